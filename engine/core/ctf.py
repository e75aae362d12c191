"""The contrast transfer function, by RELION's formula (``ctf.h``), one implementation.

Simulation, projection and reconstruction all call :func:`ctf_rfft2`; nothing else in
cryogmm evaluates a CTF. Images are real-space ``[..., N, N]`` with the centre at
``N // 2``; their Fourier transforms use the ``rfft2`` layout ``[..., N, N // 2 + 1]`` of
``torch.fft.rfft2(torch.fft.ifftshift(img, dim=(-2, -1)))``.

RELION's definitions: ``lambda = 12.2643247 / sqrt(V (1 + 0.978466e-6 V))`` (Å, V in
volts); ``deltaf(angle) = -(dU + dV)/2 - (dU - dV)/2 cos(2 (atan2(ky, kx) - azimuth))``;
``chi = pi lambda deltaf |k|^2 + pi/2 Cs lambda^3 |k|^4 - phase_shift - atan(Q0/sqrt(1-Q0^2))``;
``CTF = -scale sin(chi) exp(-B |k|^2 / 4)``. Defocus in Å (underfocus positive, as in
``rlnDefocusU``), Cs in mm, angles in degrees, frequencies in 1/Å.
"""

from __future__ import annotations

import math

import torch


def rfft2_frequencies(box: int, apix: float, device=None, dtype=torch.float32):
    """Frequencies (1/Å) of the ``rfft2`` grid of a ``box``-pixel image: ``(ky, kx)``, each
    ``[box, box // 2 + 1]``."""
    ky = torch.fft.fftfreq(box, d=apix, device=device, dtype=dtype)
    kx = torch.fft.rfftfreq(box, d=apix, device=device, dtype=dtype)
    return torch.meshgrid(ky, kx, indexing="ij")


class CtfParams:
    """Per-particle CTF parameters as tensors of shape ``[B]`` (see module docstring for units)."""

    FIELDS = (
        "defocus_u_A",
        "defocus_v_A",
        "defocus_angle_deg",
        "voltage_kV",
        "cs_mm",
        "amp_contrast",
        "phase_shift_deg",
        "bfactor_A2",
        "scale",
    )
    DEFAULTS = {"phase_shift_deg": 0.0, "bfactor_A2": 0.0, "scale": 1.0}

    def __init__(self, **kw):
        n = None
        for f in self.FIELDS:
            if f not in kw and f not in self.DEFAULTS:
                raise TypeError(f"CtfParams: missing {f}")
        vals = {f: kw.get(f, self.DEFAULTS.get(f)) for f in self.FIELDS}
        tensors = {f: torch.as_tensor(v, dtype=torch.float64).reshape(-1) for f, v in vals.items()}
        n = max(t.numel() for t in tensors.values())
        for f, t in tensors.items():
            setattr(self, f, t.expand(n) if t.numel() == 1 else t)
        self.n = n

    @classmethod
    def from_table(cls, table, indices=None):
        """From a :class:`cryogmm.bridge.table.ParticleTable` (optionally a subset of rows)."""
        import numpy as np

        idx = slice(None) if indices is None else np.asarray(indices)
        return cls(
            defocus_u_A=table.defocus_u_A[idx],
            defocus_v_A=table.defocus_v_A[idx],
            defocus_angle_deg=table.defocus_angle_deg[idx],
            voltage_kV=table.voltage_kV[idx],
            cs_mm=table.cs_mm[idx],
            amp_contrast=table.amp_contrast[idx],
            phase_shift_deg=table.phase_shift_deg[idx],
            bfactor_A2=table.bfactor_A2[idx],
            scale=table.ctf_scale[idx],
        )


def ctf_rfft2(params: CtfParams, box: int, apix: float, device=None, dtype=torch.float32):
    """RELION's CTF on the ``rfft2`` grid: ``[B, box, box // 2 + 1]`` real values.

    Computed in float64 (the phase ``chi`` reaches thousands of radians at high frequency
    and large defocus) and returned in ``dtype``.
    """
    ky, kx = rfft2_frequencies(box, apix, device=device, dtype=torch.float64)
    p = {f: getattr(params, f).to(device=device)[:, None, None] for f in CtfParams.FIELDS}
    V = p["voltage_kV"] * 1e3
    lam = 12.2643247 / torch.sqrt(V * (1.0 + V * 0.978466e-6))
    q0 = p["amp_contrast"]
    k1 = math.pi * lam
    k2 = math.pi / 2.0 * p["cs_mm"] * 1e7 * lam**3
    k3 = torch.atan(q0 / torch.sqrt(1.0 - q0**2))
    k4 = -p["bfactor_A2"] / 4.0
    k5 = torch.deg2rad(p["phase_shift_deg"])
    u2 = kx**2 + ky**2
    ang = torch.atan2(ky, kx) - torch.deg2rad(p["defocus_angle_deg"])
    defocus_avg = -(p["defocus_u_A"] + p["defocus_v_A"]) * 0.5
    defocus_dev = -(p["defocus_u_A"] - p["defocus_v_A"]) * 0.5
    deltaf = defocus_avg + defocus_dev * torch.cos(2.0 * ang)
    chi = k1 * deltaf * u2 + k2 * u2**2 - k5 - k3
    ctf = -torch.sin(chi) * torch.exp(k4 * u2) * p["scale"]
    return ctf.to(dtype)


def apply_ctf(images: torch.Tensor, ctf: torch.Tensor) -> torch.Tensor:
    """Multiply centred real images ``[B, N, N]`` by a CTF ``[B, N, N // 2 + 1]`` in Fourier space."""
    n = images.shape[-1]
    f = torch.fft.rfft2(torch.fft.ifftshift(images, dim=(-2, -1)))
    out = torch.fft.irfft2(f * ctf, s=(n, n))
    return torch.fft.fftshift(out, dim=(-2, -1))
