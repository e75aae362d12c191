"""What every job shares: reports, progress, devices and seeds."""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys
import time

from cryogmm.errors import OptionError

MALLOC_ENV = "CRYOGMM_KEEP_FREED"


def stage_unit(stage: str) -> str:
    """What a stage's ``done``/``total`` count, from its name (the jobs' stage names): particles
    (``ptcl``) for reading, simulating, reconstructing and aligning particles, images (``img``)
    for a training epoch, ``frame`` for maps along a trajectory, ``map`` for a series' capture,
    optimiser ``step`` otherwise (model refinement, mixture fits, L-BFGS evaluations)."""
    s = stage.lower()
    if s.startswith("epoch"):
        return "img"
    if s.startswith("maps along"):
        return "frame"
    if s.startswith("capture"):
        return "map"
    if ("particles" in s or s in ("simulate", "reconstruct") or " iteration " in f" {s} "
            or s.startswith("conformation")):
        return "ptcl"
    return "step"


_OPEN = set()  # Progress objects with bars open, closed by close_bars() when a job returns


def close_bars() -> None:
    """End the bars every :class:`Progress` left open (the CLI calls it when a job returns)."""
    for p in list(_OPEN):
        p.close()


class Progress:
    """Progress reporting for a job: ``progress(stage, done, total)``.

    With ``callback=None`` and ``bar=True`` it draws tqdm bars on stderr (the CLI), one per
    stage, counting in the stage's unit (:func:`stage_unit`, or ``units[stage]``); a stage that
    starts again (``done`` below the bar's count, or another ``total``: the repeated polish
    rounds) gets a fresh bar, and :meth:`close` ends any bar a stage left open (an optimiser
    that converged before its step budget). On a terminal finished bars vanish; in a log (not
    a terminal) each bar's last state stays, so the log shows that it moved. Scipion and
    ChimeraX pass their own callback.
    """

    def __init__(self, callback=None, bar: bool = False, units: dict | None = None):
        self.callback, self.bar = callback, bar
        self.units = dict(units or {})
        self._bars = {}

    def __call__(self, stage: str, done: int, total: int):
        if self.callback is not None:
            self.callback(stage, done, total)
        if not self.bar:
            return
        import sys

        from tqdm.auto import tqdm

        b = self._bars.get(stage)
        if b is not None and (b.total != total or done < b.n):
            b.close()
            b = None
        if b is None:
            tty = sys.stderr.isatty()
            b = self._bars[stage] = tqdm(total=total, initial=min(done, total), desc=stage,
                                         unit=self.units.get(stage) or stage_unit(stage), leave=not tty,
                                         dynamic_ncols=True, mininterval=0.2 if tty else 5.0)
            _OPEN.add(self)
        else:
            b.update(done - b.n)
        if done >= total:
            b.close()
            del self._bars[stage]
            if not self._bars:
                _OPEN.discard(self)

    def close(self):
        """End every bar still open (shown as it stands)."""
        for b in self._bars.values():
            b.close()
        self._bars.clear()
        _OPEN.discard(self)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
        return False


def pick_device(name: str | None = None):
    """``auto``, ``cpu``, ``cuda``, ``cuda:1``.

    ``auto``: ``cuda`` when CUDA is available, else the CPU. Under ``torchrun`` ``cuda`` becomes
    each process's own GPU, ``cuda:LOCAL_RANK``, in :func:`cryogmm.distributed.setup`, which
    refuses more processes on a node than it has GPUs (never two ranks on one GPU).
    """
    import torch

    if name in (None, "", "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(name)
    except RuntimeError:
        raise OptionError("--device", f"unknown device {name!r}; expected auto, cpu or cuda[:N]") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise OptionError("--device", f"{name} asked for but no CUDA device is available")
    return dev


MATMUL_PRECISIONS = ("highest", "tf32", "bf16")


def set_matmul_precision(dev, mode: str = "highest"):
    """Precision of the projection matrix products on GPUs: ``highest`` (float32, the default),
    ``tf32`` (TF32 tensor cores for float32 matrix products and convolutions: 10-bit mantissa
    inputs, float32 accumulation) or ``bf16`` (TF32 as above, and the separable projection's
    batched products under bf16 autocast where the caller asks for it, :func:`autocast`).
    FSC, Fourier reconstruction and their accumulators always stay float32/float64: this
    only changes matrix products. On the CPU the setting is recorded but changes nothing.
    Returns the mode."""
    import torch

    if mode not in MATMUL_PRECISIONS:
        raise OptionError("--matmul-precision", f"{mode!r}; expected one of {', '.join(MATMUL_PRECISIONS)}")
    if getattr(dev, "type", str(dev)) == "cuda":
        fast = mode != "highest"
        torch.backends.cuda.matmul.allow_tf32 = fast
        torch.backends.cudnn.allow_tf32 = fast
    return mode


def autocast(dev, mode: str = "highest"):
    """A context: bf16 autocast on CUDA when ``mode == 'bf16'``, else nothing."""
    import contextlib

    import torch

    if mode == "bf16" and getattr(dev, "type", str(dev)) == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def pin_images(dev, force: bool = False):
    """For :meth:`ImageSource.chunks`' ``transform``: on CUDA, a function that copies a batch of
    images (numpy) into a new page-locked float32 tensor, run by the prefetch thread, so the
    main thread only queues a non-blocking upload; ``None`` elsewhere (a CPU job uses the
    numpy array as it is). ``force``: the function without pinning, on any device (tests)."""
    if getattr(dev, "type", str(dev)) != "cuda" and not force:
        return None
    import numpy as np
    import torch

    pin = getattr(dev, "type", str(dev)) == "cuda"

    def to_pinned(images):
        a = np.ascontiguousarray(images, dtype=np.float32)
        t = torch.empty(a.shape, dtype=torch.float32, pin_memory=pin)
        t.numpy()[...] = a
        return t

    return to_pinned


def keep_freed_memory(limit_bytes: int = 1 << 30) -> bool:
    """Let the process reuse the memory of its freed temporaries (glibc on Linux).

    A training or refinement batch makes and frees tensors of tens of MB (complex factors of a
    Fourier projection, profile buffers, their gradients). glibc gives every allocation over its
    mmap threshold (at most 32 MB by default) fresh pages and returns them on free, so each batch
    pays the kernel for mapping and zero-filling them page by page again (measured: an
    interleave of 6 M complex values, 7.9 ns per value this way, 0.9 ns when the pages are
    reused; ``hetero train --draw atoms`` 1.4x the images/s). Here blocks up to ``limit_bytes``
    come from the heap and up to ``limit_bytes`` of free memory stay with the process; its peak
    memory is unchanged, only not handed back between batches. No effect elsewhere (other C
    libraries, other systems) or with the environment variable ``CRYOGMM_KEEP_FREED=0``.
    Returns whether it took effect."""
    if os.environ.get(MALLOC_ENV, "") == "0" or not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        if not libc.gnu_get_libc_version:  # glibc only (musl has mallopt but ignores it)
            return False
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    m_trim_threshold, m_mmap_threshold = -1, -3
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    limit = int(min(limit_bytes, 2**31 - 1))
    return bool(mallopt(m_mmap_threshold, limit)) and bool(mallopt(m_trim_threshold, limit))


class Timer:
    def __init__(self):
        self.t0 = time.perf_counter()

    def __call__(self) -> float:
        return time.perf_counter() - self.t0
