"""The CLI jobs, one module per command (module docstring = ``--help``, ``add_args``, ``main``)."""

from pathlib import Path

TORCHRUN_DEVICE_HELP = "auto (each torchrun rank its own GPU, else cuda:0, else cpu), cpu or cuda[:N] (default auto)"


def add_stream_args(p):
    """``--accumulate``, ``--prefetch`` and ``--device`` of the jobs that reconstruct from a stack
    and run under torchrun."""
    p.add_argument("--accumulate", choices=("auto", "float32", "float64"), default="auto",
                   help="precision of the reconstructions' Fourier sums: auto = float64 under torchrun (results "
                        "independent of the sharding), float32 on one process")
    p.add_argument("--prefetch", type=int, default=1, help="batches read ahead in a background thread (0: off; default 1)")
    p.add_argument("--device", default="auto", help=TORCHRUN_DEVICE_HELP)


DEVICE_HELP = "auto, cpu or cuda[:N] (default auto)"


def add_seed_device_out(p, seed_help: str = "random seed (default 0); equal seeds give equal results"):
    """``--seed``, ``--device`` (auto) and ``--out`` (a folder, required) of the one-process jobs."""
    p.add_argument("--seed", type=int, default=0, help=seed_help)
    p.add_argument("--device", default="auto", help=DEVICE_HELP)
    p.add_argument("--out", type=Path, required=True, help="output folder")
