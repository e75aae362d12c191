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

As one job: decisions (stop early or not) are rank 0's, broadcast (:func:`agree`); a
collective that waits longer than :func:`timeout_s` (``--dist-timeout``) fails; a rank that
fails reports it through the launcher's store (:func:`report_failure`, the CLI does it) and every
other rank's watchdog ends its process within seconds, so no rank waits for ever for a dead one;
with CUDA each process takes its own GPU or the job refuses to start (:func:`setup`).
"""

from __future__ import annotations

import atexit
import datetime
import os
import signal
import sys
import threading
import time

import numpy as np
import torch

from cryogmm.errors import OptionError

TEST_FAIL_ENV = "CRYOGMM_TEST_FAIL"
"""Test hook: ``RANK:N`` makes rank ``RANK`` raise at its ``N``-th collective (``RANK:N:hang``:
sleep there instead), so the tests can check what a failing rank does to the others."""

_state = {
    "timeout_s": None,  # set by configure() (the CLI's --dist-timeout); None: torch's default
    "failure": None,  # (rank, message) of the rank that failed first, once known here
    "watchdog": None,  # the thread watching the store for a failed rank
    "stop": threading.Event(),
    "handling": False,  # the main thread is already handling an error: do not interrupt it
    "aborted": False,
    "collectives": 0,  # counted for the test hook
}

PEER_GRACE_S = 5.0
"""After a peer's failure is seen, how long the main thread has to unwind (outputs removed)
before the process is ended regardless (it may be blocked inside a collective)."""

LOST_STORE_S = 20.0
"""How long the store may be unreachable, once reached, before this rank gives up."""


class PeerFailure(KeyboardInterrupt):
    """Raised in the main thread when another rank failed: unwinds like Ctrl-C (partial
    outputs removed) through any ``except Exception``."""


def launched() -> bool:
    """True when started by ``torchrun`` with more than one process."""
    try:
        return int(os.environ.get("WORLD_SIZE", "1")) > 1 and "RANK" in os.environ
    except ValueError:
        return False


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", "0"))


def local_world() -> int:
    """Processes on this node (``LOCAL_WORLD_SIZE``, set by ``torchrun``)."""
    return int(os.environ.get("LOCAL_WORLD_SIZE", "1"))


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


def configure(timeout_s: float | None = None) -> None:
    """Settings of the process group :func:`setup` joins: ``timeout_s``, how long a collective
    may wait before it fails (``--dist-timeout``, whose default is
    :data:`cryogmm.commands.DIST_TIMEOUT_S`; without it, torch's default)."""
    if timeout_s is not None:
        if not (timeout_s > 0 and np.isfinite(timeout_s)):
            raise OptionError("--dist-timeout", f"{timeout_s}; expected a positive number of seconds")
        _state["timeout_s"] = float(timeout_s)


def timeout_s() -> float | None:
    return _state["timeout_s"]


def _cuda_device(device: torch.device) -> torch.device:
    """This rank's GPU: ``cuda:LOCAL_RANK``, one GPU per process, or a clear error."""
    n, here = torch.cuda.device_count(), local_world()
    if device.index is not None and here > 1:
        raise OptionError("--device", f"{device} under torchrun with {here} processes on this node would put them all on "
                          "one GPU; pass --device cuda (or auto): each process takes cuda:LOCAL_RANK "
                          "(choose the GPUs with CUDA_VISIBLE_DEVICES)")
    if device.index is not None:
        return device
    if here > n:
        raise OptionError("--device", f"torchrun started {here} processes on this node but {n} GPU(s) are visible; "
                          f"one GPU per process: use --nproc-per-node {n} or fewer, or --device cpu")
    return torch.device("cuda", local_rank())


def setup(device: torch.device) -> torch.device:
    """Join the process group the launcher describes (once per process) and return this
    rank's device: ``cuda:LOCAL_RANK`` for CUDA (NCCL; one GPU per process, else an
    :class:`~cryogmm.errors.OptionError`), the given device otherwise (gloo). The group's
    timeout is :func:`timeout_s`; a watchdog thread ends this process when another rank
    reports a failure (:func:`report_failure`). Without ``torchrun`` it returns ``device``
    unchanged."""
    if not launched():
        return device
    dist = torch.distributed
    if device.type == "cuda":
        device = _cuda_device(device)
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        _start_watchdog()
        backend = "nccl" if device.type == "cuda" else "gloo"
        t = _state["timeout_s"]
        dist.init_process_group(backend=backend, init_method="env://",
                                timeout=None if t is None else datetime.timedelta(seconds=t))
        atexit.register(_finish)
    return device


# --------------------------------------------------------------------------- failures
# A rank that fails writes "rank<TAB>message" under one key of the launcher's TCP store
# (MASTER_ADDR:MASTER_PORT: torchrun's agent store, or rank 0's); the first writer wins and
# prints its message; every other rank's watchdog sees the key within a second and ends its
# process (PeerFailure in the main thread, then a hard exit if that thread is stuck in a
# collective). So one rank's exception ends every rank within seconds, the message printed once.


def _failure_key() -> str:
    run = os.environ.get("TORCHELASTIC_RUN_ID", "")
    return f"cryogmm/failed/{run}/{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}"


def _store(timeout: float):
    addr, port = os.environ.get("MASTER_ADDR"), os.environ.get("MASTER_PORT")
    if not addr or not port:
        return None
    return torch.distributed.TCPStore(addr, int(port), is_master=False, wait_for_workers=False,
                                      timeout=datetime.timedelta(seconds=timeout))


def report_failure(message: str) -> bool:
    """Tell the other ranks that this one failed (with ``message``). Returns True when this
    rank is the first to fail (it should print its message), False when another rank failed
    first (this failure is most likely a consequence: print nothing of it). Without
    ``torchrun``, or when the store cannot be reached, returns True."""
    _state["handling"] = True
    if not launched():
        return True
    me = rank()
    if _state["failure"] is not None:
        return _state["failure"][0] == me
    payload = f"{me}\t{message}"
    try:
        store = _store(timeout=5.0)
        if store is None:
            return True
        got = store.compare_set(_failure_key(), "", payload)
        got = got.decode() if isinstance(got, bytes) else str(got)
    except Exception:
        return True
    r, _, msg = got.partition("\t")
    _state["failure"] = (int(r), msg)
    return got == payload


def peer_failure():
    """``(rank, message)`` of the rank whose failure stopped this one, or None."""
    f = _state["failure"]
    return f if f is not None and f[0] != rank() else None


def _start_watchdog():
    if _state["watchdog"] is not None:
        return
    main = threading.main_thread()
    if threading.current_thread() is main:
        signal.signal(signal.SIGUSR1, _on_peer_signal)
        can_signal = True
    else:
        can_signal = False
    t = threading.Thread(target=_watch, args=(main.ident, can_signal), name="cryogmm-dist-watchdog", daemon=True)
    _state["watchdog"] = t
    t.start()
    # a script calling the engine under torchrun (not the CLI, which reports failures itself):
    # an uncaught exception is reported to the other ranks before Python prints it
    previous = sys.excepthook

    def hook(kind, value, tb):
        if not issubclass(kind, PeerFailure):
            report_failure(" ".join(str(value).split()) or kind.__name__)
        previous(kind, value, tb)

    sys.excepthook = hook


def _on_peer_signal(signum, frame):
    if _state["handling"]:
        return
    _state["handling"] = True
    f = _state["failure"]
    raise PeerFailure(f"rank {f[0]} failed" if f else "another rank failed")


def _watch(main_ident, can_signal: bool):
    key, me = _failure_key(), int(os.environ.get("RANK", "0"))
    store, reached, lost_since = None, False, None
    while not _state["stop"].wait(0.5):
        try:
            if store is None:
                store = _store(timeout=10.0)
                if store is None:
                    return
            if store.check([key]):
                got = store.get(key)
                r, _, msg = (got.decode() if isinstance(got, bytes) else str(got)).partition("\t")
                if int(r) != me:
                    _state["failure"] = (int(r), msg)
                    _stop(main_ident, can_signal)
                    return
            reached, lost_since = True, None
        except Exception:
            store = None
            if not reached:
                continue  # the store is not up yet (rank 0 has not started)
            lost_since = lost_since or time.monotonic()
            if time.monotonic() - lost_since > LOST_STORE_S:
                _state["failure"] = (-1, "the process group's store went away")
                _stop(main_ident, can_signal)
                return


def _stop(main_ident, can_signal: bool):
    """Another rank failed: unwind the main thread (PeerFailure), then end the process."""
    if can_signal and not _state["handling"]:
        try:
            signal.pthread_kill(main_ident, signal.SIGUSR1)
        except Exception:
            pass
        if _state["stop"].wait(PEER_GRACE_S):
            return
    r = _state["failure"][0]
    who = f"rank {r} failed" if r >= 0 else _state["failure"][1]
    print(f"cryogmm: rank {int(os.environ.get('RANK', '0'))} stopped: {who}", file=sys.stderr, flush=True)
    os._exit(1)


def abort() -> None:
    """After a failure: do not wait for the other ranks on the way out (NCCL communicators
    aborted where torch can, the group not destroyed collectively)."""
    _state["aborted"] = True
    _state["stop"].set()
    if _active() and torch.distributed.get_backend() == "nccl":
        fn = getattr(torch.distributed.distributed_c10d, "_abort_process_group", None)
        if fn is not None:
            try:
                fn()
            except Exception:
                pass


def finish() -> None:
    """The job is done: stop the watchdog (the other ranks may now leave in any order)."""
    _state["stop"].set()


def _inject_test_failure():
    spec = os.environ.get(TEST_FAIL_ENV)
    if not spec:
        return
    _state["collectives"] += 1
    parts = spec.split(":")
    if int(parts[0]) == rank() and _state["collectives"] == int(parts[1]):
        if parts[2:] == ["hang"]:
            time.sleep(3600)
        raise RuntimeError(f"{TEST_FAIL_ENV}: failure injected on rank {rank()} at collective {parts[1]}")


def agree(flag) -> bool:
    """Rank 0's ``flag`` on every rank (a decision such as stopping early must be taken by
    one rank: floats that differ in the last bits between ranks must not let one rank stop
    while another waits in a collective). ``bool(flag)`` on one process."""
    if world() == 1:
        return bool(flag)
    _inject_test_failure()
    t = torch.tensor([1 if flag else 0], dtype=torch.int32, device=_comm_device(torch.empty(0)))
    torch.distributed.broadcast(t, src=0)
    return bool(t.item())


def _finish():
    _state["stop"].set()
    if _active() and not _state["aborted"]:
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
    _inject_test_failure()
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
    _inject_test_failure()
    box = [obj if rank() == src else None]
    torch.distributed.broadcast_object_list(box, src=src)
    return box[0]


def barrier() -> None:
    if world() > 1:
        _inject_test_failure()
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
