"""Restraint dictionaries beyond the shipped monomer library: user dictionaries
(``--restraints FILE.cif``, the mmCIF monomer format Refmac, Phenix and Servalcat read) and
dictionaries made from a residue's own coordinates for residues no dictionary knows (as Coot
and ISOLDE do for unknown ligands): bonds between atoms within covalent reach, the angles
between them, planes of flat three-connected centres and the hand of chiral ones, all at
their input values, so the residue keeps its shape and moves with its neighbours. A residue
with a peptide backbone (``N``, ``CA``, ``C``: UNK, modified amino acids) gets the peptide
group, and one with a sugar-phosphate backbone the RNA or DNA group, so it links to its
neighbours in the chain (an UNK helix is refined as the backbone and Cβ it carries).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from cryogmm.errors import InputError, ModelError

BOND_ESD_A = 0.02
ANGLE_ESD_DEG = 3.0
PLANE_ESD_A = 0.02
PLANE_MAX_RMS_A = 0.05  # a three-connected centre flatter than this keeps a plane
COVALENT_SLACK = 1.25  # bonded when closer than this times the sum of covalent radii
# no dictionary needed (or wanted): waters stay fixed clash partners
WATERS = ("HOH", "WAT", "DOD", "H2O")


def read_user_dictionaries(paths) -> tuple[list, dict]:
    """gemmi documents of the user's dictionaries and ``{residue name: file}``; one line
    naming the file for a file that is not a monomer dictionary or a residue defined twice."""
    import gemmi

    docs, owner = [], {}
    for p in paths or ():
        p = Path(p)
        if not p.is_file():
            raise InputError(p, "no such file")
        try:
            doc = gemmi.cif.read(str(p))
        except Exception as e:  # gemmi's parser names the line
            raise InputError(p, f"is not a CIF file ({str(e).splitlines()[0]})") from None
        comps = [b.name[len("comp_"):] for b in doc if b.name.startswith("comp_") and b.name != "comp_list"
                 and b.find_values("_chem_comp_atom.atom_id")]
        if not comps:
            raise InputError(p, "is not a monomer dictionary: no data_comp_XXX block with _chem_comp_atom rows")
        for c in comps:
            if c in owner:
                raise InputError(p, f"defines {c}, which {owner[c]} defines too; give one dictionary per residue")
            owner[c] = str(p)
        docs.append(doc)
    return docs, owner


def _covalent_r(el) -> float:
    r = el.covalent_r
    return r if r > 0 else 0.77


def polymer_group(atom_names) -> str:
    """The monomer-library group a residue's atoms imply: peptide, RNA, DNA or non-polymer."""
    n = set(atom_names)
    if {"N", "CA", "C"} <= n:
        return "peptide"
    if {"P", "O5'", "C5'", "C4'", "C3'", "O3'"} <= n:
        return "RNA" if "O2'" in n else "DNA"
    return "non-polymer"


