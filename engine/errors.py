"""The errors cryogmm raises for a user's mistakes.

Every message names the file (or option), the value received and what was expected.
The CLI turns a :class:`CryoGMMError` into one line on stderr and exit code 2.
Nothing here imports torch.
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
