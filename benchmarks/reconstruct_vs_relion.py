"""Reconstruction speed and agreement: cryogmm vs RELION's relion_reconstruct, same STAR, same machine.

Simulates a particle set (adenylate kinase, RELION CTF, noise), then times
  - RELION: `relion_reconstruct --ctf` on all particles (one map), and the gold-standard
    equivalent (three calls: --subset 1, --subset 2, all);
  - cryogmm: `reconstruct_table` (both half maps, their FSC and the Wiener-filtered final map,
    in one pass over the images), on the CPU threads torch is given (default: all cores);
and prints the wall-time ratios and the FSC between the two maps (and each against the truth),
saving everything as JSON.

    python benchmarks/reconstruct_vs_relion.py [--n 4000] [--box 96] [--apix 1.5] [--device cpu]
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent


def timed(fn, repeat=1):
    best = float("inf")
    out = None
    for _ in range(repeat):
        t = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t)
    return out, best


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=4000)
    ap.add_argument("--box", type=int, default=96)
    ap.add_argument("--apix", type=float, default=1.5)
    ap.add_argument("--snr", type=float, default=0.01, help="low enough that the FSC crosses 0.143 before Nyquist")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    ap.add_argument("--repeat", type=int, default=2, help="best of this many timings each")
    ap.add_argument("--out", type=Path, default=HERE / "results" / "reconstruct_vs_relion.json")
    args = ap.parse_args(argv)
    if shutil.which("relion_reconstruct") is None:
        sys.exit("relion_reconstruct not found: apt-get install -y --no-install-recommends relion")
    if args.threads:
        torch.set_num_threads(args.threads)

    from cryogmm.bridge.images import ImageSource
    from cryogmm.bridge.io import read_particles
    from cryogmm.demo import example_model
    from cryogmm.runtime import pick_device
    from cryogmm.io.maps import read_map
    from cryogmm.core.similarity import fsc, resolution_at
    from cryogmm.recon.job import reconstruct_table
    from cryogmm.simulate.particles import SimulateConfig, simulate

    dev = pick_device(args.device)
    work = Path(tempfile.mkdtemp(prefix="cryogmm-bench-"))
    try:
        simulate(SimulateConfig(out=work / "sim", model=example_model("open"), n=args.n, box=args.box,
                                apix=args.apix, snr=args.snr, seed=11))
        star = work / "sim" / "particles.star"

        def relion(subset=None, name="relion.mrc"):
            # RELION resolves image names against its working folder
            cmd = ["relion_reconstruct", "--i", star.name, "--o", str(work / name), "--ctf"]
            if subset:
                cmd += ["--subset", str(subset)]
            subprocess.run(cmd, check=True, capture_output=True, cwd=star.parent)

        _, t_relion = timed(lambda: relion(), args.repeat)
        _, t_relion_h1 = timed(lambda: relion(1, "relion_h1.mrc"), 1)
        _, t_relion_h2 = timed(lambda: relion(2, "relion_h2.mrc"), 1)

        def ours():
            table = read_particles(star)
            src = ImageSource.from_table(table)
            res = reconstruct_table(table, src, device=dev, wiener=False)
            if dev.type == "cuda":
                torch.cuda.synchronize()
            return res

        (h1, h2, ours_map, curve), t_ours = timed(ours, args.repeat)
        relion_map = torch.as_tensor(read_map(work / "relion.mrc")[0])
        truth = torch.as_tensor(read_map(work / "sim" / "truth_map.mrc")[0])
        rh1 = torch.as_tensor(read_map(work / "relion_h1.mrc")[0])
        rh2 = torch.as_tensor(read_map(work / "relion_h2.mrc")[0])
        box, apix = args.box, args.apix

        def res(c, t=0.143):
            return resolution_at(c, box, apix, t)

        f_between = fsc(ours_map, relion_map)
        f_ours_truth, f_relion_truth = fsc(ours_map, truth), fsc(relion_map, truth)
        f_halves_ours, f_halves_relion = curve, fsc(rh1, rh2)
        t_relion_gold = t_relion + t_relion_h1 + t_relion_h2
        result = {
            "benchmark": "reconstruct_vs_relion",
            "machine": {"cpu_count": __import__("os").cpu_count(), "torch_threads": torch.get_num_threads(),
                        "device": str(dev) if dev.type == "cpu" else torch.cuda.get_device_name(dev),
                        "platform": platform.platform(), "torch": torch.__version__},
            "dataset": {"n": args.n, "box": box, "apix_A": apix, "snr": args.snr},
            "relion_version": subprocess.run(["relion_reconstruct", "--version"], capture_output=True,
                                             text=True).stdout.split("\n")[0].strip(),
            "seconds": {"relion_one_map": t_relion, "relion_gold_standard_3_calls": t_relion_gold,
                        "cryogmm_halves_fsc_and_map": t_ours},
            "speedup_vs_relion_one_map": t_relion / t_ours,
            "speedup_vs_relion_gold_standard": t_relion_gold / t_ours,
            "fsc_between_maps": {"min_to_nyquist": float(f_between[1:].min()),
                                 "mean_to_nyquist": float(f_between[1:].mean()),
                                 "resolution_0.5_A": res(f_between, 0.5)},
            "half_map_resolution_A": {"cryogmm": res(f_halves_ours), "relion": res(f_halves_relion)},
            "vs_truth_resolution_0.5_A": {"cryogmm": res(f_ours_truth, 0.5), "relion": res(f_relion_truth, 0.5)},
        }
    finally:
        shutil.rmtree(work, ignore_errors=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    print(f"\ncryogmm {t_ours:.2f} s vs RELION {t_relion:.2f} s (one map) / {t_relion_gold:.2f} s (gold standard): "
          f"{result['speedup_vs_relion_one_map']:.2f}x / {result['speedup_vs_relion_gold_standard']:.2f}x; "
          f"FSC between maps >= {result['fsc_between_maps']['min_to_nyquist']:.3f} to Nyquist")


if __name__ == "__main__":
    main()
