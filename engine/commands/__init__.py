"""The CLI jobs, one module per command (module docstring = ``--help``, ``add_args``, ``main``)."""

import argparse
import os
from pathlib import Path

from cryogmm.errors import InputError, device_name, nonnegative_int, positive_float
from cryogmm.io.outputs import check_output

DIST_TIMEOUT_S = 1800.0
"""``--dist-timeout`` default: how long a collective may wait under ``torchrun`` before the job
fails. Rank 0 alone fits the mixtures of ``refine-poses`` while the others wait, so it is
generous; a failing rank ends the others within seconds whatever it is."""

TORCHRUN_DEVICE_HELP = ("auto (cuda when there is a GPU, else cpu), cpu or cuda[:N] (default auto); under torchrun "
                        "each process takes its own GPU, cuda:LOCAL_RANK, and more processes per node than GPUs is an error")


def add_dist_args(p):
    """``--dist-timeout`` and ``--device`` of the jobs that run under torchrun."""
    p.add_argument("--dist-timeout", type=positive_float, default=DIST_TIMEOUT_S, metavar="SECONDS",
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


DEVICE_HELP = "auto (cuda when there is a GPU, else cpu), cpu or cuda[:N] (default auto)"

MAP_SIMILARITIES = ("fsc", "frc", "relative-entropy", "cross-correlation", "inner-product")
MAP_SIMILARITY_HELP = ("map similarity: fsc (default; mean FSC of volumes up to the resolution), frc (mean FRC of "
                       "projections), relative-entropy, cross-correlation or inner-product")


def add_device(p):
    """``--device auto|cpu|cuda[:N]`` (default auto) of the one-process jobs."""
    p.add_argument("--device", type=device_name, default="auto", help=DEVICE_HELP)


def add_similarity(p):
    """``--similarity`` of the model jobs (refine-model, refine-series): one default."""
    p.add_argument("--similarity", default=MAP_SIMILARITIES[0], choices=MAP_SIMILARITIES, help=MAP_SIMILARITY_HELP)


class _Deprecated(argparse.Action):
    """An old spelling of an option, hidden from ``--help``, that still sets the new one."""

    def __call__(self, parser, namespace, values, option_string=None):
        setattr(namespace, self.dest, values)


def add_count(p, name: str, dest: str, old: str = "--n", **kw):
    """A count option (``--n-particles``, ``--n-gaussians``) with its old spelling ``old``
    kept as a hidden, deprecated alias."""
    p.add_argument(name, dest=dest, **kw)
    p.add_argument(old, dest=dest, type=kw.get("type"), action=_Deprecated, default=argparse.SUPPRESS,
                   help=argparse.SUPPRESS)


def add_seed_device_out(p, seed_help: str = "random seed (default 0); equal seeds give equal results"):
    """``--seed``, ``--device`` (auto) and ``--out`` (a folder, required) of the one-process jobs."""
    p.add_argument("--seed", type=nonnegative_int, default=0, help=seed_help)
    add_device(p)
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
