"""Topology of an atomic model: restraint index arrays, riding hydrogens, torsion tables.

Built once from a PDB/mmCIF file with gemmi and the shipped CCP4 monomer-library subset
(``cryogmm/data/geom_monlib.json``: the 20 amino acids and MSE, the RNA and DNA nucleotides,
nucleotide cofactors (ATP ADP ANP GTP GDP NAD NAP FAD FMN SAM COA PLP), haem (HEM HEC),
ions (NA MG ZN CA MN FE K CL), additives (SO4 PO4 GOL EDO PEG CIT), cholesterol (CLR),
lipids and detergents (POV PCW PEE PLC 3PE LHG PGW LMT Y01) and glycans (NAG MAN BMA FUC
GAL); every link and modification block: peptide and phosphodiester links, termini,
glycosidic links such as NAG-ASN; amino-acid targets after Engh & Huber). The result is a set
of plain index arrays that the restraint terms in :mod:`cryogmm.model.restraints` evaluate
on any coordinates.

Atoms are ordered as in the model, with riding hydrogens added by gemmi after each
residue's heavy atoms. Every residue is restrained and moves: by a user dictionary, the
shipped library, or one made from its own geometry (:mod:`cryogmm.model.dictionaries`); only
waters (and residues whose atoms their self-made namesake lacks) are kept, fixed, as clash
partners, in place, and listed in ``Topology.fixed_residues``; nothing is dropped. Which
residues were restrained how is in ``Topology.dictionary_counts`` and
``Topology.self_restrained``. Alternate conformations keep the first altloc (reported).
Missing heavy atoms are reported per residue and their restraints are left out.

Coordinates are Å in the file's frame.
"""

from __future__ import annotations

import functools
import json
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from cryogmm.core.rotations import dihedral_deg
from cryogmm.errors import ModelError
from cryogmm.io.structures import read_structure_file
from cryogmm.model.cdl import check_library
from cryogmm.model.dictionaries import WATERS, polymer_group, read_user_dictionaries, self_dictionary
from cryogmm.model.napairs import detect as detect_pairs

AMINO_ACIDS = ("ALA", "ARG", "ASN", "ASP", "CYS", "GLN", "GLU", "GLY", "HIS", "ILE", "LEU", "LYS", "MET",
               "PHE", "PRO", "SER", "THR", "TRP", "TYR", "VAL", "MSE")
NUCLEOTIDES = ("A", "C", "G", "U", "DA", "DC", "DG", "DT")

# side-chain chi angles (IUPAC); these define the rotamer tables' axes
CHI_ATOMS = {
    "ARG": [("N", "CA", "CB", "CG"), ("CA", "CB", "CG", "CD"), ("CB", "CG", "CD", "NE"), ("CG", "CD", "NE", "CZ")],
    "ASN": [("N", "CA", "CB", "CG"), ("CA", "CB", "CG", "OD1")],
    "ASP": [("N", "CA", "CB", "CG"), ("CA", "CB", "CG", "OD1")],
    "CYS": [("N", "CA", "CB", "SG")],
    "GLN": [("N", "CA", "CB", "CG"), ("CA", "CB", "CG", "CD"), ("CB", "CG", "CD", "OE1")],
    "GLU": [("N", "CA", "CB", "CG"), ("CA", "CB", "CG", "CD"), ("CB", "CG", "CD", "OE1")],
    "HIS": [("N", "CA", "CB", "CG"), ("CA", "CB", "CG", "ND1")],
    "ILE": [("N", "CA", "CB", "CG1"), ("CA", "CB", "CG1", "CD1")],
    "LEU": [("N", "CA", "CB", "CG"), ("CA", "CB", "CG", "CD1")],
    "LYS": [("N", "CA", "CB", "CG"), ("CA", "CB", "CG", "CD"), ("CB", "CG", "CD", "CE"), ("CG", "CD", "CE", "NZ")],
    "MET": [("N", "CA", "CB", "CG"), ("CA", "CB", "CG", "SD"), ("CB", "CG", "SD", "CE")],
    "MSE": [("N", "CA", "CB", "CG"), ("CA", "CB", "CG", "SE"), ("CB", "CG", "SE", "CE")],
    "PHE": [("N", "CA", "CB", "CG"), ("CA", "CB", "CG", "CD1")],
    "PRO": [("N", "CA", "CB", "CG")],
    "SER": [("N", "CA", "CB", "OG")],
    "THR": [("N", "CA", "CB", "OG1")],
    "TRP": [("N", "CA", "CB", "CG"), ("CA", "CB", "CG", "CD1")],
    "TYR": [("N", "CA", "CB", "CG"), ("CA", "CB", "CG", "CD1")],
    "VAL": [("N", "CA", "CB", "CG1")],
}
# residue -> rotamer table name in rotamer_top8000.npz
ROTAMER_TABLE = {"ARG": "arg", "ASN": "asn", "ASP": "asp", "CYS": "cys", "GLN": "gln", "GLU": "glu", "HIS": "his",
                 "ILE": "ile", "LEU": "leu", "LYS": "lys", "MET": "met", "MSE": "met", "PHE": "phetyr",
                 "PRO": "pro", "SER": "ser", "THR": "thr", "TRP": "trp", "TYR": "phetyr", "VAL": "val"}
