"""Pose-refinement throughput: particles/s of the alignment step of ``refine-poses``.

Times :func:`cryogmm.refine.refine_batch` (the per-iteration work on every particle: Adam
steps of projection + CTF + band FRC and their gradients) for the box sizes and mixture
sizes the method uses, on CPU here and on a GPU when one is present (``--device cuda``).
The paper's anchor (Chen, Schmid & Chiu): 400,000 particles, box 196, 3 Å, about 2 hours
per iteration on an RTX A5000, i.e. about 55 particles/s. Results are added as a new run to
``benchmarks/results/refine_poses_<device>.json`` (earlier runs are kept), with the date, host,
load averages, the command and the CPU time of the timed calls (``process_time``: all threads;
less sensitive than the wall time to other jobs on a shared machine).

To compare two versions of the engine in one session, run the script once per checkout with
``--label`` (e.g. ``PYTHONPATH=/path/to/old/tree``).

    python benchmarks/refine_poses.py [--device cpu] [--cases 128:5000 196:20000] [--batch 64] [--steps 40]
        [--label after]
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch

HERE = Path(__file__).resolve().parent
PAPER_PARTICLES_PER_S = 400_000 / (2 * 3600)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--cases", nargs="+", default=["128:5000", "196:20000"], help="BOX:N_GAUSSIANS")
    ap.add_argument("--apix", type=float, default=1.0)
    ap.add_argument("--resolution", type=float, default=3.0, help="upper bound of the FRC band, Å (paper: 3 Å)")
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--repeat", type=int, default=2)
    ap.add_argument("--out", type=Path)
    ap.add_argument("--label", default="", help="names this run in the results (e.g. before / after)")
    args = ap.parse_args(argv)
    load_start = os.getloadavg()

    from cryogmm.core.ctf import CtfParams, ctf_rfft2
    from cryogmm.core.gaussians import Gaussians
    from cryogmm.runtime import pick_device
    from cryogmm.poses.align import BandFrc, cpu_workers, refine_batch, refine_parts, stack_mixtures
    from cryogmm.core.rotations import random_rotations

    dev = pick_device(args.device)
    name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else platform.processor() or "cpu"
    rng = np.random.default_rng(0)
    results = []
    for case in args.cases:
        box, n = (int(v) for v in case.split(":"))
        radius = 0.3 * box * args.apix
        g = Gaussians(torch.as_tensor(rng.normal(0, radius / 2, (n, 3)), dtype=torch.float32, device=dev),
                      torch.ones(n, device=dev), torch.full((n,), args.resolution / (math.pi * math.sqrt(2)), device=dev))
        band = BandFrc(box, args.apix, max(1, round(box * args.apix / 30.0)), int(box * args.apix / args.resolution),
                       device=dev)
        B = args.batch
        imgs = torch.randn(B, box, box, device=dev)
        x = band.crop_ft(imgs)
        ctf = band.band(ctf_rfft2(CtfParams(defocus_u_A=np.full(B, 15000.0), defocus_v_A=np.full(B, 14800.0),
                                            defocus_angle_deg=0.0, voltage_kV=300.0, cs_mm=2.7, amp_contrast=0.1),
                                  band.crop, band.apix_crop, device=dev))
        A0 = torch.as_tensor(random_rotations(B, rng), dtype=torch.float32, device=dev)
        s0 = torch.zeros(B, 2, device=dev)
        refine_batch(g, band, x, ctf, A0, s0, steps=2, lr_rad=0.01, lr_A=0.3)  # warm-up
        mix, sets = stack_mixtures([g, g]), torch.arange(B, device=dev) % 2  # the job's batches: both halves

        def intra():
            refine_batch(g, band, x, ctf, A0, s0, steps=args.steps, lr_rad=0.01, lr_A=0.3)

        def workers():
            with cpu_workers(dev) as w:
                refine_parts(w, mix, sets, band, x, ctf, A0, s0, steps=args.steps, lr_rad=0.01, lr_A=0.3)

        times = {"intra": [], "workers": []}
        for _ in range(args.repeat):
            for mode, fn in (("intra", intra), ("workers", workers)):
                if dev.type == "cuda":
                    torch.cuda.synchronize()
                t, c = time.perf_counter(), time.process_time()
                fn()
                if dev.type == "cuda":
                    torch.cuda.synchronize()
                times[mode].append((time.perf_counter() - t, time.process_time() - c))
        by_mode = {m: {"seconds_per_batch": min(w for w, _ in v), "cpu_seconds_per_batch": min(c for _, c in v),
                       "particles_per_s": B / min(w for w, _ in v)} for m, v in times.items()}
        best, best_cpu = by_mode["workers"]["seconds_per_batch"], by_mode["workers"]["cpu_seconds_per_batch"]
        pps = B / best
        r = {"box": box, "n_gaussians": n, "crop_box": band.crop, "band_shells": [band.lo, band.hi], "batch": B,
             "steps": args.steps, "seconds_per_batch": best, "particles_per_s": pps,
             "cpu_seconds_per_batch": best_cpu, "particles_per_cpu_s": B / best_cpu,
             "ratio_to_paper_a5000": pps / PAPER_PARTICLES_PER_S, "by_mode": by_mode,
             "workers_over_intra": by_mode["intra"]["seconds_per_batch"] / best}
        results.append(r)
        print(f"box {box}, {n} Gaussians, crop {band.crop}: {pps:.2f} particles/s (intra-op threads "
              f"{by_mode['intra']['particles_per_s']:.2f}) "
              f"({r['ratio_to_paper_a5000']:.3f}x the paper's ~{PAPER_PARTICLES_PER_S:.0f}/s on an RTX A5000)")
    out = args.out or HERE / "results" / f"refine_poses_{dev.type}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    doc = json.loads(out.read_text()) if out.exists() else {"benchmark": "refine_poses"}
    if "cases" in doc and "runs" not in doc:  # the first layout: one run at the top level
        first = {k: doc.pop(k) for k in ("device", "device_name", "torch", "torch_threads", "resolution_A", "cases")
                 if k in doc}
        doc["runs"] = [{"label": "issue 19 baseline (before the projection kernel)", **first}]
    doc.setdefault("runs", []).append({
        "label": args.label, "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "host": platform.node(), "command": " ".join([sys.executable, *sys.argv]),
        "loadavg_start": load_start, "loadavg_end": os.getloadavg(), "device": str(dev), "device_name": name,
        "torch": torch.__version__, "torch_threads": torch.get_num_threads(), "resolution_A": args.resolution,
        "cases": results})
    out.write_text(json.dumps(doc, indent=2) + "\n")

if __name__ == "__main__":
    main()
