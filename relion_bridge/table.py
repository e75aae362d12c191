"""The canonical per-particle table: RELION 3.1 column names, whatever the file was.

A :class:`ParticleTable` holds two pandas tables, ``particles`` (one row per particle, every
column of the user's file kept in its order) and ``optics`` (one row per optics group), plus
where it came from. Typed accessors (``rotmat``, ``shift_A``, ``defocus_u_A``, ``apix``, ...)
return numpy arrays in the units their names say; every sign and unit conversion goes
through :mod:`cryogmm.bridge.conventions`.

Canonical form (what the readers produce, whatever the file version):

- poses: ``rlnAngleRot/Tilt/Psi`` (degrees, RELION ZYZ); shifts ``rlnOriginX/YAngst`` (Å);
- CTF per particle: ``rlnDefocusU/V`` (Å), ``rlnDefocusAngle``, ``rlnPhaseShift`` (degrees),
  ``rlnCtfBfactor`` (Å²), ``rlnCtfScalefactor``;
- per optics group (``optics``): ``rlnImagePixelSize`` (Å), ``rlnImageSize`` (px),
  ``rlnVoltage`` (kV), ``rlnSphericalAberration`` (mm), ``rlnAmplitudeContrast``;
- image location: ``rlnImageName`` = ``"%06d@stack"`` (1-based on disk, 0-based in
  :attr:`ParticleTable.image_index`).

Tables are immutable in spirit: every ``with_*``/``subset`` returns a new table.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import numpy as np
import pandas as pd

from cryogmm.bridge import conventions
from cryogmm.errors import CsError, StarError

_STR = np.dtypes.StringDType()

__all__ = ["ParticleTable", "StarLayout", "OPTICS_LABELS", "POSE_COLUMNS", "CTF_COLUMNS", "latent_columns"]

POSE_COLUMNS = ("rlnAngleRot", "rlnAngleTilt", "rlnAnglePsi")
SHIFT_COLUMNS = ("rlnOriginXAngst", "rlnOriginYAngst")
CTF_COLUMNS = ("rlnDefocusU", "rlnDefocusV", "rlnDefocusAngle")
CTF_OPTICS = ("rlnVoltage", "rlnSphericalAberration", "rlnAmplitudeContrast")

#: Labels RELION 3.1+ keeps per optics group (in ``data_optics``) rather than per particle;
#: a RELION 3.0 file carries them as particle columns.
OPTICS_LABELS = (
    "rlnOpticsGroup",
    "rlnOpticsGroupName",
    "rlnAmplitudeContrast",
    "rlnSphericalAberration",
    "rlnVoltage",
    "rlnImagePixelSize",
    "rlnMicrographOriginalPixelSize",
    "rlnMicrographPixelSize",
    "rlnImageSize",
    "rlnImageDimensionality",
    "rlnCtfDataAreCtfPremultiplied",
    "rlnBeamTiltX",
    "rlnBeamTiltY",
    "rlnOddZernike",
    "rlnEvenZernike",
    "rlnMagMat00",
    "rlnMagMat01",
    "rlnMagMat10",
    "rlnMagMat11",
    "rlnMagnification",
    "rlnDetectorPixelSize",
)

# what a cryoSPARC reader calls the fields a check asks for (for error messages)
_CS_NAMES = {
    "rlnAngleRot": "alignments3D/pose",
    "rlnAngleTilt": "alignments3D/pose",
    "rlnAnglePsi": "alignments3D/pose",
    "rlnDefocusU": "ctf/df1_A",
    "rlnDefocusV": "ctf/df2_A",
    "rlnDefocusAngle": "ctf/df_angle_rad",
    "rlnVoltage": "ctf/accel_kv",
    "rlnSphericalAberration": "ctf/cs_mm",
    "rlnAmplitudeContrast": "ctf/amp_contrast",
}


def latent_columns(k: int) -> list[str]:
    """Column names for a ``k``-dimensional latent coordinate: ``rlnCryogmmLatent0..``."""
    return [f"rlnCryogmmLatent{i}" for i in range(k)]


@dataclasses.dataclass
class StarLayout:
    """How the STAR file was laid out, so that writing it back keeps its shape.

    ``order``: block names in file order; ``particles``/``optics``: which blocks those are
    (``optics`` is None for a RELION 3.0 file); ``extra``: every other block, carried as
    read; ``version``: "3.0" or "3.1"; ``columns_30``: a 3.0 file's particle columns in
    their original order (optics columns included).
    """

    order: list = dataclasses.field(default_factory=lambda: ["optics", "particles"])
    particles: str = "particles"
    optics: str | None = "optics"
    extra: dict = dataclasses.field(default_factory=dict)
    version: str = "3.1"
    columns_30: list | None = None


def _resolve(path: str, bases) -> str:
    """Absolute, normalised path of ``path`` under the first of ``bases`` that holds it
    (``>``-prefixed cryoSPARC paths are handled by the .cs reader); the first base if none."""
    if os.path.isabs(path):
        return os.path.normpath(path)
    for b in bases:
        c = os.path.normpath(os.path.join(b, path))
        if os.path.exists(c):
            return c
    return os.path.normpath(os.path.join(bases[0], path))


class ParticleTable:
    """Per-particle metadata in canonical RELION 3.1 form (see the module docstring).

    ``particles``: DataFrame, one row per particle; ``optics``: DataFrame, one row per optics
    group (``rlnOpticsGroup`` plus pixel size, box, voltage, Cs, amplitude contrast, ...);
    ``source``: the file read (or None); ``project_dir``: folder that relative image paths
    are resolved against (default: the source file's folder, else the working folder).

    Keyword-only extras used by the readers and writers: ``layout`` (:class:`StarLayout`)
    and ``cs_fields`` (the original cryoSPARC fields, ``{name: array}`` aligned with the
    rows, carried so that writing ``.cs`` back keeps them).
    """

    def __init__(self, particles, optics, source=None, project_dir=None, *, layout=None, cs_fields=None):
        particles = particles.reset_index(drop=True) if isinstance(particles, pd.DataFrame) else pd.DataFrame(particles)
        optics = optics.reset_index(drop=True) if isinstance(optics, pd.DataFrame) else pd.DataFrame(optics)
        self.source = Path(source) if source is not None else None
        self.project_dir = Path(project_dir) if project_dir is not None else None
        self.layout = layout if layout is not None else StarLayout()
        self.cs_fields = cs_fields
        if "rlnOpticsGroup" not in optics.columns:
            if len(optics) > 1:
                self._fail("optics table has several rows but no rlnOpticsGroup column")
            optics = optics.copy()
            optics.insert(0, "rlnOpticsGroup", np.ones(len(optics), dtype=np.int64))
        if len(optics) == 0:
            self._fail("no optics group defined")
        groups = optics["rlnOpticsGroup"].to_numpy()
        if pd.Series(groups).duplicated().any():
            self._fail(f"optics group {pd.Series(groups)[pd.Series(groups).duplicated()].iloc[0]} is defined twice")
        if "rlnOpticsGroup" not in particles.columns:
            if len(optics) > 1:
                self._fail(
                    f"particles have no rlnOpticsGroup column but there are {len(optics)} optics groups"
                )
            particles = particles.copy()
            particles["rlnOpticsGroup"] = np.full(len(particles), groups[0], dtype=np.int64)
        self.particles = particles
        self.optics = optics
        self._row_of_group = self._group_rows()

    # ------------------------------------------------------------------ helpers
    def _fail(self, problem: str):
        err = CsError if (self.source is not None and self.source.suffix == ".cs") else StarError
        raise err(self.source, problem)

    def _group_rows(self) -> np.ndarray:
        g = pd.to_numeric(self.particles["rlnOpticsGroup"], errors="coerce").to_numpy()
        known = self.optics["rlnOpticsGroup"].to_numpy()
        order = np.argsort(known, kind="stable")
        pos = np.searchsorted(known[order], g)
        pos = np.clip(pos, 0, len(known) - 1)
        ok = known[order][pos] == g
        if not ok.all():
            bad = int(np.argmax(~ok))
            self._fail(
                f"particle {bad + 1} refers to optics group {self.particles['rlnOpticsGroup'].iloc[bad]}, "
                f"which the optics table does not define (groups: {', '.join(map(str, known[:10]))})"
            )
        return order[pos]

    def _copy(self, particles=None, optics=None, cs_fields=None, keep_cs=True) -> "ParticleTable":
        t = ParticleTable.__new__(ParticleTable)
        t.particles = self.particles if particles is None else particles
        t.optics = self.optics if optics is None else optics
        t.source, t.project_dir = self.source, self.project_dir
        t.layout = dataclasses.replace(self.layout)
        t.cs_fields = cs_fields if cs_fields is not None else (self.cs_fields if keep_cs else None)
        t._row_of_group = self._row_of_group if optics is None and particles is None else t._group_rows()
        return t

    def _numbers(self, frame, name: str, dtype, what: str) -> np.ndarray:
        """``frame[name]`` as ``dtype``; a value that is not a finite number is an error naming
        the file, the column and the particle (or optics group)."""
        col = frame[name]
        try:
            a = col.to_numpy(dtype=dtype)
        except (TypeError, ValueError):
            a = None
        if a is not None and (a.dtype.kind != "f" or np.isfinite(a).all()):
            return a
        num = pd.to_numeric(col, errors="coerce").to_numpy(dtype=np.float64)
        row = int(np.argmax(~np.isfinite(num)))
        self._fail(f"column {name}: {what} {row + 1} holds {str(col.iloc[row])!r}, which is not a finite number")

    def _col(self, name: str, default=None, dtype=np.float64) -> np.ndarray:
        if name in self.particles.columns:
            return self._numbers(self.particles, name, dtype, "particle")
        if default is None:
            self._fail(f"missing column {name}")
        return np.full(self.n, default, dtype=dtype)

    def _optics_col(self, name: str, dtype=np.float64) -> np.ndarray:
        if name in self.optics.columns:
            return self._numbers(self.optics, name, dtype, "optics row")[self._row_of_group]
        if name in self.particles.columns:  # tolerated: per-particle optics value
            return self._numbers(self.particles, name, dtype, "particle")
        self._fail(f"missing {name} (needed per optics group)")

    def __len__(self) -> int:
        return len(self.particles)

    def __repr__(self) -> str:
        return (
            f"ParticleTable(n={self.n}, optics_groups={len(self.optics)}, "
            f"source={str(self.source) if self.source else None!r})"
        )

    # ------------------------------------------------------------------ accessors
    @property
    def n(self) -> int:
        return len(self.particles)

    @property
    def euler_deg(self) -> np.ndarray:
        """[n, 3] float64: (rlnAngleRot, rlnAngleTilt, rlnAnglePsi) in degrees."""
        self.require(poses=True, ctf=False)
        return np.stack([self._col(c) for c in POSE_COLUMNS], axis=1)

    @property
    def rotmat(self) -> np.ndarray:
        """[n, 3, 3] RELION matrices ``A`` (map point r lands at image ``(A r)[:2]``)."""
        e = self.euler_deg
        return conventions.euler_zyz_deg_to_rotmat(e[:, 0], e[:, 1], e[:, 2])

    @property
    def shift_A(self) -> np.ndarray:
        """[n, 2] float64 (rlnOriginXAngst, rlnOriginYAngst) in Å; zeros if absent."""
        return np.stack([self._col(c, 0.0) for c in SHIFT_COLUMNS], axis=1)

    @property
    def defocus_u_A(self) -> np.ndarray:
        return self._col("rlnDefocusU")

    @property
    def defocus_v_A(self) -> np.ndarray:
        return self._col("rlnDefocusV")

    @property
    def defocus_angle_deg(self) -> np.ndarray:
        return self._col("rlnDefocusAngle")

    @property
    def phase_shift_deg(self) -> np.ndarray:
        return self._col("rlnPhaseShift", 0.0)

    @property
    def bfactor_A2(self) -> np.ndarray:
        return self._col("rlnCtfBfactor", 0.0)

    @property
    def ctf_scale(self) -> np.ndarray:
        return self._col("rlnCtfScalefactor", 1.0)

    @property
    def voltage_kV(self) -> np.ndarray:
        return self._optics_col("rlnVoltage")

    @property
    def cs_mm(self) -> np.ndarray:
        return self._optics_col("rlnSphericalAberration")

    @property
    def amp_contrast(self) -> np.ndarray:
        return self._optics_col("rlnAmplitudeContrast")

    @property
    def apix(self) -> np.ndarray:
        """[n] pixel size in Å of each particle image (its optics group's rlnImagePixelSize)."""
        return self._optics_col("rlnImagePixelSize")

    @property
    def box(self) -> np.ndarray:
        """[n] int64 image size in pixels (its optics group's rlnImageSize)."""
        return self._optics_col("rlnImageSize", dtype=np.int64)

    @property
    def optics_group(self) -> np.ndarray:
        return self.particles["rlnOpticsGroup"].to_numpy(dtype=np.int64)

    def _image_parts(self):
        """(index [n] 0-based, path_codes [n], path_uniques [k]) from rlnImageName, vectorised."""
        if "rlnImageName" not in self.particles.columns:
            self._fail("missing column rlnImageName (where each particle image is)")
        names = np.asarray(self.particles["rlnImageName"].to_numpy(dtype=object), dtype=_STR)
        num, sep, rest = np.strings.partition(names, np.asarray("@", dtype=_STR))
        has_at = sep == "@"
        path = np.where(has_at, rest, num)
        digits = np.strings.isdecimal(num) & has_at
        idx = np.ones(len(names), dtype=np.int64)
        try:
            idx[has_at] = num[has_at].astype(np.int64)
        except ValueError:
            digits = digits | ~has_at
            bad = int(np.argmax(~digits))
            self._fail(f"rlnImageName {names[bad]!r} does not start with a 1-based image number before '@'")
        if (idx < 1).any():
            bad = int(np.argmax(idx < 1))
            self._fail(f"rlnImageName {names[bad]!r}: image numbers start at 1")
        codes, uniques = pd.factorize(path.astype(object))
        return idx - 1, codes, np.asarray(uniques, dtype=object)

    @property
    def image_index(self) -> np.ndarray:
        """[n] int64, 0-based index of each image in its stack (``000001@x.mrcs`` -> 0)."""
        return self._image_parts()[0]

    def _bases(self) -> list[Path]:
        """Folders a relative image path may be relative to, in order: ``project_dir`` alone
        if set; else the source file's folder and its ancestors (a RELION project keeps
        ``Extract/job005/...`` paths in ``Refine3D/job010/run_data.star``), then the working
        folder (where RELION runs)."""
        if self.project_dir is not None:
            return [Path(self.project_dir)]
        if self.source is None:
            return [Path.cwd()]
        start = Path(os.path.abspath(self.source)).parent
        return [start, *start.parents, Path.cwd()]

    @property
    def image_path(self) -> np.ndarray:
        """[n] str: absolute stack path of each image.

        Relative paths are resolved against ``project_dir`` if set; else against the first of
        the source file's folder, its ancestors and the working folder under which the stack
        exists (the source's folder when none holds it, so errors name the expected place).
        """
        _, codes, paths = self._image_parts()
        bases = self._bases()
        resolved = np.array([_resolve(p, bases) for p in paths], dtype=object)
        return resolved[codes]

    def relocated(self, folder) -> "ParticleTable":
        """Copy whose image paths still find the same stacks when written into ``folder``:
        a relative path that ``folder`` (its ancestors, the working folder) would not resolve
        to the same file is made absolute. Used by jobs writing STAR/.cs outputs elsewhere."""
        if "rlnImageName" not in self.particles.columns:
            return self
        idx, codes, paths = self._image_parts()
        here = self._bases()
        folder = Path(os.path.abspath(folder))
        there = [folder, *folder.parents, Path.cwd()]
        new = []
        for p in paths:
            if os.path.isabs(p):
                new.append(p)
                continue
            target = _resolve(p, here)
            new.append(p if _resolve(p, there) == target else target)
        if list(new) == list(paths):
            return self
        names = np.char.add(np.char.add(np.char.zfill((idx + 1).astype(str), 6), "@"),
                            np.asarray(new, dtype=str)[codes])
        t = self.with_columns(rlnImageName=names.astype(object))
        if t.cs_fields is not None and "blob/path" in t.cs_fields:
            t.cs_fields = dict(t.cs_fields)
            t.cs_fields["blob/path"] = np.asarray(new, dtype=object)[codes]
        return t

    def image_stack_names(self) -> tuple[np.ndarray, np.ndarray]:
        """(codes [n], names [k]): each particle's stack as written in the file (not resolved)."""
        _, codes, paths = self._image_parts()
        return codes, paths

    @property
    def half_set(self) -> np.ndarray:
        """[n] int64: rlnRandomSubset (1 or 2), 0 where absent."""
        return self._col("rlnRandomSubset", 0, dtype=np.int64)

    @property
    def has_poses(self) -> bool:
        return all(c in self.particles.columns for c in POSE_COLUMNS)

    @property
    def has_ctf(self) -> bool:
        return all(c in self.particles.columns for c in CTF_COLUMNS) and all(
            c in self.optics.columns or c in self.particles.columns for c in CTF_OPTICS
        )

    def require(self, poses=True, ctf=True, why: str | None = None) -> None:
        """Raise StarError (CsError for a .cs source) naming the file and missing columns."""
        missing = []
        if poses:
            missing += [c for c in POSE_COLUMNS if c not in self.particles.columns]
        if ctf:
            missing += [c for c in CTF_COLUMNS if c not in self.particles.columns]
            missing += [c for c in CTF_OPTICS if c not in self.optics.columns and c not in self.particles.columns]
        if not missing:
            return
        what = why or " and ".join(w for w, on in (("poses", poses), ("CTF", ctf)) if on)
        if self.source is not None and self.source.suffix == ".cs":
            fields = list(dict.fromkeys(_CS_NAMES.get(c, c) for c in missing))
            extra = " (no 3D alignments in this file?)" if "alignments3D/pose" in fields else ""
            raise CsError(self.source, f"missing fields {', '.join(fields)} needed for {what}{extra}")
        raise StarError(self.source, f"missing columns {', '.join(missing)} needed for {what}")

    # ------------------------------------------------------------------ new tables
    def with_half_sets(self, seed=0) -> "ParticleTable":
        """Copy with ``rlnRandomSubset`` (1/2) assigned at random, balanced and seeded, to
        every particle that has none (column absent, or a value other than 1 or 2);
        particles that have one keep it."""
        h = self.half_set
        todo = np.flatnonzero((h != 1) & (h != 2))
        if todo.size == 0:
            return self
        rng = np.random.default_rng(seed)
        h = h.copy()
        new = np.ones(todo.size, dtype=np.int64)
        new[todo.size // 2 :] = 2
        h[todo] = rng.permutation(new)
        return self.with_columns(rlnRandomSubset=h)

    def subset(self, indices) -> "ParticleTable":
        """Copy holding the given rows (0-based integer indices, or a boolean mask [n])."""
        idx = np.asarray(indices)
        if idx.dtype == bool:
            if idx.shape != (self.n,):
                raise ValueError(f"boolean mask has shape {idx.shape}, expected ({self.n},)")
            idx = np.flatnonzero(idx)
        idx = idx.astype(np.int64, copy=False)
        if idx.size and (idx.min() < -self.n or idx.max() >= self.n):
            raise IndexError(f"indices out of range for {self.n} particles")
        t = self._copy(particles=self.particles.iloc[idx].reset_index(drop=True), keep_cs=False)
        if self.cs_fields is not None:
            t.cs_fields = {k: v[idx] for k, v in self.cs_fields.items()}
        return t

    def with_columns(self, **cols) -> "ParticleTable":
        """Copy with columns added (at the end) or replaced (in place); each value an array [n]."""
        p = self.particles.copy(deep=False)
        for name, v in cols.items():
            v = np.asarray(v)
            if v.ndim != 1 or len(v) != self.n:
                raise ValueError(f"column {name}: expected shape ({self.n},), got {v.shape}")
            p[name] = v
        return self._copy(particles=p)

    def with_poses(self, rotmat=None, shift_A=None) -> "ParticleTable":
        """Copy with new poses (RELION matrices [n,3,3] -> Euler columns) and/or shifts [n,2] Å."""
        cols = {}
        if rotmat is not None:
            R = np.asarray(rotmat, dtype=np.float64)
            if R.shape != (self.n, 3, 3):
                raise ValueError(f"rotmat: expected shape ({self.n}, 3, 3), got {R.shape}")
            e = conventions.rotmat_to_euler_zyz_deg(R)
            cols.update(zip(POSE_COLUMNS, e.T))
        if shift_A is not None:
            s = np.asarray(shift_A, dtype=np.float64)
            if s.shape != (self.n, 2):
                raise ValueError(f"shift_A: expected shape ({self.n}, 2), got {s.shape}")
            cols.update(zip(SHIFT_COLUMNS, s.T))
        return self.with_columns(**cols)
