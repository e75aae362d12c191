"""Every sign and unit convention of cryogmm, in one place (pure numpy, no torch).

Checked against Debian's RELION 3.1.3 (``relion_project``/``relion_reconstruct``) by
``tests/test_relion_peer.py`` and against cryoDRGN's readers by the bridge tests.

- Lengths are in Å inside the engine; pixels only at I/O edges.
- Maps are indexed ``[z, y, x]``, images ``[y, x]``; the centre is index ``N // 2``.
- RELION ZYZ Euler angles ``(rot, tilt, psi)`` in degrees give RELION's matrix ``A``
  (``Euler_angles2matrix`` in RELION's ``euler.cpp``). A point ``r = (x, y, z)`` of the
  map, in Å from the map centre, lands at image coordinates ``(A @ r)[:2]``.
- Shifts: RELION's ``rlnOriginX/YAngst`` ``o`` satisfies ``image(p) = projection(p + o)``:
  a feature at ``q`` of the un-shifted projection appears at ``q - o`` in the particle.
  RELION 3.0 ``rlnOriginX/Y`` are the same in pixels.
- cryoSPARC ``alignments3D/pose`` is a rotation vector ``v``; RELION's ``A`` is
  ``expmap(v).T``. ``alignments3D/shift`` is in pixels of ``alignments3D/psize_A`` with the
  same sign as ``rlnOriginX``. cryoSPARC CTF angles are radians, RELION's degrees.
"""

from __future__ import annotations

import numpy as np

__all__ = [
    "euler_zyz_deg_to_rotmat",
    "rotmat_to_euler_zyz_deg",
    "rotvec_to_rotmat",
    "rotmat_to_rotvec",
    "csparc_pose_to_relion_rotmat",
    "relion_rotmat_to_csparc_pose",
    "image_position_A",
    "origin_px_to_A",
    "origin_A_to_px",
    "electron_wavelength_A",
    "DEG",
]

DEG = np.pi / 180.0
_EPS = float(np.finfo(np.float32).eps)


def euler_zyz_deg_to_rotmat(rot, tilt, psi) -> np.ndarray:
    """RELION Euler angles (degrees, any broadcastable shape ``S``) -> matrices ``A`` [S, 3, 3].

    Same matrix as RELION's ``Euler_angles2matrix(rot, tilt, psi, A)``.
    """
    a = np.asarray(rot, dtype=np.float64) * DEG
    b = np.asarray(tilt, dtype=np.float64) * DEG
    g = np.asarray(psi, dtype=np.float64) * DEG
    a, b, g = np.broadcast_arrays(a, b, g)
    ca, sa, cb, sb, cg, sg = np.cos(a), np.sin(a), np.cos(b), np.sin(b), np.cos(g), np.sin(g)
    cc, cs, sc, ss = cb * ca, cb * sa, sb * ca, sb * sa
    A = np.empty(a.shape + (3, 3))
    A[..., 0, 0] = cg * cc - sg * sa
    A[..., 0, 1] = cg * cs + sg * ca
    A[..., 0, 2] = -cg * sb
    A[..., 1, 0] = -sg * cc - cg * sa
    A[..., 1, 1] = -sg * cs + cg * ca
    A[..., 1, 2] = sg * sb
    A[..., 2, 0] = sc
    A[..., 2, 1] = ss
    A[..., 2, 2] = cb
    return A


def rotmat_to_euler_zyz_deg(A) -> np.ndarray:
    """Matrices ``A`` [..., 3, 3] -> RELION Euler angles [..., 3] (rot, tilt, psi) in degrees.

    Follows RELION's ``Euler_matrix2angles``: tilt in [0, 180]; at tilt 0 or 180 all the
    in-plane rotation is put in psi and rot is 0.
    """
    A = np.asarray(A, dtype=np.float64)
    shape = A.shape[:-2]
    A = A.reshape(-1, 3, 3)
    out = np.zeros((A.shape[0], 3))
    abs_sb = np.sqrt(A[:, 0, 2] ** 2 + A[:, 1, 2] ** 2)
    gen = abs_sb > 16 * _EPS
    # general case
    gamma = np.arctan2(A[:, 1, 2], -A[:, 0, 2])
    alpha = np.arctan2(A[:, 2, 1], A[:, 2, 0])
    sg = np.sin(gamma)
    with np.errstate(divide="ignore", invalid="ignore"):
        sign_sb = np.where(
            np.abs(sg) < _EPS,
            np.sign(-A[:, 0, 2] / np.cos(gamma)),
            np.where(sg > 0, np.sign(A[:, 1, 2]), -np.sign(A[:, 1, 2])),
        )
    beta = np.arctan2(sign_sb * abs_sb, A[:, 2, 2])
    # degenerate: tilt 0 or 180
    up = A[:, 2, 2] > 0
    g_deg = np.where(up, np.arctan2(-A[:, 1, 0], A[:, 0, 0]), np.arctan2(A[:, 1, 0], -A[:, 0, 0]))
    out[:, 0] = np.where(gen, alpha, 0.0)
    out[:, 1] = np.where(gen, beta, np.where(up, 0.0, np.pi))
    out[:, 2] = np.where(gen, gamma, g_deg)
    return (out / DEG).reshape(shape + (3,))


