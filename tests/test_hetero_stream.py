"""hetero train with its particles streamed from disk (ImageSource batches, prepared one ahead
in a thread) against the same particles held in memory; the memory budget and its refusals;
the split of a global batch among shards."""

import json
import subprocess
import sys
from importlib import resources
from pathlib import Path

import numpy as np
import pytest
import torch

from cryogmm.bridge.images import prefetched
from cryogmm.errors import OptionError
from cryogmm.hetero import data as hetero_data
from cryogmm.hetero.config import HeteroConfig
from cryogmm.hetero.train import load_checkpoint, setup, train_hetero
from cryogmm.hetero.vae import ForwardModel, build_vae

DATA = Path(str(resources.files("cryogmm.data")))
OPEN, CLOSED = DATA / "adk_open.pdb", DATA / "adk_closed.pdb"


@pytest.fixture(scope="module")
def sim(tmp_path_factory):
    """Open-to-closed adenylate kinase, 5 frames, 150 particles, box 40 at 2.5 Å, SNR 1."""
    from cryogmm.hetero.truth import ADK_CORE, superpose_file
    from cryogmm.simulate.particles import SimulateConfig, simulate

    d = tmp_path_factory.mktemp("hstream")
    closed = d / "closed_on_open.pdb"
    superpose_file(CLOSED, OPEN, closed, ADK_CORE)
    simulate(SimulateConfig(out=d / "sim", endpoints=(OPEN, closed), frames=5, n=150, box=40, apix=2.5, snr=1.0,
                            seed=5, device="cpu"))
    return d / "sim"


def _cfg(sim, out, **kw):
    base = dict(star=sim / "particles.star", model=OPEN, out=out, map=sim / "truth_map.mrc", decoder="segments",
                segments=6, zdim=2, epochs=3, batch=16, lowpass_A=10.0, kl_warmup=2, seed=0, device="cpu",
                calibrate=False)  # the calibration reads no particles (and is slow on a CPU)
    base.update(kw)
    return HeteroConfig(**base)


@pytest.mark.parametrize("cache", [True, False])
def test_streamed_batches_equal_the_resident_ones(sim, tmp_path, cache):
    """Same cropped transforms, CTFs, encoder inputs, noise variance and image scale, for a
    batch of rows in any order, whether the particles are held or read per batch (through the
    on-disk cache or straight from the stacks)."""
    mem, ref = setup(_cfg(sim, tmp_path / "a", load="memory"))
    st, _ = setup(_cfg(sim, tmp_path / "b", load="stream", cache=cache))
    assert mem.resident and not st.resident and (st.source is None) == cache and (st.cache is not None) == cache
    assert st.noise_var == mem.noise_var
    vae = build_vae(_cfg(sim, tmp_path / "a"), ref, mem)
    fm, fs = ForwardModel(vae, ref, mem, "cpu"), ForwardModel(vae, ref, st, "cpu")
    assert fs.ref_scale == fm.ref_scale and fs.enc_all is None and fm.enc_all is not None
    idx = np.sort(np.random.default_rng(1).choice(mem.n, 23, replace=False))
    for a, b, name in zip(fm.batch(idx), fs.batch(idx), ("image", "rotation", "shift", "ctf", "encoder input")):
        # per-batch FFTs and CTFs of 23 rows vs chunks of 512: equal up to float32 rounding
        scale = float(a.abs().max())
        assert float((a - b).abs().max()) <= 1e-6 * scale, name
    st.close()


@pytest.mark.parametrize("cache", [True, False])
def test_streamed_training_follows_the_resident_run(sim, tmp_path, cache):
    """Two epochs on the same particles: the same epoch losses and the same network (to float
    rounding: the uncached streamed batches are computed from a batch's rows, the resident ones
    once in chunks), and the report says how the particles were held."""
    rm = train_hetero(_cfg(sim, tmp_path / "mem", load="memory", epochs=2))
    rs = train_hetero(_cfg(sim, tmp_path / "str", load="stream", epochs=2, cache=cache))
    assert rm["particles"]["held"] == "memory" and rs["particles"]["held"] == "streamed"
    for hm, hs in zip(rm["history"], rs["history"]):
        for k in ("loss", "data", "kl"):
            assert hs[k] == pytest.approx(hm[k], rel=1e-4, abs=1e-6), (hm["epoch"], k)
    a = load_checkpoint(tmp_path / "mem" / "checkpoint.pt")["model"]
    b = load_checkpoint(tmp_path / "str" / "checkpoint.pt")["model"]
    for k in a:
        if not a[k].numel() or not a[k].is_floating_point():  # empty: e.g. no atoms drawn (draw="coarse")
            assert torch.equal(a[k], b[k]), k
            continue
        scale = float(a[k].abs().max()) + 1e-12
        assert float((a[k] - b[k]).abs().max()) <= 1e-3 * scale, k


