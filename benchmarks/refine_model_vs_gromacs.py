"""Adenylate kinase: the closed model (1AKE) refined into maps simulated from the open model (4AKE).

For each resolution (4 Å, 3 Å; Gaussian noise added, band-limited to the resolution) and
each map similarity, runs ``cryogmm refine-model`` (rigid patches -> residues -> full atom)
and reports: Cα RMSD to the open model, our validation figures, map CC, the same figures
for the open model itself, wall time, and, when the MolProbity judge is installed
(``MOLP=/path/to/molp``, set up by ../shared/tools/molprobity/setup.sh), its figures for
the refined models. GROMACS density-guided simulation is run for comparison when ``gmx``
is on PATH (not installed on the reference machine: the comparison is then reported as
missing, never estimated).

    python benchmarks/refine_model_vs_gromacs.py [--res 4 3] [--similarity relative-entropy ...]
        [--steps 150] [--work /tmp/model/adk] [--out benchmarks/results/refine_model_adk.json]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import subprocess
import sys
import time
from importlib import resources
from pathlib import Path

import numpy as np
import torch


def make_map(model_path: Path, resolution_A: float, out: Path, apix: float = 1.0, noise: float = 0.3, seed: int = 0,
             pad_A: float = 12.0):
    """Molmap-like map of a model (sigma = res / (pi sqrt 2), electrons) on a cubic grid with
    white Gaussian noise (sd = ``noise`` x the noise-free map's sd over the box) low-passed to
    the resolution. Returns the path."""
    from cryogmm.gmm import ELECTRONS, sigma_from_resolution
    from cryogmm.mapio import write_map
    from cryogmm.metrics import lowpass
    from cryogmm.model_density import splat
    from cryogmm.topology import build_topology

    topo = build_topology(model_path, add_hydrogens=False)
    x = topo.coords[~topo.is_h]
    lo = x.min(0) - pad_A
    n = int(math.ceil((x.max(0) - lo).max() / apix + pad_A / apix))
    n += n % 2
    amp = torch.tensor([ELECTRONS.get(e, 6) for e in topo.element[~topo.is_h]], dtype=torch.float64)
    m = splat(torch.as_tensor(x), amp, sigma_from_resolution(resolution_A), (n, n, n), apix, lo)
    rng = np.random.default_rng(seed)
    noisy = m + torch.as_tensor(rng.normal(scale=noise * float(m.std()), size=m.shape))
    noisy = lowpass(noisy, resolution_A, apix)
    write_map(out, noisy.numpy(), apix, origin_A=lo)
    return out


def judge(model: Path, molp: str | None):
    if not molp:
        return None
    exe = Path(molp) / "validate.sh"
    if not exe.exists():
        return None
    r = subprocess.run([str(exe), str(model)], capture_output=True, text=True)
    try:
        return json.loads(r.stdout.strip().splitlines()[-1])
    except Exception:
        return {"error": r.stderr[-300:]}


KEYS = ("ca_rmsd_to_reference_A", "bond_rmsz", "angle_rmsz", "rama_favoured_pct", "rama_outlier_pct",
        "rotamer_outlier_pct", "clashscore", "cbeta_deviations", "map_cc_mask", "qscore_mean")
JUDGE_KEYS = ("bond_rmsz", "angle_rmsz", "rama_favored_pct", "rama_outlier_pct", "rotamer_outlier_pct", "clashscore")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--res", type=float, nargs="+", default=[4.0, 3.0])
    ap.add_argument("--similarity", nargs="+",
                    default=["relative-entropy", "cross-correlation", "inner-product", "fsc", "frc"])
    ap.add_argument("--steps", type=int, default=150)
    ap.add_argument("--work", type=Path, default=Path("/tmp/model/adk"))
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "refine_model_adk.json")
    ap.add_argument("--molp", default=os.environ.get("MOLP"))
    a = ap.parse_args(argv)
    torch.set_num_threads(2)
    from cryogmm.model_refine import RefineModelConfig, refine_model
    from cryogmm.model_density import read_map_grid
    from cryogmm.topology import build_topology
    from cryogmm.validate import map_figures, validate_coords

    data = resources.files("cryogmm.data")
    open_pdb, closed_pdb = Path(str(data.joinpath("adk_open.pdb"))), Path(str(data.joinpath("adk_closed.pdb")))
    a.work.mkdir(parents=True, exist_ok=True)
    results = {"machine": {"cpu_threads": torch.get_num_threads(), "gpu": None}, "cases": [],
               "gromacs": "not run: gmx not on PATH" if shutil.which("gmx") is None else "available"}
    topo_open = build_topology(open_pdb)
    for res in a.res:
        mp = make_map(open_pdb, res, a.work / f"open_{res:g}A.mrc")
        grid = read_map_grid(mp)
        ref_fig = validate_coords(topo_open, topo_open.coords)
        ref_fig.update({k: v for k, v in map_figures(topo_open, topo_open.coords, grid, res).items()
                        if k != "qscore_per_residue"})
        for sim in a.similarity:
            out = a.work / f"refined_{res:g}A_{sim}"
            t0 = time.time()
            rep = refine_model(RefineModelConfig(model=closed_pdb, map=mp, resolution_A=res, out=out,
                                                 similarity=sim, steps=a.steps, reference=open_pdb))
            wall = time.time() - t0
            case = {"resolution_A": res, "similarity": sim, "wall_s": wall,
                    "before": {k: rep["before"].get(k) for k in KEYS}, "after": {k: rep["after"].get(k) for k in KEYS},
                    "open_model": {k: ref_fig.get(k) for k in KEYS if k in ref_fig}}
            j = judge(out / "refined.pdb", a.molp)
            if j is not None:
                case["molprobity_after"] = {k: j.get(k) for k in JUDGE_KEYS}
            af = case["after"]
            case["goals_met"] = bool(af["ca_rmsd_to_reference_A"] <= 1.0 and af["rama_outlier_pct"] == 0.0
                                     and af["rotamer_outlier_pct"] <= 1.0 and af["clashscore"] <= 2.0
                                     and af["bond_rmsz"] <= 1.0 and af["angle_rmsz"] <= 1.0
                                     and af["map_cc_mask"] >= ref_fig["map_cc_mask"] - 0.02)
            results["cases"].append(case)
            print(json.dumps(case), flush=True)
            a.out.parent.mkdir(parents=True, exist_ok=True)
            a.out.write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
