"""k-means: weighted k-means of points (density seeding of Gaussian mixtures) and k-means of
Cα positions into patches (rigid patches of model refinement and model series)."""

from __future__ import annotations

import numpy as np
import torch

# --------------------------------------------------------------------------- k-means


def _nearest(points: torch.Tensor, centres: torch.Tensor, chunk: int):
    """Index of and squared distance to the nearest centre for every point, in chunks.

    ``|p - c|^2 = |p|^2 + (|c|^2 - 2 p.c)``: the bracket, one fused ``addmm`` over the
    ``[chunk, k]`` block, is all the minimum needs (``|p|^2`` is the same for every centre and
    is added to the minimum only), so the block is written once and read once."""
    c2 = (centres * centres).sum(1)
    ct = centres.T.contiguous()
    idx, d2 = [], []
    for i in range(0, points.shape[0], chunk):
        p = points[i:i + chunk]
        m = torch.addmm(c2, p, ct, alpha=-2.0).min(1)
        idx.append(m.indices)
        d2.append((m.values + (p * p).sum(1)).clamp_min(0))
    return torch.cat(idx), torch.cat(d2)


def weighted_kmeans(points: torch.Tensor, weights: torch.Tensor, k: int, *, iterations: int = 10,
                    generator: torch.Generator | None = None, chunk: int = 8192):
    """Density-weighted k-means (Lloyd) of ``points [M, D]`` with ``weights [M] > 0``.

    Seeds: ``k`` distinct points drawn with probability proportional to weight (from
    ``generator``, a CPU generator, for reproducibility). Distances are computed for
    ``chunk`` points at a time against all centres. A cell that empties is re-seeded at the
    point with the largest weighted squared distance to its centre.

    Returns ``(centres [k, D], labels [M])``.
    """
    M = points.shape[0]
    if not 1 <= k <= M:
        raise ValueError(f"weighted_kmeans: k must be in 1..{M} (the number of points), got {k}")
    seed_idx = torch.multinomial(weights.detach().to("cpu", torch.float64), k, replacement=False,
                                 generator=generator).to(points.device)
    centres = points[seed_idx].clone()
    labels = None
    for _ in range(iterations):
        new, d2 = _nearest(points, centres, chunk)
        sums = torch.zeros_like(centres).index_add_(0, new, points * weights[:, None])
        mass = torch.zeros(k, dtype=points.dtype, device=points.device).index_add_(0, new, weights)
        empty = mass <= 0
        centres = torch.where(empty[:, None], centres, sums / mass.clamp_min(torch.finfo(mass.dtype).tiny)[:, None])
        if bool(empty.any()):
            far = torch.topk(weights * d2, int(empty.sum())).indices
            centres[empty] = points[far]
        elif labels is not None and torch.equal(new, labels):
            break
        labels = new
    labels, _ = _nearest(points, centres, chunk)
    return centres, labels


def kmeans_patches(ca: np.ndarray, k: int, seed: int = 0, iters: int = 50) -> np.ndarray:
    """Assign residues (their Cα ``[R, 3]``) to ``k`` spatial patches (deterministic)."""
    r = len(ca)
    k = max(1, min(k, r))
    if k == 1:
        return np.zeros(r, dtype=np.int64)
    rng = np.random.default_rng(seed)
    cent = ca[rng.choice(r, k, replace=False)]
    lab = np.zeros(r, dtype=np.int64)
    for _ in range(iters):
        d = ((ca[:, None] - cent[None]) ** 2).sum(-1)
        lab = d.argmin(1)
        for j in range(k):
            if (lab == j).any():
                cent[j] = ca[lab == j].mean(0)
    _, lab = np.unique(lab, return_inverse=True)
    return lab
