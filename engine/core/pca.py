"""Principal components of latent coordinates: the one PCA of the engine (heterogeneity
analysis writes them; the Scipion door reads them back rather than recomputing)."""

from __future__ import annotations

import numpy as np


def pca(z: np.ndarray, k: int):
    mean = z.mean(0)
    zc = z - mean
    _, s, vt = np.linalg.svd(zc, full_matrices=False)
    k = min(k, vt.shape[0])
    var = s**2 / max(1, len(z) - 1)
    return mean, vt[:k], zc @ vt[:k].T, var / var.sum()
