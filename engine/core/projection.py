"""Projection of Gaussian mixtures and of maps into particle images.

Conventions (``cryogmm.bridge.conventions``): a point ``r`` of the map lands at image
coordinates ``(A r)[:2] - o`` for RELION's matrix ``A`` and origin ``o`` (Å); images are
``[B, N, N]`` indexed ``[y, x]`` with the centre at ``N // 2``. Image values are sums of map
voxels along the beam, the scale ``relion_project`` writes.
"""

from __future__ import annotations

import math

import torch

from cryogmm.core.gaussians import Gaussians, axis_factors


def rotate_centers(centers: torch.Tensor, rotmat: torch.Tensor, shift_A: torch.Tensor | None = None):
    """Image-plane positions of Gaussian centres: ``(A c)[:2] - shift``.

    ``centers`` [N, 3] or [B, N, 3]; ``rotmat`` [B, 3, 3]; ``shift_A`` [B, 2] or None.
    Returns ``[B, N, 2]`` (x, y) in Å and the depth ``[B, N]``.
    """
    pos = torch.matmul(centers, rotmat.transpose(-1, -2))  # [B, N, 3]
    xy = pos[..., :2]
    if shift_A is not None:
        xy = xy - shift_A[:, None, :]
    return xy, pos[..., 2]


def project(g: Gaussians, rotmat: torch.Tensor, shift_A: torch.Tensor | None, box: int, apix: float) -> torch.Tensor:
    """Project a mixture at ``B`` poses: ``[B, box, box]``.

    Separable: with ``X[b, n, x]`` and ``Y[b, n, y]`` the per-Gaussian 1D factors, the batch
    of images is the batched matrix product ``Y^T diag(w) X``. Differentiable in centres,
    amplitudes, widths, rotations and shifts. ``g`` may carry per-image centres ``[B, N, 3]``
    (a deformed mixture); amplitudes and widths ``[N]`` or ``[B, N]``.
    """
    xy, _ = rotate_centers(g.centers, rotmat, shift_A)
    B = xy.shape[0]
    s = g.sigmas.expand(B, -1) if g.sigmas.dim() == 1 else g.sigmas
    a = g.amplitudes.expand(B, -1) if g.amplitudes.dim() == 1 else g.amplitudes
    w = a / (2.0 * math.pi * s**2 * apix)  # line integral / apix = sum of voxels
    gx = axis_factors(xy[..., 0], s, box, apix)  # [B, N, box]
    gy = axis_factors(xy[..., 1], s, box, apix) * w[..., None]
    return torch.bmm(gy.transpose(1, 2), gx)


def project_map(volume: torch.Tensor, rotmat: torch.Tensor, shift_A: torch.Tensor | None, apix: float,
                chunk: int = 8) -> torch.Tensor:
    """Project a cubic map ``[N, N, N]`` at ``B`` poses by trilinear sampling along rays: ``[B, N, N]``.

    The image pixel ``p`` sums the map at ``A^T (p + o, z)`` over the ``N`` depth samples
    ``z``, the real-space form of the projection ``relion_project`` computes. Used by
    ``cryogmm simulate --map``.
    """
    n = volume.shape[-1]
    dev, dt = volume.device, volume.dtype
    ax = (torch.arange(n, device=dev, dtype=dt) - n // 2) * apix
    zz, yy, xx = torch.meshgrid(ax, ax, ax, indexing="ij")
    pts = torch.stack([xx, yy, zz], -1)  # [z, y, x, 3] image-frame points (x, y, depth)
    vol = volume[None, None]
    out = []
    for i in range(0, rotmat.shape[0], chunk):
        R = rotmat[i:i + chunk].to(dt)
        p = pts.unsqueeze(0).expand(R.shape[0], -1, -1, -1, -1)
        if shift_A is not None:
            o = shift_A[i:i + chunk].to(dt)
            p = p + torch.cat([o, torch.zeros_like(o[:, :1])], -1)[:, None, None, None, :]
        r = torch.einsum("bzyxj,bjk->bzyxk", p, R)  # r = A^T p  (row vector p @ A)
        grid = r / apix + n // 2  # voxel index, x first
        grid = grid * (2.0 / (n - 1)) - 1.0
        samp = torch.nn.functional.grid_sample(
            vol.expand(R.shape[0], -1, -1, -1, -1), grid, mode="bilinear", padding_mode="zeros", align_corners=True
        )  # [b, 1, z, y, x]
        out.append(samp[:, 0].sum(1))
    return torch.cat(out, 0)
