"""refine-poses: a checkpoint after every iteration; ``kill -9`` after the first one, then
``--resume``, gives the outputs of an uninterrupted run; and the one-pass sweep's pieces
(device scatter, mixed half-set batches) against their references."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import mrcfile
import numpy as np
import pytest
import torch

from cryogmm.demo import example_model


def _env():
    env = dict(os.environ, OMP_NUM_THREADS="1")
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    return env


def _cmd(star, out, *extra):
    return [sys.executable, "-m", "cryogmm.cli", "refine-poses", str(star), "--out", str(out), "--iterations", "3",
            "--steps", "12", "--fit-iterations", "40", "--max-gaussians", "200", "--device", "cpu", "--batch", "64",
            *extra]


@pytest.fixture(scope="module")
def sim(tmp_path_factory):
    """Adenylate kinase, 200 particles, box 32 at 3.5 Å, SNR 0.5, starting poses 3° / 1 Å off."""
    from cryogmm.simulate.particles import SimulateConfig, simulate

    d = tmp_path_factory.mktemp("resume") / "sim"
    simulate(SimulateConfig(model=example_model("open"), out=d, n=200, box=32, apix=3.5, snr=0.5,
                            pose_noise_deg=3.0, shift_noise_A=1.0, seed=5, device="cpu"))
    return d


@pytest.mark.slow
def test_kill_after_first_checkpoint_then_resume_equals_uninterrupted(sim, tmp_path):
    from cryogmm.bridge.io import read_particles

    star = sim / "particles.star"
    full = subprocess.run(_cmd(star, tmp_path / "full"), env=_env(), capture_output=True, text=True, timeout=900)
    assert full.returncode == 0, full.stderr[-2000:]
    out = tmp_path / "killed"
    p = subprocess.Popen(_cmd(star, out), env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    t0 = time.monotonic()
    while not (out / "checkpoint.pt").exists():
        assert p.poll() is None, "the run ended before writing a checkpoint"
        assert time.monotonic() - t0 < 900
        time.sleep(0.02)
    p.send_signal(signal.SIGKILL)
    p.wait()
    assert not (out / "report.json").exists(), "the kill came too late to interrupt the run"
    assert not (out / "refined.star").exists()
    # without --resume (or --force) the folder holding the checkpoint is refused
    again = subprocess.run(_cmd(star, out), env=_env(), capture_output=True, text=True, timeout=300)
    assert again.returncode == 2 and "--resume" in again.stderr
    # a resumed run must keep the options that shape the result
    bad = subprocess.run(_cmd(star, out, "--resume", "--steps", "13"), env=_env(), capture_output=True, text=True,
                         timeout=300)
    assert bad.returncode == 2 and "--steps" in bad.stderr and len(bad.stderr.strip().splitlines()) == 1
    res = subprocess.run(_cmd(star, out, "--resume"), env=_env(), capture_output=True, text=True, timeout=900)
    assert res.returncode == 0, res.stderr[-2000:]
    a, b = read_particles(tmp_path / "full" / "refined.star"), read_particles(out / "refined.star")
    # same process settings, same state at the checkpoint, deterministic CPU kernels: bit-identical
    np.testing.assert_array_equal(a.rotmat, b.rotmat)
    np.testing.assert_array_equal(a.shift_A, b.shift_A)
    for name in ("half1.mrc", "half2.mrc", "map.mrc"):
        np.testing.assert_array_equal(mrcfile.read(tmp_path / "full" / name), mrcfile.read(out / name), err_msg=name)
    import json

    rep = json.loads((out / "report.json").read_text())
    assert rep["resumed_after_iteration"] >= 1
    ref = json.loads((tmp_path / "full" / "report.json").read_text())
    assert [h["resolution_A"] for h in rep["iterations"]] == [h["resolution_A"] for h in ref["iterations"]]


def test_resume_without_checkpoint_is_refused(sim, tmp_path):
    from cryogmm.cli import main as cli

    (tmp_path / "o").mkdir()
    assert cli(["refine-poses", str(sim / "particles.star"), "--out", str(tmp_path / "o"), "--resume"]) == 2
    assert os.listdir(tmp_path / "o") == []


def test_report_splits_the_time_into_phases(sim, tmp_path):
    """The report says where the time went: each iteration's mixture fits and its align + insert
    pass (parts of the iteration's seconds), and the job's read / start maps / iterations / write
    (parts of the job's seconds)."""
    import json

    from cryogmm.cli import main as cli

    out = tmp_path / "o"
    assert cli(["refine-poses", str(sim / "particles.star"), "--out", str(out), "--iterations", "2", "--steps", "3",
                "--fit-iterations", "10", "--max-gaussians", "100", "--device", "cpu"]) == 0
    rep = json.loads((out / "report.json").read_text())
    for h in rep["iterations"]:
        assert h["seconds_fit"] > 0 and h["seconds_align"] > 0
        assert h["seconds_fit"] + h["seconds_align"] <= h["seconds"]
        assert h["particles_per_s"] == pytest.approx(rep["n_aligned"] / h["seconds_align"])
    ph = rep["seconds_phases"]
    assert ph["iterations"] == pytest.approx(sum(h["seconds"] for h in rep["iterations"]))
    assert min(ph["read"], ph["start_maps"], ph["write"]) > 0
    assert ph["read"] + ph["start_maps"] + ph["iterations"] + ph["write"] <= rep["seconds"]


def test_device_scatter_equals_the_sorted_scatter():
    """The sort-free scatter (one index_add_ per channel, used off the CPU) adds the same values
    as the CPU's sorted, chunked one."""
    from cryogmm.core.rotations import random_rotations
    from cryogmm.recon.accumulator import FourierAccumulator

    rng = np.random.default_rng(3)
    box, B = 24, 12
    imgs = torch.as_tensor(rng.normal(size=(B, box, box)), dtype=torch.float32)
    R = torch.as_tensor(random_rotations(B, rng), dtype=torch.float32)
    sh = torch.as_tensor(rng.normal(0, 2, (B, 2)), dtype=torch.float32)
    sets = torch.as_tensor(rng.integers(0, 2, B))
    f = torch.fft.rfft2(torch.fft.ifftshift(imgs, dim=(-2, -1)))
    a = FourierAccumulator(box, 2.0, grid_dtype=torch.float64)
    b = FourierAccumulator(box, 2.0, grid_dtype=torch.float64)
    a.insert_ft(f, R, sh, None, sets)
    key, order, pts = b._slice_points(f, R, sh, None, sets)
    assert order is not None  # on the CPU the keys come sorted
    key_unsorted = torch.empty_like(key)
    key_unsorted[order] = key  # back in the particles' order, as off the CPU
    b._scatter_device(key_unsorted, pts)
    assert torch.allclose(a.grid, b.grid, rtol=0, atol=1e-12 * float(a.grid.abs().max()))
    assert a.grid.abs().sum() > 0


def test_mixed_half_batch_equals_per_half_batches():
    """A batch holding both half sets (each particle its own half's mixture, sets padded to one
    size) refines every particle as a batch of its half alone does."""
    from cryogmm.core.ctf import CtfParams, ctf_rfft2
    from cryogmm.core.gaussians import Gaussians
    from cryogmm.core.rotations import random_rotations
    from cryogmm.poses.align import BandFrc, refine_batch, stack_mixtures

    rng = np.random.default_rng(1)
    box, apix, B = 32, 3.0, 6
    gs = [Gaussians(torch.as_tensor(rng.normal(0, 12, (n, 3)), dtype=torch.float32), torch.rand(n) + 0.5,
                    torch.full((n,), 3.0)) for n in (40, 33)]
    band = BandFrc(box, apix, 2, 10)
    x = band.crop_ft(torch.as_tensor(rng.normal(size=(B, box, box)), dtype=torch.float32))
    c = band.band(ctf_rfft2(CtfParams(defocus_u_A=np.full(B, 15000.0), defocus_v_A=np.full(B, 14000.0),
                                      defocus_angle_deg=10.0, voltage_kV=300.0, cs_mm=2.7, amp_contrast=0.1),
                            band.crop, band.apix_crop))
    A0 = torch.as_tensor(random_rotations(B, rng), dtype=torch.float32)
    s0 = torch.as_tensor(rng.normal(0, 1, (B, 2)), dtype=torch.float32)
    sets = torch.tensor([0, 1, 1, 0, 1, 0])
    mix = stack_mixtures(gs)
    kw = dict(steps=8, lr_rad=0.02, lr_A=0.3)
    A, sh, score = refine_batch(Gaussians(mix.centers[sets], mix.amplitudes[sets], mix.sigmas[sets]), band, x, c,
                                A0, s0, **kw)
    for h in (0, 1):
        sel = torch.nonzero(sets == h).squeeze(1)
        Ah, shh, sch = refine_batch(gs[h], band, x[sel], c[sel], A0[sel], s0[sel], **kw)
        assert torch.allclose(A[sel], Ah, atol=2e-5) and torch.allclose(sh[sel], shh, atol=2e-4)
        assert torch.allclose(score[sel], sch, atol=2e-5)
    assert (A - A0).abs().max() > 1e-3  # the poses did move


def test_project_map_in_memory_budget_equals_the_dense_grid():
    """project_map by planes under a small memory budget equals the sum of trilinear samples on
    the whole [B, N^3, 3] point grid (float64: to rounding)."""
    from cryogmm.core.projection import project_map
    from cryogmm.core.rotations import random_rotations

    rng = np.random.default_rng(2)
    n, apix = 20, 1.3
    v = torch.as_tensor(rng.normal(size=(n, n, n)))
    R = torch.as_tensor(random_rotations(3, rng))
    o = torch.as_tensor(rng.normal(0, 2, (3, 2)))
    ax = (torch.arange(n, dtype=v.dtype) - n // 2) * apix
    zz, yy, xx = torch.meshgrid(ax, ax, ax, indexing="ij")
    p = torch.stack([xx, yy, zz], -1)[None] + torch.cat([o, torch.zeros(3, 1, dtype=v.dtype)], 1)[:, None, None, None]
    r = torch.einsum("bzyxj,bjk->bzyxk", p, R)
    grid = (r / apix + n // 2) * (2.0 / (n - 1)) - 1.0
    dense = torch.nn.functional.grid_sample(v[None, None].expand(3, -1, -1, -1, -1), grid, mode="bilinear",
                                            padding_mode="zeros", align_corners=True)[:, 0].sum(1)
    for budget in (None, 16 * n * n * 3, 1):  # everything at once, 3 planes, one plane
        got = project_map(v, R, o, apix, max_bytes=budget)
        assert torch.allclose(got, dense, rtol=0, atol=1e-10), budget
    assert dense.abs().max() > 1


@pytest.mark.slow
def test_padded_last_batch_gives_the_same_poses(sim, tmp_path, monkeypatch):
    """The fixed-size batches of GPUs (the last one padded with copies, dropped afterwards) give
    the poses and maps of unpadded batches (run here on the CPU)."""
    from cryogmm.bridge.io import read_particles
    from cryogmm.poses import job
    from cryogmm.poses.job import RefineConfig, refine_poses

    kw = dict(star=sim / "particles.star", iterations=1, steps=10, fit_iterations=30, max_gaussians=150, batch=64,
              device="cpu", seed=3)
    refine_poses(RefineConfig(out=tmp_path / "plain", **kw))
    monkeypatch.setattr(job, "PAD_ON_CPU", True)
    refine_poses(RefineConfig(out=tmp_path / "padded", **kw))
    a, b = read_particles(tmp_path / "plain" / "refined.star"), read_particles(tmp_path / "padded" / "refined.star")
    np.testing.assert_allclose(a.rotmat, b.rotmat, atol=1e-5)
    np.testing.assert_allclose(a.shift_A, b.shift_A, atol=1e-4)
    m1, m2 = (mrcfile.read(tmp_path / r / "map.mrc") for r in ("plain", "padded"))
    assert np.abs(m1 - m2).max() <= 1e-4 * np.abs(m1).max()
