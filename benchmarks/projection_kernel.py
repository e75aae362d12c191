"""CPU roofline of the separable projection: ``project`` against ``torch.bmm`` of the same shapes.

Usage: python benchmarks/projection_kernel.py [--threads 0,1] [--repeat 7] [--quick] [--baseline-rev main]
       [--no-compile] [--out PATH]

For each case (box 64 and 128, 2,000 and 5,000 Gaussians, batch 16, 1 Å/px, widths 1.5 Å,
centres in a ball of radius 0.3 box, float32; the mixture of ``gpu_throughput.py``) three
things are timed in the same process, interleaved round by round, median of ``--repeat``:

- ``bmm``: ``torch.bmm`` of ``[B, box, N] x [B, N, box]`` dense random operands (the
  arithmetic the projection needs, at the machine's matrix-product speed); forward alone and
  forward+backward (autograd, both operands requiring gradients: three products).
- ``before``: the projection as it was up to commit e517cae (profiles ``exp`` over the full
  box for every Gaussian, mostly denormal far from the centres, then one dense bmm), kept
  here verbatim as ``reference_project``.
- ``prev``: ``engine/core/projection.py`` as committed at ``--baseline-rev`` (default ``main``),
  loaded from git into this process (the kernel this tree's changes are measured against).
- ``after``: ``cryogmm.core.projection.project`` of this tree (windowed profiles, scatter into
  reused buffers, only the image region the windows reach, on CPUs tiles of Gaussians sorted by
  their y windows each multiplied over its own rows, closed-form backward).
- ``compiled``: the same inside ``with projection.use_compile():`` (torch.compile of the
  profile windows; compiled during the warm-up, not timed). ``--no-compile`` leaves it out.
- ``floor``: the work no windowed kernel that multiplies the whole box avoids, timed alone: one
  ``exp`` over every window value (``[batch, 2, N, W]`` with ``W`` the kernel's window width) and
  one index copy of every window into operands of the product's size, then its zeroing.
  ``floor_fwd_ratio = t_bmm / (t_bmm + t_exp + t_scatter)`` is the highest forward ratio such a
  kernel reaches on this machine (every other elementwise pass and all Python overhead taken as
  free); a kernel that multiplies less than the whole box (the region, the tiles) can pass it.

Forward+backward differentiates through centres and rotations (as pose refinement and
mixture fitting do). Ratios are ``t_bmm / t_project`` (forward) and ``t_bmm_fb / t_project_fb``
(forward+backward): the fraction of the same-shape bmm's throughput; ``*_cpu_ratio`` the same
from process CPU time (steadier on a loaded machine at one thread). The machine is shared;
the load average at start and end is recorded. Writes ``benchmarks/results/projection_kernel.json``
(the file's earlier runs are kept under ``earlier_runs``).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import time
import types
from pathlib import Path

import numpy as np
import torch

CASES = [(64, 2000), (64, 5000), (128, 2000), (128, 5000)]


def reference_project(centers, amplitudes, sigmas, rotmat, box, apix):
    """The projection before the windowed kernel (dense profiles over the whole box)."""
    xy = torch.matmul(centers, rotmat.transpose(-1, -2))[..., :2]
    B = xy.shape[0]
    s, a = sigmas.expand(B, -1), amplitudes.expand(B, -1)
    w = a / (2.0 * math.pi * s**2 * apix)
    x = (torch.arange(box, dtype=xy.dtype) - box // 2) * apix

    def factors(coord):
        return torch.exp(-0.5 * ((x - coord[..., None]) / s[..., None]) ** 2)

    gx = factors(xy[..., 0])
    gy = factors(xy[..., 1]) * w[..., None]
    return torch.bmm(gy.transpose(1, 2), gx)


def mixture(n, box, apix, seed=0):
    g = torch.Generator().manual_seed(seed)
    c = torch.randn(n, 3, generator=g)
    c = c / c.norm(dim=1, keepdim=True) * (0.3 * box * apix) * torch.rand(n, 1, generator=g) ** (1 / 3)
    return c, torch.rand(n, generator=g) + 0.5, torch.full((n,), 1.5 * apix)


def timed(fn):
    """Wall and process CPU seconds of one call (CPU time leaves out the time this process
    waited for a core on a shared machine; with several threads it adds theirs up)."""
    t, c = time.perf_counter(), time.process_time()
    fn()
    return time.perf_counter() - t, time.process_time() - c


def load_baseline(rev):
    """``engine/core/projection.py`` at git revision ``rev`` as a module (None without git)."""
    try:
        src = subprocess.run(["git", "-C", str(Path(__file__).resolve().parent), "show", f"{rev}:engine/core/projection.py"],
                             capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError) as exc:
        print(f"no baseline {rev}: {exc}", file=sys.stderr)
        return None
    mod = types.ModuleType(f"projection_at_{rev}")
    exec(compile(src, f"{rev}:engine/core/projection.py", "exec"), mod.__dict__)
    return mod


def git_commit():
    """This tree's commit, with ``+dirty`` when files differ from it (None without git)."""
    here = str(Path(__file__).resolve().parent)
    try:
        rev = subprocess.run(["git", "-C", here, "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                             check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", here, "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None
    return rev + ("+dirty" if dirty else "")


def run_case(box, n, batch, repeat, repeat_before, baseline=None, compiled=True):
    from cryogmm.core import projection
    from cryogmm.core.gaussians import Gaussians
    from cryogmm.core.projection import project
    from cryogmm.core.rotations import random_rotations

    apix = 1.0
    c, a, s = mixture(n, box, apix)
    R = torch.tensor(random_rotations(batch, np.random.default_rng(1)), dtype=torch.float32)
    Y = torch.rand(batch, box, n, requires_grad=True)
    X = torch.rand(batch, n, box, requires_grad=True)

    def bmm_f():
        with torch.no_grad():
            torch.bmm(Y, X)

    def bmm_fb():
        torch.bmm(Y, X).sum().backward()

    def before_f():
        with torch.no_grad():
            reference_project(c, a, s, R, box, apix)

    def before_fb():
        cc, RR = c.clone().requires_grad_(), R.clone().requires_grad_()
        reference_project(cc, a, s, RR, box, apix).sum().backward()

    def variant(fn, scope=None):
        """Forward and forward+backward of ``fn``, each inside ``scope()`` when given."""
        def f():
            with torch.no_grad():
                fn(Gaussians(c, a, s), R, None, box, apix)

        def fb():
            cc, RR = c.clone().requires_grad_(), R.clone().requires_grad_()
            fn(Gaussians(cc, a, s), RR, None, box, apix).sum().backward()

        def wrap(g):
            def run():
                if scope is None:
                    return g()
                with scope():
                    return g()
            return run
        return wrap(f), wrap(fb)

    # the work no windowed kernel avoids: one exp per window value and one index copy (and its
    # zeroing) of every window into the product's operands, on windows of the kernel's width
    W = -(-projection.window_width(float(s.max()), apix, torch.float32) // 4) * 4
    win = torch.rand(batch, 2, n, W) * -20.0
    rows_g = torch.arange(batch * 2 * n) * (box // 4) + torch.randint(0, (box - W) // 4 + 1, (batch * 2 * n,))
    ops = torch.zeros(batch * 2 * n * box).view(torch.complex128)
    runs = ops.as_strided((ops.numel() - W // 4 + 1, W // 4), (1, 1))

    def exp_only():
        torch.exp(win)

    def scatter_only():
        runs.index_copy_(0, rows_g, win.view(torch.complex128).reshape(-1, W // 4))
        runs.index_fill_(0, rows_g, 0)

    fns = {"bmm_fwd": bmm_f, "bmm_fwdbwd": bmm_fb, "before_fwd": before_f, "before_fwdbwd": before_fb,
           "floor_exp": exp_only, "floor_scatter": scatter_only}
    if baseline is not None:
        fns["prev_fwd"], fns["prev_fwdbwd"] = variant(baseline.project)
    fns["after_fwd"], fns["after_fwdbwd"] = variant(project)
    if compiled:
        fns["compiled_fwd"], fns["compiled_fwdbwd"] = variant(project, projection.use_compile)
    times = {k: [] for k in fns}
    cpu = {k: [] for k in fns}
    for f in fns.values():  # warm-up
        f()
    for r in range(repeat):
        for k, f in fns.items():
            if k.startswith("before") and r >= repeat_before:
                continue
            wall, cpu_s = timed(f)
            times[k].append(wall)
            cpu[k].append(cpu_s)
    med = {k: statistics.median(v) for k, v in times.items()}
    med_cpu = {k: statistics.median(v) for k, v in cpu.items()}
    with torch.no_grad():
        old = reference_project(c, a, s, R, box, apix)
        new = project(Gaussians(c, a, s), R, None, box, apix)
    row = {"box": box, "gaussians": n, "batch": batch,
           "gflop_per_bmm": 2.0 * batch * n * box * box / 1e9,
           "median_s": {k: round(v, 5) for k, v in med.items()},
           "median_cpu_s": {k: round(v, 5) for k, v in med_cpu.items()},
           "bmm_gflops": round(2.0 * batch * n * box * box / med["bmm_fwd"] / 1e9, 1)}
    for which in ("before", "prev", "after", "compiled"):
        if f"{which}_fwd" not in med:
            continue
        row[f"{which}_fwd_ratio"] = round(med["bmm_fwd"] / med[f"{which}_fwd"], 3)
        row[f"{which}_fwdbwd_ratio"] = round(med["bmm_fwdbwd"] / med[f"{which}_fwdbwd"], 3)
        row[f"{which}_fwd_cpu_ratio"] = round(med_cpu["bmm_fwd"] / med_cpu[f"{which}_fwd"], 3)
        row[f"{which}_fwdbwd_cpu_ratio"] = round(med_cpu["bmm_fwdbwd"] / med_cpu[f"{which}_fwdbwd"], 3)
    row["window_width_px"] = W
    row["floor_fwd_ratio"] = round(med["bmm_fwd"] / (med["bmm_fwd"] + med["floor_exp"] + med["floor_scatter"]), 3)
    row["after_vs_before_max_rel_diff"] = float((new - old).abs().max() / old.abs().max())
    if compiled:
        with torch.no_grad(), projection.use_compile():
            comp = project(Gaussians(c, a, s), R, None, box, apix)
        row["compiled_vs_after_max_rel_diff"] = float((comp - new).abs().max() / new.abs().max())
    return row


def summarise(rounds):
    """Per case, the median, min and max over rounds of every ``*_ratio`` of its rows."""
    out = []
    for rows in zip(*rounds):
        c = {"box": rows[0]["box"], "gaussians": rows[0]["gaussians"]}
        for k in rows[0]:
            if k.endswith("_ratio"):
                v = [r[k] for r in rows]
                c[k] = {"median": round(statistics.median(v), 3), "min": min(v), "max": max(v)}
        out.append(c)
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", default="0,1", help="comma list of torch CPU thread counts, one run each "
                    "(0: torch's choice); on a shared machine one thread is the steadier ratio")
    ap.add_argument("--repeat", type=int, default=7)
    ap.add_argument("--repeat-before", type=int, default=3, help="repeats of the slow 'before' path")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--quick", action="store_true", help="box 64 only")
    ap.add_argument("--rounds", type=int, default=1, help="measure every case this many times per thread count "
                    "(a shared machine's speed drifts by tens of percent between minutes): the file keeps each "
                    "round and, per case, the median, min and max of each ratio")
    ap.add_argument("--baseline-rev", default="main", help="git revision whose projection.py is timed as 'prev' "
                    "('' to leave it out)")
    ap.add_argument("--no-compile", action="store_true", help="leave out the torch.compile row")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "projection_kernel.json"))
    args = ap.parse_args(argv)
    load0 = os.getloadavg()
    baseline = load_baseline(args.baseline_rev) if args.baseline_rev else None
    default_threads = torch.get_num_threads()
    runs = []
    for nt in (int(x) for x in args.threads.split(",")):
        torch.set_num_threads(nt or default_threads)
        print(f"torch threads {torch.get_num_threads()}")
        rounds = []
        run_load0 = os.getloadavg()
        for _ in range(max(1, args.rounds)):
            rows = []
            for box, n in CASES:
                if args.quick and box != 64:
                    continue
                row = run_case(box, n, args.batch, args.repeat, min(args.repeat, args.repeat_before), baseline,
                               not args.no_compile)
                rows.append(row)
                parts = " | ".join(f"{w} fwd {row[w + '_fwd_ratio']:.3f} fwd+bwd {row[w + '_fwdbwd_ratio']:.3f}"
                                   for w in ("before", "prev", "after", "compiled") if w + "_fwd_ratio" in row)
                print(f"box {box:3d} N {n:5d}: bmm {row['bmm_gflops']:6.1f} GFLOP/s | {parts} | "
                      f"floor fwd {row['floor_fwd_ratio']:.3f} | "
                      f"max rel diff {row['after_vs_before_max_rel_diff']:.1e}", flush=True)
            rounds.append(rows)
        run = {"torch_threads": torch.get_num_threads(), "loadavg_start": [round(x, 2) for x in run_load0],
               "loadavg_end": [round(x, 2) for x in os.getloadavg()], "cases": rounds[0]}
        if len(rounds) > 1:
            run["rounds"] = rounds
            run["summary"] = summarise(rounds)
            for c in run["summary"]:
                print(f"threads {run['torch_threads']} box {c['box']:3d} N {c['gaussians']:5d} over {len(rounds)} "
                      f"rounds: after fwd median {c['after_fwd_ratio']['median']:.3f} "
                      f"[{c['after_fwd_ratio']['min']:.3f}, {c['after_fwd_ratio']['max']:.3f}], fwd+bwd median "
                      f"{c['after_fwdbwd_ratio']['median']:.3f} [{c['after_fwdbwd_ratio']['min']:.3f}, "
                      f"{c['after_fwdbwd_ratio']['max']:.3f}]")
        runs.append(run)
    out = {"what": "project() throughput as a fraction of a same-shape torch.bmm, same process (ratio = t_bmm / "
                   "t_project; forward+backward against bmm forward+backward)",
           "torch": torch.__version__, "cpus": os.cpu_count(),
           "cpu_capability": torch.backends.cpu.get_cpu_capability(),
           "date": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()), "host": os.uname().nodename,
           "command": "python " + " ".join([Path(sys.argv[0]).as_posix()] + sys.argv[1:]) if argv is None else argv,
           "commit": git_commit(), "baseline_rev": args.baseline_rev or None,
           "loadavg_start": [round(x, 2) for x in load0], "loadavg_end": [round(x, 2) for x in os.getloadavg()],
           "goal": {"fwd_ratio": 0.5, "fwdbwd_ratio": 0.3}, "runs": runs}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    if Path(args.out).exists():
        prev = json.loads(Path(args.out).read_text())
        earlier = prev.pop("earlier_runs", [])
        out["earlier_runs"] = earlier + [prev]
    Path(args.out).write_text(json.dumps(out, indent=1) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