@pytest.mark.parametrize("cache", [True, False])
def test_prefetched_batches_are_the_direct_ones(sim, tmp_path, cache):
    st, ref = setup(_cfg(sim, tmp_path / "c", load="stream", cache=cache))
    fw = ForwardModel(build_vae(_cfg(sim, tmp_path / "c"), ref, st), ref, st, "cpu")
    parts = [np.arange(0, 10), np.arange(40, 45), np.array([3, 77, 149])]
    seen = []
    for idx in fw.prefetch(parts):
        got = fw.batch(idx)
        direct = fw._compute(idx)
        seen.append(idx)
        for a, b in zip(got, direct):
            assert torch.equal(a, b)
    assert [list(p) for p in seen] == [list(p) for p in parts]
    assert fw._ready is None
    st.close()


def test_prefetched_raises_in_the_caller_and_stops_early():
    def fn(i):
        if i == 3:
            raise ValueError("bad part")
        return i * 10

    assert list(prefetched(fn, [0, 1, 2], 2)) == [(0, 0), (1, 10), (2, 20)]
    with pytest.raises(ValueError, match="bad part"):
        list(prefetched(fn, [0, 3], 1))
    gen = prefetched(fn, list(range(100)) + [3], 1)
    assert next(gen) == (0, 0)
    gen.close()  # leaving early stops the worker before it reaches the bad part


def test_shard_shares_partition_every_batch():
    n, w = 103, 3
    from cryogmm import distributed

    shards = [distributed.shard(n, r, w) for r in range(w)]
    rng = np.random.default_rng(0)
    for _ in range(20):
        idx_all = np.sort(rng.choice(n, 16, replace=False))
        got, picks = [], []
        for rows in shards:
            idx, pick, weight = hetero_data.shard_share(idx_all, rows)
            if weight:
                assert np.all((idx >= rows[0]) & (idx <= rows[-1]))
                np.testing.assert_array_equal(idx, idx_all[pick])
                got.append(idx)
                picks.append(pick)
            else:
                assert idx.tolist() == [rows[0]]  # its own row, zero weight
        np.testing.assert_array_equal(np.concatenate(got), idx_all)
        np.testing.assert_array_equal(np.concatenate(picks), np.arange(len(idx_all)))
    idx, pick, weight = hetero_data.shard_share(np.array([0, 1, 2]), shards[2])
    assert weight == 0.0 and idx.tolist() == [shards[2][0]] and pick.tolist() == [0]


class _Table:
    def __init__(self, n):
        import pandas as pd

        self.n = n
        self.particles = pd.DataFrame({"rlnDefocusU": np.zeros(n)})


def test_memory_plan_chooses_and_refuses():
    t = _Table(200_000)
    per = hetero_data.resident_bytes_per_particle(42)
    assert per == 8 * 42 * 22 + 4 * 42 * 22 + 2 * 2 * 42 * 42 * 4
    plan = hetero_data.memory_plan(t, n_local=t.n, box=128, crop=42, batch=64, max_memory_gb=4.0)
    assert not plan["resident"] and plan["estimate_in_memory_GB"] > 4 > plan["estimate_streamed_GB"]
    assert hetero_data.memory_plan(_Table(1000), n_local=1000, box=128, crop=42, batch=64, max_memory_gb=4.0)["resident"]
    assert not hetero_data.memory_plan(_Table(1000), n_local=1000, box=128, crop=42, batch=64, load="stream")["resident"]
    with pytest.raises(OptionError, match="--max-memory-gb.*--in-memory"):
        hetero_data.memory_plan(t, n_local=t.n, box=128, crop=42, batch=64, load="memory", max_memory_gb=4.0)
    with pytest.raises(OptionError, match="--max-memory-gb.*even streaming"):
        hetero_data.memory_plan(t, n_local=t.n, box=128, crop=42, batch=64, max_memory_gb=0.2)