def self_dictionary(name: str, res) -> tuple[str, list]:
    """CIF text of a dictionary for residue ``res`` (a gemmi Residue) from its own heavy-atom
    geometry, and the restraint counts made (bonds, angles, planes, chiral centres)."""
    import gemmi

    atoms = [a for a in res if not a.is_hydrogen()]
    if not atoms:
        raise ModelError(name, "has no heavy atoms to restrain")
    names = [a.name for a in atoms]
    xyz = np.array([a.pos.tolist() for a in atoms])
    rad = np.array([_covalent_r(a.element) for a in atoms])
    d = np.linalg.norm(xyz[:, None] - xyz[None], axis=-1)
    near = (d < COVALENT_SLACK * (rad[:, None] + rad[None])) & (d > 0.4)
    np.fill_diagonal(near, False)
    nbr = [list(np.nonzero(near[i])[0]) for i in range(len(atoms))]
    bonds = [(i, j) for i in range(len(atoms)) for j in nbr[i] if i < j]
    angles = [(i, j, k) for j in range(len(atoms)) for a, i in enumerate(nbr[j]) for k in nbr[j][a + 1:]]
    planes, chirs = [], []
    for j in range(len(atoms)):
        if len(nbr[j]) == 3:
            pts = xyz[[j] + nbr[j]]
            c = pts - pts.mean(0)
            rms = np.linalg.svd(c, compute_uv=False)[-1] / 2.0
            if rms < PLANE_MAX_RMS_A:
                planes.append([j] + nbr[j])
                continue
        if len(nbr[j]) >= 3:
            a, b, c = nbr[j][:3]
            vol = float(np.dot(xyz[a] - xyz[j], np.cross(xyz[b] - xyz[j], xyz[c] - xyz[j])))
            chirs.append((j, a, b, c, "positive" if vol > 0 else "negative"))
    q = gemmi.cif.quote
    group = polymer_group(names)
    lines = ["data_comp_list", "loop_", "_chem_comp.id", "_chem_comp.three_letter_code", "_chem_comp.name",
             "_chem_comp.group", "_chem_comp.number_atoms_all", "_chem_comp.number_atoms_nh", "_chem_comp.desc_level",
             f"{q(name)} {q(name)} 'restrained to its input geometry' {group} {len(atoms)} {len(atoms)} .", "",
             f"data_comp_{name}", "loop_", "_chem_comp_atom.comp_id", "_chem_comp_atom.atom_id",
             "_chem_comp_atom.type_symbol", "_chem_comp_atom.type_energy", "_chem_comp_atom.charge",
             "_chem_comp_atom.x", "_chem_comp_atom.y", "_chem_comp_atom.z"]
    for a, p in zip(atoms, xyz):
        el = a.element.name.upper()
        lines.append(f"{q(name)} {q(a.name)} {el} {el} 0 {p[0]:.3f} {p[1]:.3f} {p[2]:.3f}")
    if bonds:
        lines += ["loop_", "_chem_comp_bond.comp_id", "_chem_comp_bond.atom_id_1", "_chem_comp_bond.atom_id_2",
                  "_chem_comp_bond.type", "_chem_comp_bond.value_dist", "_chem_comp_bond.value_dist_esd"]
        lines += [f"{q(name)} {q(names[i])} {q(names[j])} SINGLE {d[i, j]:.3f} {BOND_ESD_A}" for i, j in bonds]
    if angles:
        lines += ["loop_", "_chem_comp_angle.comp_id", "_chem_comp_angle.atom_id_1", "_chem_comp_angle.atom_id_2",
                  "_chem_comp_angle.atom_id_3", "_chem_comp_angle.value_angle", "_chem_comp_angle.value_angle_esd"]
        for i, j, k in angles:
            u, v = xyz[i] - xyz[j], xyz[k] - xyz[j]
            ang = np.degrees(np.arccos(np.clip(u @ v / (np.linalg.norm(u) * np.linalg.norm(v)), -1, 1)))
            lines.append(f"{q(name)} {q(names[i])} {q(names[j])} {q(names[k])} {ang:.2f} {ANGLE_ESD_DEG}")
    if chirs:
        lines += ["loop_", "_chem_comp_chir.comp_id", "_chem_comp_chir.id", "_chem_comp_chir.atom_id_centre",
                  "_chem_comp_chir.atom_id_1", "_chem_comp_chir.atom_id_2", "_chem_comp_chir.atom_id_3",
                  "_chem_comp_chir.volume_sign"]
        lines += [f"{q(name)} chir_{n + 1} {q(names[j])} {q(names[a])} {q(names[b])} {q(names[c])} {s}"
                  for n, (j, a, b, c, s) in enumerate(chirs)]
    if planes:
        lines += ["loop_", "_chem_comp_plane_atom.comp_id", "_chem_comp_plane_atom.plane_id",
                  "_chem_comp_plane_atom.atom_id", "_chem_comp_plane_atom.dist_esd"]
        lines += [f"{q(name)} plan-{n + 1} {q(names[i])} {PLANE_ESD_A}" for n, pl in enumerate(planes) for i in pl]
    return "\n".join(lines) + "\n", [len(bonds), len(angles), len(planes), len(chirs)]
