"""Local alignment of a batch of particles against a Gaussian mixture: the band-limited FRC
score, focus widths from a mask, and the Adam refinement of rotations and shifts."""

from __future__ import annotations

import math

import torch

from cryogmm.core.gaussians import Gaussians
from cryogmm.core.projection import project
from cryogmm.core.rotations import rotvec_to_rotmat
from cryogmm.runtime import autocast


class BandFrc:
    """FRC over shells ``lo..hi`` on a Fourier-cropped grid of ``crop`` pixels.

    The crop keeps the absolute frequencies: shell ``k`` of the cropped grid is shell ``k``
    of the full box, with pixel ``apix * box / crop``.
    """

    def __init__(self, box: int, apix: float, lo: int, hi: int, device=None):
        self.box, self.lo, self.hi = box, int(lo), int(hi)
        crop = min(box, max(24, 2 * math.ceil(1.6 * hi)))
        crop += crop % 2
        self.crop = crop
        self.apix_crop = apix * box / crop
        ky = torch.fft.fftfreq(crop, d=1.0 / crop, device=device)
        kx = torch.arange(crop // 2 + 1, device=device, dtype=ky.dtype)
        KY, KX = torch.meshgrid(ky, kx, indexing="ij")
        shell = torch.round(torch.sqrt(KX**2 + KY**2)).long()
        keep = (shell >= self.lo) & (shell <= self.hi)
        self.index = torch.nonzero(keep.reshape(-1)).squeeze(1)
        self.shell = shell.reshape(-1)[self.index] - self.lo
        self.n_shells = self.hi - self.lo + 1

    def crop_ft(self, images: torch.Tensor) -> torch.Tensor:
        """Centred real images ``[B, N, N]`` -> band values of their Fourier transforms ``[B, K]``."""
        f = torch.fft.rfft2(torch.fft.ifftshift(images, dim=(-2, -1)))
        c, n = self.crop, self.box
        f = torch.cat([f[:, : c // 2, : c // 2 + 1], f[:, n - c // 2:, : c // 2 + 1]], 1)
        return f.reshape(f.shape[0], -1)[:, self.index]

    def band(self, ft_crop: torch.Tensor) -> torch.Tensor:
        """``[B, crop, crop // 2 + 1]`` -> ``[B, K]``."""
        return ft_crop.reshape(ft_crop.shape[0], -1)[:, self.index]

    def shell_sum(self, v: torch.Tensor) -> torch.Tensor:
        out = torch.zeros(v.shape[0], self.n_shells, dtype=v.dtype, device=v.device)
        return out.index_add(1, self.shell, v)

    def frc(self, x: torch.Tensor, p: torch.Tensor, x_power: torch.Tensor | None = None) -> torch.Tensor:
        """Per-shell FRC ``[B, n_shells]`` between band values ``x`` and ``p`` ``[B, K]``."""
        num = self.shell_sum((x.conj() * p).real)
        px = self.shell_sum(x.real**2 + x.imag**2) if x_power is None else x_power
        pp = self.shell_sum(p.real**2 + p.imag**2)
        return num / torch.sqrt(px * pp).clamp_min(1e-20)


def focus_widths(g, mask: torch.Tensor, apix: float):
    """Scale each Gaussian's width by ``1 / (0.25 + 0.75 M(c))`` with ``M`` the mask
    (``[N, N, N]``, 0..1) sampled trilinearly at its centre."""

    n = mask.shape[-1]
    grid = (g.centers / apix + n // 2) * (2.0 / (n - 1)) - 1.0
    m = torch.nn.functional.grid_sample(mask[None, None].to(g.centers), grid[None, None, None], mode="bilinear",
                                        padding_mode="zeros", align_corners=True).reshape(-1)
    return Gaussians(g.centers, g.amplitudes, g.sigmas / (0.25 + 0.75 * m.clamp(0, 1)))


def refine_batch(g, band: BandFrc, x: torch.Tensor, ctf: torch.Tensor, A0: torch.Tensor, s0: torch.Tensor, *,
                 steps: int, lr_rad: float, lr_A: float, precision: str = "highest"):
    """Local refinement of one batch of particles against one mixture.

    ``x [B, K]`` particle band values, ``ctf [B, K]`` their CTF on the band, ``A0 [B, 3, 3]``
    and ``s0 [B, 2]`` (Å) starting poses. Returns ``(A, shift_A, frc_mean)``. ``precision``
    ``bf16``: the projection runs under bf16 autocast on CUDA (the image comes back float32).
    """

    B = x.shape[0]
    delta = torch.zeros(B, 3, dtype=A0.dtype, device=A0.device, requires_grad=True)
    shift = s0.clone().requires_grad_(True)
    opt = torch.optim.Adam([{"params": [delta], "lr": lr_rad}, {"params": [shift], "lr": lr_A}])
    # cosine decay: large steps to leave the start, small ones to settle on the optimum
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda t: 0.5 * (1.0 + math.cos(math.pi * min(t, steps) / steps)))
    x_power = band.shell_sum(x.real**2 + x.imag**2)
    g = g.detach()
    for step in range(steps + 1):
        A = rotvec_to_rotmat(delta) @ A0
        with autocast(A0.device, precision):
            img = project(g, A, shift, band.crop, band.apix_crop)
        p = torch.fft.rfft2(torch.fft.ifftshift(img.float(), dim=(-2, -1)))
        p = band.band(p) * ctf
        score = band.frc(x, p, x_power).mean(1)
        if step == steps:  # the last pass only scores the final poses
            break
        opt.zero_grad()
        (-score.sum()).backward()
        opt.step()
        sched.step()
    return A.detach(), shift.detach(), score.detach()
