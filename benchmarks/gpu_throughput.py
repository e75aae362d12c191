"""Throughput of the engine on one device, against the device's bound and against peers' figures.

Usage:
  python benchmarks/gpu_throughput.py                  # on a GPU: the issue's full sizes
  python benchmarks/gpu_throughput.py --quick          # reduced sizes (CPU-friendly; labelled as such)
  python benchmarks/gpu_throughput.py --device cpu --quick --out benchmarks/results/gpu_throughput_cpu_quick.json

What is measured (every figure is timed in this run; nothing is extrapolated):

1. **Projection** (``cryogmm.project.project``, the separable projector): for N Gaussians at
   box B and a batch of b poses the images are ``b`` matrix products ``Y^T diag(w) X`` of
   ``[B, N] x [N, B]``: ``2 b N B^2`` floating-point operations. Images/s and achieved
   TFLOP/s of those products, forward and forward+backward, in float32 (``highest``), TF32
   and bf16 autocast (GPU only), against the device's dense peak from the table below (the
   float32 CUDA-core peak for ``highest`` rows, the TF32 tensor-core peak for TF32 rows, bf16
   for bf16 rows; the CPU has no such bound and is labelled so). Peak memory is reset before
   the forward and again before forward+backward, and each is read after its own case. Sizes: 2k-30k Gaussians at box 128/196/256 (``--quick``: 2k/5k at 64/128).
2. **Pose refinement** (``cryogmm.refine.refine_batch``): particles/s for one refinement
   iteration (``--steps`` Adam steps per particle, full band to Nyquist) with e2gmm_refine's
   sizes (7,374 Gaussians, box 196), and peak device memory at e2gmm's memory case (7,374
   Gaussians, box 240, batch 16).
3. **Heterogeneity** (``cryogmm hetero train``): images/s of the last epoch on a simulated
   adenylate kinase set (box 128; ``--quick`` box 64).
4. **Peak memory**: ``torch.cuda.max_memory_allocated`` per case on GPUs; on the CPU the
   process's peak RSS (``ru_maxrss``), labelled so.

Anchors (published figures, not measured here) printed in the same table: e2gmm_refine
(400k particles, box 196, about 2 h per iteration on an RTX A5000, i.e. about 56 particles/s;
8.7 GB for 7,374 Gaussians at box 240, batch 16) and cryoDRGN (about 140 images/s at box
128 on a V100). Goals (issue #9): projection >= 30 % of the tensor-core bound; pose
refinement >= 10x e2gmm's particles/s; memory <= half of e2gmm's at the same size.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

HERE = Path(__file__).resolve().parent

#: dense (no structured sparsity) peak TFLOP/s from NVIDIA's datasheets: float32 (CUDA cores),
#: TF32 and bf16 tensor cores; matched against torch.cuda.get_device_name() by substring, first hit
PEAKS = [
    ("H200", {"fp32": 67.0, "tf32": 494.7, "bf16": 989.4}),
    ("H100 NVL", {"fp32": 60.0, "tf32": 417.5, "bf16": 835.5}),
    ("H100 PCIe", {"fp32": 51.2, "tf32": 378.0, "bf16": 756.0}),
    ("H100", {"fp32": 67.0, "tf32": 494.7, "bf16": 989.4}),  # SXM (the name has "HBM3" or "SXM")
    ("A100", {"fp32": 19.5, "tf32": 156.0, "bf16": 312.0}),
    ("L40S", {"fp32": 91.6, "tf32": 183.0, "bf16": 362.0}),
    ("A10", {"fp32": 31.2, "tf32": 62.5, "bf16": 125.0}),
    ("RTX A5000", {"fp32": 27.8, "tf32": 55.6, "bf16": 111.1}),
    ("V100", {"fp32": 15.7, "tf32": None, "bf16": None}),
]

ANCHORS = {
    "e2gmm_refine_particles_per_s": {"value": 400_000 / 7200.0, "note": "400k particles, box 196, ~2 h per iteration, "
                                     "RTX A5000 (published)"},
    "e2gmm_refine_memory_GB": {"value": 8.7, "note": "7,374 Gaussians, box 240, batch 16 (published)"},
    "cryodrgn_images_per_s": {"value": 140.0, "note": "box 128, V100 (published)"},
}


def device_info(dev: torch.device) -> dict:
    if dev.type == "cuda":
        name = torch.cuda.get_device_name(dev)
        peak = next((p for k, p in PEAKS if k.lower() in name.lower()), None)
        props = torch.cuda.get_device_properties(dev)
        return {"type": "cuda", "name": name, "memory_GB": props.total_memory / 1e9, "peak_TFLOPs": peak,
                "peak_source": "NVIDIA datasheet, dense" if peak else "unknown device: no bound",
                "peak_memory_kind": "torch.cuda.max_memory_allocated per case"}
    return {"type": "cpu", "name": f"CPU ({platform.processor() or platform.machine()}, "
            f"{torch.get_num_threads()} threads)", "peak_TFLOPs": None,
            "peak_source": "CPU: no tensor-core bound (labelled CPU)",
            "peak_memory_kind": "process peak RSS so far (ru_maxrss; cumulative over the cases)"}


def _sync(dev):
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def _timeit(fn, dev, min_s=0.5, min_reps=3):
    fn()  # warm-up (kernels, caches)
    _sync(dev)
    reps, t0 = 0, time.perf_counter()
    while True:
        fn()
        reps += 1
        _sync(dev)
        el = time.perf_counter() - t0
        if reps >= min_reps and el >= min_s:
            return el / reps


#: the datasheet peak each precision's rows are measured against: float32 products without
#: TF32 run on the CUDA cores, not the tensor cores
BOUND_KIND = {"highest": "fp32", "tf32": "tf32", "bf16": "bf16"}


def _reset_peak(dev):
    if dev.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(dev)


def _peak_GB(dev):
    if dev.type == "cuda":
        return torch.cuda.max_memory_allocated(dev) / 1e9
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9


def _mixture(n, box, apix, dev, seed=0):
    from cryogmm.core.gaussians import Gaussians

    g = torch.Generator().manual_seed(seed)
    r = 0.3 * box * apix
    c = torch.randn(n, 3, generator=g)
    c = c / c.norm(dim=1, keepdim=True) * r * torch.rand(n, 1, generator=g) ** (1 / 3)
    return Gaussians(c.to(dev), (torch.rand(n, generator=g) + 0.5).to(dev), torch.full((n,), 1.5 * apix).to(dev))


def _rotations(b, dev, seed=0):
    from cryogmm.core.rotations import random_rotations

    return torch.as_tensor(random_rotations(b, np.random.default_rng(seed)), dtype=torch.float32, device=dev)


def bench_projection(dev, sizes, batch_for, modes):
    from cryogmm.runtime import autocast, set_matmul_precision
    from cryogmm.core.projection import project

    info = device_info(dev)
    rows = []
    for box in sizes["boxes"]:
        for n in sizes["gaussians"]:
            b = batch_for(n, box)
            apix = 1.0
            g = _mixture(n, box, apix, dev)
            R = _rotations(b, dev)
            sh = torch.zeros(b, 2, device=dev)
            flops = 2.0 * b * n * box * box
            for mode in modes:
                set_matmul_precision(dev, mode)

                def fwd():
                    with torch.no_grad(), autocast(dev, mode):
                        return project(g, R, sh, box, apix)

                gg = type(g)(g.centers.clone().requires_grad_(True), g.amplitudes, g.sigmas)

                def fwd_bwd():
                    with autocast(dev, mode):
                        img = project(gg, R, sh, box, apix)
                    img.float().square().sum().backward()

                _reset_peak(dev)
                t_f = _timeit(fwd, dev)
                mem_f = _peak_GB(dev)
                _reset_peak(dev)
                t_fb = _timeit(fwd_bwd, dev)
                mem_fb = _peak_GB(dev)
                kind = BOUND_KIND[mode]
                peak = (info["peak_TFLOPs"] or {}).get(kind)
                tf = flops / t_f / 1e12
                rows.append({"box": box, "gaussians": n, "batch": b, "precision": mode,
                             "images_per_s": b / t_f, "images_per_s_fwd_bwd": b / t_fb,
                             "achieved_TFLOPs": tf, "bound_kind": kind, "bound_TFLOPs": peak,
                             "fraction_of_bound": (tf / peak) if peak else None,
                             "peak_memory_GB": mem_f, "peak_memory_GB_fwd_bwd": mem_fb})
                set_matmul_precision(dev, "highest")
                r = rows[-1]
                frac = f"{100 * r['fraction_of_bound']:.1f} %" if r["fraction_of_bound"] else "n/a (CPU)" \
                    if dev.type == "cpu" else "n/a"
                print(f"  projection box {box:3d} N {n:6d} b {b:4d} {mode:7s}: {r['images_per_s']:10.0f} img/s fwd, "
                      f"{r['images_per_s_fwd_bwd']:9.0f} fwd+bwd, {tf:9.4g} TFLOP/s ({frac} of bound), "
                      f"peak {r['peak_memory_GB']:.2f} GB", flush=True)
    return rows


def _refine_case(dev, n_gauss, box, batch, steps, mode, seed=0):
    """Pose refinement of ``batch`` particles (full band) against an ``n_gauss`` mixture: seconds, peak memory."""
    from cryogmm.core.projection import project
    from cryogmm.poses.align import BandFrc, refine_batch
    from cryogmm.core.rotations import rotvec_to_rotmat

    apix = 1.0
    g = _mixture(n_gauss, box, apix, dev, seed)
    band = BandFrc(box, apix, 2, box // 2 - 1, device=dev)
    R = _rotations(batch, dev, seed)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        img = project(g, R, torch.zeros(batch, 2, device=dev), box, apix)
        img = img + img.std() * 3 * torch.randn(img.shape, generator=gen).to(dev)
    x = band.crop_ft(img)
    ctf = torch.ones_like(x.real)
    dR = rotvec_to_rotmat((torch.randn(batch, 3, generator=gen) * math.radians(3)).to(dev))
    A0 = dR @ R
    s0 = torch.randn(batch, 2, generator=gen).to(dev)
    from cryogmm.runtime import set_matmul_precision

    set_matmul_precision(dev, mode)
    kw = dict(steps=steps, lr_rad=math.radians(1.0), lr_A=0.3, precision=mode)
    refine_batch(g, band, x[:2], ctf[:2], A0[:2], s0[:2], **kw)  # warm-up
    _sync(dev)
    _reset_peak(dev)
    t0 = time.perf_counter()
    refine_batch(g, band, x, ctf, A0, s0, **kw)
    _sync(dev)
    sec = time.perf_counter() - t0
    set_matmul_precision(dev, "highest")
    return sec, _peak_GB(dev), band.crop


def bench_refine(dev, cases, steps, modes):
    rows = []
    for c in cases:
        for mode in modes:
            sec, peak, crop = _refine_case(dev, c["gaussians"], c["box"], c["batch"], steps, mode)
            rows.append({**c, "precision": mode, "steps": steps, "crop": crop, "seconds": sec,
                         "particles_per_s": c["batch"] / sec, "peak_memory_GB": peak})
            r = rows[-1]
            print(f"  refine {c['label']}: box {c['box']} N {c['gaussians']} batch {c['batch']} {mode}: "
                  f"{r['particles_per_s']:.1f} particles/s ({steps} steps), peak {peak:.2f} GB", flush=True)
    return rows


def bench_hetero(dev, box, n, epochs, work: Path):
    import cryogmm.data

    model = Path(cryogmm.data.__file__).parent / "adk_open.pdb"
    closed = Path(cryogmm.data.__file__).parent / "adk_closed.pdb"
    sim, run = work / f"het{box}", work / f"run{box}"
    env = dict(os.environ)
    subprocess.run([sys.executable, "-m", "cryogmm.cli", "simulate", "--endpoints", str(model), str(closed),
                    "--frames", "10", "--n", str(n), "--box", str(box), "--apix", str(160.0 / box),
                    "--snr", "0.1", "--seed", "0", "--device", str(dev), "--out", str(sim)],
                   check=True, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    from cryogmm.hetero.config import HeteroConfig
    from cryogmm.hetero.train import train_hetero

    rep = train_hetero(HeteroConfig(star=sim / "particles.star", model=model, out=run, epochs=epochs, batch=64,
                                    lowpass_A=max(8.0, 2.2 * 160.0 / box), device=str(dev), seed=0))
    last = rep["history"][-1]
    row = {"box": box, "n": n, "crop": rep["crop"], "epochs": epochs, "images_per_s": last["images_per_s"],
           "lowpass_A": rep["lowpass_A"], "peak_memory_GB": _peak_GB(dev)}
    print(f"  hetero box {box} (crop {rep['crop']}): {row['images_per_s']:.0f} images/s (last epoch)", flush=True)
    return row


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="auto")
    ap.add_argument("--quick", action="store_true", help="reduced sizes (CPU)")
    ap.add_argument("--steps", type=int, default=40, help="Adam steps per particle in the refinement case")
    ap.add_argument("--skip", nargs="*", default=[], choices=["projection", "refine", "hetero"])
    ap.add_argument("--threads", type=int, default=2, help="CPU threads (default 2)")
    ap.add_argument("--out", type=Path)
    a = ap.parse_args()
    from cryogmm.runtime import pick_device

    torch.set_num_threads(a.threads)
    dev = pick_device(a.device)
    info = device_info(dev)
    gpu = dev.type == "cuda"
    modes = ["highest", "tf32", "bf16"] if gpu else ["highest"]
    print(f"device: {info['name']} ({info['peak_source']}){' -- QUICK sizes' if a.quick else ''}", flush=True)
    if a.quick:
        sizes = {"boxes": [64, 128], "gaussians": [2000, 5000]}
        refine_cases = [{"label": "e2gmm-like (reduced)", "gaussians": 2000, "box": 64, "batch": 16},
                        {"label": "e2gmm memory case (reduced)", "gaussians": 7374, "box": 96, "batch": 16}]
        het = (64, 300, 2)
    else:
        sizes = {"boxes": [128, 196, 256], "gaussians": [2000, 5000, 10000, 30000]}
        refine_cases = [{"label": "e2gmm speed case", "gaussians": 7374, "box": 196, "batch": 512},
                        {"label": "e2gmm memory case", "gaussians": 7374, "box": 240, "batch": 16}]
        het = (128, 4000, 3)

    def batch_for(n, box):  # X and Y factors [b, n, box] float32 within about 2 GB (GPU) or 0.1 GB (CPU)
        budget = 2e9 if gpu else 1e8
        return int(max(1, min(256 if gpu else 16, budget // (2 * 4 * n * box))))

    res = {"benchmark": "gpu_throughput", "quick": a.quick,
           "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
           "device": info, "torch": torch.__version__, "host": {"machine": platform.machine(), "cpus": os.cpu_count()},
           "anchors": ANCHORS}
    if "projection" not in a.skip:
        res["projection"] = bench_projection(dev, sizes, batch_for, modes)
    if "refine" not in a.skip:
        res["refine"] = bench_refine(dev, refine_cases, a.steps if not a.quick else min(a.steps, 10), modes[:2])
    if "hetero" not in a.skip:
        with tempfile.TemporaryDirectory(prefix="cryogmm_bench_") as tmp:
            res["hetero"] = bench_hetero(dev, *het, Path(tmp))

    # ---- the table, with the anchors
    print("\nsummary (measured here; anchors are published figures)")
    print(f"{'what':58s} {'cryogmm':>14s} {'anchor':>12s} {'ratio':>8s}")
    e2 = ANCHORS["e2gmm_refine_particles_per_s"]["value"]
    for r in res.get("refine", []):
        if "speed" in r["label"] or "like" in r["label"]:
            print(f"{'pose refinement particles/s, ' + r['label'] + ' ' + r['precision']:58s} "
                  f"{r['particles_per_s']:14.1f} {e2:12.1f} {r['particles_per_s'] / e2:8.2f}")
        else:
            m = ANCHORS["e2gmm_refine_memory_GB"]["value"]
            print(f"{'peak memory GB, ' + r['label'] + ' ' + r['precision']:58s} {r['peak_memory_GB']:14.2f} "
                  f"{m:12.2f} {r['peak_memory_GB'] / m:8.2f}")
    if "hetero" in res:
        h = res["hetero"]
        c = ANCHORS["cryodrgn_images_per_s"]["value"]
        print(f"{'heterogeneity images/s, box ' + str(h['box']):58s} {h['images_per_s']:14.1f} {c:12.1f} "
              f"{h['images_per_s'] / c:8.2f}")
    for r in res.get("projection", []):
        frac = f"{100 * r['fraction_of_bound']:.1f}% bound" if r["fraction_of_bound"] else "no bound"
        print(f"{'projection TFLOP/s box %d N %d %s' % (r['box'], r['gaussians'], r['precision']):58s} "
              f"{r['achieved_TFLOPs']:14.4g} {frac:>21s}")
    if not gpu:
        print("(CPU run, reduced sizes: ratios compare this CPU with the anchors' GPUs; the GPU figures and the\n"
              " tensor-core comparison are missing: rerun on a GPU without --quick)")
    out = a.out or HERE / "results" / (f"gpu_throughput_{'cpu' if not gpu else info['name'].replace(' ', '_')}"
                                       f"{'_quick' if a.quick else ''}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(res, indent=2) + "\n")
    print(f"-> {out}")


if __name__ == "__main__":
    main()
