"""Geometry-only refinement of deposited models: adenylate kinase (4AKE open, 1AKE closed) by
default; with ``--models PATH ...`` any model, e.g. the RNA hairpin and the HIV protease-inhibitor
complex in tests/data, or a cryo-EM model with ATP, Mg and lipids (6MSM, MDAnalysisTests sdist).

``refine_model(..., geometry_only=True)`` (no map; the atoms are held near the start by the
default 0.15 Å harmonic anchor) must improve every geometry figure, or keep it at 0, while
moving the atoms by less than 0.3 Å RMS (protein backbone restrained to Engh & Huber targets, the
default; ``--backbone-library cdl`` for the conformation-dependent library). Judged by ``cryogmm validate`` (bond/angle RMSZ and
> 4 sigma outliers, Ramachandran outliers / favoured, rotamer outliers, clashscore, Cβ
deviations, planarity outliers and RMS, chirality outliers) and, when set up (``MOLP`` or
``--molp``, see ../shared/tools/molprobity), by MolProbity (bond/angle RMSZ and outliers,
Ramachandran, rotamers, clashscore; the judge runs without the CDL) and by the judge's cctbx with
its CDL on (bond/angle RMSZ and outliers, ``molprobity_cdl_*``: what Phenix and phenix.molprobity
report by default).

    MOLP=/tmp/model/molp python benchmarks/geometry_only.py [--models adk_open adk_closed]
        [--steps 150] [--work /tmp/bench/geo] [--out benchmarks/results/geometry_only.json]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from importlib import resources
from pathlib import Path

# figure -> +1 when larger is better, -1 when smaller is better
OURS = {"bond_rmsz": -1, "angle_rmsz": -1, "bond_outliers": -1, "angle_outliers": -1, "rama_outlier_pct": -1,
        "rama_favoured_pct": +1, "rotamer_outlier_pct": -1, "clashscore": -1, "cbeta_deviations": -1,
        "plane_outliers": -1, "plane_rms_A": -1, "chiral_outliers": -1, "omega_cis_nonpro": -1,
        "n_pucker_outliers": -1, "suite_outliers": -1, "base_plane_rmsz": -1}
JUDGE = {"bond_rmsz": -1, "angle_rmsz": -1, "n_bond_outliers": -1, "n_angle_outliers": -1, "rama_outlier_pct": -1,
         "rama_favored_pct": +1, "rotamer_outlier_pct": -1, "clashscore": -1}
MAX_RMS_MOVE_A = 0.3


def judge(model: Path, molp: str | None):
    if not molp or not (Path(molp) / "validate.sh").exists():
        return None
    r = subprocess.run([str(Path(molp) / "validate.sh"), str(model)], capture_output=True, text=True)
    try:
        return json.loads(r.stdout.strip().splitlines()[-1])
    except Exception:
        return {"error": r.stderr[-300:]}


def judge_cdl(model: Path, molp: str | None):
    """Bond/angle RMSZ of the judge's cctbx with the conformation-dependent library switched on
    (Phenix's and phenix.molprobity's default; the judge's own figures run without it), from
    every restraint ``_molprobity_restraints.py --cdl`` lists (H ignored, as the judge)."""
    exe = Path(molp or "") / "venv" / "bin" / "python"
    if not molp or not exe.exists():
        return None
    helper = Path(__file__).with_name("_molprobity_restraints.py")
    r = subprocess.run([str(exe), str(helper), str(model), molp, "--cdl"], capture_output=True, text=True)
    z = {"bond": [], "angle": []}
    for line in r.stdout.splitlines():
        d = json.loads(line)
        z[d["kind"]].append((d["model"] - d["target"]) / d["sigma"])
    if not z["bond"]:
        return {"error": r.stderr[-300:]}
    rms = lambda v: round(float(sum(t * t for t in v) / len(v)) ** 0.5, 3) if v else None  # noqa: E731
    return {"bond_rmsz": rms(z["bond"]), "angle_rmsz": rms(z["angle"]),
            "n_bond_outliers": sum(abs(t) > 4 for t in z["bond"]), "n_angle_outliers": sum(abs(t) > 4 for t in z["angle"])}


JUDGE_CDL = {"bond_rmsz": -1, "angle_rmsz": -1, "n_bond_outliers": -1, "n_angle_outliers": -1}


def verdict(before: dict, after: dict, keys: dict, tol: float = 1e-9) -> dict:
    """Per figure: improved, stayed at 0 (ok), or worse (the figures that fail)."""
    out = {}
    for k, sign in keys.items():
        b, a = before.get(k), after.get(k)
        if b is None and a is None:
            out[k] = "n/a"  # a figure of another molecule kind (e.g. suites of a protein)
        elif b is None or a is None:
            out[k] = "missing"
        elif sign < 0 and a == 0 and b == 0:
            out[k] = "stays 0"
        elif sign > 0 and a >= 100.0 - tol and b >= 100.0 - tol:
            out[k] = "stays 100"
        elif sign * (a - b) > tol:
            out[k] = "improves"
        elif abs(a - b) <= tol:
            out[k] = "unchanged"
        else:
            out[k] = "worse"
    return out


def run(model: Path, out: Path, steps: int, molp: str | None, extra: dict | None = None, threads: int = 2,
        backbone_library: str = "cdl") -> dict:
    from cryogmm.model.refine.config import RefineModelConfig
    from cryogmm.model.refine.job import refine_model

    t0 = time.time()
    rep = refine_model(RefineModelConfig(model=model, out=out, geometry_only=True, steps=steps,
                                         threads=threads, backbone_library=backbone_library,
                                         extra=dict(extra or {})))
    wall = time.time() - t0
    row = {"model": str(model), "wall_s": wall, "load": os.getloadavg(), "rms_moved_A": rep["rms_moved_A"],
           "backbone_library": rep.get("backbone_library"),
           "ours_before": {k: rep["before"].get(k) for k in OURS}, "ours_after": {k: rep["after"].get(k) for k in OURS}}
    row["n_rama"], row["n_rotamers"] = rep["before"].get("n_rama"), rep["before"].get("n_rotamers")
    jb, ja = judge(model, molp), judge(out / "refined.pdb", molp)
    if jb is not None and ja is not None:
        row["molprobity_before"] = {k: jb.get(k) for k in JUDGE}
        row["molprobity_after"] = {k: ja.get(k) for k in JUDGE}
        row["molprobity_verdict"] = verdict(row["molprobity_before"], row["molprobity_after"], JUDGE)
    cb, ca = judge_cdl(model, molp), judge_cdl(out / "refined.pdb", molp)
    if cb is not None and ca is not None:
        row["molprobity_cdl_before"], row["molprobity_cdl_after"] = cb, ca
    return judge_row(row)


OK = ("improves", "stays 0", "stays 100", "n/a")


def judge_row(row: dict) -> dict:
    """Set ``fails`` (figures that did not improve and are not at their best) and ``goal_met``.
    A model without amino acids (``n_rama`` 0) has no Ramachandran or rotamer figures: n/a."""
    none = []
    if row.get("n_rama") == 0:
        none += ["rama_outlier_pct", "rama_favoured_pct", "rama_favored_pct", "cbeta_deviations"]
    if row.get("n_rotamers") == 0:
        none += ["rotamer_outlier_pct"]
    for part in ("ours_before", "ours_after", "molprobity_before", "molprobity_after"):
        for k in none:
            if k in row.get(part, {}):
                row[part][k] = None
    if "ours_before" in row:
        row["ours_verdict"] = verdict(row["ours_before"], row["ours_after"], OURS)
    if "molprobity_before" in row:
        row["molprobity_verdict"] = verdict(row["molprobity_before"], row["molprobity_after"], JUDGE)
    if "molprobity_cdl_before" in row:
        row["molprobity_cdl_verdict"] = verdict(row["molprobity_cdl_before"], row["molprobity_cdl_after"], JUDGE_CDL)
    fails = [f"ours:{k} {v}" for k, v in row["ours_verdict"].items() if v not in OK]
    fails += [f"molprobity_cdl:{k} {v}" for k, v in row.get("molprobity_cdl_verdict", {}).items() if v not in OK]
    fails += [f"molprobity:{k} {v}" for k, v in row.get("molprobity_verdict", {}).items() if v not in OK]
    if row["rms_moved_A"] >= MAX_RMS_MOVE_A:
        fails.append(f"rms_moved_A {row['rms_moved_A']:.3f} >= {MAX_RMS_MOVE_A}")
    row["fails"] = fails
    row["goal_met"] = not fails
    return row


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="+", default=["adk_open", "adk_closed"],
                    help="names in cryogmm.data or paths to PDB/mmCIF files")
    ap.add_argument("--steps", type=int, default=150)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--backbone-library", default="engh-huber", choices=("engh-huber", "cdl"))
    ap.add_argument("--work", type=Path, default=Path("/tmp/bench/geo"))
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "geometry_only.json")
    ap.add_argument("--molp", default=os.environ.get("MOLP"))
    ap.add_argument("--rescore", action="store_true",
                    help="re-derive the verdicts of the measured figures stored in --out (no refinement)")
    a = ap.parse_args(argv)
    if a.rescore:
        res = json.loads(a.out.read_text())
        res["rows"] = [judge_row(r) for r in res["rows"]]
        a.out.write_text(json.dumps(res, indent=2) + "\n")
        _print(res)
        return 0
    import torch

    torch.set_num_threads(a.threads)
    data = resources.files("cryogmm.data")
    import datetime
    import platform

    res = {"judge": str(a.molp) if a.molp else "not run (set MOLP)", "max_rms_move_A": MAX_RMS_MOVE_A,
           "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"), "host": platform.node(),
           "command": " ".join(["python"] + sys.argv), "rows": []}
    for name in a.models:
        p = Path(name) if Path(name).exists() else Path(str(data.joinpath(f"{name}.pdb")))
        row = run(p, a.work / Path(name).stem, a.steps, a.molp, threads=a.threads, backbone_library=a.backbone_library)
        row["name"] = Path(name).stem
        res["rows"].append(row)
        print(json.dumps(row), flush=True)
        a.out.parent.mkdir(parents=True, exist_ok=True)
        a.out.write_text(json.dumps(res, indent=2) + "\n")
    _print(res)
    return 0


def _print(res):
    for r in res["rows"]:
        print(f"{r['name']}: moved {r['rms_moved_A']:.3f} Å RMS in {r['wall_s']:.0f} s; goal "
              f"{'met' if r['goal_met'] else 'NOT met: ' + ', '.join(r['fails'])}")


if __name__ == "__main__":
    sys.exit(main())
