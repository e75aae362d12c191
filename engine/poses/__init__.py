"""Orientation refinement of particles against Gaussian mixtures (``cryogmm refine-poses``):
batch alignment, patches, symmetry expansion, conformation to orientation, the job."""
