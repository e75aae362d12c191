"""Peak memory and images/s of ``hetero train`` streaming its particles from disk, against
holding them in memory, measured in the same run.

Usage: python benchmarks/hetero_stream.py [--n 200000] [--n-small 20000] [--batches 40]
       [--workdir /tmp/scale/hetero_stream] [--max-memory-gb 4] [--threads 1] [--repeat 1]
       [--modes stream,memory[,nocache]] [--skip-big] [--keep] [--out benchmarks/results/hetero_stream.json]

1. Stacks written like ``stream_200k.py`` (its ``write_stack``): ``cryogmm simulate --snr inf``
   makes a few hundred noise-free CTF-modulated projections (random poses, defocus 1-2.5 µm),
   tiled to ``--n`` images plus fresh seeded Gaussian noise (SNR 0.1), one STAR row each:
   adenylate kinase (the bundled open model) at box 128, 1.2 Å (200,000 images: 13.1 GB) and
   HIV protease (the test data's 1HVR dimer without its inhibitor) at box 96, 1.2 Å
   (``--n-small`` images). ``--n-small`` rows of the AdK stack (its first rows) make the
   smaller AdK set.
2. Each case runs ``train_hetero`` (``cryogmm hetero train`` defaults: segments decoder, zdim 8,
   batch 64, lowpass 8 Å; the calibration of the coarse model is switched off: it reads no
   particles and costs the same in both modes) in a child process, one epoch stopped after
   ``--batches`` batches by its progress callback. The epoch's order is the seeded
   permutation of all particles, so the batches read images from the whole file. Recorded:
   the child's peak RSS (``ru_maxrss`` from ``os.wait4``), the setup time (table, noise pass
   over every image, in memory also the cropping of all of them), the time to the first batch,
   and images/s over the batches after the first.
3. Cases: AdK ``--n`` with ``--max-memory-gb`` (auto: streams, the in-memory estimate does not
   fit), AdK ``--n-small`` streamed and in memory, HIV protease ``--n-small`` streamed and in
   memory. The ratio streamed/in-memory is taken within the run (same machine load); with
   ``--repeat k`` the modes of a case alternate (which goes first swaps every repeat) and the
   ratio is of the mean images/s. Streamed runs go through the on-disk particle cache
   (``hetero.cache``) in ``WORKDIR/cache``: the first streamed run of a case writes it (its setup
   and time to the first batch include that), later ones reuse it; ``nocache`` in ``--modes``
   adds streamed runs without the cache (every batch read from the stacks and cropped, and the
   reference projected, as before the cache). ``--skip-big`` leaves out the ``--n`` run (the
   ``--n`` stack is still written: the small AdK set is its first rows; pass ``--n`` equal to
   ``--n-small`` to write only that).

Goal (issue 18 item 6): peak RSS <= 4 GB on one process at 200,000 box-128 particles; images/s
streamed no lower than in memory. The stacks are deleted afterwards unless ``--keep``.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(ROOT / "tests"))

CHILD = r'''
import json, sys, time
a = json.loads(sys.argv[1])
t0 = time.perf_counter()
import torch
torch.set_num_threads(a["threads"])
from pathlib import Path
import cryogmm.hetero.train as T
from cryogmm.hetero.config import HeteroConfig

info, marks, held = {}, [], {}
setup = T.setup


def timed_setup(cfg, progress=None):
    data, ref = setup(cfg, progress)
    held["data"] = data
    info.update(held="memory" if data.resident else "streamed", plan=data.plan, crop=data.crop,
                seconds_setup=time.perf_counter() - t0)
    return data, ref


class Enough(Exception):
    pass


def progress(what, done, total):
    if what.startswith("epoch"):
        marks.append((time.perf_counter(), done))
        if len(marks) >= a["batches"]:
            raise Enough


T.setup = timed_setup
cfg = HeteroConfig(star=Path(a["star"]), model=Path(a["model"]), map=Path(a["map"]), out=Path(a["out"]), epochs=1,
                   calibrate=False, load=a["load"], max_memory_gb=a["max_memory_gb"], seed=0, device="cpu",
                   cache=a["cache"], cache_dir=Path(a["cache_dir"]) if a["cache_dir"] else None)
try:
    T.train_hetero(cfg, progress)
except Enough:
    pass
c = held["data"].cache
info["cache"] = c.report() if c is not None else None
(t1, d1), (tk, dk) = marks[0], marks[-1]
hwm = [x for x in open("/proc/self/status") if x.startswith("VmHWM:")]
info["vmhwm_GB"] = int(hwm[0].split()[1]) * 1024 / 1e9 if hwm else None
info.update(batches=len(marks), images=dk, seconds_to_first_batch=t1 - t0, seconds_total=tk - t0,
            images_per_s=(dk - d1) / (tk - t1), seconds_per_batch=(tk - t1) / (len(marks) - 1))
print("RESULT " + json.dumps(info))
'''


def run_case(name, star, model, mapf, work, load, max_gb, batches, threads) -> dict:
    """One child run; ``load``: memory, stream (through the cache in ``work/cache``), nocache
    (streamed without a cache) or auto."""
    import shutil

    out = work / f"run_{name}_{load}"
    shutil.rmtree(out, ignore_errors=True)
    args = {"star": str(star), "model": str(model), "map": str(mapf), "out": str(out),
            "load": "stream" if load == "nocache" else load, "cache": load != "nocache",
            "cache_dir": str(work / "cache"), "max_memory_gb": max_gb, "batches": batches, "threads": threads}
    env = dict(os.environ, OMP_NUM_THREADS=str(threads))
    load_before = os.getloadavg()
    t0 = time.perf_counter()
    p = subprocess.Popen([sys.executable, "-c", CHILD, json.dumps(args)], env=env, stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True)
    _, status, ru = os.wait4(p.pid, 0)
    wall = time.perf_counter() - t0
    stdout, stderr = p.stdout.read(), p.stderr.read()
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"{name} {load} failed:\n{stderr[-3000:]}")
    res = json.loads(next(x for x in stdout.splitlines() if x.startswith("RESULT "))[7:])
    # ru_maxrss of a child starts from the parent's RSS at fork (Linux keeps the high-water mark
    # across exec): the child's own VmHWM (its address space since exec) is the figure
    res.update(case=name, load=load, max_memory_gb=max_gb, star=str(star), seconds_wall=wall,
               peak_rss_GB=res["vmhwm_GB"], ru_maxrss_GB_with_parent_at_fork=ru.ru_maxrss * 1024 / 1e9, loadavg_before=load_before, loadavg_after=os.getloadavg())
    cache = res.get("cache") or {}
    print(f"{name:10s} {load:7s} held {res['held']:8s} peak RSS {res['peak_rss_GB']:.2f} GB, setup "
          f"{res['seconds_setup']:.0f} s, first batch {res['seconds_to_first_batch']:.0f} s, "
          f"{res['images_per_s']:.1f} images/s over {res['batches'] - 1} batches (load {load_before[0]:.1f}; cache "
          f"{cache.get('fourier')}/{cache.get('encoder')} {cache.get('bytes', 0) / 1e9:.2f} GB)", flush=True)
    return res


def subset_star(src: Path, dst: Path, n: int):
    import starfile

    blocks = starfile.read(src, always_dict=True)
    blocks["particles"] = blocks["particles"].iloc[:n].reset_index(drop=True)
    starfile.write(blocks, dst, overwrite=True)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=200_000)
    ap.add_argument("--n-small", type=int, default=20_000)
    ap.add_argument("--batches", type=int, default=40, help="training batches (of 64) per case")
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/scale/hetero_stream"))
    ap.add_argument("--max-memory-gb", type=float, default=4.0)
    ap.add_argument("--threads", type=int, default=1,
                    help="torch threads per child (default 1: on a shared, oversubscribed machine OpenMP teams of 2 "
                         "made some runs 15x slower at random)")
    ap.add_argument("--repeat", type=int, default=1, help="runs of each small-set pair (alternating)")
    ap.add_argument("--modes", default="stream,memory",
                    help="comma-separated: stream (through the cache), memory, nocache (streamed without the cache)")
    ap.add_argument("--skip-big", action="store_true", help="leave out the --n run")
    ap.add_argument("--keep", action="store_true", help="keep the stacks and caches")
    ap.add_argument("--out", type=Path, default=HERE / "results" / "hetero_stream.json")
    a = ap.parse_args()
    from stream_200k import write_stack
    from test_hetero_null import protein_only

    import cryogmm.data

    adk = Path(cryogmm.data.__file__).parent / "adk_open.pdb"
    wa, wh = a.workdir / "adk", a.workdir / "hivp"
    wa.mkdir(parents=True, exist_ok=True)
    wh.mkdir(parents=True, exist_ok=True)
    hivp = protein_only(wh / "hivp.pdb")
    stacks = {"adk": write_stack(wa, a.n, seed=0, model=adk, box=128, apix=1.2, distinct=300, name="stack"),
              "hivp": write_stack(wh, a.n_small, seed=1, model=hivp, box=96, apix=1.2, distinct=300, name="stack")}
    for k, v in stacks.items():
        print(f"{k}: wrote {v['n']} images ({v['stack_GB']:.2f} GB) in {v['seconds_write']:.0f} s", flush=True)
    subset_star(wa / "stack.star", wa / "small.star", a.n_small)
    modes = [m.strip() for m in a.modes.split(",") if m.strip()]
    bad = [m for m in modes if m not in ("stream", "memory", "nocache")]
    if bad or "stream" not in modes or "memory" not in modes:
        raise SystemExit(f"--modes {a.modes}: expected stream and memory, and optionally nocache")
    cases = [(f"adk_{a.n_small}", wa / "small.star", adk, wa), (f"hivp_{a.n_small}", wh / "stack.star", hivp, wh)]
    runs = []
    for r in range(a.repeat):
        order = modes if r % 2 == 0 else modes[::-1]  # alternate which mode goes first
        for name, star, model, w in cases:
            for load in order:
                runs.append(run_case(name, star, model, w / "sim" / "truth_map.mrc", w, load, None, a.batches,
                                     a.threads))
    big = None
    if not a.skip_big:
        big = run_case(f"adk_{a.n}", wa / "stack.star", adk, wa / "sim" / "truth_map.mrc", wa, "auto",
                       a.max_memory_gb, a.batches, a.threads)
        runs.append(big)

    def mean_ips(case, load):
        v = [r["images_per_s"] for r in runs if r["case"] == case and r["load"] == load]
        return sum(v) / len(v)

    def ratio(case, load="stream"):
        return mean_ips(case, load) / mean_ips(case, "memory")

    small_stream = [r for r in runs if r["case"] == f"adk_{a.n_small}" and r["held"] == "streamed"]
    summary = {
        "peak_rss_GB_streamed_small": max(r["peak_rss_GB"] for r in small_stream),
        "peak_rss_GB_memory_small": {c: max(r["peak_rss_GB"] for r in runs if r["case"] == c and r["load"] == "memory")
                                     for c, *_ in cases},
        "images_per_s_ratio_streamed_over_memory": {c: ratio(c) for c, *_ in cases},
        "images_per_s_per_run": {c: {m: [r["images_per_s"] for r in runs if r["case"] == c and r["load"] == m]
                                     for m in modes} for c, *_ in cases},
    }
    # per repeat (the modes of a case ran back to back, under about the same load): the paired ratios
    per = summary["images_per_s_per_run"]
    summary["images_per_s_ratio_per_repeat"] = {c: [s / m for s, m in zip(per[c]["stream"], per[c]["memory"])]
                                                for c, *_ in cases}
    summary["images_per_s_ratio_median_of_repeats"] = {c: float(sorted(v)[len(v) // 2]) if len(v) % 2 else
                                                       float(sum(sorted(v)[len(v) // 2 - 1: len(v) // 2 + 1]) / 2)
                                                       for c, v in summary["images_per_s_ratio_per_repeat"].items()}
    if "nocache" in modes:
        summary["images_per_s_ratio_uncached_stream_over_memory"] = {c: ratio(c, "nocache") for c, *_ in cases}
        summary["images_per_s_ratio_uncached_per_repeat"] = {
            c: [s / m for s, m in zip(per[c]["nocache"], per[c]["memory"])] for c, *_ in cases}
    if big is not None:
        summary.update({"peak_rss_GB_streamed_big": big["peak_rss_GB"], "n_big": a.n,
                        "in_memory_estimate_GB_big": big["plan"]["estimate_in_memory_GB"],
                        "images_per_s_streamed_big": big["images_per_s"], "fraction_of_epoch_big": big["images"] / a.n,
                        "cache_big": big.get("cache")})
        summary["goal_rss_met"] = big["peak_rss_GB"] <= 4.0 and a.n >= 200_000
    summary["goal_images_per_s_met"] = all(v >= 1.0 for v in summary["images_per_s_ratio_streamed_over_memory"].values())
    res = {"benchmark": "hetero_stream", "issue": 18,
           "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
           "command": " ".join([sys.executable, *sys.argv]), "device": "cpu",
           "host": {"machine": platform.machine(), "cpus": os.cpu_count(), "python": platform.python_version(),
                    "loadavg_end": os.getloadavg()},
           "what_ran": (f"train_hetero (cryogmm hetero train defaults, calibrate off), one epoch stopped after "
                        f"{a.batches} batches of 64; images/s over the batches after the first; peak RSS of the child "
                        "process; --max-memory-gb only on the large case (auto mode); streamed runs through the "
                        f"particle cache in WORKDIR/cache (written by the first streamed run of a case); modes {modes}, "
                        f"{a.repeat} repeat(s), alternating"),
           "stacks": stacks, "runs": runs, "summary": summary}
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(res, indent=2) + "\n")
    print(json.dumps(summary, indent=2))
    if not a.keep:
        import shutil

        for w in (wa, wh):
            for f in ("stack.mrcs", "stack.star", "small.star"):
                (w / f).unlink(missing_ok=True)
            shutil.rmtree(w / "cache", ignore_errors=True)
    print(f"-> {a.out}")


if __name__ == "__main__":
    main()
