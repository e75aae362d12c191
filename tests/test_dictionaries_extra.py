"""Monomer-library dictionaries shipped beyond the amino acids, nucleotides and ATP/ADP (issue
17, dictionaries): cofactors and nucleotides, ions, cholesterol and glycans are restrained from
the library (not from their own input geometry), and glycans stay bonded to their Asn through
the library's NAG-ASN link (``pyr-ASN``) and to each other through the glycosidic links."""

from __future__ import annotations

import json
from pathlib import Path

import gemmi
import numpy as np
import pytest

from cryogmm.cli import main as cli
from cryogmm.model.topology import _monlib_files, build_topology, dictionary_residues, monomer_library_dir
from cryogmm.model.validate import validate_coords
from test_nucleic_ligands import _ideal_ligand

ADDED = ("ANP", "GTP", "GDP", "NAD", "NAP", "FAD", "FMN", "SAM", "HEM", "HEC", "COA", "PLP",
         "MG", "ZN", "CA", "MN", "FE", "K", "CL", "CLR", "NAG", "MAN", "BMA", "FUC", "GAL")
ACE2_NAG = Path(__file__).parent / "data" / "ace2_7ddo_nag546.pdb"


def _pair(t, res_a, atom_a, res_b, atom_b):
    """Indices into ``t.bonds`` of the bonds between atom_a of residue res_a and atom_b of res_b."""
    n, r = t.atom_name, t.res_name
    return [k for k, (i, j) in enumerate(t.bonds)
            if {(r[i], n[i]), (r[j], n[j])} == {(res_a, atom_a), (res_b, atom_b)} and t.res_index[i] != t.res_index[j]]


def test_library_ships_the_added_residues_and_glycosidic_links():
    lib = dictionary_residues()
    assert set(ADDED) <= lib
    lst = _monlib_files()["list/mon_lib_list.cif"]
    for link in ("pyr-ASN", "BETA1-4", "ALPHA1-3", "ALPHA1-6", "ALPHA1-2", "BETA1-3", "BETA1-6"):
        assert f"data_link_{link}\n" in lst, link
    cit = json.loads((Path(__file__).resolve().parents[1] / "engine" / "data" / "geom_monlib.json").read_text())
    assert "github.com/MonomerLibrary/monomers commit" in cit["citation"] and cit["licence"] == "LGPL-3.0"
    notice = (Path(__file__).resolve().parents[1] / "engine" / "data" / "THIRD_PARTY.txt").read_text()
    assert all(c in notice.split() for c in ("HEM", "NAG", "MG", "CLR"))


@pytest.mark.parametrize("code", ADDED)
def test_added_residue_is_restrained_by_the_library(code, tmp_path):
    """At its dictionary's own coordinates each added residue is a library ligand (not
    self-restrained, not fixed) and validates clean."""
    t = build_topology(_ideal_ligand(code, tmp_path / f"{code}.pdb"))
    assert t.dictionary_counts == {"ligand": {code: 1}} and t.self_restrained == [] and t.fixed_residues == []
    assert t.movable.all()
    v = validate_coords(t, t.coords)
    assert v["bond_rmsz"] < 1.0 and v["chiral_outliers"] == 0, v["bond_rmsz"]


@pytest.mark.parametrize("code", ["HEM", "NAG"])
def test_noisy_cofactor_is_regularised(code, tmp_path):
    """0.15 Å of noise on haem and on NAG: geometry-only refinement brings bond RMSZ under 1."""
    noisy = _ideal_ligand(code, tmp_path / "noisy.pdb", distort=0.15, seed=2)
    t = build_topology(noisy)
    assert validate_coords(t, t.coords)["bond_rmsz"] > 3.0
    assert cli(["refine-model", str(noisy), "--geometry-only", "--out", str(tmp_path / "out")]) == 0
    rep = json.loads((tmp_path / "out" / "report.json").read_text())
    assert rep["after"]["bond_rmsz"] < 1.0 and rep["rms_moved_A"] > 0.05
    assert rep["restrained_residues"] == {"ligand": {code: 1}}


