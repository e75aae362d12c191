"""Direct Fourier inversion: particles with poses and CTF -> maps, gold-standard halves, FSC.

Each particle's Fourier transform is phase-shifted to undo its origin, multiplied by its
CTF and inserted on the central slice ``A^T (kx, ky, 0)`` of a 2x oversampled 3D Fourier
grid by trilinear weights, together with its Friedel mate; the CTF^2 goes into a weight
grid alongside. The map is ``F / (W + lambda)`` per voxel (inverse-transformed, corrected for
the trilinear kernel and limited to the sphere of radius N/2 with a soft edge), with ``lambda`` a small
fraction of the shell's mean weight for half maps (CTF^2-weighted inversion) and
``mean_shell(W) / SNR(k)`` from the half-map FSC for the final map (a Wiener filter).

Memory stays bounded: images are inserted batch by batch as they are read, and only the
grids (``(2N)^3 x 3`` floats per half) are kept; :meth:`FourierAccumulator.batch_for_memory`
sizes the batch for a host-memory budget.

Precision: the grids accumulate in float32 by default (each voxel sums O(n / N^2) terms
of similar size), or in float64 (``grid_dtype``; the default of jobs run under ``torchrun``)
so that the sums do not depend on how the particles were split among processes; across
processes they are summed in float64 (:meth:`FourierAccumulator.all_reduce`), and the map
inversion works in float32 on the sums rounded to float32. No TF32 or bf16 enters here
whatever the matrix-product precision of the job.
"""

from __future__ import annotations

import math
import os
from concurrent.futures import ThreadPoolExecutor

import torch

from cryogmm import distributed
from cryogmm.core.ctf import CtfParams, ctf_rfft2
from cryogmm.core.masks import soft_sphere_mask


def _fft_index(n: int, device=None, dtype=torch.float32):
    """Signed integer frequencies of an ``n``-point FFT axis (fftfreq * n)."""
    return torch.fft.fftfreq(n, d=1.0 / n, device=device, dtype=dtype)


_POOLS: dict[tuple[int, int], ThreadPoolExecutor] = {}


