"""Reconstruct a 200,000-particle box-64 stack from disk with bounded host memory.

Usage: python benchmarks/stream_200k.py [--n 200000] [--workdir /tmp/scale/stream]
       [--max-memory-gb 1.5] [--keep] [--out benchmarks/results/stream_200k.json]

1. ``cryogmm simulate --snr inf`` makes 500 noise-free CTF-modulated projections of
   adenylate kinase (box 64, 2 Å, random poses) with their STAR;
2. a stack of ``--n`` images is written to disk (3.3 GB for 200k): image ``i`` is projection
   ``i mod 500`` plus fresh Gaussian noise (SNR 0.1, seeded), one RELION 3.1 STAR row each
   (the 500 rows' poses and CTF tiled, ``rlnImageName`` ``i@stream.mrcs``);
3. ``cryogmm reconstruct --max-memory-gb`` runs in a child process; its peak resident
   memory (``ru_maxrss`` of that child, from ``os.wait4``) and wall time are recorded, with
   the resolution and the map's correlation with the simulation's truth map.

Goal (issue #9): peak RSS under 2 GB. The stack is deleted afterwards unless ``--keep``.
Timings on a shared 2-core machine are noisy: ``--no-prefetch-run --repeat 2`` alternates
runs with and without the background reader.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


def write_stack(work: Path, n: int, seed: int = 0, snr: float = 0.1, chunk: int = 4000, model: Path | None = None,
                box: int = 64, apix: float = 2.0, distinct: int = 500, name: str = "stream") -> dict:
    """The on-disk stack and STAR (see the module docstring; ``model``: default adenylate kinase,
    ``distinct`` noise-free projections tiled, ``name``.mrcs/.star); returns what was made."""
    import mrcfile
    import numpy as np
    import starfile

    import cryogmm.data

    model = model or Path(cryogmm.data.__file__).parent / "adk_open.pdb"
    sim = work / "sim"
    if not (sim / "particles.star").is_file():
        subprocess.run([sys.executable, "-m", "cryogmm.cli", "simulate", "--model", str(model), "--n", str(distinct),
                        "--box", str(box), "--apix", str(apix), "--snr", "inf", "--seed", str(seed), "--out", str(sim)],
                       check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    with mrcfile.open(sim / "particles.mrcs", permissive=True) as m:
        signal = np.asarray(m.data, dtype=np.float32).copy()
    k, box = signal.shape[0], signal.shape[-1]
    sd = float(np.sqrt(signal.var(axis=(1, 2)).mean() / snr))
    stack = work / f"{name}.mrcs"
    t0 = time.perf_counter()
    # header and a sparse file of the full size (nothing is touched through the memory map) ...
    with mrcfile.new_mmap(stack, shape=(n, box, box), mrc_mode=2, overwrite=True) as m:
        m.voxel_size = apix
        m.header.ispg = 0  # a stack of images
        offset = 1024 + int(m.header.nsymbt)
    # ... then the images with positioned writes, chunk by chunk (bounded memory here too)
    rng = np.random.default_rng(seed)
    fd = os.open(stack, os.O_WRONLY)
    try:
        for a in range(0, n, chunk):
            b = min(n, a + chunk)
            imgs = signal[np.arange(a, b) % k] + rng.standard_normal((b - a, box, box), dtype=np.float32) * sd
            os.pwrite(fd, imgs.tobytes(), offset + a * box * box * 4)
    finally:
        os.close(fd)
    blocks = starfile.read(sim / "particles.star", always_dict=True)
    parts = blocks["particles"]
    big = parts.iloc[np.arange(n) % k].reset_index(drop=True)
    big["rlnImageName"] = [f"{i + 1:06d}@{name}.mrcs" for i in range(n)]
    if "rlnRandomSubset" in big.columns:
        big = big.drop(columns="rlnRandomSubset")
    starfile.write({"optics": blocks["optics"], "particles": big}, work / f"{name}.star", overwrite=True)
    return {"n": n, "box": box, "apix_A": apix, "snr": snr, "distinct_projections": k,
            "stack_GB": stack.stat().st_size / 1e9, "seconds_write": time.perf_counter() - t0}


def run_reconstruct(work: Path, max_gb: float | None, prefetch: int, threads: int) -> dict:
    """``cryogmm reconstruct`` in a child: wall time and the child's own peak RSS."""
    out = work / f"rec_p{prefetch}"
    shutil.rmtree(out, ignore_errors=True)
    cmd = [sys.executable, "-m", "cryogmm.cli", "reconstruct", str(work / "stream.star"), "--out", str(out),
           "--device", "cpu", "--prefetch", str(prefetch)]
    if max_gb is not None:
        cmd += ["--max-memory-gb", str(max_gb)]
    env = dict(os.environ, OMP_NUM_THREADS=str(threads))
    t0 = time.perf_counter()
    p = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    _, status, ru = os.wait4(p.pid, 0)
    wall = time.perf_counter() - t0
    stdout = p.stdout.read().decode()
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"reconstruct failed: {stdout}")
    rep = json.loads((out / "report.json").read_text())
    import mrcfile
    import numpy as np

    m = mrcfile.read(out / "map.mrc")
    t = mrcfile.read(work / "sim" / "truth_map.mrc")
    return {"prefetch": prefetch, "max_memory_gb": max_gb, "threads": threads, "seconds_wall": wall,
            "seconds_job": rep["seconds"], "particles_per_s": rep["n_particles"] / rep["seconds"],
            "peak_rss_GB": ru.ru_maxrss * 1024 / 1e9, "resolution_A": rep["resolution_A"],
            "map_vs_truth_correlation": float(np.corrcoef(m.ravel(), t.ravel())[0, 1])}


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=200_000)
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/scale/stream"))
    ap.add_argument("--max-memory-gb", type=float, default=1.5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--no-prefetch-run", action="store_true", help="also run with --prefetch 0 (alternating)")
    ap.add_argument("--repeat", type=int, default=1, help="runs of each setting (default 1)")
    ap.add_argument("--keep", action="store_true", help="keep the stack")
    ap.add_argument("--out", type=Path, default=HERE / "results" / "stream_200k.json")
    a = ap.parse_args()
    a.workdir.mkdir(parents=True, exist_ok=True)
    made = write_stack(a.workdir, a.n)
    print(f"wrote {made['n']} images ({made['stack_GB']:.2f} GB) in {made['seconds_write']:.0f} s", flush=True)
    runs = []
    for _ in range(a.repeat):
        for pf in ((1, 0) if a.no_prefetch_run else (1,)):
            runs.append(run_reconstruct(a.workdir, a.max_memory_gb, pf, a.threads))
    for r in runs:
        print(f"prefetch {r['prefetch']}: {r['seconds_wall']:.1f} s wall ({r['particles_per_s']:.0f} particles/s), "
              f"peak RSS {r['peak_rss_GB']:.2f} GB (goal < 2), FSC 0.143 {r['resolution_A']:.2f} Å, "
              f"map vs truth r = {r['map_vs_truth_correlation']:.4f}")
    res = {"benchmark": "stream_200k", "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
           "device": "cpu", "host": {"machine": platform.machine(), "cpus": os.cpu_count(), "python": platform.python_version()},
           "stack": made, "runs": runs, "goal_peak_rss_GB": 2.0,
           "goal_met": all(r["peak_rss_GB"] < 2.0 for r in runs)}
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(res, indent=2) + "\n")
    if not a.keep:
        for f in ("stream.mrcs", "stream.star"):
            (a.workdir / f).unlink(missing_ok=True)
    print(f"-> {a.out}")


if __name__ == "__main__":
    main()
