"""Micro-benchmark of direct Fourier inversion: ``FourierAccumulator.insert`` per batch and ``reconstruct()``.

Usage: python benchmarks/insert_micro.py [--box 96] [--batch 256] [--repeat 10] [--threads T]

Random images with uniform random poses, origins and CTFs (the speed does not depend on the
content), held in memory, so that only the accumulator is timed: the best of ``--repeat``
inserts of one batch into two half sets, and the best of ``--repeat`` half maps. Prints JSON.
For the end-to-end comparison with RELION see ``reconstruct_vs_relion.py``.
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np
import torch


def best_of(fn, repeat):
    best = float("inf")
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--box", type=int, default=96)
    ap.add_argument("--apix", type=float, default=1.5)
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--repeat", type=int, default=10)
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    from cryogmm.core.ctf import CtfParams
    from cryogmm.recon.accumulator import FourierAccumulator
    from cryogmm.core.rotations import random_rotations

    rng = np.random.default_rng(0)
    B, n = args.batch, args.box
    images = torch.randn(B, n, n, generator=torch.Generator().manual_seed(0))
    R = torch.as_tensor(random_rotations(B, rng), dtype=torch.float32)
    shift = torch.as_tensor(rng.normal(0, 3, (B, 2)), dtype=torch.float32)
    ctf = CtfParams(defocus_u_A=rng.uniform(8e3, 2.5e4, B), defocus_v_A=rng.uniform(8e3, 2.5e4, B),
                    defocus_angle_deg=rng.uniform(0, 180, B), voltage_kV=300.0, cs_mm=2.7, amp_contrast=0.1)
    sets = torch.as_tensor(rng.integers(0, 2, B))
    acc = FourierAccumulator(n, args.apix, n_sets=2)
    acc.insert(images, R, shift, ctf, sets)  # warm-up
    t_insert = best_of(lambda: acc.insert(images, R, shift, ctf, sets), args.repeat)
    t_map = best_of(lambda: acc.reconstruct([0]), args.repeat)
    print(json.dumps({"box": n, "batch": B, "torch_threads": torch.get_num_threads(), "torch": torch.__version__,
                      "insert_ms": round(1e3 * t_insert, 1), "insert_us_per_particle": round(1e6 * t_insert / B, 1),
                      "reconstruct_half_map_ms": round(1e3 * t_map, 1)}, indent=2))


if __name__ == "__main__":
    main()
