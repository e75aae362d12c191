"""Particles for heterogeneity training: images Fourier-cropped to the low-pass, with CTFs,
poses and shifts as tensors; the Fourier-space projection of Gaussians at those poses.

Two ways to hold the particles, same numbers (:class:`ParticleData`):

- **in memory** (``resident``): every cropped transform is read once and kept (the fastest
  epochs when they fit);
- **streamed**: only the table's per-particle numbers stay in memory; a batch's images are read
  from the stacks when it is needed (positioned reads of :class:`~cryogmm.bridge.images.ImageSource`,
  the next batch prepared in a background thread by the training loop) and cropped then, so
  host memory does not grow with the number of particles.

Under ``torchrun`` each rank holds (or reads) only its contiguous shard of the particles
(:func:`cryogmm.distributed.shard`); the noise variance is summed over the shards.
``load_particles(load="auto")`` keeps the particles in memory when their estimated footprint
fits the memory budget (``max_memory_gb``, default a quarter of the machine's memory shared by
the ranks of a node) and streams them otherwise.
"""

from __future__ import annotations

import math
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from cryogmm import distributed
from cryogmm.bridge.images import ImageSource
from cryogmm.bridge.io import read_particles
from cryogmm.core.ctf import CtfParams, ctf_rfft2, rfft2_frequencies
from cryogmm.core.gaussians import Gaussians
from cryogmm.core.projection import rotate_centers
from cryogmm.errors import OptionError, StarError
from cryogmm.hetero.cache import ParticleCache, check_cache_dir
from cryogmm.hetero.config import DEFAULT_LOWPASS_A

#: host memory of a training process besides its particles (interpreter, torch, model, optimiser), bytes
BASELINE_BYTES = 0.6e9
LOADS = ("auto", "memory", "stream")


# --------------------------------------------------------------------------- particles
def crop_size(box: int, apix: float, lowpass_A: float) -> int:
    """Even crop (px) whose Nyquist reaches ``lowpass_A`` (with a small margin), at most ``box``."""
    k = math.ceil(box * apix / lowpass_A)
    return int(min(box, 2 * (k + 1)))


