"""Direct Fourier inversion: particles with poses and CTF -> maps, gold-standard halves, FSC.

Each particle's Fourier transform is phase-shifted to undo its origin, multiplied by its
CTF and inserted on the central slice ``A^T (kx, ky, 0)`` of a 2x oversampled 3D Fourier
grid by trilinear weights, together with its Friedel mate; the CTF^2 goes into a weight
grid alongside. The map is ``F / (W + lambda)`` per voxel (inverse-transformed, corrected for
the trilinear kernel and limited to the sphere of radius N/2 with a soft edge), with ``lambda`` a small
fraction of the shell's mean weight for half maps (CTF^2-weighted inversion) and
``mean_shell(W) / SNR(k)`` from the half-map FSC for the final map (a Wiener filter).

Memory stays bounded: images are inserted batch by batch as they are read, and only the
grids (``(2N)^3 x 3`` floats per half) are kept.
"""

from __future__ import annotations

import math

import torch

from cryogmm.ctf import CtfParams, ctf_rfft2

__all__ = ["FourierAccumulator", "shell_mean"]


def _fft_index(n: int, device=None, dtype=torch.float32):
    """Signed integer frequencies of an ``n``-point FFT axis (fftfreq * n)."""
    return torch.fft.fftfreq(n, d=1.0 / n, device=device, dtype=dtype)


def shell_mean(values: torch.Tensor, shells: torch.Tensor, n_shells: int, where: torch.Tensor | None = None):
    """Mean of ``values`` per integer shell (over voxels where ``where`` is true): ``[n_shells]``."""
    v = values.reshape(-1)
    s = shells.reshape(-1)
    m = torch.ones_like(v, dtype=torch.bool) if where is None else where.reshape(-1)
    keep = m & (s < n_shells)
    tot = torch.zeros(n_shells, dtype=v.dtype, device=v.device).index_add_(0, s[keep], v[keep])
    cnt = torch.zeros(n_shells, dtype=v.dtype, device=v.device).index_add_(0, s[keep], torch.ones_like(v[keep]))
    return tot / cnt.clamp_min(1)


