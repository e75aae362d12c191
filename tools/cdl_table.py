"""Maintainer script (outside the package): build ``cryogmm/data/cdl_v1.2.npz``, the
conformation-dependent library of protein backbone geometry, from the CDL table that cctbx ships.

Run once by a maintainer (not at run time)::

    python tools/cdl_table.py CDL_DATABASE_PY [OUT_DIR]

``CDL_DATABASE_PY`` is ``mmtbx/conformation_dependent_library/cdl_database.py`` of a cctbx
install (PyPI ``cctbx-base`` 2025.11 was used; cctbx is BSD-3-Clause-LBNL). The file is read as
data (parsed with :mod:`ast`, never imported or executed). Berkholz DS, Shapovalov MV, Dunbrack RL
Jr & Karplus PA (2009) Conformation dependence of backbone geometry in proteins. Structure
17:1316-1325 (CDL v1.2 as carried by cctbx).

The table: for each of 8 residue classes (Gly, Pro, Ile/Val, the other amino acids; each
followed by Pro or not) and each 10°x10° bin of (φ, ψ),
the mean and standard deviation of 7 backbone angles and 5 bonds of the residue, bin k for the
key (φ, ψ) = -180 + 10 k (the table is looked up at φ/ψ rounded to 10°) (order of
``ANGLES`` and ``BONDS`` in :mod:`cryogmm.model.cdl`). Stored as int16 codes (angles in 0.01°,
bonds in 0.0001 Å: the source's own precision, so lossless), -1 where the source has no value
(Gly has no Cβ), with the residue counts per bin.
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import numpy as np

GROUPS = ("NonPGIV_nonxpro", "IleVal_nonxpro", "Gly_nonxpro", "Pro_nonxpro",
          "NonPGIV_xpro", "IleVal_xpro", "Gly_xpro", "Pro_xpro")
# source columns 2..25: (mean, sd) of C-N-CA, N-CA-CB, N-CA-C, CB-CA-C, CA-C-O, CA-C-N, O-C-N (angles),
# C-N, N-CA, CA-CB, CA-C, C-O (bonds)
N_ANGLES, N_BONDS = 7, 5
CITATION = ("Berkholz DS, Shapovalov MV, Dunbrack RL Jr, Karplus PA (2009) Conformation dependence of backbone "
            "geometry in proteins. Structure 17:1316-1325. CDL v1.2 as carried by cctbx (cctbx-base 2025.11, "
            "mmtbx/conformation_dependent_library/cdl_database.py), licence BSD-3-Clause-LBNL.")


def read_database(path: Path) -> tuple[str, dict]:
    """(version, {group: {(phi, psi): row}}) of a ``cdl_database.py``, parsed as literals: the
    ``cdl_database = {...}`` dictionary, then the file's per-value corrections
    (``Group[(phi, psi)] = Group[(phi2, psi2)]`` and ``Group[(phi, psi)][column] = value`` after
    ``Group = cdl_database["Group"]``), in order."""
    tree = ast.parse(Path(path).read_text())
    version, db, n_fix, n_alias = None, None, 0, 0
    for node in tree.body:
        if not (isinstance(node, ast.Assign) and len(node.targets) == 1):
            continue
        t = node.targets[0]
        if isinstance(t, ast.Name) and t.id == "version":
            version = ast.literal_eval(node.value)
        elif isinstance(t, ast.Name) and t.id == "cdl_database" and isinstance(node.value, ast.Dict):
            db = ast.literal_eval(node.value)
        elif isinstance(t, ast.Subscript) and isinstance(t.value, ast.Subscript) and isinstance(t.value.value, ast.Name):
            group, key = t.value.value.id, ast.literal_eval(t.value.slice)
            col, val = ast.literal_eval(t.slice), ast.literal_eval(node.value)
            db[group][key][col] = val
            n_fix += 1
        elif isinstance(t, ast.Subscript) and isinstance(t.value, ast.Name) and isinstance(node.value, ast.Subscript):
            # a bin given the row of another bin: the same list, as Python makes it (a later
            # correction of one changes both)
            v = node.value
            db[t.value.id][ast.literal_eval(t.slice)] = db[v.value.id][ast.literal_eval(v.slice)]
            n_alias += 1
    if db is None:
        raise SystemExit(f"{path}: no cdl_database dictionary")
    print(f"{path}: {n_alias} bins filled from neighbours, {n_fix} corrections applied")
    return version, db


def build(path: Path, out: Path) -> Path:
    version, db = read_database(path)
    ncol = N_ANGLES + N_BONDS
    codes = np.full((len(GROUPS), 36, 36, ncol, 2), -1, dtype=np.int16)
    counts = np.zeros((len(GROUPS), 36, 36), dtype=np.int32)
    scale = np.array([100.0] * N_ANGLES + [10000.0] * N_BONDS)
    for g, name in enumerate(GROUPS):
        for (phi, psi), row in db[name].items():
            i, j = (phi + 180) // 10 % 36, (psi + 180) // 10 % 36
            counts[g, i, j] = row[1]
            vals = np.array([np.nan if v == -1 else v for v in row[2:2 + 2 * ncol]], dtype=np.float64).reshape(ncol, 2)
            c = np.round(vals * scale[:, None])
            codes[g, i, j] = np.where(np.isnan(c), -1, c).astype(np.int16)
    missing = int((counts == 0).sum())
    out.mkdir(parents=True, exist_ok=True)
    dest = out / "cdl_v1.2.npz"
    np.savez_compressed(dest, codes=codes, counts=counts, scale=scale, groups=np.array(GROUPS),
                        version=np.array(version or "CDL"), citation=np.array(CITATION))
    print(f"{dest}: {version}, {len(GROUPS)} classes x 36 x 36 bins, {missing} empty bins")
    return dest


if __name__ == "__main__":
    if len(sys.argv) < 2:
        print(__doc__)
        sys.exit(2)
    build(Path(sys.argv[1]), Path(sys.argv[2]) if len(sys.argv) > 2 else Path(__file__).parents[1] / "engine" / "data")
