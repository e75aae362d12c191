"""Writing files so that nothing is ever half-written.

Every output of cryogmm goes through :func:`atomic_output`: the file is written under a
temporary name in the same folder and renamed into place only when writing succeeded.
:func:`check_output` is the one check every job's ``--out`` passes before any work starts
(a path that can be created, is not an input, and holds no earlier results unless
``--force``); a folder or temporary file that cannot be created is an
:class:`~cryogmm.errors.OutputError`, one line, never a traceback.
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
from cryogmm.errors import OutputError


def _jsonable(x, where: str = "", nulls: dict | None = None):
    """``x`` as JSON types; a non-finite number becomes None and, with ``nulls``, its place
    (``a.b[3]``) is recorded there with what it was."""
    if isinstance(x, dict):
        return {str(k): _jsonable(v, f"{where}.{k}" if where else str(k), nulls) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v, f"{where}[{i}]", nulls) for i, v in enumerate(x)]
    if isinstance(x, Path):
        return str(x)
    if isinstance(x, np.ndarray):
        return _jsonable(x.tolist(), where, nulls)
    if isinstance(x, (np.floating, float)):
        x = float(x)
        if np.isfinite(x):
            return x
        if nulls is not None:
            nulls.setdefault(where, "not a number (undefined)" if np.isnan(x) else f"{'-' if x < 0 else ''}infinite")
        return None
    if isinstance(x, np.integer):
        return int(x)
    if isinstance(x, np.bool_):
        return bool(x)
    if hasattr(x, "tolist"):  # torch tensors
        return _jsonable(x.tolist(), where, nulls)
    return x


# An FSC table in a report (``{"fsc": {"resolution_A": [...], <curves>...}}``) lists the
# resolution of every shell; shell 0 is the zero frequency, which has none (box x apix / 0).
DC_REASON = "shell 0 is the zero frequency: it has no resolution (box x pixel size / 0)"


def _fsc_conventions(d: dict, where: str, nulls: dict):
    """In every dict of a report holding an FSC table: shell 0's resolution is null (with its
    reason), and the resolution figures beside the table (``resolution*_A``) that sit at the
    Nyquist limit are flagged ``resolution_limited_by: {figure: "nyquist"}``: the FSC never fell
    below its threshold, so the figure is a bound set by the sampling, not a measured
    resolution."""
    for k, v in list(d.items()):
        if isinstance(v, dict):
            _fsc_conventions(v, f"{where}.{k}" if where else str(k), nulls)
        elif isinstance(v, list):
            for i, item in enumerate(v):
                if isinstance(item, dict):
                    _fsc_conventions(item, f"{where}.{k}[{i}]" if where else f"{k}[{i}]", nulls)
    table = d.get("fsc")
    if not isinstance(table, dict) or "resolution_A" not in table:
        return
    res = [None if r is None or not np.isfinite(float(r)) else float(r) for r in table["resolution_A"]]
    if not res:
        return
    tw = f"{where}.fsc.resolution_A" if where else "fsc.resolution_A"
    res[0] = None
    nulls[f"{tw}[0]"] = DC_REASON  # also replaces the generic reason of an infinite shell 0
    d["fsc"] = {**table, "resolution_A": res}
    limited = nyquist_limited(d, res)
    if limited:
        d["resolution_limited_by"] = {**d.get("resolution_limited_by", {}), **limited}


def nyquist_limited(figures: dict, shell_resolutions) -> dict:
    """``{name: "nyquist"}`` for the resolution figures of ``figures`` (keys ``resolution*_A``) at
    the Nyquist limit of an FSC table whose shells have the resolutions ``shell_resolutions``
    (shell 0 first, any value there): the last shell's, or 2 x apix (what
    :func:`cryogmm.core.similarity.resolution_at` returns when the curve never falls below its
    threshold; apix = shell 1's resolution / box, the box even or odd)."""
    res = [None if r is None else float(r) for r in shell_resolutions]
    finite = [r for r in res[1:] if r is not None and np.isfinite(r)]
    if not finite:
        return {}
    n = len(res)
    nyq = [min(finite)] + ([2.0 * res[1] / b for b in (2 * (n - 1), 2 * (n - 1) + 1)] if res[1] else [])
    return {k: "nyquist" for k, v in figures.items()
            if k.startswith("resolution") and k.endswith("_A") and isinstance(v, (int, float, np.floating))
            and not isinstance(v, bool) and np.isfinite(v) and any(abs(float(v) - q) <= 1e-6 * q for q in nyq)}


