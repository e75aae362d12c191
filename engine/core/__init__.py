"""Pure tensor primitives (no I/O, no jobs): Gaussians, rotations, projection, Fourier helpers,
CTF, similarities, masks, symmetry, k-means and PCA. Imports only torch/numpy/scipy and
``cryogmm.errors``."""
