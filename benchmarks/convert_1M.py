"""Convert a synthetic 1,000,000-particle cryoSPARC .cs to RELION STAR and back.

Usage: python benchmarks/convert_1M.py [--n 1000000] [--workdir DIR] [--out benchmarks/results/convert_1M.json]

Each direction (read + write) runs in a fresh child process, so that its peak memory
(``ru_maxrss``) is its own. Goal on a 2-core CPU machine: under 30 s and 2 GB each way.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


def synthesise(path: Path, n: int, seed: int = 0) -> None:
    """A refinement-like particle .cs: 3000 micrographs, 2 exposure groups."""
    import numpy as np
    from cryosparc.dataset import NUMPY_FORMAT, Dataset

    rng = np.random.default_rng(seed)
    per_mic = 334
    mic = np.arange(n) // per_mic
    stacks = np.array([f"J12/extract/{10**20 + m:021d}_mic_{m:05d}_particles.mrc" for m in range(mic.max() + 1)], dtype=object)
    q = rng.normal(size=(n, 4))
    q /= np.linalg.norm(q, axis=1, keepdims=True)
    angle = 2 * np.arccos(np.abs(q[:, 0]))
    axis = q[:, 1:] / np.maximum(np.linalg.norm(q[:, 1:], axis=1, keepdims=True), 1e-12)
    f = {
        "uid": rng.integers(1, 2**63, n, dtype=np.int64).astype(np.uint64),
        "blob/path": stacks[mic],
        "blob/idx": (np.arange(n) % per_mic).astype(np.uint32),
        "blob/shape": np.full((n, 2), 256, np.uint32),
        "blob/psize_A": np.full(n, 1.06, np.float32),
        "blob/sign": np.full(n, -1, np.float32),
        "ctf/type": np.array(["imported"] * n, dtype=object),
        "ctf/exp_group_id": (mic % 2).astype(np.uint32),
        "ctf/accel_kv": np.full(n, 300, np.float32),
        "ctf/cs_mm": np.full(n, 2.7, np.float32),
        "ctf/amp_contrast": np.full(n, 0.1, np.float32),
        "ctf/df1_A": rng.uniform(8000, 25000, n).astype(np.float32),
        "ctf/df2_A": rng.uniform(8000, 25000, n).astype(np.float32),
        "ctf/df_angle_rad": rng.uniform(-np.pi, np.pi, n).astype(np.float32),
        "ctf/phase_shift_rad": np.zeros(n, np.float32),
        "ctf/scale": np.ones(n, np.float32),
        "alignments3D/split": rng.integers(0, 2, n).astype(np.uint32),
        "alignments3D/shift": rng.normal(0, 3, (n, 2)).astype(np.float32),
        "alignments3D/pose": (axis * angle[:, None]).astype(np.float32),
        "alignments3D/psize_A": np.full(n, 1.06, np.float32),
        "alignments3D/error": rng.normal(size=n).astype(np.float32),
        "alignments3D/class_posterior": np.ones(n, np.float32),
        "alignments3D/class": np.zeros(n, np.uint32),
    }
    Dataset(f).save(str(path), format=NUMPY_FORMAT)


def _child(direction: str, src: str, dst: str) -> None:
    """Run one direction and print its numbers as JSON (run in a fresh process)."""
    from cryogmm.bridge.io import read_particles, write_particles

    t0 = time.perf_counter()
    table = read_particles(src)
    t1 = time.perf_counter()
    write_particles(table, dst)
    t2 = time.perf_counter()
    rss_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    print(json.dumps({
        "direction": direction, "n": table.n, "read_s": round(t1 - t0, 2), "write_s": round(t2 - t1, 2),
        "seconds": round(t2 - t0, 2), "peak_rss_MB": round(rss_kb / 1024, 1),
        "output_MB": round(os.path.getsize(dst) / 2**20, 1),
    }))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=1_000_000)
    ap.add_argument("--workdir", default=None, help="where to put the (large) temporary files")
    ap.add_argument("--out", default=str(HERE / "results" / "convert_1M.json"))
    ap.add_argument("--child", nargs=3, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        _child(*args.child)
        return 0
    with tempfile.TemporaryDirectory(dir=args.workdir) as d:
        d = Path(d)
        t0 = time.perf_counter()
        synthesise(d / "particles.cs", args.n)
        synth_s = time.perf_counter() - t0
        results = []
        for direction, src, dst in (("cs_to_star", "particles.cs", "particles.star"),
                                    ("star_to_cs", "particles.star", "back.cs")):
            r = subprocess.run([sys.executable, __file__, "--child", direction, str(d / src), str(d / dst)],
                               capture_output=True, text=True, check=True)
            results.append(json.loads(r.stdout.strip().splitlines()[-1]))
            print(f"{direction}: {results[-1]['seconds']:.1f} s (read {results[-1]['read_s']:.1f} s, "
                  f"write {results[-1]['write_s']:.1f} s), peak {results[-1]['peak_rss_MB']:.0f} MB, "
                  f"output {results[-1]['output_MB']:.0f} MB")
        # the round trip kept poses, shifts and CTF
        import numpy as np
        from scipy.spatial.transform import Rotation

        a, b = np.load(d / "particles.cs"), np.load(d / "back.cs")
        k = slice(0, None, 97)
        pose_err = float(np.abs(Rotation.from_rotvec(a["alignments3D/pose"][k]).as_matrix()
                                - Rotation.from_rotvec(b["alignments3D/pose"][k]).as_matrix()).max())
        shift_err = float(np.abs(a["alignments3D/shift"] - b["alignments3D/shift"]).max())
        df_err = float(np.abs(a["ctf/df1_A"] - b["ctf/df1_A"]).max())
    report = {
        "n": args.n,
        "synthesis_s": round(synth_s, 2),
        "directions": results,
        "total_s": round(sum(r["seconds"] for r in results), 2),
        "max_peak_rss_MB": max(r["peak_rss_MB"] for r in results),
        "round_trip_max_error": {"rotation_matrix": pose_err, "shift_px": shift_err, "df1_A": df_err},
        "goal": "each direction < 30 s and < 2 GB",
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "platform": platform.platform()},
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
