"""Local alignment of a batch of particles against a Gaussian mixture: the band-limited FRC
score, focus widths from a mask, and the Adam refinement of rotations and shifts."""

from __future__ import annotations

import contextlib
import math
from concurrent.futures import ThreadPoolExecutor

import torch

from cryogmm.core.fourier import band_crop
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
        self.crop = crop = band_crop(box, hi)
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
        return self.band(self.crop_rfft(torch.fft.rfft2(torch.fft.ifftshift(images, dim=(-2, -1)))))

    def crop_rfft(self, f: torch.Tensor) -> torch.Tensor:
        """``rfft2``-layout values of the full box ``[B, N, N // 2 + 1]`` (a transform or a CTF)
        -> the same frequencies on the cropped grid ``[B, crop, crop // 2 + 1]``."""
        c, n = self.crop, self.box
        return torch.cat([f[:, : c // 2, : c // 2 + 1], f[:, n - c // 2:, : c // 2 + 1]], 1)

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


def stack_mixtures(gmms) -> Gaussians:
    """Several mixtures as one with a leading set axis: centres ``[S, N, 3]``, amplitudes and
    widths ``[S, N]``; a smaller mixture is padded with zero-amplitude Gaussians (which project
    to exact zeros). ``Gaussians(c[sets], a[sets], s[sets])`` then gives every particle of a
    batch its own set's mixture, so one batch mixes half sets at a fixed size."""
    n = max(g.n for g in gmms)
    c, a, w = [], [], []
    for g in gmms:
        pad = n - g.n
        c.append(torch.cat([g.centers, g.centers.new_zeros(pad, 3)]))
        a.append(torch.cat([g.amplitudes, g.amplitudes.new_zeros(pad)]))
        w.append(torch.cat([g.sigmas, g.sigmas.min().expand(pad)]))
    return Gaussians(torch.stack(c), torch.stack(a), torch.stack(w))


#: Adam's constants (those of ``torch.optim.Adam``'s defaults)
_BETA1, _BETA2, _EPS = 0.9, 0.999, 1e-8


def refine_batch(g, band: BandFrc, x: torch.Tensor, ctf: torch.Tensor, A0: torch.Tensor, s0: torch.Tensor, *,
                 steps: int, lr_rad: float, lr_A: float, precision: str = "highest"):
    """Local refinement of one batch of particles against one mixture.

    ``x [B, K]`` particle band values, ``ctf [B, K]`` their CTF on the band, ``A0 [B, 3, 3]``
    and ``s0 [B, 2]`` (Å) starting poses. ``g`` one mixture, or one per particle (centres
    ``[B, N, 3]``, amplitudes and widths ``[B, N]``, see :func:`stack_mixtures`). Returns
    ``(A, shift_A, frc_mean)``. ``precision`` ``bf16``: the projection runs under bf16
    autocast on CUDA (the image comes back float32).

    The optimiser is Adam (``torch.optim.Adam``'s update, written out on the two tensors) with
    a cosine decay of the step: large steps to leave the start, small ones to settle on the
    optimum. Every particle's update depends on its own gradient only, so a particle's result
    does not depend on its batch. The loop reads nothing back to the host (learning rates are
    host numbers of the step index), so on a GPU it only queues kernels.
    """

    delta = torch.zeros(A0.shape[0], 3, dtype=A0.dtype, device=A0.device, requires_grad=True)
    shift = s0.clone().requires_grad_(True)
    params, lrs = (delta, shift), (float(lr_rad), float(lr_A))
    m = [torch.zeros_like(p) for p in params]
    v = [torch.zeros_like(p) for p in params]
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
        grads = torch.autograd.grad(-score.sum(), params)
        t = step + 1
        decay = 0.5 * (1.0 + math.cos(math.pi * step / steps))
        bc1, bc2_sqrt = 1.0 - _BETA1**t, math.sqrt(1.0 - _BETA2**t)
        with torch.no_grad():
            for prm, gr, mi, vi, lr in zip(params, grads, m, v, lrs):
                mi.lerp_(gr, 1.0 - _BETA1)
                vi.mul_(_BETA2).addcmul_(gr, gr, value=1.0 - _BETA2)
                prm.addcdiv_(mi, (vi.sqrt() / bc2_sqrt).add_(_EPS), value=-lr * decay / bc1)
    return A.detach(), shift.detach(), score.detach()


class _Workers:
    """Threads that share an aligning pass: ``n`` of them, each with one torch thread."""

    def __init__(self, pool: ThreadPoolExecutor, n: int):
        self.pool, self.n = pool, n

    def map(self, fn, items):
        return list(self.pool.map(fn, items))


@contextlib.contextmanager
def cpu_workers(dev, jobs: int | None = None):
    """Worker threads for work split into independent parts on the CPU (``None`` on other
    devices, without a device, or with one torch thread): as many as torch's threads (or
    ``jobs`` when fewer), torch's threads shared out among them.

    The windowed projection's index copies, the FFTs of a band and the optimiser's elementwise
    updates use intra-op threads poorly (an aligning pass kept ~1.1 of 2 cores busy);
    independent sub-batches (or the two half sets' mixture fits), each on its own thread, keep
    every core busy. Torch's thread count is restored at the end."""
    n = torch.get_num_threads()
    k = n if jobs is None else min(n, int(jobs))
    if dev is None or torch.device(dev).type != "cpu" or k < 2:
        yield None
        return
    per = max(1, n // k)
    torch.set_num_threads(per)
    try:
        with ThreadPoolExecutor(k, initializer=torch.set_num_threads, initargs=(per,)) as pool:
            yield _Workers(pool, k)
    finally:
        torch.set_num_threads(n)


def refine_parts(workers, mix: Gaussians, sets: torch.Tensor, band: BandFrc, x, ctf, A0, s0, **kw):
    """:func:`refine_batch` of one batch whose particles each use their own set's mixture of
    ``mix`` (:func:`stack_mixtures`; ``sets [B]``), split into one sub-batch per worker of
    :func:`cpu_workers` (``None``: the whole batch here). Every particle's refinement is
    independent of its batch, so the split changes nothing but the order of float sums."""

    def one(ix):  # ix: the sub-batch's rows, or slice(None) for the whole batch
        s = sets[ix]
        g = Gaussians(mix.centers[s], mix.amplitudes[s], mix.sigmas[s])
        return refine_batch(g, band, x[ix], ctf[ix], A0[ix], s0[ix], **kw)

    if workers is None or len(sets) < 2:
        return one(slice(None))
    parts = [ix for ix in torch.arange(len(sets), device=sets.device).tensor_split(workers.n) if len(ix)]
    outs = workers.map(one, parts)
    return tuple(torch.cat([o[k] for o in outs]) for k in range(3))
