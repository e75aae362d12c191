"""cryogmm validate beside the real MolProbity (cctbx/mmtbx, Top8000, reduce + probe).

Models: the deposited adenylate kinase models (4AKE open, 1AKE closed) and copies with
0.1 and 0.3 Å Gaussian coordinate noise (seeded). For each, both validators' bond/angle
RMSZ, Ramachandran favoured/outlier %, rotamer outlier % and clashscore, with the wall
time of each. The judge is set up by ../shared/tools/molprobity/setup.sh; point MOLP (or
--molp) at its prefix.

    MOLP=/tmp/model/molp python benchmarks/validate_vs_molprobity.py \
        [--out benchmarks/results/validate_vs_molprobity.json]
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

import numpy as np

PAIRS = [("bond_rmsz", "bond_rmsz"), ("angle_rmsz", "angle_rmsz"), ("rama_favoured_pct", "rama_favored_pct"),
         ("rama_outlier_pct", "rama_outlier_pct"), ("rotamer_outlier_pct", "rotamer_outlier_pct"),
         ("clashscore", "clashscore"), ("n_clashes", "n_clashes")]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--molp", default=os.environ.get("MOLP"))
    ap.add_argument("--work", type=Path, default=Path("/tmp/model/val_bench"))
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "validate_vs_molprobity.json")
    a = ap.parse_args(argv)
    from cryogmm.model.topology import build_topology, write_model
    from cryogmm.model.validate import validate_coords

    a.work.mkdir(parents=True, exist_ok=True)
    data = resources.files("cryogmm.data")
    models = []
    for name in ("adk_open", "adk_closed"):
        p = Path(str(data.joinpath(f"{name}.pdb")))
        models.append((name, p))
        t = build_topology(p, add_hydrogens=False)
        for sd in (0.1, 0.3):
            rng = np.random.default_rng(0)
            q = a.work / f"{name}_noise{sd:g}.pdb"
            write_model(t, t.coords + rng.normal(scale=sd, size=t.coords.shape), q)
            models.append((f"{name}_noise{sd:g}", q))
    rows = []
    for name, p in models:
        t0 = time.time()
        t = build_topology(p)
        ours = validate_coords(t, t.coords)
        t_ours = time.time() - t0
        judge, t_judge = None, None
        if a.molp and (Path(a.molp) / "validate.sh").exists():
            t0 = time.time()
            r = subprocess.run([str(Path(a.molp) / "validate.sh"), str(p)], capture_output=True, text=True)
            t_judge = time.time() - t0
            try:
                judge = json.loads(r.stdout.strip().splitlines()[-1])
            except Exception:
                judge = {"error": r.stderr[-300:]}
        row = {"model": name, "cryogmm_s": t_ours, "molprobity_s": t_judge}
        for ko, kj in PAIRS:
            row[ko] = {"cryogmm": ours.get(ko), "molprobity": None if judge is None else judge.get(kj)}
        rows.append(row)
        print(json.dumps(row), flush=True)
    res = {"rows": rows, "judge": "not run (set MOLP)" if not a.molp else str(a.molp)}
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(res, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
