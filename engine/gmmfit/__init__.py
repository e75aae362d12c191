"""Gaussian mixtures fitted to maps (``cryogmm fit-gmm``, and the references of pose refinement)."""
