"""The ``cryogmm`` command line: one subcommand per job, each a module with
``add_args(parser)`` and ``main(args)``; the module docstring is its ``--help``.

A :class:`cryogmm.errors.CryoGMMError` raised by a job, a bad option (argparse's error,
an unknown command) are printed as one line on stderr and the process exits with code 2.
SIGTERM (what a batch scheduler sends) unwinds like Ctrl-C: no partial output is left.
Under ``torchrun`` the first rank to fail reports it to the others (:mod:`cryogmm.distributed`),
which stop within seconds; its message is printed once, theirs say which rank failed.
"""

from __future__ import annotations

import argparse
import importlib
import os
import signal
import sys
import threading

# name -> module; imported lazily so `cryogmm info` never pays for torch
COMMANDS = {
    "simulate": "cryogmm.commands.simulate",
    "reconstruct": "cryogmm.commands.reconstruct",
    "refine-poses": "cryogmm.commands.refine_poses",
    "demo": "cryogmm.commands.demo",
    "fit-gmm": "cryogmm.commands.fit_gmm",
    "validate": "cryogmm.commands.validate",
    "refine-model": "cryogmm.commands.refine_model",
    "refine-series": "cryogmm.commands.refine_series",
    "hetero": "cryogmm.commands.hetero",
    "relion": "cryogmm.commands.relion_external",
    "convert": "cryogmm.bridge.commands.convert",
    "subset": "cryogmm.bridge.commands.subset",
    "info": "cryogmm.bridge.commands.info",
}


class OneLineParser(argparse.ArgumentParser):
    """argparse, but a usage error is one line on stderr (exit 2) that names the option."""

    def error(self, message):
        msg = " ".join(str(message).split())
        self.exit(2, f"{self.prog}: error: {msg} (see {self.prog} --help)\n")


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised in the main thread so every ``with`` block cleans up as on Ctrl-C."""


def _on_sigterm(signum, frame):
    raise Terminated()


def _first_line(doc: str | None) -> str:
    return (doc or "").strip().splitlines()[0] if doc else ""


def build_parser(only: str | None = None) -> argparse.ArgumentParser:
    from cryogmm import __version__

    parser = OneLineParser(
        prog="cryogmm",
        description="Gaussian-mixture methods for cryo-EM. Run `cryogmm <command> --help` for each job.",
    )
    parser.add_argument("--version", action="version", version=f"cryogmm {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="<command>")
    for name, modname in COMMANDS.items():
        if only is not None and name != only:
            sub.add_parser(name, help="")
            continue
        mod = importlib.import_module(modname)
        p = sub.add_parser(
            name,
            help=_first_line(mod.__doc__),
            description=mod.__doc__,
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
        mod.add_args(p)
        p.set_defaults(_module=mod)
    return parser


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    only = next((a for a in argv if a in COMMANDS), None)
    if only is None and not any(a in ("-h", "--help", "--version") for a in argv):
        if not argv:
            build_parser(only="__none__").print_help()
            return 0
        first = next((a for a in argv if not a.startswith("-")), None)
        what = f"unknown command {first!r}" if first else f"no command given (got {' '.join(argv)!r})"
        print(f"cryogmm: error: {what}; choose from {', '.join(COMMANDS)} (see cryogmm --help)", file=sys.stderr)
        return 2
    parser = build_parser(only=only)
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # a usage error, already printed as one line (--help and --version exit 0)
        if not e.code:
            raise
        return e.code if isinstance(e.code, int) else 2
    name = " ".join(a for a in (args.command, getattr(args, "action", None)) if a)
    from cryogmm.runtime import keep_freed_memory

    keep_freed_memory()
    dist = _distributed()
    if dist is not None and getattr(args, "dist_timeout", None) is not None:
        dist.configure(timeout_s=args.dist_timeout)
    main_thread = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, _on_sigterm) if main_thread else None
    try:
        ret = args._module.main(args)
    except BaseException as e:  # noqa: BLE001 - every way out is reported once, as one line where it can be
        return _failed(name, e, dist)
    finally:
        if main_thread:
            signal.signal(signal.SIGTERM, previous)
    from cryogmm.runtime import close_bars

    close_bars()  # bars of stages that ended early (an optimiser converged) end as they stand
    if dist is not None:
        dist.finish()
    return int(ret or 0)


def _distributed():
    """:mod:`cryogmm.distributed` when started by ``torchrun`` with several processes (it
    imports torch, which a plain ``cryogmm info`` never pays for), else None."""
    if os.environ.get("WORLD_SIZE", "1") in ("", "0", "1") or "RANK" not in os.environ:
        return None
    from cryogmm import distributed

    return distributed if distributed.launched() else None


def _failed(name: str, e: BaseException, dist) -> int:
    """Report a job's failure: one line (a traceback for a bug) and the exit code. Under
    ``torchrun`` the first rank to fail tells the others (they stop within seconds, see
    :mod:`cryogmm.distributed`) and alone prints its message; a rank stopped by another's
    failure prints one line saying so."""
    import traceback

    from cryogmm.errors import CryoGMMError

    if isinstance(e, SystemExit):
        raise e
    from cryogmm.runtime import close_bars

    close_bars()  # bars end as they stand, before the message: the message stays the last line
    where = ""
    if dist is not None:
        first = not isinstance(e, dist.PeerFailure) and dist.report_failure(_one_line(e))
        peer = dist.peer_failure()
        dist.abort()
        if not first and peer is not None:
            print(f"cryogmm {name}: rank {dist.rank()} stopped: rank {peer[0]} failed", file=sys.stderr)
            return 1
        where = f" (rank {dist.rank()} of {int(os.environ.get('WORLD_SIZE', '1'))})"
    if isinstance(e, CryoGMMError):
        print(f"cryogmm {name}: error{where}: {_one_line(e)}", file=sys.stderr)
        return e.exit_code
    if isinstance(e, Terminated):
        print(f"cryogmm {name}: terminated (SIGTERM){where}; partial outputs removed", file=sys.stderr)
        return 143
    if isinstance(e, KeyboardInterrupt):
        print(f"cryogmm {name}: interrupted{where}", file=sys.stderr)
        return 130
    if dist is None:
        raise e  # a bug on one process: Python's traceback, exit 1, as ever
    if _is_comm_error(e):
        t = dist.timeout_s()
        limit = f"--dist-timeout is {t:g} s" if t else "the timeout is torch's default"
        print(f"cryogmm {name}: error{where}: the process group failed ({_one_line(e)}); {limit}", file=sys.stderr)
        return 1
    traceback.print_exception(e)
    print(f"cryogmm {name}: failed{where}; every rank stopped", file=sys.stderr)
    return 1


def _one_line(e: BaseException) -> str:
    return " ".join(str(e).split()) or type(e).__name__


def _is_comm_error(e: BaseException) -> bool:
    import torch

    return isinstance(e, getattr(torch.distributed, "DistError", ())) or (
        isinstance(e, RuntimeError) and any(w in str(e) for w in ("gloo", "Gloo", "NCCL", "Connection", "timed out",
                                                                   "Timed out")))


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