RAMA_CLASSES = ("general", "gly", "transpro", "cispro", "prepro", "ileval")

# van der Waals radii (Å) for contact scoring, as probe uses them with electron-cloud H
# (Word et al. 1999 J Mol Biol 285:1711): polar H shrink so that H-bonds are not clashes
VDW = {"C": 1.70, "N": 1.55, "O": 1.40, "S": 1.80, "SE": 1.90, "P": 1.80, "H": 1.17}
VDW_H_POLAR = 1.05
VDW_C_SP2 = 1.65
ACCEPTOR_ELEMENTS = ("O", "N")


@functools.lru_cache(maxsize=1)
def _monlib_files() -> dict:
    from importlib import resources

    return json.loads(resources.files("cryogmm.data").joinpath("geom_monlib.json").read_text())["files"]


@functools.lru_cache(maxsize=1)
def dictionary_residues() -> frozenset:
    """Residue names with a shipped monomer-library dictionary (they are restrained and move)."""
    return frozenset(Path(rel).stem for rel in _monlib_files() if "/" in rel and not rel.startswith("list/"))


def residue_kind(name: str) -> str:
    """``protein``, ``nucleic acid`` or ``ligand`` (any other residue with a dictionary)."""
    return "protein" if name in AMINO_ACIDS else "nucleic acid" if name in NUCLEOTIDES else "ligand"


@functools.lru_cache(maxsize=1)
def monomer_library_dir() -> str:
    """The shipped monomer-library subset unpacked once into a private temporary folder."""
    d = Path(tempfile.mkdtemp(prefix="cryogmm_monlib_"))
    for rel, text in _monlib_files().items():
        p = d / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(text)
    return str(d) + "/"


def read_structure(path):
    """gemmi Structure of the first model, or ModelError naming the file."""
    path = Path(path)
    st = read_structure_file(path)
    if len(st) == 0 or st[0].count_atom_sites() == 0:
        raise ModelError(path, "holds no atoms")
    while len(st) > 1:
        del st[1]
    st.setup_entities()
    return st


