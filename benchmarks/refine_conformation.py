"""Conformation to orientation on the two-domain case, against focused refinement alone.

The data of `refine_focused.py` (two adenylate kinase domains; domain B swung by 2-20° about
the hinge in half of the particles): a global refinement, then a heterogeneity run (`cryogmm hetero train`,
segments decoder) on the globally refined particles, then `refine-poses --hetero RUN --mask
domain_mask.mrc` (each particle's conformation of domain B brought into register by a pose change,
then focused iterations), compared with `refine-poses --mask domain_mask.mrc` from the same start.

Figures: median angular error of the poses against the domain-B register truth (true pose
times the swing), domain-B masked FSC and correlation with the true domain density.

    python benchmarks/refine_conformation.py [--reuse DIR]   # DIR: a refine_focused.py --out folder

Writes benchmarks/results/refine_conformation.json.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from refine_focused import dataset_paths, domain_figures, register_error, two_domain_dataset  # noqa: E402


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--reuse", type=Path, help="a refine_focused.py --out folder (data/ and global/ are reused)")
    ap.add_argument("--out", type=Path)
    ap.add_argument("--n", type=int, default=1200)
    ap.add_argument("--epochs", type=int, default=15)
    ap.add_argument("--iterations", type=int, default=2)
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", type=Path, default=HERE / "results" / "refine_conformation.json")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)

    from cryogmm.hetero.config import HeteroConfig
    from cryogmm.hetero.train import train_hetero
    from cryogmm.poses.job import RefineConfig, refine_poses

    work = Path(args.out or tempfile.mkdtemp(prefix="refine_conformation_"))
    work.mkdir(parents=True, exist_ok=True)
    common = dict(steps=args.steps, batch=128, seed=args.seed, device="cpu")
    if args.reuse:
        paths = dataset_paths(args.reuse / "data")
        glob = args.reuse / "global"
    else:
        paths = two_domain_dataset(work / "data", n=args.n, seed=args.seed)
        glob = work / "global"
        refine_poses(RefineConfig(star=paths["star"], out=glob, iterations=args.iterations, **common))
    start = dict(star=glob / "refined.star", half_maps=(glob / "half1.mrc", glob / "half2.mrc"))

    t0 = time.time()
    train = train_hetero(HeteroConfig(star=glob / "refined.star", model=paths["model"], out=work / "hetero",
                                      decoder="segments", segments=4, per_chain=True, zdim=2, epochs=args.epochs, seed=args.seed,
                                      device="cpu"))
    t_hetero = time.time() - t0
    t0 = time.time()
    c = refine_poses(RefineConfig(out=work / "conformation", mask=paths["mask"], hetero=work / "hetero",
                                  iterations=args.iterations, **start, **common))
    t_conf = time.time() - t0
    focused_dir = (args.reuse / "focused") if args.reuse and (args.reuse / "focused" / "refined.star").is_file() else None
    if focused_dir is None:
        t0 = time.time()
        refine_poses(RefineConfig(out=work / "focused", mask=paths["mask"], iterations=args.iterations, **start, **common))
        focused_dir = work / "focused"
    res = {
        "benchmark": "refine_conformation",
        "dataset": "refine_focused.py two-domain set (domain B swung 2-20 deg in half the particles)",
        "start": register_error(paths["star"], paths),
        "global": {**domain_figures(glob, paths), **register_error(glob / "refined.star", paths)},
        "focused": {**domain_figures(focused_dir, paths), **register_error(focused_dir / "refined.star", paths)},
        "conformation_to_orientation": {
            **domain_figures(work / "conformation", paths),
            **register_error(work / "conformation" / "refined.star", paths),
            "step": c["conformation_to_orientation"],
            "seconds_refine": t_conf,
        },
        "hetero": {"epochs": args.epochs, "seconds": t_hetero,
                   "final": {k: v for k, v in train.items() if k in ("final_loss", "epochs", "images_per_s")}},
        "work": str(work),
    }
    print(json.dumps(res, indent=2))
    for k in ("global", "focused", "conformation_to_orientation"):
        r = res[k]
        print(f"{k:28s} domain-B register error {r['register_error_deg_median']:.2f}° (displaced half "
              f"{r['register_error_deg_median_displaced']:.2f}°), masked FSC0.143 {r['masked_resolution_A']:.2f} Å, "
              f"corr {r['masked_corr_to_truth']:.3f}")
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(res, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
