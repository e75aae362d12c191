"""Monomer-library dictionaries of the lipids and detergents of cryo-EM models (issue 17,
dictionaries): the phospholipids POPC (POV), DOPC (PCW), DOPE (PEE), DLPC (PLC) and the others
of ``tools/model_tables.py`` ``EXTRA_LIPIDS`` are restrained from the library, not from their own
input geometry; the copies shipped are whole and self-consistent; the partial POPC tails of the
deposited CFTR model 6MSM are library ligands in refine-model's report."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import gemmi
import numpy as np
import pytest

from cryogmm.cli import main as cli
from cryogmm.model.topology import _monlib_files, build_topology, dictionary_residues
from cryogmm.model.validate import validate_coords
from test_nucleic_ligands import _ideal_ligand

ROOT = Path(__file__).resolve().parents[1]
LIPIDS = ("POV", "PCW", "PEE", "PLC", "3PE", "LHG", "PGW", "LMT", "Y01")
CFTR_POV = Path(__file__).parent / "data" / "cftr_6msm_pov.pdb"


def _tables():
    """The maintainer script ``tools/model_tables.py`` (its lipid list, commit and checks)."""
    spec = importlib.util.spec_from_file_location("model_tables", ROOT / "tools" / "model_tables.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_lipids_ship_with_their_source_commit():
    mt = _tables()
    assert set(LIPIDS) <= set(mt.EXTRA_LIPIDS) and set(LIPIDS) <= dictionary_residues()
    table = json.loads((ROOT / "engine" / "data" / "geom_monlib.json").read_text())
    assert mt.MONLIB_COMMIT in table["citation"] and table["licence"] == "LGPL-3.0"
    shipped = [r for r in mt.EXTRA_LIPIDS if f"{r[0].lower()}/{r}.cif" in table["files"]]
    assert table["citation"].endswith(f"(lipids and detergents: {' '.join(shipped)}).")
    notice = (ROOT / "engine" / "data" / "THIRD_PARTY.txt").read_text()
    assert mt.MONLIB_COMMIT in notice and all(r in notice for r in shipped)


@pytest.mark.parametrize("code", LIPIDS)
def test_shipped_lipid_dictionary_is_whole_and_self_consistent(code):
    """The copy shipped (transcribed from the repository) passes the build's own check: atom
    count as its ``_chem_comp.number_atoms_all``, every bond and angle target within 0.05 Å /
    5° of its own ideal coordinates; and it is one block per residue, as gemmi reads it."""
    text = _monlib_files()[f"{code[0].lower()}/{code}.cif"]
    doc = gemmi.cif.read_string(text)
    assert [b.name for b in doc] == ["comp_list", f"comp_{code}"]
    _tables()._check_self_consistent(doc.find_block(f"comp_{code}"), doc.find_block("comp_list"), code, code)
    chir = list(doc.find_block(f"comp_{code}").find_values("_chem_comp_chir.volume_sign"))
    assert len(chir) - chir.count("both") >= 1  # a defined hand: glycerol C2, sugar or steroid centres


@pytest.mark.parametrize("code", LIPIDS)
def test_lipid_at_ideal_geometry_is_a_library_ligand(code, tmp_path):
    t = build_topology(_ideal_ligand(code, tmp_path / f"{code}.pdb"))
    assert t.dictionary_counts == {"ligand": {code: 1}} and t.self_restrained == [] and t.fixed_residues == []
    assert t.movable.all() and t.missing_atoms == []
    v = validate_coords(t, t.coords)
    assert v["bond_rmsz"] < 1.0 and v["angle_rmsz"] < 1.0 and v["chiral_outliers"] == 0, v


@pytest.mark.parametrize("code", ["POV", "PEE", "LMT", "Y01"])
def test_noisy_lipid_is_regularised(code, tmp_path):
    """0.2 Å of seeded noise on POPC, DOPE, DDM (two sugar rings) and cholesteryl hemisuccinate
    (fused rings): geometry-only refinement brings bond and angle RMSZ under 1, keeps every chiral
    centre's hand and keeps the residue a library ligand."""
    noisy = _ideal_ligand(code, tmp_path / "noisy.pdb", distort=0.2, seed=5)
    t = build_topology(noisy)
    before = validate_coords(t, t.coords)
    assert before["bond_rmsz"] > 3.0
    assert cli(["refine-model", str(noisy), "--geometry-only", "--out", str(tmp_path / "out")]) == 0
    rep = json.loads((tmp_path / "out" / "report.json").read_text())
    assert rep["after"]["bond_rmsz"] < 1.0 and rep["after"]["angle_rmsz"] < 1.0 and rep["rms_moved_A"] > 0.05
    assert rep["after"]["chiral_outliers"] == 0
    assert rep["restrained_residues"] == {"ligand": {code: 1}} and rep["self_restrained"] == []


def test_cftr_popc_tails_are_library_restrained(tmp_path):
    """6MSM (CFTR, cryo-EM) models its POPC molecules as acyl-chain fragments (14 and 11 of 52
    heavy atoms here). They are library ligands (bond targets from the dictionary, e.g. C32-C33
    1.497 Å, not their input lengths), their missing atoms are reported, and refine-model's
    report lists them as library-restrained, none self-restrained."""
    t = build_topology(CFTR_POV)
    assert t.dictionary_counts["ligand"] == {"POV": 2} and t.self_restrained == [] and t.fixed_residues == []
    assert sorted(m.split(":")[0] for m in t.missing_atoms) == ["A/POV1507", "A/POV1508"]
    n, r = t.atom_name, t.res_name
    k = [b for b, (i, j) in enumerate(t.bonds) if r[i] == r[j] == "POV" and {n[i], n[j]} == {"C32", "C33"}]
    assert len(k) == 2 and np.allclose(t.bond_ideal[k], 1.497)
    d = [np.linalg.norm(t.coords[t.bonds[b][0]] - t.coords[t.bonds[b][1]]) for b in k]
    assert max(abs(x - 1.497) for x in d) > 0.01  # not the inputs' own lengths
    assert cli(["refine-model", str(CFTR_POV), "--geometry-only", "--quick", "--steps", "10",
                "--out", str(tmp_path / "out")]) == 0
    rep = json.loads((tmp_path / "out" / "report.json").read_text())
    assert rep["restrained_residues"]["ligand"] == {"POV": 2} and rep["self_restrained"] == []
    assert {d["residue"] for d in rep["after"]["ligands"]} == {"A/POV1507", "A/POV1508"}
    assert all(d["bond_rmsz"] < 1.0 and d["angle_rmsz"] < 1.0 for d in rep["after"]["ligands"])


def test_self_consistency_check_catches_a_copying_error():
    """The build's check rejects a copy with one mistyped coordinate digit or a flipped chiral sign."""
    text = _monlib_files()["p/POV.cif"]
    check = _tables()._check_self_consistent
    for bad in (text.replace("87.539      63.184", "87.539      63.884", 1),
                text.replace("O21    C1    C3    positive", "O21    C1    C3    negative", 1)):
        assert bad != text
        doc = gemmi.cif.read_string(bad)
        with pytest.raises(SystemExit, match="POV"):
            check(doc.find_block("comp_POV"), doc.find_block("comp_list"), "POV", "POV")
