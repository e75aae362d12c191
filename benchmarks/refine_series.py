"""Adenylate kinase model series: maps at points between open (4AKE) and closed (1AKE) ->
one network -> a series of frames (``cryogmm refine-series``).

Truth: ``--maps`` models by linear interpolation of the matching atoms of the two endpoints
(t = 0 open .. 1 closed); their maps at ``--res`` Å on one shared box (molmap widths, white
noise of ``--noise`` x the map's sd, low-passed to the resolution;
:func:`cryogmm.model_series.series_example`). The start is the closed model (``--start``).
Reported: for every output frame the geometry goals (Rama outliers 0 %, rotamer outliers
<= 1 %, clashscore <= 2, bond and angle RMSZ <= 1, by our validation) and the map CC with its
two neighbouring maps; for every map the Cα RMSD of its frame to the model that made the
map, against the start's; wall times. The same figures for the start are the baseline
("peer") of this run.

    python benchmarks/refine_series.py [--maps 10] [--frames 20] [--res 4] [--apix 1.5]
        [--steps 60] [--work /tmp/series/bench] [--out benchmarks/results/refine_series.json]
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import numpy as np
import torch


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--maps", type=int, default=10)
    ap.add_argument("--frames", type=int, default=20)
    ap.add_argument("--res", type=float, default=4.0)
    ap.add_argument("--apix", type=float, default=1.5)
    ap.add_argument("--noise", type=float, default=0.3)
    ap.add_argument("--start", choices=["open", "closed"], default="closed")
    ap.add_argument("--residues", type=int, nargs=2, default=None, help="a fragment (first last)")
    ap.add_argument("--similarity", default="relative-entropy")
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--patches", type=int, default=24)
    ap.add_argument("--capture-steps", type=int, default=30)
    ap.add_argument("--no-capture", action="store_true")
    ap.add_argument("--polish-iters", type=int, default=40)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--work", type=Path, default=Path("/tmp/series/bench"))
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "refine_series.json")
    a = ap.parse_args()

    from cryogmm.model.series.job import refine_series
    from cryogmm.model.series.config import GOALS
    from cryogmm.model.series.config import RefineSeriesConfig
    from cryogmm.simulate.maps import series_example

    torch.set_num_threads(a.threads)
    t0 = time.time()
    ex = series_example(a.work / "data", n_maps=a.maps, resolution_A=a.res, apix=a.apix, noise=a.noise,
                        residues=None if a.residues is None else tuple(a.residues), seed=a.seed, start=a.start)
    cfg = RefineSeriesConfig(model=ex["start"], maps=tuple(ex["maps"]), out=a.work / "out", resolution_A=a.res,
                             frames=a.frames, similarity=a.similarity, steps=a.steps, n_patches=a.patches,
                             polish_iters=a.polish_iters, references=tuple(ex["truths"]), seed=a.seed, threads=a.threads,
                             capture=not a.no_capture, capture_steps=a.capture_steps)
    rep = refine_series(cfg)
    frames = rep["per_frame"]
    maps = rep["per_map"]
    keys = list(GOALS)
    summary = {
        "frames_passing_goals": int(sum(f["passes_goals"] for f in frames)),
        "n_frames": len(frames),
        "worst_frame": {k: max(f[k] for f in frames) for k in keys},
        "network_worst_frame": {k: max(f["network_geometry"][k] for f in frames) for k in keys},
        "min_neighbour_cc": min(min(f["map_cc_neighbours"]) for f in frames),
        "mean_neighbour_cc": float(np.mean([np.mean(f["map_cc_neighbours"]) for f in frames])),
        "ca_rmsd_start_A": [m["start_ca_rmsd_to_reference_A"] for m in maps],
        "ca_rmsd_frame_A": [m["ca_rmsd_to_reference_A"] for m in maps],
        "map_cc_start": [m["start"]["map_cc_mask"] for m in maps],
        "map_cc_frame": [m["frame"]["map_cc_mask"] for m in maps],
        "mean_ca_rmsd_ratio_frame_over_start": float(np.mean(
            [m["ca_rmsd_to_reference_A"] / m["start_ca_rmsd_to_reference_A"] for m in maps
             if m["start_ca_rmsd_to_reference_A"] > 0.5])),
    }
    result = {
        "case": "adenylate kinase open -> closed, linear interpolation",
        "machine": {"cpu_threads": torch.get_num_threads(), "gpu": None, "load_1min_at_end": os.getloadavg()[0]},
        "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(a).items()},
        "t": ex["t"], "box": ex["box"], "apix": ex["apix"], "goals": GOALS, "summary": summary,
        "per_frame": frames,
        "per_map": [{k: v for k, v in m.items()} for m in maps],
        "capture": rep["capture"], "seconds": rep["seconds"], "wall_s": time.time() - t0, "log": rep["log"],
    }
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"frames passing all geometry goals: {summary['frames_passing_goals']}/{len(frames)}")
    print("worst frame:", {k: round(v, 3) for k, v in summary["worst_frame"].items()})
    print(f"neighbour CC: min {summary['min_neighbour_cc']:.3f}, mean {summary['mean_neighbour_cc']:.3f}")
    for i, m in enumerate(maps):
        print(f"map {i + 1:2d} (t={ex['t'][i]:.2f}): Cα RMSD start {m['start_ca_rmsd_to_reference_A']:.2f} -> "
              f"frame {m['ca_rmsd_to_reference_A']:.2f} Å; CC {m['start']['map_cc_mask']:.3f} -> "
              f"{m['frame']['map_cc_mask']:.3f}")
    print(f"ratio frame/start Cα RMSD (maps > 0.5 Å from the start): {summary['mean_ca_rmsd_ratio_frame_over_start']:.2f}")
    for c in rep["capture"] or []:
        print(f"capture map {c['map'] + 1:2d} (from map {'start' if c['from_map'] is None else c['from_map'] + 1}): "
              f"Cα RMSD {c.get('ca_rmsd_to_reference_A', float('nan')):.2f} Å, {c['seconds']:.0f} s")
    print(f"wall {result['wall_s']:.0f} s -> {a.out}")


if __name__ == "__main__":
    main()