@dataclass
class Topology:
    """Index arrays over the atoms of one model (heavy atoms and riding H, see module doc)."""

    structure: object  # gemmi.Structure holding the atoms in this order (with H)
    coords: np.ndarray  # [M, 3] Å
    element: np.ndarray  # [M] str
    atom_name: np.ndarray
    res_index: np.ndarray  # [M] residue index (0-based, over all residues kept)
    res_name: np.ndarray
    chain: np.ndarray
    seq_id: np.ndarray
    is_h: np.ndarray  # [M] bool
    movable: np.ndarray  # [M] bool: False for atoms of fixed (unknown) residues
    residues: list  # per residue: dict(chain, seq, icode, name, known, kind, atoms=[indices])
    # hydrogens ride on heavy atoms: H = P + c0 e1 + c1 e2 + c2 e3 with a frame from (P, A, B)
    h_index: np.ndarray  # [nh]
    h_frame: np.ndarray  # [nh, 3] (P, A, B)
    h_coef: np.ndarray  # [nh, 3]
    bonds: np.ndarray  # [nb, 2]
    bond_ideal: np.ndarray
    bond_sigma: np.ndarray
    angles: np.ndarray  # [na, 3]
    angle_ideal: np.ndarray  # degrees
    angle_sigma: np.ndarray
    chirals: np.ndarray  # [nc, 4] centre, a1, a2, a3
    chiral_ideal: np.ndarray  # signed ideal volume Å^3 (0 for 'both': sign free, abs target)
    chiral_both: np.ndarray  # bool
    chiral_sigma: np.ndarray
    planes: np.ndarray  # [np, K] padded with -1
    plane_sigma: np.ndarray  # [np]
    omegas: np.ndarray  # [no, 4]
    omega_ideal: np.ndarray  # degrees (180 trans, 0 cis)
    omega_sigma: np.ndarray
    rama: np.ndarray  # [nr, 5] C(i-1), N, CA, C, N(i+1)
    rama_class: np.ndarray  # [nr] index into RAMA_CLASSES
    rama_res: np.ndarray  # [nr] residue index
    chis: dict  # table name -> (atoms [n, nchi, 4], res [n])
    cb: np.ndarray  # [ncb, 4] N, C, CA, CB for Cβ deviation
    excluded: set  # {(i, j)} i < j pairs within 3 bonds
    vdw: np.ndarray  # [M]
    polar_h: np.ndarray  # [M] bool
    acceptor: np.ndarray  # [M] bool
    donor: np.ndarray  # [M] bool: N/O/S carrying H
    rotors: list  # (parent, axis atom, [H]) rotatable polar H groups
    # sugar puckers: per nucleotide C5' C4' C3' O3' C1' N9/N1 and the linked next P (-1 at a 3' end or break)
    puckers: np.ndarray = field(default_factory=lambda: np.zeros((0, 7), dtype=np.int64))
    pucker_res: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))
    # ribose (O2') or deoxyribose: MolProbity's pucker test and the suites are RNA's
    pucker_rna: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=bool))
    fixed_residues: list = field(default_factory=list)
    dictionary_counts: dict = field(default_factory=dict)  # kind -> {residue name: count} of restrained residues
    self_restrained: list = field(default_factory=list)  # residue names restrained to their own geometry
    missing_atoms: list = field(default_factory=list)
    altloc_atoms: int = 0
    warnings: list = field(default_factory=list)
    backbone_library: str = "engh-huber"  # protein backbone targets: "engh-huber" or "cdl" (cryogmm.model.cdl)
    na_pairs: dict | None = None  # base pairs and stacks found on the start model (cryogmm.model.napairs)

    @property
    def n_atoms(self) -> int:
        return len(self.element)

    @property
    def heavy(self) -> np.ndarray:
        return np.nonzero(~self.is_h)[0]

    def label(self, i: int) -> str:
        return f"{self.chain[i]}/{self.res_name[i]}{self.seq_id[i]}/{self.atom_name[i]}"

    def res_label(self, r: int) -> str:
        d = self.residues[r]
        return f"{d['chain']}/{d['name']}{d['seq']}{d['icode'].strip()}"


