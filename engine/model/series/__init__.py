"""``cryogmm refine-series``: one network maps a latent coordinate to an atomic model fitted to a
series of maps."""
