"""Whole models beyond the amino acids (issue 17): an RNA hairpin and a protein-ligand complex,
each with part of it moved rigidly, refined back into a 4 Å map of the deposited model.

Cases (public structures; neither is adenylate kinase):
  rna     the 23-nt RNA hairpin of PDB 1K5I (tests/data/rna_1k5i.pdb): nucleotides 13-23 turned
          12° about the loop; figures: P RMSD, geometry, map CC
  1lcd    lac repressor headpiece bound to its DNA operator (Biopython 1.88 sdist on PyPI):
          the protein turned 10° about the complex's centre; figures: Cα and P RMSD, geometry
  1hvr    HIV-1 protease dimer with the inhibitor XK2 (no shipped dictionary: restrained to its
          own geometry) and two S-hydroxycysteines (CSO, the same), from the MDAnalysisTests 2.11.0
          sdist on PyPI (downloaded with pip into --work): chain B and the inhibitor turned 10°
          about the dimer's centre; figures: Cα RMSD, ligand RMSD, geometry, map CC

Maps: every heavy atom a Gaussian of sigma 0.225 x 4 Å weighted by its atomic number, 10 % white
noise (made here, independently of the engine's map code). Usage:
  python benchmarks/refine_model_whole.py [--quick] [--cases rna 1hvr] [--work /tmp/bench/whole]
Writes benchmarks/results/refine_model_whole.json.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import gemmi
import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from identical_outputs import splat_map  # noqa: E402

ROOT = HERE.parent
MDAT = "mdanalysistests==2.11.0"


def _turn(st, select, deg, axis, centre):
    ax = np.asarray(axis, float) / np.linalg.norm(axis)
    t = math.radians(deg)
    k = np.array([[0, -ax[2], ax[1]], [ax[2], 0, -ax[0]], [-ax[1], ax[0], 0]])
    rot = np.eye(3) + math.sin(t) * k + (1 - math.cos(t)) * k @ k
    for c in st[0].all():
        if select(c):
            c.atom.pos = gemmi.Position(*(rot @ (np.array(c.atom.pos.tolist()) - centre) + centre))


def _atoms(path):
    st = gemmi.read_structure(str(path))
    return {(c.chain.name, c.residue.seqid.num, c.residue.name, c.atom.name): np.array(c.atom.pos.tolist())
            for c in st[0].all() if c.atom.element.name != "H"}


def _rmsd(a, b, keep):
    ks = [k for k in a if k in b and keep(k)]
    return float(np.sqrt(np.mean([((a[k] - b[k]) ** 2).sum() for k in ks]))), len(ks)


def case_rna(work: Path):
    truth = ROOT / "tests" / "data" / "rna_1k5i.pdb"
    st = gemmi.read_structure(str(truth))
    hinge = np.array([c.atom.pos.tolist() for c in st[0].all() if 10 <= c.residue.seqid.num <= 14]).mean(0)
    _turn(st, lambda c: c.residue.seqid.num >= 13, 12.0, (1.0, 0.3, 0.2), hinge)
    st.write_pdb(str(work / "start.pdb"))
    return truth, {"P": lambda k: k[3] == "P"}


def sdist_file(work: Path, spec: str, suffix: str, name: str) -> Path:
    """A file of a PyPI source distribution (``spec`` as pip takes it), downloaded into ``work``
    once, written there as ``name``."""
    sdist = work / f"{spec.replace('==', '-')}.tar.gz"
    if not sdist.exists():
        subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--no-binary", ":all:", spec,
                        "-d", str(work)], check=True)
    with tarfile.open(sdist) as tf:
        member = next(m for m in tf.getmembers() if m.name.endswith(suffix))
        (work / name).write_bytes(tf.extractfile(member).read())
    return work / name


def case_1hvr(work: Path):
    st = gemmi.read_structure(str(sdist_file(work, MDAT, "MDAnalysisTests/data/1hvr.pdb", "1hvr.pdb")))
    st.remove_hydrogens()
    st.remove_alternative_conformations()
    st.remove_waters()
    st.setup_entities()
    truth = work / "truth.pdb"
    st.write_pdb(str(truth))
    centre = np.array([c.atom.pos.tolist() for c in st[0].all()]).mean(0)
    _turn(st, lambda c: c.chain.name == "B" or c.residue.name == "XK2", 10.0, (0.3, 1.0, 0.2), centre)
    st.write_pdb(str(work / "start.pdb"))
    return truth, {"CA": lambda k: k[3] == "CA", "ligand XK2": lambda k: k[2] == "XK2"}


BIOPYTHON = "biopython==1.88"


def case_1lcd(work: Path):
    """Lac repressor headpiece on its 22-bp DNA operator (PDB 1LCD, NMR model 1, from the
    Biopython 1.88 sdist's tests on PyPI): the protein turned 10° about the complex's centre."""
    st = gemmi.read_structure(str(sdist_file(work, BIOPYTHON, "Tests/PDB/1LCD.pdb", "1lcd.pdb")))
    del st[1:]
    st.remove_hydrogens()
    st.remove_alternative_conformations()
    st.remove_waters()
    st.remove_empty_chains()
    st.setup_entities()
    truth = work / "truth.pdb"
    st.write_pdb(str(truth))
    dna = {"DA", "DC", "DG", "DT"}
    centre = np.array([c.atom.pos.tolist() for c in st[0].all()]).mean(0)
    _turn(st, lambda c: c.residue.name not in dna, 10.0, (0.2, 0.4, 1.0), centre)
    st.write_pdb(str(work / "start.pdb"))
    return truth, {"CA": lambda k: k[3] == "CA", "P": lambda k: k[3] == "P"}


CASES = {"rna": case_rna, "1hvr": case_1hvr, "1lcd": case_1lcd}


def validate_file(path: Path) -> dict:
    """``cryogmm validate`` figures of a model file (the engine's own validation)."""
    from cryogmm.model.topology import build_topology
    from cryogmm.model.validate import validate_coords

    t = build_topology(path)
    return validate_coords(t, t.coords)


def judge(model: Path, molp: str) -> dict:
    """MolProbity (../shared/tools/molprobity) figures of a model."""
    r = subprocess.run([str(Path(molp) / "validate.sh"), str(model)], capture_output=True, text=True)
    try:
        j = json.loads(r.stdout.strip().splitlines()[-1])
    except Exception:
        return {"error": r.stderr[-300:]}
    return {k: j.get(k) for k in ("bond_rmsz", "angle_rmsz", "rama_outlier_pct", "rotamer_outlier_pct", "clashscore")}


def suitename_outliers(model: Path, molp: str):
    """Suite outliers (``!!``) by MolProbity's own suitename (mmtbx) on a model."""
    r = subprocess.run([str(Path(molp) / "venv" / "bin" / "python"), "-m", "mmtbx.command_line.suitename", str(model)],
                       capture_output=True, text=True)
    rows = [ln for ln in r.stdout.splitlines() if ln.startswith(" :")]
    return sum(1 for ln in rows if " !! " in ln) if rows else None


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cases", nargs="+", default=list(CASES), choices=CASES)
    ap.add_argument("--quick", action="store_true", help="refine-model --quick")
    ap.add_argument("--work", type=Path, default=Path("/tmp/bench/whole"))
    ap.add_argument("--out", type=Path, default=HERE / "results" / "refine_model_whole.json")
    ap.add_argument("--molp", default=os.environ.get("MOLP"), help="MolProbity judge (../shared/tools/molprobity)")
    a = ap.parse_args(argv)
    rows = {}
    for name in a.cases:
        w = a.work / name
        w.mkdir(parents=True, exist_ok=True)
        truth, groups = CASES[name](w)
        splat_map(truth, w / "target.mrc", resolution=4.0, seed=0, noise=0.1)
        t0 = time.time()
        subprocess.run([sys.executable, "-m", "cryogmm.cli", "refine-model", str(w / "start.pdb"), "--map",
                        str(w / "target.mrc"), "--resolution", "4", "--out", str(w / "run"), "--force"]
                       + (["--quick"] if a.quick else []), check=True, capture_output=True)
        wall = time.time() - t0
        rep = json.loads((w / "run" / "report.json").read_text())
        t, s, r = _atoms(truth), _atoms(w / "start.pdb"), _atoms(w / "run" / "refined.pdb")
        row = {"wall_s": wall, "atoms": len(t), "load_avg_1min_at_end": round(os.getloadavg()[0], 2)}
        for g, keep in groups.items():
            row[f"{g}_rmsd_start_A"], n = _rmsd(t, s, keep)
            row[f"{g}_rmsd_refined_A"], _ = _rmsd(t, r, keep)
            row[f"{g}_atoms"] = n
        keys = ("bond_rmsz", "angle_rmsz", "rama_outlier_pct", "rotamer_outlier_pct", "clashscore", "chiral_outliers",
                "map_cc_mask", "base_plane_rmsz", "n_pucker_outliers", "suite_outliers", "mean_suiteness")
        row["after"] = {k: rep["after"][k] for k in keys if k in rep["after"]}
        row["ligands_after"] = rep["after"].get("ligands")
        dep = validate_file(truth)
        row["deposited"] = {k: dep[k] for k in keys if k in dep}
        if a.molp:
            row["molprobity_deposited"] = judge(truth, a.molp)
            row["molprobity_refined"] = judge(w / "run" / "refined.pdb", a.molp)
            if "nucleic acid" in rep["restrained_residues"]:
                row["suitename_outliers_deposited"] = suitename_outliers(truth, a.molp)
                row["suitename_outliers_refined"] = suitename_outliers(w / "run" / "refined.pdb", a.molp)
        row["restrained_residues"] = rep["restrained_residues"]
        row["self_restrained"] = rep["self_restrained"]
        row["fixed_residues"] = rep["fixed_residues"]
        rows[name] = row
        print(name, json.dumps({k: v for k, v in row.items() if not isinstance(v, (dict, list))}), flush=True)
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps({"quick": a.quick, "resolution_A": 4.0, "cases": rows}, indent=1) + "\n")


if __name__ == "__main__":
    main()
