"""What the per-stage checkpoints of refine-model cost: seconds spent writing checkpoint.pt
against the whole run, and the checkpoint's size, on two molecules (adenylate kinase 1AKE, 214
residues; HIV-1 protease 1HVR with its inhibitor, 2 x 99 residues) refined with --quick into a
4 Å map of themselves from a start displaced by 1 Å with 0.2 Å noise.

Usage:
  .venv/bin/python benchmarks/refine_checkpoint_cost.py [--out benchmarks/results/refine_checkpoint_cost.json]
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import tempfile
import time
from importlib import resources
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
MOLECULES = {
    "adk_1ake": Path(str(resources.files("cryogmm.data").joinpath("adk_closed.pdb"))),
    "hivp_1hvr": ROOT / "tests" / "data" / "hivp_1hvr_xk2.pdb",
}


def case(name: str, model: Path, work: Path) -> dict:
    from cryogmm.io.maps import write_map
    from cryogmm.model.density import model_map
    from cryogmm.model.refine import checkpoint as ck
    from cryogmm.model.refine import job
    from cryogmm.model.refine.config import QUICK_EXTRA, QUICK_STAGES, QUICK_STEPS, RefineModelConfig
    from cryogmm.model.topology import build_topology, write_model

    d = work / name
    d.mkdir(parents=True)
    t = build_topology(model, add_hydrogens=False)
    lo = t.coords.min(0) - 6.0
    n = int(np.ceil((t.coords.max(0) - lo).max() + 6))
    n += n % 2
    m = model_map(t.coords, t.element, 4.0, 1.0, lo, (n, n, n)).numpy()
    rng = np.random.default_rng(0)
    write_map(d / "map.mrc", m + rng.normal(scale=0.1 * m.std(), size=m.shape), 1.0, origin_A=lo)
    write_model(t, t.coords + np.array([0.8, -0.5, 0.3]) + rng.normal(scale=0.2, size=t.coords.shape), d / "start.pdb")

    saves, sizes = [], []
    real_save = ck.save_checkpoint

    def timed_save(path, state, fp):
        t0 = time.perf_counter()
        real_save(path, state, fp)
        saves.append(time.perf_counter() - t0)
        sizes.append(Path(path).stat().st_size)

    job.save_checkpoint = timed_save
    try:
        t0 = time.perf_counter()
        rep = job.refine_model(RefineModelConfig(model=d / "start.pdb", map=d / "map.mrc", resolution_A=4.0,
                                                 out=d / "out", stages=QUICK_STAGES, steps=QUICK_STEPS,
                                                 extra=dict(QUICK_EXTRA)))
        total = time.perf_counter() - t0
    finally:
        job.save_checkpoint = real_save
    return {"molecule": name, "atoms": int((~t.is_h).sum()), "stages": list(QUICK_STAGES),
            "checkpoints": len(saves), "checkpoint_MB_max": max(sizes) / 1e6, "seconds_total": total,
            "seconds_checkpoints": sum(saves), "checkpoint_fraction": sum(saves) / total,
            "trajectory_frames": rep["trajectory_frames"], "load_before": os.getloadavg()}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "refine_checkpoint_cost.json")
    args = ap.parse_args()
    import torch

    torch.set_num_threads(2)
    rows = []
    with tempfile.TemporaryDirectory() as w:
        for name, model in MOLECULES.items():
            rows.append(case(name, model, Path(w)))
            print(json.dumps(rows[-1]))
    res = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
           "host": platform.node(), "cpus": os.cpu_count(), "load_after": os.getloadavg(),
           "command": "python benchmarks/refine_checkpoint_cost.py", "rows": rows,
           "note": "the machine was shared with other jobs: seconds are contended; the fraction compares "
                   "checkpoint writes with the run they were part of"}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(res, indent=2) + "\n")


if __name__ == "__main__":
    main()
