"""Rotations in torch: differentiable, batch-first, safe at the identity.

Matrices follow RELION's convention (``cryogmm.bridge.conventions``); angles in radians
unless a name says ``deg``.
"""

from __future__ import annotations

import numpy as np
import torch


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


def random_rotations(n: int, rng: np.random.Generator) -> np.ndarray:
    """``n`` rotations uniform on SO(3) (normalised Gaussian quaternions): ``[n, 3, 3]``."""
    from scipy.spatial.transform import Rotation

    q = rng.standard_normal((n, 4))
    return Rotation.from_quat(q / np.linalg.norm(q, axis=1, keepdims=True)).as_matrix()


def perturb_rotations(R: np.ndarray, sd_deg: float, rng: np.random.Generator) -> np.ndarray:
    """Compose each rotation with a random one about a uniform axis by an angle ~ |N(0, sd)|."""
    from scipy.spatial.transform import Rotation

    axis = rng.standard_normal((len(R), 3))
    axis /= np.linalg.norm(axis, axis=1, keepdims=True)
    ang = np.deg2rad(rng.normal(0.0, sd_deg, len(R)))
    return R @ Rotation.from_rotvec(axis * ang[:, None]).as_matrix()


def weighted_kabsch(P: torch.Tensor, Q: torch.Tensor, w: torch.Tensor):
    """Rigid motion that best maps points ``P [B, N, 3]`` onto ``Q [N, 3]`` (or ``[B, N, 3]``)
    with weights ``w [N] >= 0``: ``(Rot [B, 3, 3], t [B, 3])`` minimising
    ``sum_j w_j |Rot p_j + t - q_j|^2`` (Kabsch with the reflection guard)."""
    P = P.double()
    Q = Q.double().expand_as(P)
    w = (w.double() / w.double().sum()).to(P.device)
    pc = (w[None, :, None] * P).sum(1)
    qc = (w[None, :, None] * Q).sum(1)
    H = ((P - pc[:, None]) * w[None, :, None]).transpose(1, 2) @ (Q - qc[:, None])
    U, _, Vt = torch.linalg.svd(H)
    d = torch.sign(torch.linalg.det(Vt.transpose(1, 2) @ U.transpose(1, 2)))
    D = torch.diag_embed(torch.stack([torch.ones_like(d), torch.ones_like(d), d], -1))
    Rot = Vt.transpose(1, 2) @ D @ U.transpose(1, 2)
    t = qc - (Rot @ pc[:, :, None])[:, :, 0]
    return Rot, t


def kabsch(P: np.ndarray, Q: np.ndarray):
    """Rotation ``R`` and translation ``t`` minimising ``|| (Q R^T + t) - P ||`` (rows are points;
    numpy in and out): :func:`weighted_kabsch` of ``Q`` onto ``P`` with equal weights."""
    Rot, t = weighted_kabsch(torch.as_tensor(Q, dtype=torch.float64)[None], torch.as_tensor(P, dtype=torch.float64),
                             torch.ones(len(P), dtype=torch.float64))
    return Rot[0].numpy(), t[0].numpy()


def dihedral(p0, p1, p2, p3) -> torch.Tensor:
    """Dihedral angle (radians, (-pi, pi]) of points ``[..., 3]``; atan2 form, smooth
    gradients except at collinear atoms."""
    b0, b1, b2 = p1 - p0, p2 - p1, p3 - p2
    n1 = torch.cross(b0, b1, dim=-1)
    n2 = torch.cross(b1, b2, dim=-1)
    b1n = b1 / b1.norm(dim=-1, keepdim=True)
    m = torch.cross(n1, b1n, dim=-1)
    return -torch.atan2((m * n2).sum(-1), (n1 * n2).sum(-1))


def axis_rotation(axis, deg):
    """Rotation matrices about unit vectors ``axis [..., 3]`` by ``deg [...]`` degrees
    (Rodrigues); one vector and one angle give one ``[3, 3]`` matrix."""
    axis = np.asarray(axis, dtype=np.float64)
    t = np.radians(np.asarray(deg, dtype=np.float64))
    k = np.zeros(axis.shape[:-1] + (3, 3))
    k[..., 0, 1], k[..., 0, 2], k[..., 1, 2] = -axis[..., 2], axis[..., 1], -axis[..., 0]
    k[..., 1, 0], k[..., 2, 0], k[..., 2, 1] = axis[..., 2], -axis[..., 1], axis[..., 0]
    return np.eye(3) + np.sin(t)[..., None, None] * k + (1 - np.cos(t))[..., None, None] * (k @ k)


def dihedral_deg(p0, p1, p2, p3):
    """Dihedral angles (degrees, numpy) of points ``[..., 3]``: one angle for four points ``[3]``,
    one per row for ``[C, 3]`` (the same angle as :func:`dihedral`)."""
    b0, b1, b2 = p0 - p1, p2 - p1, p3 - p2
    b1n = b1 / np.linalg.norm(b1, axis=-1, keepdims=True)
    v = b0 - (b0 * b1n).sum(-1, keepdims=True) * b1n
    w = b2 - (b2 * b1n).sum(-1, keepdims=True) * b1n
    return np.degrees(np.arctan2((np.cross(b1n, v) * w).sum(-1), (v * w).sum(-1)))


