"""Patch-by-patch refinement: k-means patches of a mixture as soft masks, and the composite
map assembled from the patches' maps."""

from __future__ import annotations

import math

import torch

from cryogmm.core.kmeans import weighted_kmeans
from cryogmm.errors import OptionError


def patch_masks(g, k: int, box: int, apix: float, *, edge_px: float = 4.0, seed: int = 0):
    """Split a mixture into ``k`` patches by amplitude-weighted k-means of its centres and
    make a soft spherical mask per patch (centre: the patch's amplitude-weighted centroid;
    radius: 1.25 times the weighted RMS distance of its Gaussians plus two widths, so weak
    Gaussians fitted to noise far out do not inflate it). Returns
    ``(masks [k, N, N, N], info)`` with ``info`` a list of dicts (centre_A, radius_A, n)."""

    if not 1 <= k <= g.n:
        raise OptionError("--patches", f"{k}; expected 1..{g.n} (the number of Gaussians)")
    gen = torch.Generator().manual_seed(seed)
    c = g.centers.detach().cpu().double()
    w = g.amplitudes.detach().cpu().double().abs().clamp_min(1e-12)
    centres, labels = weighted_kmeans(c, w, k, iterations=50, generator=gen)
    ax = (torch.arange(box, dtype=torch.float64) - box // 2) * apix
    Z, Y, X = torch.meshgrid(ax, ax, ax, indexing="ij")
    masks, info = [], []
    sig = float(g.sigmas.detach().cpu().median())
    for j in range(k):
        sel = labels == j
        cj = (c[sel] * w[sel, None]).sum(0) / w[sel].sum()
        d2 = ((c[sel] - cj) ** 2).sum(1)
        radius = 1.25 * float(torch.sqrt((d2 * w[sel]).sum() / w[sel].sum())) + 2 * sig
        r = torch.sqrt((X - cj[0]) ** 2 + (Y - cj[1]) ** 2 + (Z - cj[2]) ** 2) / apix
        edge = edge_px
        m = torch.clamp((radius / apix + edge - r) / edge, 0, 1)
        m = 0.5 - 0.5 * torch.cos(math.pi * m)
        masks.append(m.float())
        info.append({"patch": j + 1, "centre_A": cj.tolist(), "radius_A": radius, "n_gaussians": int(sel.sum())})
    return torch.stack(masks), info


def composite(maps, masks, background):
    """Mask-weighted average of per-patch maps: ``(sum_k M_k V_k + w0 V0) / (sum_k M_k + w0)``
    with ``w0 = max(0, 1 - sum_k M_k)`` giving ``background`` where no patch reaches."""
    msum = masks.sum(0)
    w0 = (1.0 - msum).clamp_min(0)
    num = sum(m * v for m, v in zip(masks, maps)) + w0 * background
    return num / (msum + w0).clamp_min(1e-6)
