"""``benchmarks/gpu_throughput.py``'s projection rows: each precision against its own bound
(float32 rows against the CUDA-core float32 peak, not the TF32 tensor-core peak) and peak
memory read per case (forward, then forward+backward after a reset). Run on the CPU at a toy
size; the figures themselves come from the benchmark, not from here."""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import gpu_throughput  # noqa: E402


def test_precisions_map_to_their_own_bound():
    assert gpu_throughput.BOUND_KIND == {"highest": "fp32", "tf32": "tf32", "bf16": "bf16"}
    for _, peaks in gpu_throughput.PEAKS:
        assert set(peaks) >= set(gpu_throughput.BOUND_KIND.values())


def test_projection_rows_on_cpu(monkeypatch):
    monkeypatch.setattr(gpu_throughput, "_timeit", lambda fn, dev: (fn(), 1.0)[1])
    rows = gpu_throughput.bench_projection(torch.device("cpu"), {"boxes": [16], "gaussians": [30]},
                                           lambda n, box: 2, ["highest"])
    assert len(rows) == 1
    r = rows[0]
    assert r["bound_kind"] == "fp32" and r["bound_TFLOPs"] is None and r["fraction_of_bound"] is None
    assert r["peak_memory_GB"] > 0 and r["peak_memory_GB_fwd_bwd"] > 0
    assert r["images_per_s"] == 2.0 and r["images_per_s_fwd_bwd"] == 2.0