def _cli(*args):
    return subprocess.run([sys.executable, "-m", "cryogmm.cli", *map(str, args)], capture_output=True, text=True,
                          timeout=300)


@pytest.mark.parametrize("extra", [["--in-memory", "--max-memory-gb", "0.3"], ["--max-memory-gb", "0.1"]])
def test_budget_too_small_is_refused_with_one_line(sim, tmp_path, extra):
    out = tmp_path / "run"
    p = _cli("hetero", "train", sim / "particles.star", "--model", OPEN, "--out", out, "--device", "cpu", *extra)
    assert p.returncode == 2, p.stderr
    lines = [x for x in p.stderr.splitlines() if x.strip()]
    assert len(lines) == 1 and "--max-memory-gb" in lines[0], p.stderr
    assert not out.exists()


def test_in_memory_and_stream_are_exclusive(sim, tmp_path):
    p = _cli("hetero", "train", sim / "particles.star", "--model", OPEN, "--out", tmp_path / "r", "--in-memory",
             "--stream")
    assert p.returncode == 2 and len(p.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "r").exists()


@pytest.mark.slow
def test_cli_streams_and_reports_it(sim, tmp_path):
    out = tmp_path / "run"
    p = _cli("hetero", "train", sim / "particles.star", "--model", OPEN, "--map", sim / "truth_map.mrc", "--out", out,
             "--device", "cpu", "--stream", "--epochs", "1", "--segments", "4", "--zdim", "2", "--batch", "32",
             "--lowpass-A", "20", "--max-memory-gb", "2")
    assert p.returncode == 0, p.stderr[-2000:]
    rep = json.loads((out / "report.json").read_text())
    assert rep["particles"]["held"] == "streamed" and rep["max_memory_gb"] == 2.0
    assert rep["particles"]["per_process"] == rep["n_particles"] == 150


# --------------------------------------------------------------------------- the on-disk cache
def _fw(cfg):
    data, ref = setup(cfg)
    return data, ForwardModel(build_vae(cfg, ref, data), ref, data, "cpu")


def _entries(folder):
    return sorted(p.name for p in Path(folder).glob("particles-*"))


def test_cache_written_once_then_reused_without_reading_the_stacks(sim, tmp_path, monkeypatch):
    cdir = tmp_path / "cache"
    st, _ = _fw(_cfg(sim, tmp_path / "a", load="stream", cache_dir=cdir))
    assert st.cache.status == {"fourier": "written", "encoder": "written"}
    (entry,) = _entries(cdir)
    files = sorted(p.name for p in (cdir / entry).iterdir())
    assert files[0].startswith("encoder-") and files[1:] == ["fourier.bin", "meta.json"]
    mem, fm = _fw(_cfg(sim, tmp_path / "m", load="memory"))
    st.close()

    from cryogmm.bridge.images import ImageSource

    def no_reads(*a, **k):
        raise AssertionError("a reused cache read the stacks")

    monkeypatch.setattr(ImageSource, "chunks", no_reads)
    monkeypatch.setattr(ImageSource, "images", no_reads)
    again, fa = _fw(_cfg(sim, tmp_path / "b", load="stream", cache_dir=cdir))
    assert again.cache.status == {"fourier": "reused", "encoder": "reused"} and _entries(cdir) == [entry]
    assert again.noise_var == mem.noise_var and fa.ref_scale == fm.ref_scale
    idx = np.sort(np.random.default_rng(2).choice(mem.n, 31, replace=False))
    for a, b, name in zip(fm.batch(idx), fa.batch(idx), ("image", "rotation", "shift", "ctf", "encoder input")):
        # written from the same chunks by the same functions as the resident arrays
        assert torch.equal(a, b), name
    # rows asked in any order come back in that order
    rev = idx[::-1].copy()
    for a, b in zip(fa.batch(idx), fa.batch(rev)):
        assert torch.equal(a, b.flip(0))
    again.close()


