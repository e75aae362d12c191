"""Read and write particle metadata: RELION STAR (3.0, 3.1, 4, 5) and cryoSPARC ``.cs``.

``read_particles(path)`` gives a :class:`~cryogmm.bridge.table.ParticleTable` in canonical
RELION 3.1 form whatever the file; ``write_particles(table, path)`` writes it back out,
choosing the format from the suffix. Writes are atomic: on any error nothing is written.

RELION 3.0 files (one block, no optics table, ``rlnOriginX/Y`` in pixels) are read into 3.1
form: optics groups are made from the distinct combinations of the per-particle optics
columns (pixel size, voltage, Cs, amplitude contrast, box, ...); the pixel size is
``rlnImagePixelSize`` when present, else ``rlnDetectorPixelSize * 1e4 / rlnMagnification``.
Writing ``star_version="3.0"`` does the reverse (and adds ``rlnMagnification = 10000``,
``rlnDetectorPixelSize = pixel size`` so that RELION 3.0 finds the pixel size).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from cryogmm.bridge import conventions
from cryogmm.bridge.csfile import read_cs, write_cs
from cryogmm.bridge.star import read_star_blocks, write_star_blocks
from cryogmm.bridge.table import OPTICS_LABELS, ParticleTable, StarLayout
from cryogmm.errors import InputError, OptionError, StarError

__all__ = ["read_particles", "write_particles", "describe_star_blocks", "STAR_VERSIONS"]

STAR_VERSIONS = ("3.0", "3.1")
_OPTICS_SET = frozenset(OPTICS_LABELS)


def read_particles(path, project_dir=None) -> ParticleTable:
    """Read a particle STAR or cryoSPARC ``.cs`` file into a :class:`ParticleTable`.

    ``project_dir``: folder that relative image paths are relative to (RELION: the project
    folder; cryoSPARC: the project folder holding ``J*/``). Default: the STAR file's folder;
    for a ``.cs`` inside a ``J<n>/`` job folder, that folder's parent.
    """
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix == ".star":
        return _read_star_particles(path, project_dir)
    if suffix == ".cs":

        return read_cs(path, project_dir=project_dir)
    raise InputError(path, f"unknown particle file type {path.suffix!r}: expected .star or .cs")


def write_particles(table: ParticleTable, path, star_version="3.1") -> None:
    """Write ``table`` to ``path``: ``.star`` (RELION ``star_version`` "3.1" or "3.0") or ``.cs``."""
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix == ".star":
        if str(star_version) not in STAR_VERSIONS:
            raise OptionError("--star-version", f"got {star_version!r}, expected one of {', '.join(STAR_VERSIONS)}")
        blocks = star_blocks_of(table, str(star_version))
        write_star_blocks(
            blocks,
            path,
            comment=f"RELION {star_version} particles, written by cryogmm",
            version=30001 if str(star_version) == "3.1" else None,
        )
        return
    if suffix == ".cs":

        write_cs(table, path)
        return
    raise InputError(path, f"unknown output type {path.suffix!r}: expected .star or .cs")


# ---------------------------------------------------------------------------- reading
_KINDS = (
    ("rlnFinalResolution", "a RELION postprocess file"),
    ("rlnOutputRootName", "a RELION optimiser file"),
    ("rlnReferenceImage", "a RELION model file"),
    ("rlnReferenceDimensionality", "a RELION model file"),
    ("rlnMicrographName", "a micrograph list"),
    ("rlnMicrographMovieName", "a movie list"),
    ("rlnCoordinateX", "a coordinate file"),
)


def describe_star_blocks(blocks: dict) -> str:
    """A one-line guess of what a non-particle STAR file is, from its labels."""
    labels = set()
    for b in blocks.values():
        labels.update(b.columns if isinstance(b, pd.DataFrame) else b.keys())
    for label, kind in _KINDS:
        if label in labels:
            return kind
    return "not a particle file"


def _find_blocks(path: Path, blocks: dict):
    loops = {k: v for k, v in blocks.items() if isinstance(v, pd.DataFrame)}
    if "particles" in loops and "rlnImageName" in loops["particles"].columns:
        part = "particles"
    else:
        part = next((k for k, v in loops.items() if "rlnImageName" in v.columns), None)
    if part is None:
        raise StarError(
            path,
            f"no particle table (a loop with rlnImageName): this looks like {describe_star_blocks(blocks)}",
        )
    optics = None
    if "optics" in loops and "rlnOpticsGroup" in loops["optics"].columns:
        optics = "optics"
    else:
        optics = next(
            (k for k, v in loops.items() if k != part and "rlnOpticsGroup" in v.columns and "rlnImageName" not in v.columns),
            None,
        )
    return part, optics


def _read_star_particles(path: Path, project_dir) -> ParticleTable:
    blocks = read_star_blocks(path)
    part, optics_name = _find_blocks(path, blocks)
    particles = blocks[part]
    extra = {k: v for k, v in blocks.items() if k not in (part, optics_name)}
    if optics_name is not None:
        optics = blocks[optics_name]
        layout = StarLayout(order=list(blocks), particles=part, optics=optics_name, extra=extra, version="3.1")
        if "rlnOriginXAngst" not in particles.columns and "rlnOriginX" in particles.columns:
            particles = _origin_px_to_A(path, particles, optics)
        return ParticleTable(particles, optics, source=path, project_dir=project_dir, layout=layout)
    return _from_relion30(path, particles, part, blocks, extra, project_dir)


def _tidy(x: np.ndarray) -> np.ndarray:
    """Round a px <-> Å origin conversion to 1e-9 (far below any meaningful shift), so that
    1.5 px * 1.4 Å reads 2.1, not 2.0999999999999996, and converts back to exactly 1.5."""
    return np.round(x, 9)


def _origin_px_to_A(path, particles, optics):
    """A 3.1-style file that still has pixel origins: convert them in place."""
    t = ParticleTable(particles, optics, source=path)
    apix = t.apix
    p = particles.copy()
    for ax in "XY":
        if f"rlnOrigin{ax}" in p.columns:
            p[f"rlnOrigin{ax}"] = _tidy(conventions.origin_px_to_A(p[f"rlnOrigin{ax}"].to_numpy(dtype=float), apix))
    return p.rename(columns={"rlnOriginX": "rlnOriginXAngst", "rlnOriginY": "rlnOriginYAngst"})


def _from_relion30(path, particles, part, blocks, extra, project_dir) -> ParticleTable:
    columns_30 = list(particles.columns)
    ocols = [c for c in particles.columns if c in _OPTICS_SET]
    p = particles
    if "rlnImagePixelSize" in p.columns:
        apix = p["rlnImagePixelSize"].to_numpy(dtype=float)
    elif "rlnDetectorPixelSize" in p.columns and "rlnMagnification" in p.columns:
        apix = p["rlnDetectorPixelSize"].to_numpy(dtype=float) * 1e4 / p["rlnMagnification"].to_numpy(dtype=float)
    else:
        apix = None
    if apix is not None:
        if not (np.isfinite(apix).all() and (apix > 0).all()):
            raise StarError(path, "pixel size (rlnDetectorPixelSize * 1e4 / rlnMagnification) is not positive everywhere")
        p = p.copy()
        if "rlnImagePixelSize" not in p.columns:
            p["rlnImagePixelSize"] = apix
            ocols.append("rlnImagePixelSize")
    elif any(c in p.columns for c in ("rlnOriginX", "rlnOriginY")):
        raise StarError(
            path,
            "RELION 3.0 file with pixel origins but no pixel size "
            "(needs rlnImagePixelSize, or rlnDetectorPixelSize and rlnMagnification)",
        )
    derived = ("rlnMagnification", "rlnDetectorPixelSize")
    if "rlnImagePixelSize" in columns_30 and all(c in columns_30 for c in derived):
        det_apix = p["rlnDetectorPixelSize"].to_numpy(dtype=float) * 1e4 / p["rlnMagnification"].to_numpy(dtype=float)
        if np.allclose(det_apix, apix, rtol=1e-9, atol=0):
            ocols = [c for c in ocols if c not in derived]  # what our 3.0 writer adds: redundant
            p = p.drop(columns=list(derived))
    keys = [c for c in ocols if c not in ("rlnOpticsGroup", "rlnOpticsGroupName")]
    if keys:
        combo = p.groupby(keys, sort=False, dropna=False).ngroup().to_numpy()
    else:
        combo = np.zeros(len(p), dtype=np.int64)
    if "rlnOpticsGroup" in p.columns:
        g = p["rlnOpticsGroup"].to_numpy()
        pairs = pd.DataFrame({"g": g, "c": combo}).drop_duplicates()
        consistent = not pairs["g"].duplicated().any() and not pairs["c"].duplicated().any()
        group = g.astype(np.int64) if consistent else combo.astype(np.int64) + 1
    else:
        group = combo.astype(np.int64) + 1
    first = pd.Series(np.arange(len(p))).groupby(group, sort=True).first().to_numpy()
    optics = pd.DataFrame({"rlnOpticsGroup": group[first]})
    if "rlnOpticsGroupName" in p.columns:
        optics["rlnOpticsGroupName"] = p["rlnOpticsGroupName"].to_numpy()[first]
    else:
        optics["rlnOpticsGroupName"] = [f"opticsGroup{g}" for g in optics["rlnOpticsGroup"]]
    for c in keys:
        optics[c] = p[c].to_numpy()[first]
    if "rlnImageDimensionality" not in optics.columns:
        optics["rlnImageDimensionality"] = 2
    # canonical particles: optics columns out, rlnOpticsGroup in, origins to Å in place
    p = p.drop(columns=[c for c in ocols if c in p.columns and c != "rlnOpticsGroup"])
    p["rlnOpticsGroup"] = group
    if apix is not None:
        for ax in "XY":
            if f"rlnOrigin{ax}" in p.columns:
                p[f"rlnOrigin{ax}"] = _tidy(conventions.origin_px_to_A(p[f"rlnOrigin{ax}"].to_numpy(dtype=float), apix))
        p = p.rename(columns={"rlnOriginX": "rlnOriginXAngst", "rlnOriginY": "rlnOriginYAngst"})
    layout = StarLayout(
        order=list(blocks), particles=part, optics=None, extra=extra, version="3.0", columns_30=columns_30
    )
    return ParticleTable(p, optics, source=path, project_dir=project_dir, layout=layout)


# ---------------------------------------------------------------------------- writing
def star_blocks_of(table: ParticleTable, version: str = "3.1") -> dict:
    """The STAR blocks (``{name: DataFrame | dict}``) that write ``table`` as RELION ``version``."""
    lay = table.layout
    if version == "3.1":
        part = lay.particles if (lay.particles or lay.version == "3.1") else "particles"
        optics = lay.optics or ("optics" if part != "optics" else "optics_")
        order = list(lay.order)
        if lay.optics is None:  # came from 3.0 (or was built in memory): optics first
            order = [optics] + [part if n == lay.particles else n for n in order if n != optics]
        if part not in order:
            order.append(part)
        blocks = {}
        for name in order:
            if name == optics:
                blocks[name] = table.optics
            elif name == part:
                blocks[name] = table.particles
            elif name in lay.extra:
                blocks[name] = lay.extra[name]
        return blocks
    # RELION 3.0: one particle table, optics values per particle, origins in pixels
    p = table.particles.copy(deep=False)
    apix = table.apix if any(c in p.columns for c in ("rlnOriginXAngst", "rlnOriginYAngst")) else None
    for ax in "XY":
        c = f"rlnOrigin{ax}Angst"
        if c in p.columns:
            p[c] = _tidy(conventions.origin_A_to_px(p[c].to_numpy(dtype=float), apix))
    p = p.rename(columns={"rlnOriginXAngst": "rlnOriginX", "rlnOriginYAngst": "rlnOriginY"})
    rows = table._row_of_group
    was_30 = lay.columns_30 is not None
    keep = set(lay.columns_30 or ())
    for c in table.optics.columns:
        if c != "rlnOpticsGroup" and (not was_30 or c in keep):
            p[c] = table.optics[c].to_numpy()[rows]
    if was_30 and "rlnOpticsGroup" not in keep:
        p = p.drop(columns=["rlnOpticsGroup"])  # synthesised on reading: 3.0 had none
    if "rlnImagePixelSize" in p.columns and "rlnMagnification" not in p.columns and "rlnDetectorPixelSize" not in p.columns:
        # RELION 3.0 knows the pixel size only as detector pixel size (µm) / magnification
        p["rlnMagnification"] = 10000.0
        p["rlnDetectorPixelSize"] = p["rlnImagePixelSize"].to_numpy(dtype=float)
    if lay.columns_30:
        first = [c for c in lay.columns_30 if c in p.columns]
        p = p[first + [c for c in p.columns if c not in set(first)]]
    blocks = {lay.particles: p}
    for name in lay.order:
        if name in lay.extra:
            blocks[name] = lay.extra[name]
    return blocks
