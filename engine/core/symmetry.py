"""Point-group symmetry (Cn, Dn) in RELION's convention: operators, map symmetrisation and
symmetry expansion of particle tables.

RELION's convention: the n-fold axis of Cn and Dn is z; the extra two-fold axes of Dn lie in
the xy plane, the first one along x. An operator ``R`` is a rotation of the map frame with
``V(R r) = V(r)`` for a symmetric map ``V``; the group contains the identity first.

Symmetry expansion (as ``relion_particle_symmetry_expand``): a particle with pose ``A`` is
also a view of the same map at pose ``A R`` for every operator ``R`` (the projection of a
symmetric map is unchanged), so an expanded copy carries pose ``A R_k``. Focused work then
brings every symmetry copy of a region under one mask.
"""

from __future__ import annotations

import math
import re

import numpy as np
import torch

from cryogmm.errors import OptionError


def _rot_z(a: float) -> np.ndarray:
    c, s = math.cos(a), math.sin(a)
    return np.array([[c, -s, 0.0], [s, c, 0.0], [0.0, 0.0, 1.0]])


def symmetry_operators(sym: str) -> np.ndarray:
    """Operators ``[K, 3, 3]`` (float64) of ``C1``, ``Cn`` or ``Dn`` (case-insensitive);
    the identity comes first."""
    m = re.fullmatch(r"([CcDd])(\d+)", str(sym).strip())
    if not m or int(m.group(2)) < 1:
        raise OptionError("--sym", f"{sym!r}; expected C1, Cn or Dn with n >= 1 (e.g. C2, D7)")
    kind, n = m.group(1).upper(), int(m.group(2))
    ops = [_rot_z(2 * math.pi * k / n) for k in range(n)]
    if kind == "D":
        flip = np.diag([1.0, -1.0, -1.0])  # two-fold about x
        ops += [r @ flip for r in ops]
    return np.stack(ops)


def rotate_map(volume: torch.Tensor, R, apix: float = 1.0) -> torch.Tensor:
    """The map ``W(r) = V(R^T r)``: ``V [N, N, N]`` (``[z, y, x]``, centre ``N // 2``) turned
    by the rotation ``R [3, 3]`` about its centre (trilinear interpolation, zero outside).
    ``apix`` cancels out; it is accepted so callers can pass their pixel size for clarity."""
    v = torch.as_tensor(volume)
    n = v.shape[-1]
    R = torch.as_tensor(np.asarray(R), dtype=v.dtype, device=v.device)
    ax = torch.arange(n, dtype=v.dtype, device=v.device) - n // 2
    Z, Y, X = torch.meshgrid(ax, ax, ax, indexing="ij")
    r = torch.stack([X, Y, Z], -1).reshape(-1, 3)
    src = r @ R  # rows: R^T r
    # grid_sample wants (x, y, z) in [-1, 1] with align_corners=True: index i -> -1 + 2 i/(n-1)
    grid = (src + n // 2) * (2.0 / (n - 1)) - 1.0
    out = torch.nn.functional.grid_sample(v[None, None], grid.reshape(1, n, n, n, 3), mode="bilinear",
                                          padding_mode="zeros", align_corners=True)
    return out.reshape(n, n, n)


def symmetrize_map(volume: torch.Tensor, ops, weight: torch.Tensor | None = None) -> torch.Tensor:
    """Impose symmetry: the average of the map turned by every operator.

    With ``weight`` (a mask, same shape) the average is weighted:
    ``sum_k rot_k(w V) / sum_k rot_k(w)`` where any weight is present, and the plain
    average elsewhere, so a sharp masked region is copied onto its symmetry mates.
    """
    v = torch.as_tensor(volume)
    plain = sum(rotate_map(v, R) for R in ops) / len(ops)
    if weight is None:
        return plain
    w = torch.as_tensor(weight, dtype=v.dtype)
    num = sum(rotate_map(w * v, R) for R in ops)
    den = sum(rotate_map(w, R) for R in ops)
    return torch.where(den > 1e-3, num / den.clamp_min(1e-3), plain)