def _crop_rows(box: int, crop: int):
    return np.concatenate([np.arange(crop // 2), np.arange(box - crop // 2, box)])


def crop_fourier(imgs, rows: torch.Tensor, crop: int) -> torch.Tensor:
    """Real images ``[B, box, box]`` (centre at ``box // 2``) -> their orthonormal ``rfft2``
    cropped to ``[B, crop, crop//2+1]`` (``rows``: :func:`_crop_rows`)."""
    x = torch.as_tensor(imgs)
    f = torch.fft.rfft2(torch.fft.ifftshift(x, dim=(-2, -1)), norm="ortho")
    return f[:, rows, : crop // 2 + 1].clone()


def resident_bytes_per_particle(crop: int) -> int:
    """Host bytes one particle costs in memory during training: its cropped transform (complex64),
    its CTF (float32) and the two encoder images (float32, built once, briefly twice)."""
    half = crop * (crop // 2 + 1)
    return 8 * half + 4 * half + 2 * (2 * crop * crop * 4)


def batch_bytes(batch: int, box: int, prefetch: int = 1) -> int:
    """Host bytes of the batches in flight when streaming: the images read, their full
    transforms (FFT work space) and the cropped results, ``prefetch + 2`` batches."""
    return (prefetch + 2) * batch * box * box * 4 * 4


def default_budget_gb() -> float:
    """Memory budget without ``--max-memory-gb``: a quarter of the machine's memory, shared by
    the ranks of this node (``LOCAL_WORLD_SIZE``)."""
    try:
        total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        total = 16e9
    return total / 4 / max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1"))) / 1e9


def memory_plan(table, *, n_local: int, box: int, crop: int, batch: int, load: str = "auto",
                max_memory_gb: float | None = None) -> dict:
    """Whether the particles are held in memory or streamed, with the estimates behind it.

    Raises :class:`~cryogmm.errors.OptionError` naming ``--max-memory-gb`` when the budget
    cannot hold the particles in memory and ``load == "memory"`` (asked explicitly), or cannot
    hold even the streamed job (baseline, table and the batches in flight)."""
    if load not in LOADS:
        raise OptionError("--load", f"{load!r}; expected one of {', '.join(LOADS)}")
    if max_memory_gb is not None and not max_memory_gb > 0:
        raise OptionError("--max-memory-gb", f"{max_memory_gb}; expected a positive number of GB")
    table_bytes = int(table.particles.memory_usage(deep=True).sum()) + 120 * table.n  # + poses, CTF tensors
    fixed = BASELINE_BYTES + table_bytes
    in_memory = fixed + n_local * resident_bytes_per_particle(crop) + batch_bytes(batch, box)
    streamed = fixed + batch_bytes(batch, box)
    budget = (max_memory_gb if max_memory_gb is not None else default_budget_gb()) * 1e9
    if load == "memory" and max_memory_gb is not None and in_memory > budget:
        raise OptionError("--max-memory-gb", f"{max_memory_gb:g} GB cannot hold {n_local} particles in memory "
                          f"(crop {crop} px: about {in_memory / 1e9:.2f} GB with --in-memory); leave out "
                          "--in-memory to stream them from disk")
    if load != "memory" and max_memory_gb is not None and streamed > budget:
        raise OptionError("--max-memory-gb", f"{max_memory_gb:g} GB cannot hold the job even streaming "
                          f"(about {streamed / 1e9:.2f} GB: interpreter, the table of {table.n} particles and "
                          f"the batches of {batch} box-{box} images in flight)")
    resident = load == "memory" or (load == "auto" and in_memory <= budget)
    return {"resident": resident, "estimate_in_memory_GB": in_memory / 1e9, "estimate_streamed_GB": streamed / 1e9,
            "budget_GB": budget / 1e9}


def _ctf_rows(p: CtfParams, idx) -> CtfParams:
    idx = torch.as_tensor(np.asarray(idx))
    return CtfParams(**{f: getattr(p, f)[idx] for f in CtfParams.FIELDS})


@dataclass
class ParticleData:
    """Particles Fourier-cropped: ``fourier(idx)`` gives ``[len(idx), crop, crop//2+1]``
    complex (``rfft2`` layout, orthonormal: white noise of variance ``noise_var`` per pixel
    keeps that variance per coefficient) of table rows ``idx``; poses ``rotmat [n,3,3]``,
    ``shift_A [n,2]`` for every row; CTF on the cropped grid computed per batch.

    ``rows``: the table rows this process holds or reads (all of them on one process, its
    contiguous shard under ``torchrun``). ``ft`` holds their transforms when ``resident``;
    otherwise it is None and ``fourier`` reads the images from ``source``."""

    table: object
    ft: torch.Tensor | None
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
    rows: np.ndarray | None = None
    source: ImageSource | None = None
    ctf_params: CtfParams | None = None
    plan: dict | None = None
    cache: ParticleCache | None = None  # streamed: the on-disk cache of cropped transforms and CTFs
    lowpass_A: float | None = None  # the band's resolution (Å): the option's, or the default resolved

    def __post_init__(self):
        if self.rows is None:
            self.rows = np.arange(self.table.n, dtype=np.int64)
        if self.ctf_params is None:
            self.ctf_params = CtfParams.from_table(self.table, np.arange(self.table.n))
        self._crop_index = torch.as_tensor(_crop_rows(self.box, self.crop))

    @property
    def n(self) -> int:
        """Number of particles (all ranks together)."""
        return int(self.table.n)

    @property
    def resident(self) -> bool:
        return self.ft is not None

    @property
    def apix_crop(self) -> float:
        return self.apix * self.box / self.crop

    def local(self, idx) -> torch.Tensor:
        """Positions in this process's ``rows`` (a contiguous range) of table rows ``idx``."""
        i = np.asarray(idx, dtype=np.int64) - int(self.rows[0]) if len(self.rows) else np.asarray(idx)
        if i.size and (i.min() < 0 or i.max() >= len(self.rows)):
            raise IndexError("particles outside this process's shard were asked for")
        return torch.as_tensor(i)

    def fourier(self, idx) -> torch.Tensor:
        """Cropped transforms of table rows ``idx`` (held, read from the cache, or read and cropped now)."""
        if self.ft is not None:
            return self.ft[self.local(idx)]
        if self.cache is not None:
            return self.cache.fourier(self.local(idx))[0]
        self.local(idx)  # a rank reads only its own shard
        return crop_fourier(self.source.images(idx), self._crop_index, self.crop)

    def ctf(self, idx) -> torch.Tensor:
        return ctf_rfft2(_ctf_rows(self.ctf_params, idx), self.crop, self.apix_crop)

    def fourier_ctf(self, idx) -> tuple[torch.Tensor, torch.Tensor]:
        """``(fourier(idx), ctf(idx))``; from the cache one read per run of rows."""
        if self.ft is None and self.cache is not None:
            return self.cache.fourier(self.local(idx))
        return self.fourier(idx), self.ctf(idx)

    def images_real(self, ft: torch.Tensor) -> torch.Tensor:
        """Cropped transforms -> centred real images ``[B, crop, crop]``."""
        return torch.fft.fftshift(torch.fft.irfft2(ft, s=(self.crop, self.crop), norm="ortho"), dim=(-2, -1))

    def close(self) -> None:
        if self.source is not None:
            self.source.close()
        if self.cache is not None:
            self.cache.close()


def load_particles(star, *, lowpass_A: float | None, project_dir=None, radius_A: float | None = None, batch: int = 512,
                   max_particles: int | None = None, progress=None, load: str = "memory",
                   max_memory_gb: float | None = None, train_batch: int = 64, sharded: bool = False,
                   cache_dir=None, cache_option: str = "--cache-dir") -> ParticleData:
    """Read a STAR (or .cs) with poses and CTF; hold every image Fourier-cropped to ``lowpass_A``
    (None: ``DEFAULT_LOWPASS_A``, or the data's Nyquist when that is coarser; ``lowpass_A`` of the result)
    in memory or stream them (``load``: ``memory``, ``stream`` or ``auto``, see :func:`memory_plan`;
    ``train_batch``: the training batch, for the estimate). ``sharded``: under ``torchrun`` this
    rank takes only its contiguous shard (:func:`cryogmm.distributed.shard`).

    The noise variance is measured in real space outside ``radius_A`` (default 0.8 x the box
    radius): the mean variance of those pixels over the particles (one pass over every image,
    read ``batch`` at a time with the next batch read ahead).

    ``cache_dir``: streamed particles go through an on-disk cache there
    (:class:`cryogmm.hetero.cache.ParticleCache`): the noise pass writes every particle's cropped
    transform and CTF once (or a complete entry of the same input and crop is reused, and the
    stacks are not read at all); batches are then read from it. Skipped (``plan["cache"]`` says
    why) when the disk lacks room for it. ``cache_option`` names the option in errors.
    """

    progress = progress or (lambda *a: None)
    star = Path(star)
    if not star.is_file():
        raise StarError(star, "no such file")
    if cache_dir is not None:
        cache_dir = check_cache_dir(cache_dir, cache_option)
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
    if lowpass_A is None:  # the default: DEFAULT_LOWPASS_A, or the data's Nyquist if coarser
        lowpass_A = max(DEFAULT_LOWPASS_A, 2 * apix)
    if lowpass_A < 2 * apix:
        raise OptionError("--lowpass-A", f"{lowpass_A:g} Å is beyond Nyquist ({2 * apix:g} Å) of {star}")
    crop = crop_size(box, apix, lowpass_A)
    w = distributed.world() if sharded else 1
    if table.n < w:
        raise StarError(star, f"holds {table.n} particles for {w} processes: use fewer processes")
    rows = distributed.shard(table.n) if w > 1 else np.arange(table.n, dtype=np.int64)
    plan = memory_plan(table, n_local=len(rows), box=box, crop=crop, batch=train_batch, load=load,
                       max_memory_gb=max_memory_gb)
    resident = plan["resident"]
    crop_index = torch.as_tensor(_crop_rows(box, crop))
    src = ImageSource.from_table(table)
    yy, xx = np.mgrid[:box, :box] - box // 2
    r = np.hypot(yy, xx) * apix
    rad = 0.8 * box // 2 * apix if radius_A is None else radius_A
    outside = torch.as_tensor(r > rad)
    if not outside.any():
        raise StarError(star, f"images of {box} px leave no pixels outside {rad:g} Å to measure the noise")
    cache = None
    if not resident and cache_dir is not None:
        cache = ParticleCache(cache_dir, star=star, stacks=src.stacks, rows=rows, n_table=table.n, box=box, apix=apix,
                              crop=crop, noise_radius_A=rad)
        if not cache.ready:
            up = cache_dir
            while not up.exists():
                up = up.parent
            free = shutil.disk_usage(up).free
            if free < 1.1 * cache.bytes_needed() + 1e9:
                plan["cache"] = (f"none: {cache.bytes_needed() / 1e9:.2f} GB needed, {free / 1e9:.2f} GB free in "
                                 f"{up}")
                cache = None
    writing = cache is not None and not cache.ready
    ctf_params = CtfParams.from_table(table, np.arange(table.n))
    fts, var_sum = [], 0.0
    if cache is not None and cache.ready:
        var_sum = float(cache.noise[0])
        progress("read particles (cached)", len(rows), len(rows))
    else:
        if writing:
            cache.writer()
        try:
            for idx, imgs in src.chunks(batch, indices=rows, prefetch=1):
                x = torch.as_tensor(imgs)
                var_sum += float(x[:, outside].var(dim=1).sum())
                if resident or writing:
                    f = crop_fourier(x, crop_index, crop)
                if resident:
                    fts.append(f)
                if writing:
                    cache.append(f, ctf_rfft2(_ctf_rows(ctf_params, idx), crop, apix * box / crop))
                progress("read particles", int(idx[-1]) + 1 - int(rows[0]), len(rows))
            if writing:
                cache.finish_fourier([var_sum, float(len(rows))])
        except BaseException:
            if writing:
                cache.abort()
            raise
    tot = distributed.all_reduce_sum(torch.tensor([var_sum, float(len(rows))], dtype=torch.float64))
    noise_var = float(tot[0]) / float(tot[1])
    ft = torch.cat(fts) if resident else None
    del fts
    if resident or cache is not None:
        src.close()
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
        rows=rows, source=None if resident or cache is not None else src, plan=plan, ctf_params=ctf_params,
        cache=cache, lowpass_A=float(lowpass_A),
    )


def shard_share(idx_all: np.ndarray, rows: np.ndarray):
    """This process's share of a global batch ``idx_all`` (sorted table rows): the rows of its own
    contiguous shard ``rows``. Returns ``(idx, pick, weight)``, ``idx = idx_all[pick]``; a process
    with none of the batch gets a zero-weight stand-in (its first row), so that DDP's collectives
    stay in step. Every global batch is the one-process batch, split by who holds the particle:
    training follows the one-process run whatever the number of processes (the shares' sizes
    vary around ``len(idx_all) / world`` from batch to batch)."""
    lo, hi = int(rows[0]), int(rows[-1]) + 1
    pick = np.flatnonzero((idx_all >= lo) & (idx_all < hi))
    if len(pick) == 0:
        return rows[:1], np.zeros(1, dtype=np.int64), 0.0
    return idx_all[pick], pick, 1.0


# --------------------------------------------------------------------------- forward model
def project_fourier(g: Gaussians, rotmat: torch.Tensor, shift_A: torch.Tensor | None, kx: torch.Tensor,
                    ky: torch.Tensor) -> torch.Tensor:
    """Fourier transforms of the projections of a mixture: ``[B, len(ky), len(kx)]`` complex.

    ``P(k) = sum_n a_n exp(-2 pi^2 s_n^2 |k|^2) exp(-2 pi i k . x_n)`` with ``x_n = (A c_n)[:2] -
    shift`` (the image-plane position, as :func:`cryogmm.project.project`), ``kx``, ``ky`` in
    1/Å. Separable: one complex batched matrix product. ``g`` may carry per-image centres
    ``[B, N, 3]`` (and per-image amplitudes or widths ``[B, N]``). Equals the continuous transform
    of the projected density (e/Å^2 integrated over the plane), so ``P / apix^3`` is the DFT of
    the image ``project`` draws. Differentiable in the centres, amplitudes and widths by the
    closed form of :class:`_FourierProjection` (once).
    """
    xy, _ = rotate_centers(g.centers, rotmat, shift_A)
    return _FourierProjection.apply(xy, g.sigmas, g.amplitudes, kx, ky)


class _FourierProjection(torch.autograd.Function):
    """``P = Cy^T Cx`` with ``Cx[b, n, j] = a_n u_x``, ``u_x = exp(-2 pi^2 s_n^2 kx_j^2 - 2 pi i
    kx_j x_bn)`` and ``Cy`` the same along y without the amplitude. The backward pass needs only
    the two complex factors the forward pass made (no trigonometry, no graph of elementwise
    steps): with ``h = conj(dL/dCx) u_x`` (per image, Gaussian and frequency), ``dL/da = sum_j
    Re h``, ``dL/dx = 2 pi a sum_j kx_j Im h``, ``dL/ds = -4 pi^2 s a sum_j kx_j^2 Re h``, and
    the same along y."""

    @staticmethod
    def forward(ctx, xy, s, a, kx, ky):
        two_pi = 2.0 * math.pi
        s2 = (two_pi**2 / 2.0) * (s * s)[..., None]  # [N, 1] or [B, N, 1]

        def factor(pos, k):
            env = torch.exp(-s2 * (k * k))  # [(B,) N, K]
            ph = pos[..., None] * (-two_pi * k)  # [B, N, K]
            return torch.complex(env * torch.cos(ph), env * torch.sin(ph))

        ux = factor(xy[..., 0], kx)
        cy = factor(xy[..., 1], ky)
        ctx.save_for_backward(ux, cy, s, a, kx, ky)
        return torch.bmm(cy.transpose(1, 2), ux * a[..., None])

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):
        ux, cy, s, a, kx, ky = ctx.saved_tensors
        need_xy, need_s, need_a = ctx.needs_input_grad[:3]
        hx = torch.bmm(cy.conj(), grad).conj_physical_().mul_(ux)  # conj(dL/dCx) u_x: [B, N, kx]
        # conj(dL/dCy) Cy, dL/dCy = (grad Cx^H)^T = a * (grad u_x^H)^T
        hy = torch.bmm(grad, ux.conj().transpose(1, 2)).transpose(1, 2).conj_physical_().mul_(cy).mul_(a[..., None])
        two_pi = 2.0 * math.pi
        dxy = ds = da = None
        hxr = hx.real
        if need_a:
            da = hxr.sum(-1)
        if need_xy:
            dxy = torch.stack([(hx.imag @ kx) * a, hy.imag @ ky], -1).mul_(two_pi)
        if need_s:
            ds = ((hxr @ (kx * kx)) * a + hy.real @ (ky * ky)).mul_(-(two_pi**2) * s)
        # widths or amplitudes shared by the images: their gradients summed over the batch
        if ds is not None and s.dim() == 1:
            ds = ds.sum(0)
        if da is not None and a.dim() == 1:
            da = da.sum(0)
        return dxy, ds, da, None, None
