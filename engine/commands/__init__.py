"""The CLI jobs, one module per command (module docstring = ``--help``, ``add_args``, ``main``)."""

import os
from pathlib import Path

from cryogmm.errors import InputError, device_name, nonnegative_int, positive_float
from cryogmm.io.outputs import check_output
from cryogmm.runtime import DIST_TIMEOUT_S

TORCHRUN_DEVICE_HELP = ("auto (cuda when there is a GPU, else cpu), cpu or cuda[:N] (default auto); under torchrun "
                        "each process takes its own GPU, cuda:LOCAL_RANK, and more processes per node than GPUs is an error")


def add_dist_args(p):
    """``--dist-timeout`` and ``--device`` of the jobs that run under torchrun."""
    p.add_argument("--dist-timeout", type=positive_float, default=None, metavar="SECONDS",
                   help="under torchrun: how long a collective (an exchange between the processes) may wait "
                        f"before the job fails (default {DIST_TIMEOUT_S:g}). A rank that fails ends every rank within seconds "
                        "whatever this is; the timeout catches a rank that hangs")
    p.add_argument("--device", type=device_name, default="auto", help=TORCHRUN_DEVICE_HELP)


def add_stream_args(p):
    """``--accumulate``, ``--prefetch``, ``--dist-timeout`` and ``--device`` of the jobs that reconstruct from a stack
    and run under torchrun."""
    p.add_argument("--accumulate", choices=("auto", "float32", "float64"), default="auto",
                   help="precision of the reconstructions' Fourier sums: auto = float64 under torchrun (results "
                        "independent of the sharding), float32 on one process")
    p.add_argument("--prefetch", type=nonnegative_int, default=1,
                   help="batches read ahead in a background thread (0: off; default 1)")
    add_dist_args(p)


DEVICE_HELP = "auto, cpu or cuda[:N] (default auto)"


def add_seed_device_out(p, seed_help: str = "random seed (default 0); equal seeds give equal results"):
    """``--seed``, ``--device`` (auto) and ``--out`` (a folder, required) of the one-process jobs."""
    p.add_argument("--seed", type=nonnegative_int, default=0, help=seed_help)
    p.add_argument("--device", type=device_name, default="auto", help=DEVICE_HELP)
    p.add_argument("--out", type=Path, required=True, help="output folder")
    add_force(p)


def add_force(p, what: str = "folder"):
    """``--force``: write into an existing non-empty output (refused without it)."""
    p.add_argument("--force", action="store_true",
                   help=f"write into an output {what} that already holds files (replacing those of the same name); "
                        f"without it an existing non-empty output is refused")


def check_out(args, *inputs, folder: bool = True, resumable: bool = False, option: str = "--out", others=()):
    """The one output check of every job (before any work): see :func:`cryogmm.io.outputs.check_output`.
    ``inputs``: the job's input paths (None is skipped; lists are flattened); a missing one is an
    :class:`~cryogmm.errors.InputError` before anything is read. ``others``: inputs the output
    may not be (or hold) whose absence the job itself reports (a run folder: "train first")."""
    flat = []
    for x in inputs:
        flat.extend(x if isinstance(x, (list, tuple)) else [x])
    for x in flat:
        if x is not None and not Path(x).exists():
            raise InputError(x, "no such file or folder")
    out = getattr(args, option.lstrip("-").replace("-", "_"))
    # under torchrun only rank 0 judges an existing output: the others may start after it wrote
    later_rank = os.environ.get("RANK", "0") != "0"
    return check_output(out, inputs=[*flat, *others], force=getattr(args, "force", False) or later_rank, folder=folder, option=option,
                        resume=getattr(args, "resume", False), resumable=resumable)
