"""Rotations in torch: differentiable, batch-first, safe at the identity.

Matrices follow RELION's convention (``cryogmm.bridge.conventions``); angles in radians
unless a name says ``deg``.
"""

from __future__ import annotations

import torch

__all__ = ["rotvec_to_rotmat", "rotmat_angle_deg"]


def rotvec_to_rotmat(v: torch.Tensor) -> torch.Tensor:
    """Rotation vectors ``[..., 3]`` (axis * angle, radians) -> matrices ``[..., 3, 3]``.

    Rodrigues' formula with Taylor expansions below 1e-4 rad, so gradients are finite (and
    exact) at zero, where local refinement starts.
    """
    theta2 = (v * v).sum(-1, keepdim=True)[..., None]  # [..., 1, 1]
    small = theta2 < 1e-8
    t2 = torch.where(small, torch.ones_like(theta2), theta2)
    t = torch.sqrt(t2)
    a = torch.where(small, 1.0 - theta2 / 6.0, torch.sin(t) / t)
    b = torch.where(small, 0.5 - theta2 / 24.0, (1.0 - torch.cos(t)) / t2)
    x, y, z = v.unbind(-1)
    zero = torch.zeros_like(x)
    K = torch.stack([zero, -z, y, z, zero, -x, -y, x, zero], -1).reshape(v.shape[:-1] + (3, 3))
    eye = torch.eye(3, dtype=v.dtype, device=v.device).expand_as(K)
    return eye + a * K + b * (K @ K)


def rotmat_angle_deg(R1: torch.Tensor, R2: torch.Tensor) -> torch.Tensor:
    """Angle (degrees) of the rotation taking ``R2`` to ``R1``: ``[...]``."""
    rel = R1 @ R2.transpose(-1, -2)
    c = ((rel.diagonal(dim1=-2, dim2=-1).sum(-1) - 1.0) / 2.0).clamp(-1.0, 1.0)
    return torch.rad2deg(torch.arccos(c))