def _pool(workers: int) -> ThreadPoolExecutor:
    """A pool of ``workers`` helper threads for this process (made on first use; a forked child
    makes its own, as it has none of its parent's threads)."""
    key = (os.getpid(), workers)
    if key not in _POOLS:
        _POOLS[key] = ThreadPoolExecutor(max(1, workers), thread_name_prefix="cryogmm-insert")
    return _POOLS[key]


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
    The grid is the half-spectrum (``qx >= 0``, ``[P, P, P // 2 + 1]`` for ``P = pad * box``, held with
    z and y centred):
    a slice point with ``qx < 0`` is inserted as its Friedel mate, and the ``qx = 0`` plane is
    made Hermitian when the map is computed, which equals inserting every point twice into a
    full grid at half the work and memory.
    """

    #: points per chunk of the scatter (see :meth:`_scatter`): the grid voxels one chunk reaches stay
    #: in cache while its 8 corners x 3 channels are added, and its elementwise operations stay below
    #: torch's parallel grain (32768 elements), so that the helper threads run them serially
    chunk = 24576

    def __init__(self, box: int, apix: float, n_sets: int = 2, pad: int = 2, device=None, dtype=torch.float32,
                 grid_dtype=None):
        self.box, self.apix, self.pad, self.n_sets = int(box), float(apix), int(pad), int(n_sets)
        self.P = self.pad * self.box
        self.H = self.P // 2 + 1
        self.device, self.dtype = device, dtype
        # channels (real, imag, weight) x sets, each a half grid with z and y centred at C (no wrap-around
        # for the 8 corners of a point inside the Nyquist sphere): [Pc, Pc, Hc, 3]
        self.C = self.P // 2
        self.Pc, self.Hc = self.P + 2, self.H + 1
        # the sums: ``dtype`` by default; float64 (``grid_dtype``) makes them independent of the order the
        # particles come in (up to 1e-16), so that maps from sharded runs round to the same float32 values
        self.grid_dtype = dtype if grid_dtype is None else grid_dtype
        self.grid = torch.zeros(3, n_sets * self.Pc * self.Pc * self.Hc, device=device, dtype=self.grid_dtype)
        # grid addresses in int32 (half the memory traffic of int64) while they fit: box <= 640 for two sets
        self._index_dtype = torch.int32 if self.grid.shape[1] < 2**31 else torch.int64
        o = torch.arange(2, device=device)
        self._offsets = ((o[:, None, None] * self.Pc + o[None, :, None]) * self.Hc + o[None, None, :]).reshape(8)
        self.count = torch.zeros(n_sets, dtype=torch.long, device=device)
        n = self.box
        ky = _fft_index(n, device, dtype)
        kx = torch.arange(n // 2 + 1, device=device, dtype=dtype)
        KY, KX = torch.meshgrid(ky, kx, indexing="ij")
        keep = (KX**2 + KY**2) < (n / 2.0) ** 2  # inside Nyquist circle
        self._kx, self._ky = KX[keep], KY[keep]
        self._keep = keep.reshape(-1).nonzero().squeeze(1)  # flat rfft2 indices (cheaper than the mask)
        # the kx = 0 column holds each Friedel pair twice: half weight there
        self._half = torch.where(self._kx == 0, 0.5, 1.0).to(dtype)
        self._map_tables = None  # per-voxel tables of reconstruct(), made on first use

    #: bytes of working memory per particle of a batch, in units of box^2 (images, their transforms, the
    #: slice points and their sort keys, with the prefetch queue's batches): measured 35-64 at box 64
    #: (peak RSS of reconstruct_table with batches of 64, 1024 and 2048); 96 leaves a margin
    bytes_per_particle_px = 96

    def grid_bytes(self) -> int:
        """Bytes of the accumulator grid, the map tables and a reconstruction's temporaries."""
        grid = self.grid.numel() * self.grid.element_size()
        vox = self.P * self.P * self.H
        return int(2 * grid + vox * (8 + 8 + 4 + 4 + 8 * 2) + 3 * self.box**3 * 4)

    @staticmethod
    def batch_for_memory(box: int, max_bytes: float, fixed_bytes: float = 0.0, prefetch: int = 1) -> int:
        """The largest batch whose working memory (``(prefetch + 1)`` batches of images read ahead
        plus one batch's transforms and slice points) fits ``max_bytes - fixed_bytes``; 0 if none."""
        per = FourierAccumulator.bytes_per_particle_px * box * box + prefetch * 4 * box * box
        return max(0, int((max_bytes - fixed_bytes) // per))

    def all_reduce(self) -> "FourierAccumulator":
        """Sum the grids and counts of every process (``torch.distributed``; float64 sums); a
        no-op on one process."""

        distributed.all_reduce_sum(self.grid, dtype=torch.float64)
        distributed.all_reduce_sum(self.count, dtype=None)
        return self

    def insert(self, images: torch.Tensor, rotmat: torch.Tensor, shift_A: torch.Tensor | None = None,
               ctf: CtfParams | torch.Tensor | None = None, sets: torch.Tensor | None = None) -> None:
        """Add particles ``images [B, N, N]`` with RELION matrices ``rotmat [B, 3, 3]``, origins
        ``shift_A [B, 2]``, CTF (parameters or an ``rfft2``-layout tensor; None = no CTF) and
        set index ``sets [B]`` (0-based; default all in set 0)."""
        images = images.to(device=self.device, dtype=self.dtype)
        self.insert_ft(torch.fft.rfft2(torch.fft.ifftshift(images, dim=(-2, -1))), rotmat, shift_A, ctf, sets)

    def insert_ft(self, f: torch.Tensor, rotmat: torch.Tensor, shift_A: torch.Tensor | None = None,
                  ctf: CtfParams | torch.Tensor | None = None, sets: torch.Tensor | None = None) -> None:
        """:meth:`insert` for particles already transformed: ``f [B, N, N // 2 + 1]`` is
        ``rfft2(ifftshift(images))`` (a job that also aligns the particles transforms each image
        once and passes the same transform here)."""
        self._scatter(*self._slice_points(f, rotmat, shift_A, ctf, sets))
        B = f.shape[0]
        if sets is None:
            self.count[0] += B
        else:  # stays on the device: no host sync per batch
            self.count += torch.bincount(sets.to(self.count.device, torch.long), minlength=self.n_sets)[: self.n_sets]

    def _slice_points(self, f, rotmat, shift_A, ctf, sets):
        """The particles' Fourier samples (inside the Nyquist circle) as points of the padded grid:
        ``(key [M], order [M] or None, pts [6, M])``, with ``key`` the grid address of each point's
        lower corner, ``pts`` each point's fractional position in its voxel (x, y, z) and its values
        (real, imaginary, CTF^2 weight), Friedel-flipped where ``qx < 0``. On the CPU the keys come
        sorted (ascending, ``order`` the points in that order, ``pts`` in the particles' order); on
        other devices unsorted (``order`` None)."""
        n, dev, dt = self.box, self.device, self.dtype
        B = f.shape[0]
        f = f.to(device=dev)
        if shift_A is not None:
            # undo the origin: exp(-2 pi i (kx ox + ky oy) / (N apix)), a product of a row and a column factor
            o = shift_A.to(device=dev, dtype=dt) * (-2.0 * math.pi / (n * self.apix))
            ky = _fft_index(n, dev, dt)
            kx = torch.arange(n // 2 + 1, device=dev, dtype=dt)
            ex = torch.polar(torch.ones(B, kx.numel(), device=dev, dtype=dt), o[:, :1] * kx)
            ey = torch.polar(torch.ones(B, n, device=dev, dtype=dt), o[:, 1:2] * ky)
            f = f * ey[:, :, None] * ex[:, None, :]
        f = f.reshape(B, -1).index_select(1, self._keep)  # [B, K]
        if ctf is None:
            c = torch.ones(B, self._kx.numel(), device=dev, dtype=dt)
        else:
            if isinstance(ctf, CtfParams):
                ctf = ctf_rfft2(ctf, n, self.apix, device=dev, dtype=dt)
            c = ctf.to(device=dev, dtype=dt).reshape(B, -1).index_select(1, self._keep)
        R = rotmat.to(device=dev, dtype=dt)
        # A^T (kx, ky, 0) on the padded grid, one row per axis: [3 (x, y, z), B, K]
        q = self.pad * (R[:, 0, :].T[:, :, None] * self._kx + R[:, 1, :].T[:, :, None] * self._ky)
        # points with qx < 0 go in as their Friedel mates: -q, complex conjugate
        sign = torch.where(q[0] < 0, -1.0, 1.0).to(dt)
        q *= sign
        q0 = torch.floor(q)
        # address of the lower corner, z and y centred (offset C) so the 8 corners never wrap
        # (folded back in reconstruct())
        i0 = q0.to(self._index_dtype)
        s = torch.zeros(B, 1, device=dev, dtype=self._index_dtype) if sets is None else \
            sets.to(device=dev, dtype=self._index_dtype)[:, None]
        key = ((s * self.Pc + (i0[2] + self.C)) * self.Pc + (i0[1] + self.C)) * self.Hc + i0[0]
        order = None
        if key.device.type == "cpu":
            # visit the grid in memory order: sorting the points by their lower corner turns the
            # scattered additions (cache-miss bound) into near-streaming passes
            key, order = torch.sort(key.reshape(-1), stable=True)
        h = self._half * c
        pts = torch.empty(6, B, self._kx.numel(), device=dev, dtype=dt)
        torch.sub(q, q0, out=pts[:3])
        torch.mul(f.real, h, out=pts[3])
        torch.mul(f.imag * sign, h, out=pts[4])
        torch.mul(c, h, out=pts[5])
        return key.reshape(-1), order, pts.view(6, -1)

    def _scatter_device(self, key, pts):
        """The scatter off the CPU: the 8 corners of every point in one ``index_add_`` per channel
        (no sort, no host sync; atomic adds, so float32 sums depend on their order in the last bits)."""
        f = pts[:3]
        g = 1.0 - f
        wz = torch.stack([g[2], f[2]])  # [2, M]
        wy = torch.stack([g[1], f[1]])
        wx = torch.stack([g[0], f[0]])
        w = (wz[:, None, None, :] * wy[None, :, None, :] * wx[None, None, :, :]).reshape(8, -1)  # corner 4dz+2dy+dx
        idx = (key[None, :].to(torch.int64) + self._offsets.to(key.device)[:, None]).reshape(-1)
        for ch in range(3):
            v = (w * pts[3 + ch]).reshape(-1)
            self.grid[ch].index_add_(0, idx, v.to(self.grid_dtype))

    def _scatter(self, key, order, pts):
        """Add the points (see :meth:`_slice_points`) to the grid by trilinear weights: corner
        ``(dz, dy, dx)`` of a point at ``key`` is address ``key + offset``, weighted ``wz * wy * wx``
        (``1 - f`` or ``f`` per axis).

        The grid is cut into address ranges holding about ``chunk`` points each; each range (chunk)
        takes the 8 corners x 3 channels of the points whose corners fall in it (for each corner a
        contiguous run of the sorted points; the chunk gathers their values itself, so they stay in
        cache). The ranges are disjoint, so on the CPU consecutive groups of chunks go to
        ``torch.get_num_threads()`` threads (``index_add_`` and ``index_select`` run on one core and
        release the GIL); every grid voxel still receives its additions in the same order as in one
        sequential pass."""
        if order is None:
            self._scatter_device(key, pts)
            return
        M = key.numel()
        on_cpu = key.device.type == "cpu"
        n_chunks = max(1, -(-M // self.chunk)) if on_cpu else 1
        # range boundaries: the addresses of every chunk-th point; runs of each corner: [8, n_chunks + 1]
        inner = key[torch.arange(1, n_chunks, device=key.device) * M // n_chunks]
        bounds = torch.cat([key.new_full((1,), -(2**30)), inner, key.new_full((1,), self.grid.shape[1])])
        runs = torch.searchsorted(key, bounds[None, :] - self._offsets.to(key)[:, None]).tolist()
        offsets = self._offsets.tolist()  # corner (dz, dy, dx) is offsets[4 dz + 2 dy + dx]

        def add(first, last):  # chunks first .. last - 1
            for j in range(first, last):
                # the points of this chunk: from the start of the farthest corner's run to the end of corner 0's
                lo, hi = runs[7][j], runs[0][j + 1]
                if lo >= hi:
                    continue
                p = pts.index_select(1, order[lo:hi])
                f, vals = p[:3], p[3:]
                g = 1.0 - f
                for dz in range(2):
                    for dy in range(2):
                        for dx in range(2):
                            c = 4 * dz + 2 * dy + dx
                            a, b = runs[c][j] - lo, runs[c][j + 1] - lo
                            if a == b:
                                continue
                            w = (f if dz else g)[2, a:b] * (f if dy else g)[1, a:b]
                            w *= (f if dx else g)[0, a:b]
                            k = key[lo + a:lo + b]
                            for ch in range(3):
                                v = w * vals[ch, a:b]
                                if v.dtype != self.grid_dtype:
                                    v = v.to(self.grid_dtype)
                                self.grid[ch, offsets[c]:].index_add_(0, k, v)

        parts = min(torch.get_num_threads(), n_chunks) if on_cpu else 1
        cut = [p * n_chunks // parts for p in range(parts + 1)]
        futures = [_pool(parts - 1).submit(add, cut[p], cut[p + 1]) for p in range(1, parts)]
        add(cut[0], cut[1])
        for fut in futures:
            fut.result()

    def _tables(self):
        """Per-voxel tables of the centred ``[P, P, H]`` grid and of the map, made on first use:
        ``shell`` (``[P * P * H]``, the shell in the original box, ``N // 2 + 1`` for all beyond the
        last kept one), ``kept`` (``shell <= N // 2``), ``mate`` (index of ``-u`` along z and y, for
        the ``qx = 0`` plane), ``crop`` (the ``N`` grid indices along each axis that the map keeps)
        and ``post`` (``[N, N, N]``: the real-space factor of the map: signs, tent correction, mask)."""
        if self._map_tables is None:

            P, H, n, dev, dt = self.P, self.H, self.box, self.device, self.dtype
            nsh = n // 2 + 1
            k = torch.arange(P, device=dev, dtype=dt) - self.C  # centred frequency of z and y
            kx = torch.arange(H, device=dev, dtype=dt)
            shell = torch.round(torch.sqrt(kx**2 + k[None, :, None] ** 2 + k[:, None, None] ** 2) / self.pad)
            shell = shell.long().clamp_max(nsh).reshape(-1)
            u = torch.arange(P, device=dev)
            j = torch.arange(n, device=dev) - n // 2  # map index, centred
            # the map is the centre of fftshift(ifft(V)) on the P grid: index (j - N/2) mod P of the
            # transform; the grid being centred (frequency u - P/2 at index u) multiplies that by
            # (-1)^(j - N/2) along z and y
            sign = 1.0 - 2.0 * (j % 2).to(dt)
            # trilinear insertion convolves the Fourier grid with a tent: undo its sinc^2 in real space
            t = torch.sinc(j.to(dt) / P) ** 2
            # as RELION does, keep only the sphere the particle box can hold (soft edge inside
            # radius N/2): the corners hold nothing but noise, amplified by the correction above
            mask = soft_sphere_mask(n, n // 2 - 3, edge_px=3, device=dev, dtype=dt)
            post = (sign[:, None, None] * sign[None, :, None]) / (t[:, None, None] * t[None, :, None] * t) * mask
            self._map_tables = {"shell": shell, "kept": shell < nsh, "mate": (-u) % P, "crop": j % P,
                                "post": post.contiguous()}
        return self._map_tables

    def reconstruct(self, sets=None, reg: float = 1e-3, ssnr: torch.Tensor | None = None) -> torch.Tensor:
        """The map ``[N, N, N]`` from the sum of the given sets (default all).

        ``reg``: ``lambda = reg * mean_shell(W)``; ``ssnr [N//2+1]``: per-shell SNR of the
        summed data for a Wiener filter, ``lambda = mean_shell(W) / ssnr`` (overrides ``reg``
        where given).
        """
        sets = list(range(self.n_sets)) if sets is None else list(sets)
        P, H, n = self.P, self.H, self.box
        nsh = n // 2 + 1
        tab = self._tables()
        g = self.grid.view(3, self.n_sets, self.Pc, self.Pc, self.Hc)
        g = sum((g[:, i] for i in sets[1:]), g[:, sets[0]])  # a view for one set
        if g.dtype != self.dtype:  # float64 sums: the map is computed in float32 from their rounded values
            g = g.to(self.dtype)
        # centred half grid [3, P, P, H]: index u along z and y is frequency u - P/2; the entries
        # beyond (only reached from the Nyquist edge) are dropped
        g = g[:, :P, :P, :H]
        # the qx = 0 plane gets its own Friedel mates ((y, z) -> (-y, -z), conjugated)
        x0 = g[..., 0]
        m = tab["mate"]
        mate = x0[:, m][:, :, m]
        x0 = torch.stack([x0[0] + mate[0], x0[1] - mate[1], x0[2] + mate[2]])
        W = g[2].contiguous()
        W[..., 0] = x0[2]
        W = W.view(-1)
        shell = tab["shell"]
        filled = W > 0
        # mean weight per shell over the filled voxels (W >= 0, so the empty ones add nothing)
        tot = W.new_zeros(nsh + 1).index_add_(0, shell, W)[:nsh]
        cnt = W.new_zeros(nsh + 1).index_add_(0, shell, filled.to(W.dtype))[:nsh]
        mean_w = tot / cnt.clamp_min(1)
        if ssnr is None:
            lam_sh = reg * mean_w
        else:
            lam_sh = mean_w / ssnr.to(mean_w).clamp_min(1e-6)
        # 1 / (W + lambda) inside the sphere of shell N/2 (and where there is weight), else 0
        inv = (W + torch.cat([lam_sh, lam_sh.new_zeros(1)])[shell]).clamp_min_(1e-30).reciprocal_()
        inv = inv.masked_fill_(~(filled & tab["kept"]), 0.0).view(P, P, H)
        V = torch.complex(g[0] * inv, g[1] * inv)
        V[..., 0] = torch.complex(x0[0] * inv[..., 0], x0[1] * inv[..., 0])
        # the zero-padded map's DFT on the P grid equals the N-map's DFT at the shared
        # frequencies, so the plain inverse of the P grid, cropped, is the map on its scale;
        # the inverse runs axis by axis (z, y, then the half axis x), cropping after each
        crop = tab["crop"]
        v = torch.fft.ifft(V, dim=0).index_select(0, crop)
        v = torch.fft.ifft(v, dim=1).index_select(1, crop)
        vol = torch.fft.irfft(v, n=P, dim=2).index_select(2, crop)
        return vol * tab["post"]
