"""Running jobs on several processes with ``torch.distributed`` (launched by ``torchrun``).

``reconstruct``, ``refine-poses`` and ``hetero train`` run unchanged under ``torchrun``::

    torchrun --nproc_per_node 2 -m cryogmm.cli reconstruct particles.star --out rec
    torchrun --nproc_per_node 4 -m cryogmm.cli refine-poses particles.star --out ref --device cuda
    torchrun --nnodes 2 --nproc_per_node 8 --rdzv-backend c10d --rdzv-endpoint HOST:29500 \\
        -m cryogmm.cli hetero train particles.star --model ref.pdb --out run

(``python -m torch.distributed.run`` is the same program as ``torchrun``.) Each process reads
the launcher's environment (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR``/``PORT``);
on GPUs it takes ``cuda:LOCAL_RANK`` and NCCL, on CPUs gloo. Without that environment (or
with ``WORLD_SIZE=1``) nothing here does anything and the jobs run as one process.

What the jobs do with several processes:

- the particles are cut into ``WORLD_SIZE`` contiguous shards (:func:`shard`), each rank
  reading and processing only its own (sequential reads of its part of the stacks);
- Fourier reconstruction accumulators are summed across ranks in float64
  (:func:`all_reduce_sum`), so every rank holds the same grids and the same maps;
- per-particle results (refined poses, scores) are gathered by :func:`gather_rows` (each rank
  fills its own rows, the rest are zero, one exact sum);
- things computed once (mixture fits) are computed on rank 0 and broadcast
  (:func:`broadcast_object`);
- models are wrapped in ``DistributedDataParallel`` (:func:`ddp`), gradients averaged;
- only rank 0 writes outputs, reports and checkpoints (:func:`is_main`); the others wait at a
  barrier and return the same report.

Results equal one process's up to the order of floating-point reductions.
"""

from __future__ import annotations

import atexit
import os

import numpy as np
import torch


def launched() -> bool:
    """True when started by ``torchrun`` with more than one process."""
    try:
        return int(os.environ.get("WORLD_SIZE", "1")) > 1 and "RANK" in os.environ
    except ValueError:
        return False


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", "0"))


def _active() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def rank() -> int:
    """This process's rank (from the launcher's ``RANK`` before the group is joined)."""
    if _active():
        return torch.distributed.get_rank()
    return int(os.environ.get("RANK", "0")) if launched() else 0


def world() -> int:
    """Number of processes in the joined group (1 before :func:`setup` or without ``torchrun``)."""
    return torch.distributed.get_world_size() if _active() else 1


def is_main() -> bool:
    return rank() == 0


def setup(device: torch.device) -> torch.device:
    """Join the process group the launcher describes (once per process) and return this
    rank's device: ``cuda:LOCAL_RANK`` for CUDA (NCCL), the given device otherwise (gloo).
    Without ``torchrun`` it returns ``device`` unchanged."""
    if not launched():
        return device
    dist = torch.distributed
    if device.type == "cuda":
        device = torch.device("cuda", local_rank() % max(1, torch.cuda.device_count()))
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(backend=backend, init_method="env://")
        atexit.register(_finish)
    return device


def _finish():
    if _active():
        try:
            torch.distributed.destroy_process_group()
        except Exception:
            pass


def shard(n: int, r: int | None = None, w: int | None = None) -> np.ndarray:
    """Row indices ``[k]`` of rank ``r``'s contiguous share of ``n`` rows (sizes differ by at most 1)."""
    r = rank() if r is None else r
    w = world() if w is None else w
    lo, hi = (n * r) // w, (n * (r + 1)) // w
    return np.arange(lo, hi, dtype=np.int64)


def _comm_device(t: torch.Tensor) -> torch.device:
    # NCCL needs CUDA tensors; gloo works on CPU tensors
    if torch.distributed.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def all_reduce_sum(t: torch.Tensor, dtype: torch.dtype | None = torch.float64) -> torch.Tensor:
    """Sum ``t`` over ranks in place (in ``dtype``, float64 by default, then back to ``t``'s dtype);
    returns ``t``. A no-op on one process."""
    if world() == 1:
        return t
    cd = _comm_device(t)
    want = dtype if (dtype is not None and t.is_floating_point()) else t.dtype
    if t.device == cd and t.dtype == want and t.is_contiguous():  # in place: no copy of a large grid
        torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.SUM)
        return t
    buf = t.to(device=cd, dtype=want, copy=True)
    torch.distributed.all_reduce(buf, op=torch.distributed.ReduceOp.SUM)
    t.copy_(buf.to(device=t.device, dtype=t.dtype))
    return t


def gather_rows(t: torch.Tensor, rows) -> torch.Tensor:
    """Every rank holds correct values of ``t [n, ...]`` at its ``rows`` only: return the full
    tensor on every rank (the other rows zeroed, then summed: exact, each row has one owner)."""
    if world() == 1:
        return t
    rows = torch.as_tensor(np.asarray(rows), dtype=torch.long, device=t.device)
    full = torch.zeros_like(t)
    full[rows] = t[rows]
    return all_reduce_sum(full, dtype=None)


def broadcast_object(obj, src: int = 0):
    """Rank ``src``'s ``obj`` (picklable; tensors travel on the CPU) on every rank."""
    if world() == 1:
        return obj
    box = [obj if rank() == src else None]
    torch.distributed.broadcast_object_list(box, src=src)
    return box[0]


def barrier() -> None:
    if world() > 1:
        if torch.distributed.get_backend() == "nccl":
            torch.distributed.barrier(device_ids=[torch.cuda.current_device()])
        else:
            torch.distributed.barrier()


def ddp(module: torch.nn.Module, device: torch.device):
    """``DistributedDataParallel(module)`` under ``torchrun``, the module itself otherwise."""
    if world() == 1:
        return module
    from torch.nn.parallel import DistributedDataParallel

    ids = [device.index if device.index is not None else torch.cuda.current_device()] if device.type == "cuda" else None
    return DistributedDataParallel(module, device_ids=ids)
