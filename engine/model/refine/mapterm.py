"""The map term of model refinement: the model's density against the target map by FSC, FRC,
relative entropy, cross-correlation or inner product, with automatic blur and Fourier
cropping."""

from __future__ import annotations

import math

import numpy as np
import torch

from cryogmm.core import similarity as core_similarity
from cryogmm.core.fourier import fourier_crop, half_spectrum_weights, n_shells, rfftn_ortho, shell_of_grid
from cryogmm.core.gaussians import Gaussians, sigma_from_resolution
from cryogmm.core.projection import project, project_map
from cryogmm.errors import OptionError
from cryogmm.model.density import blau_lindahl_sigma, splat
from cryogmm.model.refine.config import SIMILARITIES


class MapTerm:
    """A map similarity between the model's heavy atoms and a (blurred, binned) map."""

    def __init__(self, grid, resolution_A: float, similarity: str, amp: torch.Tensor, blur_A: float = 0.0,
                 dtype=torch.float64, device="cpu", resample: bool = True):
        from scipy.ndimage import gaussian_filter

        self.similarity = similarity
        data = grid.data.astype(np.float64)
        s_model = blau_lindahl_sigma(resolution_A)
        if similarity in ("fsc", "frc"):

            s_model = sigma_from_resolution(resolution_A)
        # fsc on a Fourier-cropped grid (see below): a blur is a radial filter, to which FSC is
        # blind, so it only lowers the last scored shell; neither map is blurred
        fsc_fast = similarity == "fsc" and resample
        self.sigma = math.sqrt(s_model**2 + blur_A**2) if not fsc_fast else s_model
        self.cut = 3.0
        if blur_A > 0 and not fsc_fast:
            data = gaussian_filter(data, blur_A / grid.apix, mode="constant")
        b = max(1, int(self.sigma / (1.2 * grid.apix))) if blur_A > 0 and not fsc_fast else 1
        data = data[::b, ::b, ::b]
        self.apix = grid.apix * b
        self.origin = np.asarray(grid.origin_A, dtype=np.float64)
        self.ref = torch.as_tensor(np.ascontiguousarray(data), dtype=dtype, device=device)
        self.amp = amp
        self.resolution_A = max(resolution_A, 2.0 * self.apix, math.sqrt(resolution_A**2 + (2.5 * blur_A) ** 2))
        n = self.ref.shape[-1]
        self.cubic = self.ref.shape[0] == self.ref.shape[1] == self.ref.shape[2]
        if similarity in ("fsc", "frc") and not self.cubic:
            # Fourier shells need a cube: pad at the far edges with the map's mean (the origin
            # stays; the model map is spread on the same padded grid)
            m = max(self.ref.shape)
            pad = torch.full((m, m, m), float(self.ref.mean()), dtype=dtype, device=device)
            pad[:self.ref.shape[0], :self.ref.shape[1], :self.ref.shape[2]] = self.ref
            self.ref, self.cubic = pad, True
            n = m
        if fsc_fast:
            # FSC is blind to a radial filter, so the model may be spread wider than its
            # resolution asks (less aliasing) on a coarser grid: the reference is Fourier-cropped
            # to ~resolution/3 per voxel (the last scored shell at 2/3 Nyquist) and the model's
            # Gaussians widened to >= 0.75 voxel, spread to 4 sigma. Same shells, same score to
            # ~1e-3 (tests/test_restraints.py); on adenylate kinase at 4 Å 80^3 -> 60^3 voxels,
            # and 14^3 -> 12^3 with an 8 Å blur, whose model Gaussians spread over 8^3 voxels
            # instead of 12^3 (the map term of a refinement step 3x to 7x cheaper).
            target = self.resolution_A / 3.0
            if target > 1.15 * self.apix:
                m = 2 * int(round(n * self.apix / target / 2))
                if 8 <= m < n:
                    self.ref = fourier_crop(self.ref, m)
                    self.apix = n * self.apix / m
                    n = m
            if self.sigma < 0.75 * self.apix:  # widened: spread further, its far shells are faint
                self.sigma, self.cut = 0.75 * self.apix, 4.0
        self.kmax = max(2, int(round(n * self.apix / self.resolution_A, 9)))
        self._proj = None
        if similarity == "frc":
            self._setup_frc(dtype, device)
        if similarity == "fsc":
            self._setup_fsc()

    def _setup_frc(self, dtype, device):
        rng = np.random.default_rng(0)
        q = rng.normal(size=(24, 4))
        q /= np.linalg.norm(q, axis=1, keepdims=True)
        w, x, y, z = q.T
        R = np.stack([
            np.stack([1 - 2 * (y * y + z * z), 2 * (x * y - z * w), 2 * (x * z + y * w)], -1),
            np.stack([2 * (x * y + z * w), 1 - 2 * (x * x + z * z), 2 * (y * z - x * w)], -1),
            np.stack([2 * (x * z - y * w), 2 * (y * z + x * w), 1 - 2 * (x * x + y * y)], -1)], 1)
        self.rot = torch.as_tensor(R, dtype=dtype, device=device)
        self._proj = project_map(self.ref, self.rot, None, self.apix)
        n = self.ref.shape[-1]
        self.box_center = self.origin + (n // 2) * self.apix

    def _setup_fsc(self):
        """The reference's half spectrum on the scored shells (1..kmax), once: each score is
        then one FFT of the model map and sums over those voxels only."""

        n, dev, dt = self.ref.shape[-1], self.ref.device, self.ref.dtype
        f2 = torch.fft.rfftn(self.ref, norm="ortho").reshape(-1)
        shell = shell_of_grid(n, 3, dev, half=True).reshape(-1)
        w = half_spectrum_weights(n, dev, dt).expand(n, n, -1).reshape(-1)
        ns = n_shells(n)
        self._fsc_in = (shell < ns).to(dt) * w  # weights of every voxel up to Nyquist (total power)
        sel = torch.nonzero((shell >= 1) & (shell <= self.kmax)).reshape(-1)
        self._fsc_sel, self._fsc_shell, self._fsc_w = sel, shell[sel] - 1, w[sel]
        self._f2 = f2[sel]
        p2 = torch.zeros(self.kmax, dtype=dt, device=dev).index_add(0, self._fsc_shell, self._fsc_w * f2[sel].abs() ** 2)
        self._t2 = float(((f2.abs() ** 2) * self._fsc_in).sum().clamp_min(torch.finfo(dt).tiny))
        self._p2n = torch.sqrt((p2 / self._t2).clamp_min(1e-12))

    def _fsc_score(self, sim):
        """Mean FSC over shells 1..kmax of ``sim`` against the reference (= core_similarity.fsc)."""
        f1 = rfftn_ortho(sim).reshape(-1)
        tiny = torch.finfo(sim.dtype).tiny
        t1 = ((f1.real ** 2 + f1.imag ** 2) * self._fsc_in).sum().detach().clamp_min(tiny)
        g = f1[self._fsc_sel]
        w, sh = self._fsc_w, self._fsc_shell
        cross = torch.zeros(self.kmax, dtype=sim.dtype, device=sim.device).index_add(
            0, sh, w * (g.real * self._f2.real + g.imag * self._f2.imag))
        p1 = torch.zeros_like(cross).index_add(0, sh, w * (g.real ** 2 + g.imag ** 2))
        den = torch.sqrt((p1 / t1).clamp_min(1e-12)) * self._p2n
        return (cross / (torch.sqrt(t1) * math.sqrt(self._t2)) / den).mean()

    def model_map(self, x):
        return splat(x, self.amp, self.sigma, tuple(self.ref.shape), self.apix, self.origin, cut=self.cut)

    def score(self, x) -> torch.Tensor:
        """Similarity (larger is better) of heavy-atom coordinates ``x [N, 3]``."""

        s = self.similarity
        if s == "frc":

            c = x - torch.as_tensor(self.box_center, dtype=x.dtype, device=x.device)
            g = Gaussians(c, self.amp, torch.full_like(self.amp, self.sigma))
            img = project(g, self.rot, None, self.ref.shape[-1], self.apix)
            curve = core_similarity.frc(img, self._proj)  # [B, shells]
            return curve[:, 1:self.kmax + 1].mean()
        sim = self.model_map(x)
        if s == "relative-entropy":
            return core_similarity.relative_entropy(sim, self.ref)
        if s == "cross-correlation":
            return core_similarity.cross_correlation(sim, self.ref)
        if s == "inner-product":
            # GROMACS's inner product of normalised densities, x voxels: ~2e-3 on adenylate
            # kinase. Scaled to 1 for the map itself, it pulled the closed model into the densest
            # regions (13.5 Å from the open model, 11 % Rama outliers); as it is, the rigid
            # stages' weight floor holds the patches (9.1 Å). The measure rewards density
            # overlap without penalising crowding: fsc, frc or cross-correlation suit this job.
            return core_similarity.inner_product(sim, self.ref) * sim.numel()
        if s == "fsc":
            return self._fsc_score(sim)
        raise OptionError("--similarity", f"unknown {s!r}; expected one of {', '.join(SIMILARITIES)}")