def _self_dictionaries(st, library, warnings) -> tuple[dict, list]:
    """``{name: (cif text, heavy atom names)}`` for each residue name no dictionary knows (waters
    excepted), made from its instance with the most heavy atoms (instances with fewer atoms are
    restrained over the atoms they have), and the report rows."""
    template = {}
    for ch in st[0]:
        for r in ch:
            if r.name in library or r.name in WATERS:
                continue
            n = sum(1 for a in r if not a.is_hydrogen())
            if n and (r.name not in template or n > template[r.name][0]):
                template[r.name] = (n, ch.name, r)
    made, rows = {}, []
    for name, (_, chname, r) in template.items():
        heavy = {a.name for a in r if not a.is_hydrogen()}
        text, (nb, na, npl, nch) = self_dictionary(name, r)
        made[name] = (text, heavy)
        rows.append({"residue": name, "from": f"{chname}/{name}{r.seqid.num}", "atoms": len(heavy),
                     "group": polymer_group(heavy), "bonds": nb, "angles": na, "planes": npl, "chiral_centres": nch})
        if nb == 0 and len(heavy) > 1:
            warnings.append(f"{chname}/{name}{r.seqid.num}: no dictionary and no bonded atoms; its atoms move "
                            "freely with the map")
    return made, rows


def _check_user_atoms(st, mon, user_owner):
    """A residue whose atoms a user dictionary does not define: one line naming both."""
    for ch in st[0]:
        for r in ch:
            if r.name not in user_owner or r.name not in mon.monomers:
                continue
            known = {a.id for a in mon.monomers[r.name].atoms}
            extra = sorted(a.name for a in r if a.name not in known and not a.is_hydrogen())
            if extra:
                raise ModelError(f"{ch.name}/{r.name}{r.seqid.num}", f"has atoms {' '.join(extra)} that the "
                                 f"dictionary {user_owner[r.name]} does not define")


def _missing_heavy_atoms(st, topo) -> list:
    """Heavy atoms a residue's dictionary has and the model lacks (reported; restraints on them
    are absent), as gemmi finds them after links and their modifications (a glycosidic link
    removes the sugar's O1). Left out: OXT and OP3, which exist only at a free terminus, and the
    5' phosphate of a chain's first nucleotide (a 5'-OH end is complete)."""
    first = {ch.name: ch[0].seqid for ch in st[0] if len(ch)}
    lost = {}
    for addr in topo.find_missing_atoms(including_hydrogen=False):
        name, rid = addr.atom_name, addr.res_id
        if name in ("OXT", "OP3"):
            continue
        if name in ("P", "OP1", "OP2") and first.get(addr.chain_name) == rid.seqid:
            continue
        key = f"{addr.chain_name}/{rid.name}{rid.seqid.num}"
        lost.setdefault(key, []).append(name)
    return [f"{k}: {' '.join(v)}" for k, v in lost.items()]


