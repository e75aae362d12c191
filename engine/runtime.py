"""What every job shares: reports, progress, devices and seeds."""

from __future__ import annotations

import time

from cryogmm.errors import OptionError


class Progress:
    """Progress reporting for a job: ``progress(stage, done, total)``.

    With ``callback=None`` and ``bar=True`` it draws tqdm bars on stderr (the CLI); Scipion
    and ChimeraX pass their own callback.
    """

    def __init__(self, callback=None, bar: bool = False):
        self.callback, self.bar = callback, bar
        self._bars = {}

    def __call__(self, stage: str, done: int, total: int):
        if self.callback is not None:
            self.callback(stage, done, total)
        if self.bar:
            from tqdm.auto import tqdm

            b = self._bars.get(stage)
            if b is None:
                b = self._bars[stage] = tqdm(total=total, desc=stage, unit="ptcl", leave=False, dynamic_ncols=True)
            b.update(done - b.n)
            if done >= total:
                b.close()
                del self._bars[stage]


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


class Timer:
    def __init__(self):
        self.t0 = time.perf_counter()

    def __call__(self) -> float:
        return time.perf_counter() - self.t0
