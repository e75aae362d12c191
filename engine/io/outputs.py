"""Writing files so that nothing is ever half-written.

Every output of cryogmm goes through :func:`atomic_output`: the file is written under a
temporary name in the same folder and renamed into place only when writing succeeded.
"""

from __future__ import annotations

import contextlib
import json
import os
import platform
import tempfile
from pathlib import Path

import numpy as np

from cryogmm import __version__


def _jsonable(x):
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, Path):
        return str(x)
    if isinstance(x, np.ndarray):
        return _jsonable(x.tolist())
    if isinstance(x, (np.floating, float)):
        x = float(x)
        return x if np.isfinite(x) else None
    if isinstance(x, np.integer):
        return int(x)
    if hasattr(x, "tolist"):  # torch tensors
        return _jsonable(x.tolist())
    return x


def write_report(path, report: dict) -> dict:
    """Write ``report.json`` atomically (NaN/inf become null) with the version and machine."""

    full = dict(report)
    full.setdefault("cryogmm_version", __version__)
    full.setdefault("host", {"python": platform.python_version(), "machine": platform.machine()})
    with atomic_output(path) as tmp:
        tmp.write_text(json.dumps(_jsonable(full), indent=2) + "\n")
    return full


@contextlib.contextmanager
def atomic_output(path, suffix: str | None = None):
    """Yield a temporary path beside ``path``; rename it to ``path`` on success.

    ``suffix`` defaults to the final path's suffix, so libraries that pick a format from
    the extension (starfile, mrcfile) still work on the temporary name.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(
        prefix=f".{path.name}.", suffix=path.suffix if suffix is None else suffix, dir=path.parent
    )
    os.close(fd)
    os.unlink(tmp)  # let the writer create it (some refuse to overwrite)
    try:
        yield Path(tmp)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


class OutputDir:
    """A job's output folder whose files appear only when the job succeeds.

    Files are written under ``<out>/.partial-XXXX/`` and moved into ``out`` by
    :meth:`commit`; on failure the partial folder is removed and ``out`` is left as it was.
    Use as a context manager: ``with OutputDir(out) as d: write(d.path("map.mrc"))``.
    """

    def __init__(self, out):
        self.out = Path(out)

    def __enter__(self):
        self._created = not self.out.exists()
        self.out.mkdir(parents=True, exist_ok=True)
        self._tmp = Path(tempfile.mkdtemp(prefix=".partial-", dir=self.out))
        return self

    def path(self, name: str) -> Path:
        p = self._tmp / name
        p.parent.mkdir(parents=True, exist_ok=True)
        return p

    def commit(self):
        for src in sorted(self._tmp.rglob("*")):
            if src.is_file():
                dst = self.out / src.relative_to(self._tmp)
                dst.parent.mkdir(parents=True, exist_ok=True)
                os.replace(src, dst)

    def __exit__(self, exc_type, exc, tb):
        import shutil

        try:
            if exc_type is None:
                self.commit()
        finally:
            shutil.rmtree(self._tmp, ignore_errors=True)
            if exc_type is not None and self._created:
                try:
                    self.out.rmdir()  # only if still empty: never remove anything of the user's
                except OSError:
                    pass
        return False
