"""``cryogmm refine-model``: an atomic model into a map with differentiable stereochemistry."""