def test_cache_invalidated_by_input_options_and_reference(sim, tmp_path):
    import os
    import shutil

    cdir = tmp_path / "cache"
    star = sim / "copy_for_cache.star"
    shutil.copy(sim / "particles.star", star)
    d0, _ = _fw(_cfg(sim, tmp_path / "a", star=star, load="stream", cache_dir=cdir))
    (first,) = _entries(cdir)
    d0.close()
    # another crop: a second valid entry beside the first
    d1, _ = _fw(_cfg(sim, tmp_path / "b", star=star, load="stream", cache_dir=cdir, lowpass_A=14.0))
    assert d1.cache.status["fourier"] == "written" and len(_entries(cdir)) == 2
    d1.close()
    # the STAR changed (a later modification time): written again, the stale entry of the same crop removed
    st = star.stat()
    os.utime(star, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    d2, _ = _fw(_cfg(sim, tmp_path / "c", star=star, load="stream", cache_dir=cdir))
    assert d2.cache.status == {"fourier": "written", "encoder": "written"}
    assert first not in _entries(cdir) and len(_entries(cdir)) == 2
    enc_old = sorted(p.name for p in Path(d2.cache.folder).glob("encoder-*"))
    d2.close()
    # another reference: the particles' records reused, the encoder inputs written again (one file kept)
    d3, _ = _fw(_cfg(sim, tmp_path / "d", star=star, load="stream", cache_dir=cdir, model=CLOSED))
    assert d3.cache.status == {"fourier": "reused", "encoder": "written"}
    enc_new = sorted(p.name for p in Path(d3.cache.folder).glob("encoder-*"))
    assert len(enc_new) == 1 and enc_new != enc_old
    d3.close()
    # a damaged entry (truncated records) is not read: written again
    fb = Path(d3.cache.folder) / "fourier.bin"
    with open(fb, "r+b") as fh:
        fh.truncate(fb.stat().st_size - 8)
    d4, _ = _fw(_cfg(sim, tmp_path / "e", star=star, load="stream", cache_dir=cdir, model=CLOSED))
    assert d4.cache.status == {"fourier": "written", "encoder": "written"}
    assert not list(cdir.glob(".*tmp"))  # no temporary left behind
    d4.close()
    star.unlink()


def test_training_reports_and_removes_or_keeps_the_cache(sim, tmp_path):
    r = train_hetero(_cfg(sim, tmp_path / "run", load="stream", epochs=1))
    c = r["particles"]["cache"]
    assert c["kept"] is False and c["bytes"] > 150 * 4 * 3 * 16 * 9 and c["fourier"] == "written"
    assert Path(c["path"]).parent == tmp_path / "run" / "particle_cache" and not Path(c["path"]).exists()
    assert not (tmp_path / "run" / "particle_cache").exists()
    assert json.loads((tmp_path / "run" / "report.json").read_text())["particles"]["cache"] == c
    k = train_hetero(_cfg(sim, tmp_path / "run2", load="stream", epochs=1, cache_dir=tmp_path / "keep"))
    assert k["particles"]["cache"]["kept"] is True and Path(k["particles"]["cache"]["path"]).is_dir()
    assert k["history"][0]["loss"] == pytest.approx(r["history"][0]["loss"], rel=1e-6)


@pytest.mark.parametrize("bad", ["file", "under_file"])
def test_bad_cache_dir_is_refused_with_one_line(sim, tmp_path, bad):
    f = tmp_path / "a_file"
    f.write_text("x")
    cdir = f if bad == "file" else f / "sub"
    out = tmp_path / "run"
    p = _cli("hetero", "train", sim / "particles.star", "--model", OPEN, "--out", out, "--device", "cpu", "--stream",
             "--cache-dir", cdir)
    assert p.returncode == 2, p.stderr
    lines = [x for x in p.stderr.splitlines() if x.strip()]
    assert len(lines) == 1 and "--cache-dir" in lines[0] and str(cdir) in lines[0], p.stderr
    assert not out.exists() and f.read_text() == "x"
