"""Particles for heterogeneity training: images Fourier-cropped to the low-pass, with CTFs,
poses and shifts as tensors; the Fourier-space projection of Gaussians at those poses."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from cryogmm.bridge.images import ImageSource
from cryogmm.bridge.io import read_particles
from cryogmm.core.ctf import CtfParams, ctf_rfft2, rfft2_frequencies
from cryogmm.core.gaussians import Gaussians
from cryogmm.core.projection import rotate_centers
from cryogmm.errors import OptionError, StarError


# --------------------------------------------------------------------------- particles
def crop_size(box: int, apix: float, lowpass_A: float) -> int:
    """Even crop (px) whose Nyquist reaches ``lowpass_A`` (with a small margin), at most ``box``."""
    k = math.ceil(box * apix / lowpass_A)
    return int(min(box, 2 * (k + 1)))


def _crop_rows(box: int, crop: int):
    return np.concatenate([np.arange(crop // 2), np.arange(box - crop // 2, box)])


@dataclass
class ParticleData:
    """Particles in memory, Fourier-cropped: ``ft [n, crop, crop//2+1]`` complex (``rfft2``
    layout, orthonormal: white noise of variance ``noise_var`` per pixel keeps that variance
    per coefficient), poses ``rotmat [n,3,3]``, ``shift_A [n,2]``, CTF on the cropped grid
    computed per batch from ``table``."""

    table: object
    ft: torch.Tensor
    rotmat: torch.Tensor
    shift_A: torch.Tensor
    box: int
    apix: float
    crop: int
    noise_var: float
    band: torch.Tensor  # [crop, crop//2+1] weights (0 outside the loss band, 2 for mirrored columns)
    k2: torch.Tensor  # |k|^2 (1/Å^2) on the cropped grid
    kx: torch.Tensor
    ky: torch.Tensor

    @property
    def n(self) -> int:
        return int(self.ft.shape[0])

    @property
    def apix_crop(self) -> float:
        return self.apix * self.box / self.crop

    def ctf(self, idx) -> torch.Tensor:
        return ctf_rfft2(CtfParams.from_table(self.table, np.asarray(idx)), self.crop, self.apix_crop)

    def images_real(self, ft: torch.Tensor) -> torch.Tensor:
        """Cropped transforms -> centred real images ``[B, crop, crop]``."""
        return torch.fft.fftshift(torch.fft.irfft2(ft, s=(self.crop, self.crop), norm="ortho"), dim=(-2, -1))


def load_particles(star, *, lowpass_A: float, project_dir=None, radius_A: float | None = None, batch: int = 512,
                   max_particles: int | None = None, progress=None) -> ParticleData:
    """Read a STAR (or .cs) with poses and CTF and Fourier-crop every image to ``lowpass_A``.

    The noise variance is measured in real space outside ``radius_A`` (default 0.8 x the box
    radius): the mean variance of those pixels over the particles.
    """

    progress = progress or (lambda *a: None)
    star = Path(star)
    if not star.is_file():
        raise StarError(star, "no such file")
    table = read_particles(star, project_dir=project_dir)
    table.require(poses=True, ctf=True, why="heterogeneity training (poses from a consensus refinement, and CTF)")
    if table.n < 2:
        raise StarError(star, f"holds {table.n} particle(s); heterogeneity needs many")
    if max_particles is not None and table.n > max_particles:
        table = table.subset(np.arange(max_particles))
    boxes, apixes = np.unique(table.box), np.unique(np.round(table.apix, 6))
    if len(boxes) != 1 or len(apixes) != 1:
        raise StarError(star, f"particles of several box sizes {boxes.tolist()} or pixel sizes {apixes.tolist()}; "
                        "use one optics setting")
    box, apix = int(boxes[0]), float(apixes[0])
    if lowpass_A < 2 * apix:
        raise OptionError("--lowpass-A", f"{lowpass_A:g} Å is beyond Nyquist ({2 * apix:g} Å) of {star}")
    crop = crop_size(box, apix, lowpass_A)
    rows = torch.as_tensor(_crop_rows(box, crop))
    src = ImageSource.from_table(table)
    yy, xx = np.mgrid[:box, :box] - box // 2
    r = np.hypot(yy, xx) * apix
    rad = 0.8 * box // 2 * apix if radius_A is None else radius_A
    outside = torch.as_tensor(r > rad)
    fts, var_sum, var_n = [], 0.0, 0
    for idx, imgs in src.chunks(batch):
        x = torch.as_tensor(imgs)
        if outside.any():
            bg = x[:, outside]
            var_sum += float(bg.var(dim=1).sum())
            var_n += len(idx)
        f = torch.fft.rfft2(torch.fft.ifftshift(x, dim=(-2, -1)), norm="ortho")
        fts.append(f[:, rows, : crop // 2 + 1].clone())
        progress("read particles", int(idx[-1]) + 1, table.n)
    src.close()
    ft = torch.cat(fts)
    if var_n == 0:
        raise StarError(star, f"images of {box} px leave no pixels outside {rad:g} Å to measure the noise")
    noise_var = var_sum / var_n
    if not np.isfinite(noise_var) or noise_var <= 0:
        raise StarError(star, "images have no variance outside the particle (blank or masked images?)")

    ky, kx = rfft2_frequencies(crop, apix * box / crop, dtype=torch.float64)
    k2 = kx**2 + ky**2
    band = ((k2 <= (1.0 / lowpass_A) ** 2) & (k2 > 0)).double()
    band[:, 1: crop // 2] *= 2.0  # columns with a mirrored twin in the full transform
    return ParticleData(
        table=table, ft=ft, rotmat=torch.as_tensor(table.rotmat, dtype=torch.float32),
        shift_A=torch.as_tensor(table.shift_A, dtype=torch.float32), box=box, apix=apix, crop=crop,
        noise_var=float(noise_var), band=band.float(), k2=k2.float(), kx=kx[0].float(), ky=ky[:, 0].float(),
    )


# --------------------------------------------------------------------------- forward model
def project_fourier(g: Gaussians, rotmat: torch.Tensor, shift_A: torch.Tensor | None, kx: torch.Tensor,
                    ky: torch.Tensor) -> torch.Tensor:
    """Fourier transforms of the projections of a mixture: ``[B, len(ky), len(kx)]`` complex.

    ``P(k) = sum_n a_n exp(-2 pi^2 s_n^2 |k|^2) exp(-2 pi i k . x_n)`` with ``x_n = (A c_n)[:2] -
    shift`` (the image-plane position, as :func:`cryogmm.project.project`), ``kx``, ``ky`` in
    1/Å. Separable: one complex batched matrix product. ``g`` may carry per-image centres
    ``[B, N, 3]``. Equals the continuous transform of the projected density (e/Å^2 integrated
    over the plane), so ``P / apix^3`` is the DFT of the image ``project`` draws.
    """

    xy, _ = rotate_centers(g.centers, rotmat, shift_A)
    B = xy.shape[0]
    s = g.sigmas.expand(B, -1) if g.sigmas.dim() == 1 else g.sigmas
    a = g.amplitudes.expand(B, -1) if g.amplitudes.dim() == 1 else g.amplitudes
    two_pi = 2.0 * math.pi
    s2 = (two_pi**2 / 2.0) * s[..., None] ** 2
    ex = torch.exp(-s2 * kx**2) * a[..., None]  # [B, N, kx]
    ey = torch.exp(-s2 * ky**2)
    px = -two_pi * xy[..., 0, None] * kx
    py = -two_pi * xy[..., 1, None] * ky
    cx = torch.complex(ex * torch.cos(px), ex * torch.sin(px))
    cy = torch.complex(ey * torch.cos(py), ey * torch.sin(py))
    return torch.bmm(cy.transpose(1, 2), cx)
