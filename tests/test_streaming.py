"""Streaming particle images: positioned reads, background prefetch, bounded memory."""

from __future__ import annotations

import os

import mrcfile
import numpy as np
import pytest
import torch

from cryogmm.bridge.images import ImageSource
from cryogmm.errors import OptionError, StackError


def _source(tmp_path, n=300, box=16, dtype=np.float32, stacks=3, seed=0):
    """``stacks`` MRC stacks of random images and a source whose rows visit them out of order."""
    rng = np.random.default_rng(seed)
    per = -(-n // stacks)
    data, paths = [], []
    for s in range(stacks):
        d = (rng.normal(size=(per, box, box)) * 100).astype(dtype)
        p = tmp_path / f"s{s}.mrcs"
        with mrcfile.new(p, overwrite=True) as m:
            m.set_data(d)
        data.append(d)
        paths.append(str(p))
    stack_of = rng.integers(0, stacks, n)
    index = rng.integers(0, per, n)
    expect = np.stack([data[s][i] for s, i in zip(stack_of, index)]).astype(np.float32)
    return ImageSource(paths, stack_of, index, box), expect


@pytest.mark.parametrize("dtype", [np.float32, np.int16])
def test_positioned_reads_equal_the_files(tmp_path, dtype):
    src, expect = _source(tmp_path, dtype=dtype)
    np.testing.assert_array_equal(src.images(np.arange(src.n)), expect)
    rows = np.array([5, 5, 299, 0, 17, 16, 18])  # repeats, descending and consecutive rows
    np.testing.assert_array_equal(src.images(rows), expect[rows])


@pytest.mark.parametrize("prefetch", [1, 3])
def test_prefetch_yields_exactly_the_same_chunks(tmp_path, prefetch):
    src, expect = _source(tmp_path)
    sub = np.random.default_rng(1).permutation(src.n)[:211]
    for indices in (None, sub):
        plain = list(src.chunks(37, indices=indices))
        ahead = list(src.chunks(37, indices=indices, prefetch=prefetch))
        assert len(plain) == len(ahead) == -(-(src.n if indices is None else len(sub)) // 37)
        for (i0, x0), (i1, x1) in zip(plain, ahead):
            np.testing.assert_array_equal(i0, i1)
            np.testing.assert_array_equal(x0, x1)
            np.testing.assert_array_equal(x1, expect[i1])
    # the chunks cover the rows asked for, in order
    np.testing.assert_array_equal(np.concatenate([i for i, _ in src.chunks(37, indices=sub, prefetch=1)]), sub)


def test_prefetch_stops_when_the_consumer_stops_and_passes_errors_on(tmp_path):
    import threading

    src, _ = _source(tmp_path)
    before = threading.active_count()
    for k, _ in enumerate(src.chunks(10, prefetch=2)):
        if k == 2:
            break
    assert threading.active_count() == before  # the reader thread has ended
    src.close()
    # a stack cut short after the source was made: the reader's error reaches the consumer
    with open(src._stacks[1], "r+b") as f:
        f.truncate(1024 + 16 * 16 * 4 * 3)
    with pytest.raises(StackError):
        for _ in src.chunks(25, prefetch=1):
            pass


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


@pytest.mark.skipif(not os.path.exists("/proc/self/statm"), reason="needs Linux /proc")
def test_streaming_a_stack_does_not_keep_it_resident(tmp_path):
    """A 105 MB stack read chunk by chunk: the resident set grows by about a chunk, not by the
    stack (a memory map would keep every page read in the resident set)."""
    n, box = 6400, 64
    p = tmp_path / "big.mrcs"
    with mrcfile.new_mmap(p, shape=(n, box, box), mrc_mode=2, overwrite=True) as m:
        for a in range(0, n, 800):
            m.data[a:a + 800] = np.random.default_rng(a).normal(size=(800, box, box)).astype(np.float32)
    src = ImageSource([str(p)], np.zeros(n, np.int64), np.arange(n), box)
    base = _rss_bytes()
    peak, total = base, 0.0
    for idx, x in src.chunks(256, prefetch=1):
        total += float(x[:, 0, 0].sum())
        peak = max(peak, _rss_bytes())
    assert np.isfinite(total)
    assert peak - base < 40e6, f"resident set grew by {(peak - base) / 1e6:.0f} MB reading a 105 MB stack"


def test_max_memory_bounds_the_batch_and_keeps_the_map(tmp_path):
    from cryogmm.recon.accumulator import FourierAccumulator
    from cryogmm.recon.job import BASELINE_BYTES, ReconstructConfig, reconstruct
    from cryogmm.simulate.particles import SimulateConfig, simulate
    from cryogmm.demo import example_model

    box = 32
    acc = FourierAccumulator(box, 3.0)
    fixed = BASELINE_BYTES + acc.grid_bytes()
    b1 = FourierAccumulator.batch_for_memory(box, fixed + 10e6, fixed)
    b2 = FourierAccumulator.batch_for_memory(box, fixed + 20e6, fixed)
    assert 0 < b1 < b2 and FourierAccumulator.batch_for_memory(box, fixed - 1, fixed) == 0
    sim = tmp_path / "sim"
    simulate(SimulateConfig(model=example_model("open"), out=sim, n=120, box=box, apix=3.0, snr=1.0, seed=2,
                            device="cpu"))
    full = reconstruct(ReconstructConfig(star=sim / "particles.star", out=tmp_path / "a", device="cpu"))
    # a budget that leaves room for a few particles per batch: same map up to summation order
    gb = (fixed + 6 * FourierAccumulator.bytes_per_particle_px * box * box) / 1e9
    small = reconstruct(ReconstructConfig(star=sim / "particles.star", out=tmp_path / "b", device="cpu",
                                          max_memory_gb=gb, prefetch=2))
    a, b = (mrcfile.read(tmp_path / d / "map.mrc") for d in ("a", "b"))
    assert np.abs(a - b).max() < 1e-4 * np.abs(a).max()
    assert small["max_memory_gb"] == gb and full["resolution_A"] == pytest.approx(small["resolution_A"], rel=1e-3)
    with pytest.raises(OptionError, match="--max-memory-gb"):
        reconstruct(ReconstructConfig(star=sim / "particles.star", out=tmp_path / "c", device="cpu",
                                      max_memory_gb=0.01))
    assert not (tmp_path / "c").exists()


def test_float64_sums_do_not_depend_on_the_order():
    """The accumulator with float64 sums gives the same float32 map whatever the batches and
    their order (what makes sharded runs equal one process)."""
    from cryogmm.recon.accumulator import FourierAccumulator
    from cryogmm.core.rotations import random_rotations

    g = torch.Generator().manual_seed(0)
    n, box = 64, 24
    imgs = torch.randn(n, box, box, generator=g)
    R = torch.as_tensor(random_rotations(n, np.random.default_rng(0)), dtype=torch.float32)
    maps = []
    for order, bs in ((torch.arange(n), 64), (torch.randperm(n, generator=g), 7)):
        acc = FourierAccumulator(box, 2.0, n_sets=1, grid_dtype=torch.float64)
        for a in range(0, n, bs):
            o = order[a:a + bs]
            acc.insert(imgs[o], R[o])
        maps.append(acc.reconstruct())
    assert torch.equal(maps[0], maps[1])
