"""Conformation-dependent protein backbone geometry (CDL; Berkholz, Shapovalov, Dunbrack & Karplus
2009, Structure 17:1316).

A residue's backbone bond lengths and angles depend on its (φ, ψ): N-CA-C alone spans ~105-115°.
The CDL tabulates, per residue class (Gly, Pro, Ile/Val, the others; followed by Pro or not) and
per 10°x10° (φ, ψ) bin (centred on multiples of 10°), the mean and standard deviation of seven angles (C(-1)-N-CA, N-CA-CB,
N-CA-C, CB-CA-C, CA-C-O, CA-C-N(+1), O-C-N(+1)) and five bonds (C(-1)-N, N-CA, CA-CB, CA-C, C-O).
Phenix refines, and MolProbity judges, protein backbones against it by default; with fixed
Engh & Huber targets a well-refined backbone keeps an angle RMSZ floor against the CDL.

:class:`BackboneLibrary` maps each residue with φ and ψ (the topology's Ramachandran rows) to the
rows of those twelve restraints in a :class:`~cryogmm.model.restraints.Restraints`, and gives their
targets and sigmas at given coordinates: looked up in the residue's bin as cctbx does (no
interpolation; trans peptides only: a residue after a cis peptide keeps its dictionary targets, as
do chain ends and residues outside the four classes). The targets are constants of the energy:
refresh them when φ/ψ have moved (at the start of each stage and round), no gradient flows
through the lookup.

The table ``cryogmm/data/cdl_v1.2.npz`` is built by ``tools/cdl_table.py`` from the CDL v1.2
table that cctbx carries (BSD-3-Clause-LBNL; see ``cryogmm/data/THIRD_PARTY.txt``).
"""

from __future__ import annotations

import functools

import numpy as np

from cryogmm.errors import OptionError

LIBRARIES = ("cdl", "engh-huber")
GROUPS = ("NonPGIV_nonxpro", "IleVal_nonxpro", "Gly_nonxpro", "Pro_nonxpro",
          "NonPGIV_xpro", "IleVal_xpro", "Gly_xpro", "Pro_xpro")
# atoms by name in the residue (i), "C-" of the previous residue, "N+" of the next: table column order
ANGLES = (("C-", "N", "CA"), ("N", "CA", "CB"), ("N", "CA", "C"), ("CB", "CA", "C"), ("CA", "C", "O"),
          ("CA", "C", "N+"), ("O", "C", "N+"))
BONDS = (("C-", "N"), ("N", "CA"), ("CA", "CB"), ("CA", "C"), ("C", "O"))
# a peptide is cis below this |ω| (degrees), as cctbx decides which residues the CDL leaves alone
CIS_LIMIT_DEG = 45.0
# residue classes by name; the CDL covers the 20 standard amino acids, each with standard neighbours
# (as cctbx by default: a modified residue such as MSE or CSO, and its two neighbours, keep the
# dictionary's targets)
_CLASS = {"GLY": 2, "PRO": 3, "ILE": 1, "VAL": 1}
_OTHERS = {"ALA", "ARG", "ASN", "ASP", "CYS", "GLN", "GLU", "HIS", "LEU", "LYS", "MET", "PHE", "SER", "THR", "TRP",
           "TYR"}
STANDARD = frozenset(_CLASS) | _OTHERS


@functools.lru_cache(maxsize=1)
def table():
    """(means [8, 36, 36, 12], sigmas [8, 36, 36, 12]) in degrees and Å, NaN where the class has
    no such restraint, and the table's version string."""
    from importlib import resources

    with resources.files("cryogmm.data").joinpath("cdl_v1.2.npz").open("rb") as fh:
        z = np.load(fh)
        codes, scale = z["codes"].astype(np.float64), z["scale"]
        version = str(z["version"])
    codes[codes < 0] = np.nan
    return codes[..., 0] / scale, codes[..., 1] / scale, version


def check_library(name: str) -> None:
    """OptionError naming ``--backbone-library`` unless ``name`` is one of ``LIBRARIES``."""
    if name not in LIBRARIES:
        raise OptionError("--backbone-library", f"unknown {name!r}; expected one of {', '.join(LIBRARIES)}")


def residue_group(name: str, next_name: str) -> int:
    """Index into ``GROUPS`` of a residue followed by ``next_name``, or -1 (not in the CDL)."""
    if name in _CLASS:
        g = _CLASS[name]
    elif name in _OTHERS:
        g = 0
    else:
        return -1
    return g + (4 if next_name == "PRO" else 0)