class FourierAccumulator:
    """Sums of CTF-weighted Fourier slices for ``n_sets`` independent sets (gold-standard halves).

    ``box`` and ``apix`` of the particles; the reconstruction has the same box and pixel.
    The grid is the half-spectrum (``rfftn`` layout, ``[P, P, P // 2 + 1]`` for ``P = pad * box``):
    a slice point with ``qx < 0`` is inserted as its Friedel mate, and the ``qx = 0`` plane is
    made Hermitian when the map is computed, which equals inserting every point twice into a
    full grid at half the work and memory.
    """

    def __init__(self, box: int, apix: float, n_sets: int = 2, pad: int = 2, device=None, dtype=torch.float32):
        self.box, self.apix, self.pad, self.n_sets = int(box), float(apix), int(pad), int(n_sets)
        self.P = self.pad * self.box
        self.H = self.P // 2 + 1
        self.device, self.dtype = device, dtype
        # channels (real, imag, weight) x sets, each a half grid with z and y centred at C (no wrap-around
        # for the 8 corners of a point inside the Nyquist sphere): [Pc, Pc, Hc, 3]
        self.C = self.P // 2
        self.Pc, self.Hc = self.P + 2, self.H + 1
        self.grid = torch.zeros(3, n_sets * self.Pc * self.Pc * self.Hc, device=device, dtype=dtype)
        o = torch.arange(2, device=device)
        self._offsets = ((o[:, None, None] * self.Pc + o[None, :, None]) * self.Hc + o[None, None, :]).reshape(8)
        self.count = torch.zeros(n_sets, dtype=torch.long)
        n = self.box
        ky = _fft_index(n, device, dtype)
        kx = torch.arange(n // 2 + 1, device=device, dtype=dtype)
        KY, KX = torch.meshgrid(ky, kx, indexing="ij")
        keep = (KX**2 + KY**2) < (n / 2.0) ** 2  # inside Nyquist circle
        self._kx, self._ky = KX[keep], KY[keep]
        self._keep = keep
        # the kx = 0 column holds each Friedel pair twice: half weight there
        self._half = torch.where(self._kx == 0, 0.5, 1.0).to(dtype)

    def insert(self, images: torch.Tensor, rotmat: torch.Tensor, shift_A: torch.Tensor | None = None,
               ctf: CtfParams | torch.Tensor | None = None, sets: torch.Tensor | None = None) -> None:
        """Add particles ``images [B, N, N]`` with RELION matrices ``rotmat [B, 3, 3]``, origins
        ``shift_A [B, 2]``, CTF (parameters or an ``rfft2``-layout tensor; None = no CTF) and
        set index ``sets [B]`` (0-based; default all in set 0)."""
        n, P, H, dev, dt = self.box, self.P, self.H, self.device, self.dtype
        images = images.to(device=dev, dtype=dt)
        B = images.shape[0]
        f = torch.fft.rfft2(torch.fft.ifftshift(images, dim=(-2, -1)))[:, self._keep]  # [B, K]
        kx, ky = self._kx, self._ky
        if shift_A is not None:
            o = shift_A.to(device=dev, dtype=dt)
            phase = -2.0 * math.pi * (kx[None] * o[:, :1] + ky[None] * o[:, 1:2]) / (n * self.apix)
            f = f * torch.polar(torch.ones_like(phase), phase)
        if ctf is None:
            c = torch.ones(B, kx.numel(), device=dev, dtype=dt)
        else:
            if isinstance(ctf, CtfParams):
                ctf = ctf_rfft2(ctf, n, self.apix, device=dev, dtype=dt)
            c = ctf.to(device=dev, dtype=dt)[:, self._keep]
        R = rotmat.to(device=dev, dtype=dt)
        q = self.pad * (kx[None, :, None] * R[:, None, 0, :] + ky[None, :, None] * R[:, None, 1, :])  # [B,K,(x,y,z)]
        # points with qx < 0 go in as their Friedel mates: -q, complex conjugate
        flip = q[..., 0] < 0
        q = torch.where(flip[..., None], -q, q)
        h = self._half[None] * c
        val = torch.stack([f.real * h, torch.where(flip, -f.imag, f.imag) * h, c * h], -1)  # [B, K, 3]
        q0 = torch.floor(q)
        fr = q - q0
        # centred z and y (offset C) so the 8 corners never wrap; folded back in reconstruct()
        q0 = q0.to(torch.int64)
        sets = torch.zeros(B, dtype=torch.long, device=dev) if sets is None else sets.to(device=dev, dtype=torch.long)
        base = ((sets[:, None] * self.Pc + q0[..., 2] + self.C) * self.Pc + q0[..., 1] + self.C) * self.Hc + q0[..., 0]
        # visit the grid in memory order: sorting the points by their lower corner turns the
        # scattered additions (cache-miss bound) into near-streaming passes
        base, order = torch.sort(base.reshape(-1))
        fr = fr.reshape(-1, 3)[order].T  # [3, M] (x, y, z)
        val = val.reshape(-1, 3)[order].T  # [3, M]
        one = torch.ones_like(fr)
        wx, wy, wz = torch.stack([one - fr, fr], 1).unbind(0)  # each [2, M]
        w = ((wz[:, None, :] * wy[None, :, :]).reshape(4, 1, -1) * wx[None, :, :]).reshape(8, -1)  # [8, M]
        flat = (base[None, :] + self._offsets[:, None]).reshape(-1)  # corner-major, each pass sorted
        for ch in range(3):
            self.grid[ch].view(-1).index_add_(0, flat, (w * val[ch][None, :]).reshape(-1))
        self.count += torch.bincount(sets.cpu(), minlength=self.n_sets)[: self.n_sets]

    def _shells(self):
        k = _fft_index(self.P, self.device, self.dtype)
        kx = torch.arange(self.H, device=self.device, dtype=self.dtype)
        kz, ky, kx = torch.meshgrid(k, k, kx, indexing="ij")
        return torch.round(torch.sqrt(kx**2 + ky**2 + kz**2) / self.pad).long()  # in original-box shells

    def _fft_layout(self, g: torch.Tensor) -> torch.Tensor:
        """Centred ``[Pc, Pc, Hc, 3]`` accumulation grid -> ``rfftn`` layout ``[P * P * H, 3]``.

        Entries beyond the ``P`` grid (only reached from the Nyquist edge) are dropped."""
        P, C = self.P, self.C
        g = g.reshape(self.Pc, self.Pc, self.Hc, 3)[:P, :P, : self.H]
        return torch.roll(g, shifts=(-C, -C), dims=(0, 1)).reshape(-1, 3)

    def _hermitian_x0(self, g: torch.Tensor) -> torch.Tensor:
        """Add to the ``qx = 0`` plane its own Friedel mates (``(y, z) -> (-y, -z)``, conjugated)."""
        P = self.P
        g = g.reshape(P, P, self.H, 3).clone()
        plane = g[:, :, 0, :]
        idx = (-torch.arange(P, device=g.device)) % P
        mate = plane[idx][:, idx]
        mate = mate * torch.tensor([1.0, -1.0, 1.0], device=g.device, dtype=g.dtype)
        g[:, :, 0, :] = plane + mate
        return g.reshape(-1, 3)

    def reconstruct(self, sets=None, reg: float = 1e-3, ssnr: torch.Tensor | None = None) -> torch.Tensor:
        """The map ``[N, N, N]`` from the sum of the given sets (default all).

        ``reg``: ``lambda = reg * mean_shell(W)``; ``ssnr [N//2+1]``: per-shell SNR of the
        summed data for a Wiener filter, ``lambda = mean_shell(W) / ssnr`` (overrides ``reg``
        where given).
        """
        sets = list(range(self.n_sets)) if sets is None else list(sets)
        g = self.grid.view(3, self.n_sets, -1)[:, sets].sum(1).T  # [G, 3]
        g = self._hermitian_x0(self._fft_layout(g))
        P, n = self.P, self.box
        F = torch.complex(g[:, 0], g[:, 1])
        W = g[:, 2]
        shells = self._shells().reshape(-1)
        nsh = n // 2 + 1
        mean_w = shell_mean(W, shells, nsh, where=W > 0)
        if ssnr is None:
            lam_sh = reg * mean_w
        else:
            lam_sh = mean_w / ssnr.to(mean_w).clamp_min(1e-6)
        lam = torch.where(shells < nsh, lam_sh[shells.clamp_max(nsh - 1)], torch.zeros_like(W))
        inside = (shells < nsh) & (W > 0)
        V = torch.where(inside, F / (W + lam).clamp_min(1e-30), torch.zeros_like(F))
        # the zero-padded map's DFT on the P grid equals the N-map's DFT at the shared
        # frequencies, so the plain inverse of the P grid, cropped, is the map on its scale
        vol = torch.fft.fftshift(torch.fft.irfftn(V.reshape(P, P, self.H), s=(P, P, P)))
        lo = P // 2 - n // 2
        vol = vol[lo:lo + n, lo:lo + n, lo:lo + n]
        # trilinear insertion convolves the Fourier grid with a tent: undo its sinc^2 in real space
        t = torch.sinc((torch.arange(n, device=vol.device, dtype=vol.dtype) - n // 2) / P) ** 2
        vol = vol / (t[:, None, None] * t[None, :, None] * t[None, None, :])
        # as RELION does, keep only the sphere the particle box can hold (soft edge inside
        # radius N/2): the corners hold nothing but noise, amplified by the correction above
        from cryogmm.metrics import soft_sphere_mask

        return (vol * soft_sphere_mask(n, n // 2 - 3, edge_px=3, device=vol.device, dtype=vol.dtype)).contiguous()
