"""Soft masks: a sphere with a raised-cosine edge, and a mask from a map's density (threshold,
extend, soft edge)."""

from __future__ import annotations

import torch

from cryogmm.core.fourier import as_real_tensor, raised_cosine

# --------------------------------------------------------------------------- masks


def soft_sphere_mask(
    box: int,
    radius_px: float,
    edge_px: float = 6,
    device=None,
    dtype=torch.float32,
    ndim: int = 3,
) -> torch.Tensor:
    """A sphere (or, with ``ndim=2``, a disc) with a raised-cosine edge.

    Args:
        box: box size ``N`` in pixels; the centre is voxel ``(N//2, N//2, N//2)``.
        radius_px: radius in pixels within which the mask is 1.
        edge_px: width of the cosine fall-off; the mask is 0 beyond ``radius_px + edge_px``.
            ``0`` gives a hard mask.

    Returns:
        ``[N, N, N]`` (or ``[N, N]``) tensor with values in [0, 1], non-increasing with the
        distance from the centre.
    """
    c = torch.arange(int(box), device=device, dtype=torch.float64) - int(box) // 2
    grids = torch.meshgrid(*([c] * ndim), indexing="ij")
    r = torch.sqrt(sum(g * g for g in grids))
    return raised_cosine(r, float(radius_px), float(edge_px)).to(dtype)


def soft_mask_from_map(map, threshold: float, extend_px: float = 3, edge_px: float = 6) -> torch.Tensor:
    """A soft mask around the density of ``map`` (as ``relion_mask_create`` makes them).

    Voxels with ``map >= threshold`` form the initial binary mask; it is grown by
    ``extend_px`` pixels (Euclidean distance; a negative value shrinks it) and then given
    a raised-cosine edge ``edge_px`` pixels wide, falling from 1 at distance ``extend_px``
    to 0 at ``extend_px + edge_px`` from the binary mask.

    Args:
        map: ``[N, N, N]`` map (or a 2-D image); not batched.
        threshold: density value for binarisation, in the map's units.

    Returns:
        Mask of the map's shape, on its device, in its dtype (float32 for integer maps).
        Not differentiable (binarisation).
    """
    import numpy as np
    from scipy import ndimage

    m = as_real_tensor(map)
    binary = (m >= threshold).detach().cpu().numpy()
    if not binary.any():
        raise ValueError(
            f"soft_mask_from_map: threshold {threshold} is above the map's maximum "
            f"{float(m.max()):.6g}: expected a threshold that selects some voxels"
        )
    outside = ndimage.distance_transform_edt(~binary) if not binary.all() else np.zeros(binary.shape)
    inside = ndimage.distance_transform_edt(binary)
    # signed distance: 0 on the boundary layer of the binary mask, negative deeper inside
    signed = np.where(binary, 1.0 - inside, outside)
    d = torch.as_tensor(signed, device=m.device, dtype=torch.float64)
    return raised_cosine(d, float(extend_px), float(edge_px)).to(m.dtype)