def test_glycosylated_asn_is_linked_and_refines(tmp_path):
    """ACE2 Asn546 with its NAG (cryo-EM model 7DDO, LINK record): the topology carries the
    library's NAG-ASN link (ND2-C1 1.432 Å, CG-ND2-C1 122.6°) and, with 0.15 Å of noise,
    geometry-only refinement keeps the sugar on its Asn at clean geometry."""
    t = build_topology(ACE2_NAG)
    assert t.dictionary_counts["ligand"] == {"NAG": 1} and t.fixed_residues == [] and t.self_restrained == []
    assert t.missing_atoms == []  # the link removes the sugar's O1: not missing
    k = _pair(t, "ASN", "ND2", "NAG", "C1")
    assert len(k) == 1 and abs(t.bond_ideal[k[0]] - 1.432) < 1e-3
    n, r = t.atom_name, t.res_name
    ang = [a for a, (i, j, m) in enumerate(t.angles)
           if (r[i], n[i], n[j], r[m], n[m]) == ("ASN", "CG", "ND2", "NAG", "C1")
           or (r[m], n[m], n[j], r[i], n[i]) == ("ASN", "CG", "ND2", "NAG", "C1")]
    assert len(ang) == 1 and abs(t.angle_ideal[ang[0]] - 122.596) < 1e-2
    assert validate_coords(t, t.coords)["bond_rmsz"] < 1.0

    st = gemmi.read_structure(str(ACE2_NAG))
    rng = np.random.default_rng(3)
    for cra in st[0].all():
        cra.atom.pos = gemmi.Position(*(np.array(cra.atom.pos.tolist()) + rng.normal(scale=0.15, size=3)))
    noisy = tmp_path / "noisy.pdb"
    st.write_pdb(str(noisy))
    assert len(gemmi.read_structure(str(noisy)).connections) == 1
    assert cli(["refine-model", str(noisy), "--geometry-only", "--out", str(tmp_path / "out")]) == 0
    rep = json.loads((tmp_path / "out" / "report.json").read_text())
    assert rep["after"]["bond_rmsz"] < 1.0 and rep["before"]["bond_rmsz"] > 2.0
    out = build_topology(tmp_path / "out" / "refined.pdb")
    k = _pair(out, "ASN", "ND2", "NAG", "C1")
    i, j = out.bonds[k[0]]
    assert abs(np.linalg.norm(out.coords[i] - out.coords[j]) - 1.432) < 0.05


def test_beta1_4_link_between_two_nags(tmp_path):
    """Two NAGs joined O4-C1 by a LINK record (the chitobiose core of an N-glycan) are bonded by
    the library's glycosidic link (O4-C1 1.393 Å), both restrained from the library."""
    one = [ln for ln in _ideal_ligand("NAG", tmp_path / "nag.pdb").read_text().splitlines() if ln.startswith("HETATM")]
    xyz = {ln[12:16].strip(): np.array([float(ln[30:38]), float(ln[38:46]), float(ln[46:54])]) for ln in one}
    u = xyz["O4"] - xyz["C4"]
    u /= np.linalg.norm(u)
    # second sugar: its C1 1.39 Å beyond O4 along C4->O4, its body turned to point away
    body = np.mean(list(xyz.values()), axis=0) - xyz["C1"]
    v = body / np.linalg.norm(body)
    axis = np.cross(v, u)
    s, c = np.linalg.norm(axis), float(v @ u)
    kx = np.array([[0, -axis[2], axis[1]], [axis[2], 0, -axis[0]], [-axis[1], axis[0], 0]]) / max(s, 1e-9)
    rot = np.eye(3) + s * kx + (1 - c) * kx @ kx
    start = xyz["O4"] + 1.39 * u
    two = []
    for ln in one:
        if ln[12:16].strip() == "O1":  # the glycosidic link removes the anomeric O1
            continue
        p = rot @ (xyz[ln[12:16].strip()] - xyz["C1"]) + start
        two.append(ln[:22] + "   2" + ln[26:30] + "".join(f"{q:8.3f}" for q in p) + ln[54:])
    link = ("LINK" + " " * 8 + " O4 " + " NAG B   1" + " " * 16 + " C1 " + " NAG B   2" + " " * 4
            + "  1555   1555  1.39")
    p = tmp_path / "chitobiose.pdb"
    p.write_text("\n".join([link] + one + two) + "\nEND\n")
    assert len(gemmi.read_structure(str(p)).connections) == 1
    t = build_topology(p)
    assert t.dictionary_counts == {"ligand": {"NAG": 2}} and t.self_restrained == []
    k = _pair(t, "NAG", "O4", "NAG", "C1")
    assert len(k) == 1 and abs(t.bond_ideal[k[0]] - 1.393) < 1e-3
    # the link gemmi chose for the LINK record (NAG is the beta anomer): BETA1-4, not ALPHA1-4
    st = gemmi.read_structure(str(p))
    st.setup_entities()
    mon = gemmi.MonLib()
    mon.read_monomer_lib(monomer_library_dir(), ["NAG"])
    topo = gemmi.prepare_topology(st, mon, h_change=gemmi.HydrogenChange.NoChange, ignore_unknown_links=True)
    assert [e.link_id for e in topo.extras] == ["BETA1-4"]