def build_topology(path_or_structure, add_hydrogens: bool = True, dictionaries=(),
                   backbone_library: str = "engh-huber", na_pairs: bool = False) -> Topology:
    """Topology of the first model of a PDB/mmCIF file (or a gemmi Structure, copied).

    Residues are restrained by, in order: the user's ``dictionaries`` (monomer CIF files), the
    shipped monomer library, or a dictionary made from their own geometry
    (:mod:`cryogmm.model.dictionaries`); waters stay fixed. ``backbone_library``: ``cdl`` or
    ``engh-huber`` (:mod:`cryogmm.model.cdl`); ``na_pairs``: find base pairs and stacks at the
    input coordinates for their restraints (:mod:`cryogmm.model.napairs`)."""
    import gemmi

    check_library(backbone_library)

    if isinstance(path_or_structure, (str, Path)):
        st = read_structure(path_or_structure)
        src = Path(path_or_structure)
    else:
        st = path_or_structure.clone()
        src = Path(st.name or "model")
    warnings = []
    n_alt = sum(1 for cra in st[0].all() if cra.atom.altloc not in ("\0", " ", ""))
    if n_alt:
        st.remove_alternative_conformations()
        warnings.append(f"{n_alt} atoms had alternate conformations; the first altloc was kept")
    user_docs, user_owner = read_user_dictionaries(dictionaries)
    shipped = dictionary_residues() - set(user_owner)
    self_made, self_restrained = _self_dictionaries(st, shipped | set(user_owner), warnings)
    library = shipped | set(user_owner) | set(self_made)
    # residues without a dictionary (waters, residues whose atoms differ from their namesake's
    # self-made one) are set aside and re-attached as fixed atoms
    fixed_store = []
    for ci, ch in enumerate(st[0]):
        for i in range(len(ch) - 1, -1, -1):
            r = ch[i]
            if r.name not in library or (r.name in self_made and
                                          not {a.name for a in r if not a.is_hydrogen()} <= self_made[r.name][1]):
                fixed_store.append((ci, ch.name, i, r.clone()))
                del ch[i]
    fixed_store.sort(key=lambda f: (f[0], f[2]))
    import contextlib
    import io

    mon = gemmi.MonLib()
    names = sorted({r.name for ch in st[0] for r in ch})
    mon.read_monomer_lib(monomer_library_dir(), [n for n in names if n in shipped])
    for doc in user_docs:
        mon.read_monomer_doc(doc)
    for text, _ in self_made.values():
        mon.read_monomer_doc(gemmi.cif.read_string(text))
    _check_user_atoms(st, mon, user_owner)
    missing = []
    if len(st[0]) > 0 and st[0].count_atom_sites() > 0:
        if not add_hydrogens:
            st.remove_hydrogens()
        buf = io.StringIO()
        with contextlib.redirect_stdout(buf):
            topo = gemmi.prepare_topology(
                st, mon, h_change=(gemmi.HydrogenChange.ReAddButWater if add_hydrogens else gemmi.HydrogenChange.NoChange),
                warnings=buf, ignore_unknown_links=True)
        missing = _missing_heavy_atoms(st, topo)
        if add_hydrogens:
            topo.adjust_hydrogen_distances(gemmi.Restraints.DistanceOf.ElectronCloud)
        for w in buf.getvalue().splitlines():
            if w.strip() and "link" not in w.lower():
                warnings.append(w.strip())
    else:
        topo = None
    # re-attach fixed residues where they stood, so the model keeps its order and nothing is lost
    # (chains emptied by the removal stayed in place, empty, for this)
    for ci, _, i, res in fixed_store:  # ascending chain and residue index
        st[0][ci].add_residue(res, pos=i)
    st.remove_empty_chains()
    # flatten
    coords, element, atom_name, res_index, res_name, chain, seq_id, is_h, movable = ([] for _ in range(9))
    residues = []
    serial = 0
    fixed_labels = []
    dict_counts = {}
    for ch in st[0]:
        for r in ch:
            known = r.name in library and r.name in mon.monomers
            ri = len(residues)
            idx = []
            for a in r:
                a.serial = serial
                idx.append(serial)
                serial += 1
                coords.append((a.pos.x, a.pos.y, a.pos.z))
                element.append(a.element.name.upper())
                atom_name.append(a.name)
                res_index.append(ri)
                res_name.append(r.name)
                chain.append(ch.name)
                seq_id.append(r.seqid.num)
                is_h.append(a.is_hydrogen())
                movable.append(known)
            how = "fixed"
            if not known:
                fixed_labels.append(f"{ch.name}/{r.name}{r.seqid.num}")
            else:
                how = ("self-restrained" if r.name in self_made else "user dictionary" if r.name in user_owner
                       else residue_kind(r.name))
                kind = dict_counts.setdefault(how, {})
                kind[r.name] = kind.get(r.name, 0) + 1
            residues.append(dict(chain=ch.name, seq=r.seqid.num, icode=r.seqid.icode, name=r.name, known=known,
                                 kind=how, atoms=np.array(idx)))
    m = len(coords)
    if m == 0:
        raise ModelError(src, "holds no atoms")
    if not any(movable):
        raise ModelError(src, f"holds no residue of the monomer library (amino acids, RNA/DNA nucleotides, "
                              f"{', '.join(sorted(dictionary_residues() - set(AMINO_ACIDS) - set(NUCLEOTIDES)))}); "
                              f"found {', '.join(sorted(set(res_name)))}")
    coords = np.array(coords, dtype=np.float64)
    element = np.array(element)
    atom_name = np.array(atom_name)
    is_h = np.array(is_h, dtype=bool)

    def ids(atoms):
        return [a.serial for a in atoms]

    bonds, bi, bs = [], [], []
    for b in topo.bonds:
        bonds.append(ids(b.atoms)); bi.append(b.restr.value); bs.append(b.restr.esd)
    angles, ai, as_ = [], [], []
    for a in topo.angles:
        angles.append(ids(a.atoms)); ai.append(a.restr.value); as_.append(a.restr.esd)
    chir, cid, cboth = [], [], []
    for c in topo.chirs:
        sign = c.restr.sign
        if sign == gemmi.ChiralityType.Both:
            s = 0.0
        else:
            s = 1.0 if sign == gemmi.ChiralityType.Positive else -1.0
        v0 = topo.ideal_chiral_abs_volume(c)
        chir.append(ids(c.atoms)); cid.append(s * v0 if s else v0); cboth.append(s == 0.0)
    planes, ps = [], []
    for p in topo.planes:
        planes.append(ids(p.atoms)); ps.append(p.restr.esd)
    kmax = max((len(p) for p in planes), default=1)
    plane_arr = np.full((len(planes), kmax), -1, dtype=np.int64)
    for i, p in enumerate(planes):
        plane_arr[i, :len(p)] = p
    om, omi, oms = [], [], []
    for t in topo.torsions:
        if t.restr.label == "omega":
            at = ids(t.atoms)
            om.append(at)
            cur = dihedral_deg(*coords[at])
            # cis peptides (mostly before Pro) keep their cis target
            omi.append(0.0 if abs(cur) < 30.0 else 180.0)
            oms.append(t.restr.esd)
    # bond graph (with H) for exclusions and H frames
    nbr = [[] for _ in range(m)]
    for i, j in bonds:
        nbr[i].append(j); nbr[j].append(i)
    # fixed residues: bonds by distance inside each residue (for exclusions only)
    for rd in residues:
        if not rd["known"]:
            idx = rd["atoms"]
            for u in range(len(idx)):
                for v in range(u + 1, len(idx)):
                    if np.linalg.norm(coords[idx[u]] - coords[idx[v]]) < 1.9:
                        nbr[idx[u]].append(idx[v]); nbr[idx[v]].append(idx[u])
    excluded = set()
    for i in range(m):
        seen = {i: 0}
        front = [i]
        for depth in (1, 2, 3, 4):
            if depth == 4 and not is_h[i]:
                break
            nxt = []
            for a in front:
                for b in nbr[a]:
                    if b not in seen:
                        seen[b] = depth; nxt.append(b)
            front = nxt
        for j, dep in seen.items():
            # probe's -4H: pairs with an H are excluded up to 4 bonds apart, others up to 3
            if j != i and (dep <= 3 or is_h[j] or is_h[i]):
                excluded.add((min(i, j), max(i, j)))
    # riding H frames
    h_index, h_frame, h_coef = [], [], []
    for i in np.nonzero(is_h)[0]:
        heavy_n = [j for j in nbr[i] if not is_h[j]]
        if not heavy_n:
            continue
        p = heavy_n[0]
        pn = [j for j in nbr[p] if not is_h[j]]
        if not pn:
            continue
        a = pn[0]
        cands = [j for j in pn[1:]] + [j for j in nbr[a] if not is_h[j] and j != p]
        if not cands:
            continue
        b = cands[0]
        e1, e2, e3 = _frame(coords[p], coords[a], coords[b])
        d = coords[i] - coords[p]
        h_index.append(i); h_frame.append((p, a, b)); h_coef.append((d @ e1, d @ e2, d @ e3))
    # backbone φ/ψ and residue classes
    key = {}
    for rd_i, rd in enumerate(residues):
        for j in rd["atoms"]:
            key[(rd_i, atom_name[j])] = j

    def linked(r0, r1):
        c, n = key.get((r0, "C")), key.get((r1, "N"))
        return c is not None and n is not None and residues[r0]["chain"] == residues[r1]["chain"] and \
            np.linalg.norm(coords[c] - coords[n]) < 2.0

    rama, rcls, rres = [], [], []
    for r in range(len(residues)):
        rd = residues[r]
        if not rd["known"] or r == 0 or r + 1 >= len(residues):
            continue
        if not (linked(r - 1, r) and linked(r, r + 1)):
            continue
        at = [key.get((r - 1, "C")), key.get((r, "N")), key.get((r, "CA")), key.get((r, "C")), key.get((r + 1, "N"))]
        if any(x is None for x in at):
            continue
        name, nxt = rd["name"], residues[r + 1]["name"]
        if name == "GLY":
            cls = "gly"
        elif name == "PRO":
            ca0 = key.get((r - 1, "CA"))
            w = dihedral_deg(*coords[[ca0, at[0], at[1], at[2]]]) if ca0 is not None else 180.0
            cls = "cispro" if abs(w) < 30.0 else "transpro"
        elif nxt == "PRO":
            cls = "prepro"
        elif name in ("ILE", "VAL"):
            cls = "ileval"
        else:
            cls = "general"
        rama.append(at); rcls.append(RAMA_CLASSES.index(cls)); rres.append(r)
    chis = {}
    cb = []
    for r, rd in enumerate(residues):
        name = rd["name"]
        if not rd["known"]:
            continue
        bb = [key.get((r, n)) for n in ("N", "C", "CA", "CB")]
        if all(x is not None for x in bb):
            cb.append(bb)
        if name not in CHI_ATOMS:
            continue
        quad = [[key.get((r, n)) for n in q] for q in CHI_ATOMS[name]]
        if any(x is None for q in quad for x in q):
            continue
        tab = ROTAMER_TABLE[name]
        chis.setdefault(tab, ([], []))
        chis[tab][0].append(quad); chis[tab][1].append(r)
    chis = {k: (np.array(v[0], dtype=np.int64), np.array(v[1], dtype=np.int64)) for k, v in chis.items()}
    puckers, pucker_res, pucker_rna = [], [], []
    for r, rd in enumerate(residues):
        if rd["kind"] != "nucleic acid":
            continue
        glyco = "N9" if (r, "N9") in key else "N1"
        at = [key.get((r, n)) for n in ("C5'", "C4'", "C3'", "O3'", "C1'", glyco)]
        if any(x is None for x in at):
            continue
        p = key.get((r + 1, "P"))
        puckers.append(at + [p if p is not None and p in nbr[at[3]] else -1])
        pucker_res.append(r)
        pucker_rna.append((r, "O2'") in key)
    # contact radii and H-bond roles
    vdw = np.array([VDW.get(e, 1.7) for e in element])
    polar_h = np.zeros(m, dtype=bool)
    for i in np.nonzero(is_h)[0]:
        hn = [j for j in nbr[i] if not is_h[j]]
        if hn and element[hn[0]] in ("N", "O", "S"):
            polar_h[i] = True
    vdw[polar_h] = VDW_H_POLAR
    for i in range(m):
        if element[i] == "C" and not is_h[i]:
            heavy_n = [j for j in nbr[i] if not is_h[j]]
            if any(element[j] == "O" and len([k for k in nbr[j] if not is_h[k]]) == 1 for j in heavy_n) or \
                    (atom_name[i] not in ("CA", "CB") and len(nbr[i]) == 3):
                vdw[i] = VDW_C_SP2
    donor = np.zeros(m, dtype=bool)
    rotors = []  # (parent, axis atom, [H indices]) for polar H that reduce rotates (OH, SH, NH3+)
    for i in range(m):
        if is_h[i] or element[i] not in ("N", "O", "S"):
            continue
        hs = [j for j in nbr[i] if is_h[j]]
        heavy_n = [j for j in nbr[i] if not is_h[j]]
        if hs:
            donor[i] = True
        if hs and len(heavy_n) == 1 and (len(hs) == 3 or element[i] in ("O", "S")):
            rotors.append((i, heavy_n[0], hs))
    # acceptors: every O; N only without H (His ring N, Pro N excluded by its 3 heavy bonds)
    acceptor = ~is_h & ((element == "O") | ((element == "N") & ~donor & (np.array([len(v) for v in nbr]) < 3)))
    out = Topology(
        structure=st, coords=coords, element=element, atom_name=atom_name, res_index=np.array(res_index),
        res_name=np.array(res_name), chain=np.array(chain), seq_id=np.array(seq_id), is_h=is_h,
        movable=np.array(movable, dtype=bool), residues=residues,
        h_index=np.array(h_index, dtype=np.int64), h_frame=np.array(h_frame, dtype=np.int64).reshape(-1, 3),
        h_coef=np.array(h_coef).reshape(-1, 3),
        bonds=np.array(bonds, dtype=np.int64).reshape(-1, 2), bond_ideal=np.array(bi), bond_sigma=np.array(bs),
        angles=np.array(angles, dtype=np.int64).reshape(-1, 3), angle_ideal=np.array(ai), angle_sigma=np.array(as_),
        chirals=np.array(chir, dtype=np.int64).reshape(-1, 4), chiral_ideal=np.array(cid),
        chiral_both=np.array(cboth, dtype=bool), chiral_sigma=np.full(len(chir), 0.2),
        planes=plane_arr, plane_sigma=np.array(ps),
        omegas=np.array(om, dtype=np.int64).reshape(-1, 4), omega_ideal=np.array(omi), omega_sigma=np.array(oms),
        rama=np.array(rama, dtype=np.int64).reshape(-1, 5), rama_class=np.array(rcls, dtype=np.int64),
        rama_res=np.array(rres, dtype=np.int64), chis=chis,
        puckers=np.array(puckers, dtype=np.int64).reshape(-1, 7), pucker_res=np.array(pucker_res, dtype=np.int64),
        pucker_rna=np.array(pucker_rna, dtype=bool), cb=np.array(cb, dtype=np.int64).reshape(-1, 4),
        excluded=excluded, vdw=vdw, polar_h=polar_h, acceptor=acceptor, donor=donor, rotors=rotors,
        fixed_residues=fixed_labels, dictionary_counts=dict_counts, self_restrained=self_restrained,
        missing_atoms=missing, altloc_atoms=n_alt,
        warnings=warnings, backbone_library=backbone_library,
    )
    out.na_pairs = detect_pairs(out) if na_pairs else None
    return out


def _frame(p, a, b):
    e1 = a - p
    e1 = e1 / np.linalg.norm(e1)
    v = b - p
    e2 = v - (v @ e1) * e1
    e2 = e2 / np.linalg.norm(e2)
    return e1, e2, np.cross(e1, e2)


def write_model(topo: Topology, coords: np.ndarray, path, hydrogens: bool = False) -> None:
    """Write the topology's structure with new coordinates ``[M, 3]`` (PDB or mmCIF by
    extension), atomically. Hydrogens are left out unless asked."""
    st = topo.structure.clone()
    i = 0
    for ch in st[0]:
        for r in ch:
            for a in r:
                x = coords[i]
                a.pos = type(a.pos)(float(x[0]), float(x[1]), float(x[2]))
                i += 1
    if not hydrogens:
        st.remove_hydrogens()
    st.setup_entities()
    path = Path(path)
    tmp = path.with_name(path.name + ".part")
    if path.suffix.lower() in (".cif", ".mmcif"):
        doc = st.make_mmcif_document()
        doc.write_file(str(tmp))
    else:
        st.write_pdb(str(tmp))
    tmp.replace(path)
