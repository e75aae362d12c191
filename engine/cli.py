"""The ``cryogmm`` command line: one subcommand per job, each a module with
``add_args(parser)`` and ``main(args)``; the module docstring is its ``--help``.

A :class:`cryogmm.errors.CryoGMMError` raised by a job is printed as one line on stderr
and the process exits with code 2.
"""

from __future__ import annotations

import argparse
import importlib
import sys

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
    "convert": "cryogmm.bridge.commands.convert",
    "subset": "cryogmm.bridge.commands.subset",
    "info": "cryogmm.bridge.commands.info",
}


def _first_line(doc: str | None) -> str:
    return (doc or "").strip().splitlines()[0] if doc else ""


def build_parser(only: str | None = None) -> argparse.ArgumentParser:
    from cryogmm import __version__

    parser = argparse.ArgumentParser(
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
    from cryogmm.errors import CryoGMMError

    argv = list(sys.argv[1:] if argv is None else argv)
    only = next((a for a in argv if a in COMMANDS), None)
    if only is None and not any(a in ("-h", "--help", "--version") for a in argv):
        build_parser(only="__none__").print_help()
        return 2 if argv else 0
    parser = build_parser(only=only)
    args = parser.parse_args(argv)
    try:
        ret = args._module.main(args)
    except CryoGMMError as e:
        print(f"cryogmm {args.command}: error: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print(f"cryogmm {args.command}: interrupted", file=sys.stderr)
        return 130
    return int(ret or 0)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
