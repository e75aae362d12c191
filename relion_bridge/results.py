"""Results back out: merge new per-particle values into the user's own file, and subsets.

``merge_results`` reads the user's original STAR or ``.cs``, replaces or adds only what
cryogmm computed (poses, shifts, latent coordinates, labels, any named column) and writes
it out with every other column kept. ``select_*`` pick particles by index list, by label,
or by a box in latent space; write the result with
:func:`cryogmm.bridge.io.write_particles` (STAR or ``.cs``).

Latent coordinates are columns ``rlnCryogmmLatent0, rlnCryogmmLatent1, ...``
(``cryogmm/latent_0, ...`` in ``.cs``); labels ``rlnCryogmmLabel`` (``cryogmm/label``).

Every subset carries ``rlnCryogmmSourceIndex`` (``cryogmm/source_index`` in ``.cs``): the
0-based row of each particle in the file the first selection was made from, kept through
subsets of subsets, so a subset's particles map back to the originals whatever the format.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from cryogmm.bridge.io import read_particles, write_particles
from cryogmm.bridge.table import ParticleTable, latent_columns
from cryogmm.errors import InputError, OptionError

__all__ = [
    "LABEL_COLUMN",
    "SOURCE_INDEX_COLUMN",
    "merge_results",
    "with_results",
    "select_indices",
    "select_label",
    "select_latent_box",
    "read_index_file",
    "latent_of",
    "with_source_index",
]

LABEL_COLUMN = "rlnCryogmmLabel"
SOURCE_INDEX_COLUMN = "rlnCryogmmSourceIndex"


def with_source_index(table: ParticleTable) -> ParticleTable:
    """``table`` with :data:`SOURCE_INDEX_COLUMN` = its row numbers, unless it has one
    already (a subset of a subset keeps the indices of the first file)."""
    if SOURCE_INDEX_COLUMN in table.particles.columns:
        return table
    return table.with_columns(**{SOURCE_INDEX_COLUMN: np.arange(table.n, dtype=np.int64)})


def with_results(
    table: ParticleTable,
    rotmat=None,
    shift_A=None,
    latent=None,
    labels=None,
    label_column: str = LABEL_COLUMN,
    columns: dict | None = None,
) -> ParticleTable:
    """Copy of ``table`` with new values: ``rotmat`` [n,3,3] (RELION ``A``), ``shift_A``
    [n,2], ``latent`` [n,k] (-> ``rlnCryogmmLatent0..k-1``), ``labels`` [n] (->
    ``label_column``), ``columns`` {name: [n]}. Everything else is kept."""
    t = table
    if rotmat is not None or shift_A is not None:
        t = t.with_poses(rotmat=rotmat, shift_A=shift_A)
    cols = dict(columns or {})
    if latent is not None:
        z = np.asarray(latent, dtype=np.float64)
        if z.ndim == 1:
            z = z[:, None]
        if z.ndim != 2 or len(z) != t.n:
            raise ValueError(f"latent: expected shape ({t.n}, k), got {z.shape}")
        old = [c for c in t.particles.columns if c.startswith("rlnCryogmmLatent")]
        if old and len(old) != z.shape[1]:
            t = t._copy(particles=t.particles.drop(columns=old))
        cols.update(zip(latent_columns(z.shape[1]), z.T))
    if labels is not None:
        cols[label_column] = np.asarray(labels)
    return t.with_columns(**cols) if cols else t


def merge_results(original, out, *, project_dir=None, star_version=None, **values) -> ParticleTable:
    """Read ``original`` (STAR or .cs), apply :func:`with_results` ``values`` and write ``out``.

    ``star_version`` defaults to the original's (3.1 for a .cs). Returns the written table.
    """
    t = with_results(read_particles(original, project_dir=project_dir), **values)
    write_particles(t, out, star_version=star_version or t.layout.version)
    return t


def read_index_file(path, n: int) -> np.ndarray:
    """0-based particle indices from a text file (whitespace separated) or ``.npy``."""
    path = Path(path)
    if not path.is_file():
        raise InputError(path, "index file not found")
    try:
        if path.suffix == ".npy":
            idx = np.load(path, allow_pickle=False).reshape(-1)
        else:
            idx = np.array(path.read_text().split(), dtype=np.float64)
    except Exception as e:
        raise InputError(path, f"expected 0-based integer indices ({type(e).__name__}: {e})") from None
    if idx.size and (not np.all(np.isfinite(idx)) or np.any(idx != np.round(idx))):
        raise InputError(path, "expected 0-based integer indices, found non-integers")
    idx = idx.astype(np.int64)
    if idx.size and (idx.min() < 0 or idx.max() >= n):
        bad = idx[(idx < 0) | (idx >= n)][0]
        raise InputError(path, f"index {bad} out of range: the particle file has {n} particles (0..{n - 1})")
    return idx


def select_indices(table: ParticleTable, indices) -> ParticleTable:
    """Particles at the given 0-based indices, in that order (with their source index)."""
    return with_source_index(table).subset(np.asarray(indices, dtype=np.int64))


def select_label(table: ParticleTable, labels, column: str = LABEL_COLUMN) -> ParticleTable:
    """Particles whose ``column`` equals any of ``labels`` (numbers or text), in file order."""
    if column not in table.particles.columns:
        have = [c for c in table.particles.columns if "Label" in c or "Class" in c]
        raise OptionError(
            "--label-column",
            f"{table.source}: no column {column}" + (f" (label-like columns: {', '.join(have)})" if have else ""),
        )
    col = table.particles[column]
    labels = list(np.atleast_1d(labels))
    if col.dtype.kind in "iuf":
        try:
            wanted = np.array([float(v) for v in labels])
        except ValueError:
            raise OptionError("--label", f"column {column} holds numbers, got {labels}") from None
        mask = np.isin(col.to_numpy(dtype=np.float64), wanted)
    else:
        mask = col.astype(str).isin([str(v) for v in labels]).to_numpy()
    return with_source_index(table).subset(mask)


def latent_of(table: ParticleTable) -> np.ndarray:
    """[n, k] float64 latent coordinates from ``rlnCryogmmLatent0..``."""
    k = 0
    while f"rlnCryogmmLatent{k}" in table.particles.columns:
        k += 1
    if k == 0:
        raise InputError(table.source, "no latent coordinates (columns rlnCryogmmLatent0, ...)")
    return np.stack([table.particles[c].to_numpy(dtype=np.float64) for c in latent_columns(k)], axis=1)


def select_latent_box(table: ParticleTable, box: dict) -> ParticleTable:
    """Particles whose latent coordinates lie in a box: ``{dim: (lo, hi)}``, bounds inclusive."""
    z = latent_of(table)
    mask = np.ones(table.n, dtype=bool)
    for d, (lo, hi) in box.items():
        if not 0 <= d < z.shape[1]:
            raise OptionError("--latent-box", f"dimension {d} does not exist: latent space has {z.shape[1]} dimensions (0..{z.shape[1] - 1})")
        if lo > hi:
            raise OptionError("--latent-box", f"dimension {d}: lower bound {lo} is above upper bound {hi}")
        mask &= (z[:, d] >= lo) & (z[:, d] <= hi)
    return with_source_index(table).subset(mask)