def report_json(report: dict) -> dict:
    """``report`` as written to report.json: JSON types; every non-finite figure null, and
    ``null_reasons`` (the figure's place, ``a.b[3]``, and why) for each null made here or given
    by the job in ``report["null_reasons"]``; FSC tables' zero-frequency shell null and
    Nyquist-limited resolutions flagged (see :func:`_fsc_conventions`)."""
    nulls = dict(report.get("null_reasons") or {})
    full = {k: v for k, v in report.items() if k != "null_reasons"}
    out = _jsonable(full, "", nulls)
    _fsc_conventions(out, "", nulls)
    if nulls:
        out["null_reasons"] = nulls
    return out


def write_report(path, report: dict) -> dict:
    """Write ``report.json`` atomically (:func:`report_json`: NaN/inf become null with a reason
    in ``null_reasons``) with the version and machine. Returns the report in memory (numbers
    and arrays as the job made them) with the version, machine and the FSC conventions
    (``resolution_limited_by``) added."""

    full = dict(report)
    full.setdefault("cryogmm_version", __version__)
    full.setdefault("host", {"python": platform.python_version(), "machine": platform.machine()})
    out = report_json(full)
    with atomic_output(path) as tmp:
        tmp.write_text(json.dumps(out, indent=2, allow_nan=False) + "\n")
    _fsc_conventions(full, "", {})
    return full


@contextlib.contextmanager
def atomic_output(path, suffix: str | None = None):
    """Yield a temporary path beside ``path``; rename it to ``path`` on success.

    ``suffix`` defaults to the final path's suffix, so libraries that pick a format from
    the extension (starfile, mrcfile) still work on the temporary name.
    """
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(
            prefix=f".{path.name}.", suffix=path.suffix if suffix is None else suffix, dir=path.parent
        )
    except OSError as e:
        raise OutputError(path, f"cannot be written ({e.strerror or e})") from None
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
        try:
            self.out.mkdir(parents=True, exist_ok=True)
            self._tmp = Path(tempfile.mkdtemp(prefix=".partial-", dir=self.out))
        except OSError as e:
            if self._created:
                with contextlib.suppress(OSError):
                    self.out.rmdir()
            raise OutputError(self.out, f"output folder cannot be created ({e.strerror or e})") from None
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


def _nearest_existing(p: Path) -> Path:
    while not os.path.lexists(p) and p != p.parent:
        p = p.parent
    return p


def check_output(path, *, inputs=(), force: bool = False, folder: bool = True, option: str = "--out",
                 resume: bool = False, resumable: bool = False) -> Path:
    """Refuse an output path before a job does any work; return it.

    Raises :class:`~cryogmm.errors.OutputError` (one line naming ``option`` and the path)
    when the path lies under a file, is a file where a folder is expected (or the reverse),
    cannot be created or written in, is one of ``inputs`` (or, for a folder, holds one of
    them), or already holds something and neither ``force`` nor ``resume`` is given
(``resumable``: the job has a ``--resume``, which the message then offers).
    Nothing is created: the check writes only a probe folder that it removes at once.
    """
    out = Path(path)
    real = out.resolve()
    near = _nearest_existing(real)

    def fail(problem):
        raise OutputError(out, problem, option)

    exists = near == real
    if not exists and not near.is_dir():
        fail(f"cannot be created: {near} is a file, not a folder")
    if exists and folder and not real.is_dir():
        fail("is a file; expected an output folder")
    if exists and not folder and real.is_dir():
        fail("is a folder; expected an output file name")
    for inp in inputs:
        if inp is None:
            continue
        r = Path(inp).resolve()
        if r == real:
            fail(f"is also an input ({inp}); choose another output")
        if folder and r.is_relative_to(real):
            fail(f"holds the input {inp}; choose another output folder")
    if exists and not (force or resume):
        if folder:
            entries = sorted(os.listdir(real))
            if entries:
                fail(f"folder exists and is not empty ({len(entries)} entries, e.g. {entries[0]}); "
                     + ("pass --resume to continue a run or --force to write into it" if resumable
                        else "pass --force to write into it (files of the same name are replaced)"))
        else:
            fail("exists; pass --force to replace it")
    where = real if exists and folder else (real.parent if exists else near)
    try:
        probe = tempfile.mkdtemp(prefix=".cryogmm-probe-", dir=where)
        os.rmdir(probe)
    except OSError as e:
        fail(f"cannot be {'written' if exists else 'created'} in {where} ({e.strerror or e})")
    return out