def rotvec_to_rotmat(v) -> np.ndarray:
    """Rotation vectors [..., 3] (radians, axis * angle) -> matrices [..., 3, 3] (Rodrigues)."""
    v = np.asarray(v, dtype=np.float64)
    theta = np.linalg.norm(v, axis=-1)[..., None, None]
    K = np.zeros(v.shape[:-1] + (3, 3))
    K[..., 0, 1], K[..., 0, 2] = -v[..., 2], v[..., 1]
    K[..., 1, 0], K[..., 1, 2] = v[..., 2], -v[..., 0]
    K[..., 2, 0], K[..., 2, 1] = -v[..., 1], v[..., 0]
    small = theta < 1e-8
    t = np.where(small, 1.0, theta)
    a = np.where(small, 1.0 - theta**2 / 6.0, np.sin(t) / t)
    b = np.where(small, 0.5 - theta**2 / 24.0, (1.0 - np.cos(t)) / t**2)
    return np.eye(3) + a * K + b * (K @ K)


def rotmat_to_rotvec(R) -> np.ndarray:
    """Matrices [..., 3, 3] -> rotation vectors [..., 3] (radians), angle in [0, pi]."""
    from scipy.spatial.transform import Rotation

    R = np.asarray(R, dtype=np.float64)
    shape = R.shape[:-2]
    return Rotation.from_matrix(R.reshape(-1, 3, 3)).as_rotvec().reshape(shape + (3,))


def csparc_pose_to_relion_rotmat(pose) -> np.ndarray:
    """cryoSPARC ``alignments3D/pose`` [..., 3] -> RELION matrix ``A`` [..., 3, 3]."""
    return np.swapaxes(rotvec_to_rotmat(pose), -1, -2)


def relion_rotmat_to_csparc_pose(A) -> np.ndarray:
    """RELION matrix ``A`` [..., 3, 3] -> cryoSPARC ``alignments3D/pose`` [..., 3]."""
    return rotmat_to_rotvec(np.swapaxes(np.asarray(A, dtype=np.float64), -1, -2))


def image_position_A(A, r_A, origin_A) -> np.ndarray:
    """Where map point ``r_A`` [..., 3] (Å from the map centre) appears in the particle image.

    Returns image coordinates [..., 2] in Å from the image centre (``N // 2``), x first:
    ``(A @ r)[:2] - origin``.
    """
    A = np.asarray(A, dtype=np.float64)
    r = np.asarray(r_A, dtype=np.float64)
    return np.einsum("...ij,...j->...i", A, r)[..., :2] - np.asarray(origin_A, dtype=np.float64)


def origin_px_to_A(origin_px, apix):
    """RELION 3.0 ``rlnOriginX`` (pixels) -> 3.1 ``rlnOriginXAngst`` (Å)."""
    return np.asarray(origin_px, dtype=np.float64) * np.asarray(apix, dtype=np.float64)


def origin_A_to_px(origin_A, apix):
    """RELION 3.1 ``rlnOriginXAngst`` (Å) -> 3.0 ``rlnOriginX`` (pixels)."""
    return np.asarray(origin_A, dtype=np.float64) / np.asarray(apix, dtype=np.float64)


def electron_wavelength_A(voltage_kV):
    """Relativistic electron wavelength in Å, as RELION computes it (``ctf.cpp``)."""
    V = np.asarray(voltage_kV, dtype=np.float64) * 1e3
    return 12.2643247 / np.sqrt(V * (1.0 + V * 0.978466e-6))
