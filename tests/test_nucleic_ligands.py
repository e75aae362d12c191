"""Residues beyond the amino acids (issue 17, dictionaries): RNA/DNA nucleotides and the
ligands shipped with monomer-library dictionaries are restrained and refined; residues without
a dictionary stay fixed and are listed."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import gemmi
import numpy as np
import pytest

from cryogmm.cli import main as cli
from cryogmm.model.topology import build_topology, dictionary_residues
from cryogmm.model.validate import validate_coords

RNA = Path(__file__).parent / "data" / "rna_1k5i.pdb"
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from identical_outputs import splat_map  # noqa: E402


def _splat(pdb: Path, out: Path):
    """A 4 Å map of a model's heavy atoms with 10 % noise, made independently of the engine's
    map code (the refactoring guard's map maker)."""
    return splat_map(pdb, out, resolution=4.0, apix=1.0, pad=8.0, noise=0.1, seed=0)


def _p_atoms(path):
    return np.array([c.atom.pos.tolist() for c in gemmi.read_structure(str(path))[0].all() if c.atom.name == "P"])


def test_library_holds_nucleotides_and_ligands():
    lib = dictionary_residues()
    assert {"A", "C", "G", "U", "DA", "DC", "DG", "DT", "ATP", "ADP", "SO4", "GOL", "MG", "HEM", "NAG"} <= lib
    assert "ALA" in lib and "HOH" not in lib


def test_rna_topology_links_every_nucleotide():
    t = build_topology(RNA)
    assert t.fixed_residues == [] and t.movable.all()
    assert t.dictionary_counts == {"nucleic acid": {"G": 8, "A": 3, "C": 9, "U": 3}}
    # phosphodiester links: O3'(i) - P(i+1) bonds for the 22 steps
    name = t.atom_name
    link = [(i, j) for i, j in t.bonds if {name[i], name[j]} == {"O3'", "P"} and t.res_index[i] != t.res_index[j]]
    assert len(link) == 22
    # the 5' end lacks its phosphate, which a 5'-OH end does not have: nothing missing
    assert t.missing_atoms == []
    assert len(t.rama) == 0 and t.chis == {}


@pytest.mark.slow
def test_rna_stem_turned_12_degrees_refines_back(tmp_path):
    """The 3' half of the hairpin (nucleotides 13-23) turned 12° about the loop: refined into
    the 4 Å map of the deposited RNA, the phosphates come back to < 0.5 Å with clean geometry."""
    target = _splat(RNA, tmp_path / "target.mrc")
    st = gemmi.read_structure(str(RNA))
    hinge = np.array([c.atom.pos.tolist() for c in st[0].all() if 10 <= c.residue.seqid.num <= 14]).mean(0)
    ax = np.array([1.0, 0.3, 0.2]) / np.linalg.norm([1.0, 0.3, 0.2])
    t = math.radians(12.0)
    k = np.array([[0, -ax[2], ax[1]], [ax[2], 0, -ax[0]], [-ax[1], ax[0], 0]])
    rot = np.eye(3) + math.sin(t) * k + (1 - math.cos(t)) * k @ k
    for c in st[0].all():
        if c.residue.seqid.num >= 13:
            c.atom.pos = gemmi.Position(*(rot @ (np.array(c.atom.pos.tolist()) - hinge) + hinge))
    st.write_pdb(str(tmp_path / "start.pdb"))
    p0 = np.sqrt(((_p_atoms(tmp_path / "start.pdb") - _p_atoms(RNA)) ** 2).sum(1).mean())
    assert p0 > 2.0
    assert cli(["refine-model", str(tmp_path / "start.pdb"), "--map", str(target), "--resolution", "4", "--quick",
                "--out", str(tmp_path / "out")]) == 0
    p1 = np.sqrt(((_p_atoms(tmp_path / "out" / "refined.pdb") - _p_atoms(RNA)) ** 2).sum(1).mean())
    rep = json.loads((tmp_path / "out" / "report.json").read_text())
    assert p1 < 0.5, (p0, p1)
    assert rep["after"]["bond_rmsz"] < 1.0 and rep["after"]["angle_rmsz"] < 1.0
    assert rep["after"]["clashscore"] < 4.0 and rep["after"]["chiral_outliers"] == 0
    assert rep["restrained_residues"]["nucleic acid"]["C"] == 9 and rep["fixed_residues"] == []


def _ideal_ligand(code: str, path: Path, distort: float = 0.0, seed: int = 0) -> Path:
    """A ligand at its dictionary's own coordinates (heavy atoms, chain B), optionally with noise."""
    from cryogmm.model.topology import monomer_library_dir

    block = gemmi.cif.read(str(Path(monomer_library_dir()) / code[0].lower() / f"{code}.cif")).find_block(f"comp_{code}")
    table = block.find("_chem_comp_atom.", ["atom_id", "type_symbol", "x", "y", "z"])
    rng = np.random.default_rng(seed)
    rows = [(gemmi.cif.as_string(r[0]), r[1], np.array([float(r[2]), float(r[3]), float(r[4])])) for r in table]
    lines = [f"HETATM{k + 1:5d} {name:<4s} {code:>3s} B   1    "
             + "".join(f"{v:8.3f}" for v in xyz + rng.normal(scale=distort, size=3)) + f"  1.00 20.00          {el:>2s}"
             for k, (name, el, xyz) in enumerate(row for row in rows if row[1] != "H")]
    path.write_text("\n".join(lines) + "\nEND\n")
    return path


def test_atp_is_restrained_and_regularised(tmp_path):
    """ATP at its dictionary geometry validates clean; with 0.15 Å noise, geometry-only
    refinement brings its bond RMSZ back under 1 (it moves, it is not held fixed)."""
    ideal = build_topology(_ideal_ligand("ATP", tmp_path / "atp.pdb"))
    assert ideal.fixed_residues == [] and ideal.dictionary_counts == {"ligand": {"ATP": 1}}
    assert validate_coords(ideal, ideal.coords)["bond_rmsz"] < 1.0
    noisy = _ideal_ligand("ATP", tmp_path / "atp_noisy.pdb", distort=0.15, seed=1)
    before = validate_coords(build_topology(noisy), build_topology(noisy).coords)["bond_rmsz"]
    assert before > 3.0
    assert cli(["refine-model", str(noisy), "--geometry-only", "--out", str(tmp_path / "out")]) == 0
    rep = json.loads((tmp_path / "out" / "report.json").read_text())
    assert rep["after"]["bond_rmsz"] < 1.0 and rep["rms_moved_A"] > 0.05


def test_ligand_without_dictionary_restrained_to_its_own_geometry(tmp_path):
    """A ligand no dictionary knows (ATP's atoms under another name) is restrained to its input
    geometry and moves; a one-atom ion without a dictionary (Cd) moves free, Mg has the
    library's; waters stay fixed; all of it reported."""
    lig = _ideal_ligand("ATP", tmp_path / "atp.pdb")
    lines = [ln.replace("ATP B", "ZZQ B") for ln in lig.read_text().splitlines() if ln.startswith(("ATOM", "HETATM"))]
    lines += ["HETATM 9001 MG    MG B 202       0.000   0.000   8.000  1.00 20.00          MG",
              "HETATM 9002  O   HOH B 301       9.000   9.000   9.000  1.00 20.00           O",
              "HETATM 9003 CD    CD B 203       0.000   8.000   0.000  1.00 20.00          CD"]
    p = tmp_path / "mix.pdb"
    p.write_text("\n".join(lines) + "\nEND\n")
    t = build_topology(p)
    assert t.fixed_residues == ["B/HOH301"]
    assert t.dictionary_counts["self-restrained"] == {"ZZQ": 1, "CD": 1}
    assert t.dictionary_counts["ligand"] == {"MG": 1}
    row = {r["residue"]: r for r in t.self_restrained}
    assert row["ZZQ"]["bonds"] == 33 and row["ZZQ"]["planes"] >= 1 and row["ZZQ"]["chiral_centres"] >= 4
    assert row["CD"]["bonds"] == 0 and t.movable[t.res_name == "MG"].all()
    assert t.movable[t.res_name == "ZZQ"].all() and not t.movable[t.res_name == "HOH"].any()
    assert validate_coords(t, t.coords)["bond_rmsz"] < 0.05  # targets are its own geometry (to 0.001 Å)
    # the phosphate chain's atoms keep their hand (chiral restraints from the input)
    assert validate_coords(t, t.coords)["chiral_outliers"] == 0


def test_user_dictionary_and_its_bad_inputs(tmp_path, capsys):
    """--restraints FILE.cif: a residue the file defines is restrained by it; a missing file, a
    file that is no monomer dictionary, a residue defined twice or a residue with atoms the
    dictionary lacks each give one line and exit 2, nothing written."""
    from cryogmm.model.topology import monomer_library_dir

    text = (Path(monomer_library_dir()) / "a" / "ATP.cif").read_text().replace("ATP", "XY1")
    d1 = tmp_path / "xy1.cif"
    d1.write_text(text)
    model = tmp_path / "xy1.pdb"
    atoms = _ideal_ligand("ATP", tmp_path / "atp.pdb").read_text().replace("ATP B", "XY1 B")
    model.write_text(atoms)
    t = build_topology(model, dictionaries=[d1])
    assert t.dictionary_counts == {"user dictionary": {"XY1": 1}} and t.self_restrained == []
    out = tmp_path / "out"
    assert cli(["refine-model", str(model), "--geometry-only", "--restraints", str(d1), "--out", str(out)]) == 0
    assert json.loads((out / "report.json").read_text())["restrained_residues"] == {"user dictionary": {"XY1": 1}}
    capsys.readouterr()
    notcif = tmp_path / "not.cif"
    notcif.write_text("this is not CIF\n")
    nocomp = tmp_path / "nocomp.cif"
    nocomp.write_text("data_x\n_cell.length_a 10\n")
    extra = tmp_path / "extra.pdb"
    extra.write_text(atoms.replace("END", "HETATM 9999  XX  XY1 B   1       1.000   1.000   1.000  1.00 20.00           C\nEND"))
    cases = [([str(model), "--restraints", str(tmp_path / "none.cif")], "none.cif"),
             ([str(model), "--restraints", str(notcif)], "not.cif"),
             ([str(model), "--restraints", str(nocomp)], "not a monomer dictionary"),
             ([str(model), "--restraints", str(d1), "--restraints", str(d1)], "defines XY1"),
             ([str(extra), "--restraints", str(d1)], "B/XY11")]
    for args, msg in cases:
        bad_out = tmp_path / "bad"
        assert cli(["refine-model", *args, "--geometry-only", "--out", str(bad_out)]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and msg in err[0], (msg, err)
        assert not bad_out.exists()


def test_residue_without_dictionary_stays_fixed_and_listed(tmp_path):
    """Waters have no dictionary and get none: kept as fixed clash partners and reported, never dropped."""
    lines = [ln for ln in RNA.read_text().splitlines() if ln.startswith("ATOM")]
    lines.append("HETATM 9001  O   HOH A 101      40.000  40.000  40.000  1.00 20.00           O")
    p = tmp_path / "with_water.pdb"
    p.write_text("\n".join(lines) + "\nEND\n")
    t = build_topology(p)
    assert t.fixed_residues == ["A/HOH101"]
    assert not t.movable[t.res_name == "HOH"].any() and t.movable[t.res_name != "HOH"].all()


def test_validation_by_molecule_kind_and_sugar_puckers(tmp_path):
    """validate reports RMSZ per molecule kind, base planarity and MolProbity's pucker test: on
    the deposited hairpin it flags what MolProbity (mmtbx rna_validate_puckers) flags, U21 alone
    (delta 64.9°, below the C3'-endo range) of 23 sugars; a phosphate moved onto the glycosidic
    line of a C3'-endo sugar makes that sugar one too."""
    from cryogmm.model.validate import pucker_table

    t = build_topology(RNA)
    v = validate_coords(t, t.coords)
    assert set(v["by_kind"]) == {"nucleic acid"} and v["by_kind"]["nucleic acid"]["n_residues"] == 23
    assert v["n_puckers"] == 23 and [o["residue"] for o in v["pucker_outliers"]] == ["A/U21"]
    assert v["base_plane_rmsz"] > 0
    x = t.coords.copy()
    key = {(int(t.res_index[i]), str(t.atom_name[i])): i for i in range(t.n_atoms)}
    c1, n9 = x[key[(4, "C1'")]], x[key[(4, "N9" if (4, "N9") in key else "N1")]]
    u = (n9 - c1) / np.linalg.norm(n9 - c1)
    side = np.cross(u, [0.0, 0.0, 1.0])
    x[key[(5, "P")]] = c1 + 3.0 * u + 1.0 * side / np.linalg.norm(side)
    rows = {lab: (pp, ex, bad) for lab, _, pp, ex, bad in pucker_table(t, x)}
    lab = t.res_label(4)
    assert rows[lab][0] < 2.9 and rows[lab][1] == "C2'-endo" and rows[lab][2]


def test_nothing_lost_order_b_occupancy_links(tmp_path):
    """A water between two nucleotides and a Mg linked to a phosphate: the refined file holds
    every residue and atom in input order with B-factors and occupancies, and the LINK record."""
    lines = [ln for ln in RNA.read_text().splitlines() if ln.startswith("ATOM")]
    at = next(k for k, ln in enumerate(lines) if int(ln[22:26]) == 6)
    lines[at:at] = ["HETATM 9001  O   HOH A 101      30.000  30.000  30.000  0.50 41.00           O"]
    lines.append("HETATM 9002 MG    MG A 102      45.000  45.000  45.000  1.00 33.00          MG")
    op1 = next(ln for ln in lines if ln[12:16].strip() == "OP1" and int(ln[22:26]) == 7)
    mg = np.array([float(op1[30:38]), float(op1[38:46]), float(op1[46:54])]) + [2.1, 0.0, 0.0]
    lines[-1] = lines[-1][:30] + "".join(f"{v:8.3f}" for v in mg) + lines[-1][54:]
    link = ("LINK" + " " * 8 + " OP1" + " " + op1[17:20] + " A" + "   7" + " " + " " * 15 + "MG  " + " " + " MG" + " A"
            + " 102" + " " + "  " + "  1555" + " " + "  1555" + " " + " 2.10")
    p = tmp_path / "in.pdb"
    p.write_text("\n".join([link] + lines) + "\nEND\n")
    assert cli(["refine-model", str(p), "--geometry-only", "--steps", "20", "--out", str(tmp_path / "out")]) == 0

    def rows(path):
        st = gemmi.read_structure(str(path))
        st.remove_hydrogens()
        return [(c.chain.name, c.residue.seqid.num, c.residue.name, c.atom.name, round(c.atom.b_iso, 2),
                 round(c.atom.occ, 2)) for c in st[0].all()]

    for out in ("refined.pdb", "refined.cif"):
        assert rows(tmp_path / "out" / out) == rows(p), out
        assert len(gemmi.read_structure(str(tmp_path / "out" / out)).connections) == 1, out


def test_motion_auto_chooses_by_the_start_fit(tmp_path):
    """--motion auto: the deposited hairpin in its own map fits (local preset); its stem turned
    12° does not (motion domains)."""
    from dataclasses import replace

    from cryogmm.model.refine.config import RefineModelConfig
    from cryogmm.model.refine.job import checked_config, read_inputs, refine_coords

    target = _splat(RNA, tmp_path / "target.mrc")
    st = gemmi.read_structure(str(RNA))
    for c in st[0].all():
        if c.residue.seqid.num >= 13:
            c.atom.pos = gemmi.Position(*(np.array(c.atom.pos.tolist()) + [0.0, 2.5, 0.0]))
    st.write_pdb(str(tmp_path / "moved.pdb"))
    chose = {}
    for name, model in (("deposited", RNA), ("moved", tmp_path / "moved.pdb")):
        cfg = checked_config(RefineModelConfig(model=model, map=target, out=tmp_path / name, resolution_A=4.0,
                                               stages=(), motion="auto"))
        topo, grid = read_inputs(cfg)
        res = refine_coords(topo, grid, replace(cfg), progress=None)
        chose[name] = (res.motion, round(res.before["map_cc_mask"], 3))
    assert chose["deposited"][0] == "local" and chose["moved"][0] == "domains", chose


def test_ligand_outside_the_map_is_a_warning_not_a_refusal(tmp_path, capsys):
    """A model whose ion sits far outside the map: refinement goes on (the ion follows its
    geometry) and report.json says which residue lies outside."""
    lines = [ln for ln in RNA.read_text().splitlines() if ln.startswith(("ATOM", "HETATM"))]
    lines.append("HETATM 9001 MG    MG B 301     200.000 200.000 200.000  1.00 20.00          MG")
    model = tmp_path / "rna_mg.pdb"
    model.write_text("\n".join(lines) + "\nEND\n")
    _splat(RNA, tmp_path / "map.mrc")
    assert cli(["refine-model", str(model), "--map", str(tmp_path / "map.mrc"), "--resolution", "4",
                "--stages", "rigid", "full", "--steps", "5", "--out", str(tmp_path / "out")]) == 0
    rep = json.loads((tmp_path / "out" / "report.json").read_text())
    assert any("outside the map box" in w and "B/MG301" in w for w in rep["warnings"]), rep["warnings"]
    assert "outside the map box" in capsys.readouterr().err


def test_validate_reports_the_map_at_each_ligand(tmp_path):
    """Per ligand the mean map value at its atoms (map SD) and its Q-score: high in the ligand's
    own density, near the map's mean where the ligand is moved 6 Å off it."""
    from cryogmm.io.maps import read_map_grid
    from cryogmm.model.validate import map_figures

    model = Path(__file__).parent / "data" / "hivp_1hvr_xk2.pdb"
    _splat(model, tmp_path / "map.mrc")
    t = build_topology(model)
    grid = read_map_grid(tmp_path / "map.mrc")
    placed = {r["residue"]: r for r in map_figures(t, t.coords, grid, 4.0)["ligand_map"]}
    lig = next(k for k in placed if "XK2" in k)
    moved = t.coords.copy()
    moved[t.res_name == "XK2"] += np.array([6.0, 0.0, 0.0])
    off = {r["residue"]: r for r in map_figures(t, moved, grid, 4.0)["ligand_map"]}
    assert placed[lig]["map_sd_at_atoms"] > 3.0 and placed[lig]["qscore"] > 0.5
    assert off[lig]["map_sd_at_atoms"] < 0.5 * placed[lig]["map_sd_at_atoms"]


def test_a_flipped_base_is_turned_back(tmp_path):
    """A base turned 180° about its glycosidic bond (anti -> syn) lies beyond gradient
    refinement; the rotamer stage's base-flip scan turns it back into its density."""
    from cryogmm.core.rotations import axis_rotation

    st = gemmi.read_structure(str(RNA))
    res = next(r for r in st[0]["A"] if r.seqid.num == 6)
    c1, n = np.array(res["C1'"][0].pos.tolist()), np.array(res["N1"][0].pos.tolist())
    axis = (n - c1) / np.linalg.norm(n - c1)
    rot = axis_rotation(axis, 180.0)
    base = [a for a in res if "'" not in a.name and a.name not in ("P", "OP1", "OP2", "N1")]
    truth = {a.name: np.array(a.pos.tolist()) for a in base}
    for a in base:
        a.pos = gemmi.Position(*(rot @ (np.array(a.pos.tolist()) - n) + n))
    st.write_pdb(str(tmp_path / "flipped.pdb"))
    _splat(RNA, tmp_path / "map.mrc")
    assert cli(["refine-model", str(tmp_path / "flipped.pdb"), "--map", str(tmp_path / "map.mrc"), "--resolution", "4",
                "--stages", "rotamers", "--out", str(tmp_path / "out")]) == 0
    rep = json.loads((tmp_path / "out" / "report.json").read_text())
    row = next(r for r in rep["log"] if r["phase"] == "bases")
    assert row["residues"] == ["A/C6"], row
    out = gemmi.read_structure(str(tmp_path / "out" / "refined.pdb"))[0]["A"]
    got = next(r for r in out if r.seqid.num == 6)
    d = [np.linalg.norm(np.array(got[k][0].pos.tolist()) - v) for k, v in truth.items()]
    assert max(d) < 0.3, d


def test_many_chains_and_long_chain_names_kept(tmp_path):
    """A model with more chains than the 62 one-character names and chain names of 3-8
    characters (mmCIF holds them, the PDB format does not): refine-model reads it and writes
    refined.cif and trajectory.cif with every chain name, residue and atom in input order;
    no refined.pdb; the report says why and measures refined.cif."""
    src = gemmi.read_structure(str(Path(__file__).parent / "data" / "hivp_1hvr_xk2.pdb"))
    src.remove_hydrogens()
    res = [src[0]["A"][i] for i in (9, 10)]  # a dipeptide
    xk2 = src[0]["A"][len(src[0]["A"]) - 1]
    st = gemmi.Structure()
    st.add_model(gemmi.Model("1"))
    names = [f"C{k}" for k in range(66)] + ["Ligand1"]
    for k, name in enumerate(names):
        ch = gemmi.Chain(name)
        for r in ([xk2] if name == "Ligand1" else res):
            r2 = r.clone()
            for a in r2:
                a.pos = gemmi.Position(a.pos.x + 11.0 * (k % 8), a.pos.y + 11.0 * (k // 8), a.pos.z)
            ch.add_residue(r2)
        st[0].add_chain(ch)
    st.setup_entities()
    p = tmp_path / "many.cif"
    st.make_mmcif_document().write_file(str(p))
    out = tmp_path / "out"
    assert cli(["refine-model", str(p), "--geometry-only", "--stages", "full", "--steps", "1", "--out", str(out)]) == 0

    def rows(path):
        s = gemmi.read_structure(str(path))
        s.remove_hydrogens()
        return [(c.chain.name, c.residue.seqid.num, c.residue.name, c.atom.name) for c in s[0].all()]

    assert [c.name for c in gemmi.read_structure(str(out / "refined.cif"))[0]] == names
    assert rows(out / "refined.cif") == rows(p)
    traj = gemmi.read_structure(str(out / "trajectory.cif"))
    assert len(traj) >= 2 and [c.name for c in traj[0]] == names
    assert not (out / "refined.pdb").exists() and not (out / "trajectory.pdb").exists()
    rep = json.loads((out / "report.json").read_text())
    assert rep["after_measured_on"] == "refined.cif"
    assert rep["outputs"] == ["refined.cif", "trajectory.cif", "report.json"]
    assert any("'C10'" in w and "refined.pdb" in w for w in rep["warnings"])