def bins(deg: np.ndarray) -> np.ndarray:
    """10° bin index (0..35) of angles in degrees: bin k is centred on -180 + 10 k (the angle
    rounded to the nearest 10°, halves to even, as cctbx looks the table up; 180° is -180°)."""
    return (np.round(np.asarray(deg, dtype=np.float64) / 10.0).astype(np.int64) + 18) % 36


class BackboneLibrary:
    """Rows of the CDL restraints of each residue with φ/ψ in a set of bond and angle arrays.

    ``topo``: a :class:`~cryogmm.model.topology.Topology`; ``bonds [nb, 2]`` and ``angles [na, 3]``:
    the atom indices of the restraints as the caller holds them (e.g. heavy atoms only). Residues
    are the rows of ``topo.rama`` of standard amino acids between standard amino acids."""

    def __init__(self, topo, bonds: np.ndarray, angles: np.ndarray):
        bond_row = {(min(a, b), max(a, b)): k for k, (a, b) in enumerate(np.asarray(bonds).tolist())}
        angle_row = {}
        for k, (a, b, c) in enumerate(np.asarray(angles).tolist()):
            angle_row[(a, b, c)] = k
            angle_row[(c, b, a)] = k
        key = {}
        for r, rd in enumerate(topo.residues):
            for j in rd["atoms"]:
                key[(r, str(topo.atom_name[j]))] = int(j)
        rama_rows, groups, brows, arows, omegas = [], [], [], [], []
        for row, (r, at) in enumerate(zip(topo.rama_res.tolist(), topo.rama.tolist())):
            nxt = topo.residues[r + 1]["name"] if r + 1 < len(topo.residues) else ""
            g = residue_group(topo.residues[r]["name"], nxt)
            if g < 0 or nxt not in STANDARD or r == 0 or topo.residues[r - 1]["name"] not in STANDARD:
                continue
            atom = {"C-": at[0], "N": at[1], "CA": at[2], "C": at[3], "N+": at[4],
                    "CB": key.get((r, "CB")), "O": key.get((r, "O"))}
            ca0 = key.get((r - 1, "CA"))
            if ca0 is None:
                continue

            def look(names, table_):
                ids = [atom[n] for n in names]
                if any(i is None for i in ids):
                    return -1
                k = (min(ids), max(ids)) if len(ids) == 2 else tuple(ids)
                return table_.get(k, -1)

            rama_rows.append(row)
            groups.append(g)
            arows.append([look(n, angle_row) for n in ANGLES])
            brows.append([look(n, bond_row) for n in BONDS])
            omegas.append([ca0, at[0], at[1], at[2]])
        self.rama_rows = np.array(rama_rows, dtype=np.int64)
        self.groups = np.array(groups, dtype=np.int64)
        self.angle_rows = np.array(arows, dtype=np.int64).reshape(-1, len(ANGLES))
        self.bond_rows = np.array(brows, dtype=np.int64).reshape(-1, len(BONDS))
        self.omega_atoms = np.array(omegas, dtype=np.int64).reshape(-1, 4)

    def __len__(self):
        return len(self.rama_rows)

    def targets(self, phi_psi: np.ndarray, omega: np.ndarray):
        """CDL targets of the residues at ``phi_psi [n_rama, 2]`` (degrees, every Ramachandran row
        of the topology) with ω before each of this library's residues ``omega [n]``: (bond rows,
        bond means Å, bond sigmas Å, angle rows, angle means °, angle sigmas °), only where the
        table has a value and the preceding peptide is trans."""
        mean, sd, _ = table()
        pp = np.asarray(phi_psi)[self.rama_rows]
        i, j = bins(pp[:, 0]), bins(pp[:, 1])
        m, s = mean[self.groups, i, j], sd[self.groups, i, j]  # [n, 12]
        trans = np.abs(np.asarray(omega)) >= CIS_LIMIT_DEG
        out = []
        for rows, cols in ((self.bond_rows, slice(len(ANGLES), None)), (self.angle_rows, slice(0, len(ANGLES)))):
            mv, sv = m[:, cols], s[:, cols]
            ok = (rows >= 0) & np.isfinite(mv) & np.isfinite(sv) & trans[:, None]
            out += [rows[ok], mv[ok], sv[ok]]
        return tuple(out)
