"""The errors cryogmm raises for a user's mistakes.

Every message names the file (or option), the value received and what was expected.
The CLI turns a :class:`CryoGMMError` into one line on stderr and exit code 2.
Nothing here imports torch. The argparse option types (``positive_float``, ``positive_int``,
...) live here too, so every job checks its numbers the same way.
"""

from __future__ import annotations


class CryoGMMError(Exception):
    """Base class: a problem with the user's input, reported as one line, exit code 2."""

    exit_code = 2


class InputError(CryoGMMError):
    """An input file is missing, malformed or inconsistent with another input."""

    def __init__(self, path, problem: str):
        self.path = str(path) if path is not None else None
        self.problem = problem
        super().__init__(f"{self.path}: {problem}" if self.path else problem)


class StarError(InputError):
    """A STAR file is malformed or lacks what the job needs."""


class CsError(InputError):
    """A cryoSPARC .cs file is malformed or lacks what the job needs."""


class StackError(InputError):
    """A particle stack (.mrcs) is missing, too short or of the wrong shape."""


class MapError(InputError):
    """A map (.mrc) is missing, not cubic, holds NaN, or has an unexpected pixel size."""


class ModelError(InputError):
    """An atomic model could not be read or holds no usable atoms."""


class OptionError(CryoGMMError):
    """A command-line option has an invalid value."""

    def __init__(self, option: str, problem: str):
        self.option = option
        self.problem = problem
        super().__init__(f"{option}: {problem}")


class OutputError(CryoGMMError):
    """An output path cannot be written: it is a file where a folder is expected (or the
    reverse), lies under a file, cannot be created, already holds results (without
    ``--force``), or is one of the job's inputs."""

    def __init__(self, path, problem: str, option: str | None = None):
        self.path = str(path)
        self.problem = problem
        self.option = option
        super().__init__(f"{option} {self.path}: {problem}" if option else f"{self.path}: {problem}")


# ---------------------------------------------------------------------------------------
# Option types for argparse, shared by every job (one home): each turns the text of an
# option into a number or raises argparse.ArgumentTypeError, which the CLI prints as one
# line naming the option ("argument --apix: expected a positive number, got 'nan'").


def _number(kind, text: str, what: str):
    import argparse
    import math

    try:
        v = kind(text)
    except (TypeError, ValueError):
        noun = "an integer" if kind is int else "a number"
        raise argparse.ArgumentTypeError(f"expected {noun} ({what}), got {text!r}") from None
    if kind is float and not math.isfinite(v):
        raise argparse.ArgumentTypeError(f"expected a finite number ({what}), got {text!r}")
    return v


def finite_float(text: str) -> float:
    """Any finite number (no nan, no inf)."""
    return _number(float, text, "finite")


def positive_float(text: str) -> float:
    """A finite number > 0."""
    import argparse

    v = _number(float, text, "> 0")
    if v <= 0:
        raise argparse.ArgumentTypeError(f"expected a number > 0, got {text!r}")
    return v


def nonnegative_float(text: str) -> float:
    """A finite number >= 0."""
    import argparse

    v = _number(float, text, ">= 0")
    if v < 0:
        raise argparse.ArgumentTypeError(f"expected a number >= 0, got {text!r}")
    return v


def fraction(text: str) -> float:
    """A number in [0, 1]."""
    import argparse

    v = _number(float, text, "in [0, 1]")
    if not 0 <= v <= 1:
        raise argparse.ArgumentTypeError(f"expected a number in [0, 1], got {text!r}")
    return v


def positive_float_or_inf(text: str) -> float:
    """A number > 0, or ``inf``."""
    import argparse
    import math

    if text.strip().lower() in ("inf", "+inf", "infinity"):
        return math.inf
    v = _number(float, text, "> 0, or inf")
    if v <= 0:
        raise argparse.ArgumentTypeError(f"expected a number > 0 (or inf), got {text!r}")
    return v


def positive_int(text: str) -> int:
    """An integer >= 1."""
    import argparse

    v = _number(int, text, ">= 1")
    if v < 1:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {text!r}")
    return v


def nonnegative_int(text: str) -> int:
    """An integer >= 0."""
    import argparse

    v = _number(int, text, ">= 0")
    if v < 0:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {text!r}")
    return v


def at_least(n: int):
    """An argparse type: an integer >= ``n``."""

    def check(text: str) -> int:
        import argparse

        v = _number(int, text, f">= {n}")
        if v < n:
            raise argparse.ArgumentTypeError(f"expected an integer >= {n}, got {text!r}")
        return v

    check.__name__ = f"integer_at_least_{n}"
    return check


def device_name(text: str) -> str:
    """``auto``, ``cpu``, ``cuda`` or ``cuda:N`` (whether CUDA is there is checked when the job starts)."""
    import argparse
    import re

    if not re.fullmatch(r"auto|cpu|cuda(:\d+)?|mps", text.strip()):
        raise argparse.ArgumentTypeError(f"expected auto, cpu or cuda[:N], got {text!r}")
    return text.strip()
