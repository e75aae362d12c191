"""hetero analyze (issue 18): the free-energy landscape, state occupancies with half-set
errors, per-particle fit scores and junk rejection (--junk), on HIV protease particles with
10 % junk (pure noise and images of another protein); bad --junk values."""

import json
from importlib import resources
from pathlib import Path

import mrcfile
import numpy as np
import pytest
import torch

from cryogmm.bridge.images import ImageSource
from cryogmm.bridge.io import read_particles
from cryogmm.core.similarity import fsc
from cryogmm.hetero import config as hetero_config
from cryogmm.hetero import train as hetero_train
from cryogmm.hetero.landscape import fit_z, free_energy, mahalanobis, occupancies, robust_low_z
from cryogmm.io import maps as mapio
from cryogmm.recon.job import reconstruct_table

from test_hetero_null import protein_only

N, JUNK = 400, 40


def test_free_energy_grid():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((4000, 2))
    land = free_energy(x, 20)
    f, occ = land["free_energy"], land["occupancy"]
    assert f.shape == occ.shape == (20, 20) and occ.sum() == 4000
    assert np.nanmin(f) == 0 and np.isnan(f[occ == 0]).all() and np.isfinite(f[occ > 0]).all()
    # a Gaussian density: the free energy grows as r^2/2 (kT) away from the centre
    c = land["centers"]
    i, j = np.unravel_index(np.nanargmax(np.where(occ > 50, f, np.nan)), f.shape)
    r2 = c[0][i] ** 2 + c[1][j] ** 2
    assert abs(f[i, j] - 0.5 * r2) < 1.0
    one = free_energy(x[:, :1], 30)
    assert len(one["edges"]) == 1 and one["free_energy"].shape == (30,)


def test_occupancies_and_scores():
    labels = np.array([0] * 60 + [1] * 40 + [0] * 50 + [1] * 50)
    half = np.array([1] * 100 + [2] * 100)
    o = occupancies(labels, 2, half)
    assert o["method"] == "halves"
    np.testing.assert_allclose(o["occupancy"], [0.55, 0.45])
    np.testing.assert_allclose(o["error"], [0.05, 0.05])
    b = occupancies(labels, 2, np.zeros(200, int))
    assert b["method"] == "bootstrap" and 0.02 < b["error"][0] < 0.06
    s = np.r_[np.random.default_rng(1).normal(100, 10, 500), [0.0, 10.0]]
    zs = robust_low_z(s)
    assert zs[-2] > 8 and zs[-1] > 7 and np.median(zs) == pytest.approx(0, abs=1e-9)
    z = np.r_[np.random.default_rng(2).standard_normal((300, 3)), [[8.0, 8.0, 8.0]]]
    assert mahalanobis(z).argmax() == 300


def test_fit_z_combines_both_parts_of_the_residual():
    """The bulk's junk score is ~N(0, 1); an image with too little of the model along it (noise),
    one with unexplained signal left in it (another molecule) and one with both score high."""
    rng = np.random.default_rng(3)
    t = np.r_[rng.standard_normal(2000), [-6.0, 0.0, -4.0]]
    res = np.r_[500 + 30 * rng.standard_normal(2000), [500.0, 700.0, 620.0]]
    z = fit_z(t, res)
    assert abs(np.median(z[:2000])) < 0.1 and 0.9 < np.std(z[:2000]) < 1.1
    assert (z[2000:] > 3.5).all() and z[2002] > z[2000]
    np.testing.assert_allclose(z, (robust_low_z(t) + robust_low_z(-res)) / np.sqrt(2))


@pytest.fixture(scope="module")
def junk_sim(tmp_path_factory):
    """400 protease particles (box 36 at 2.5 Å, SNR 1), 40 of them replaced by junk: 20 images
    of pure noise of the same SD, 20 of another protein (adenylate kinase, simulated at the same
    SNR with poses and CTFs of its own); a segments run (6 epochs) on all 400."""
    from cryogmm.simulate.particles import SimulateConfig, simulate

    d = tmp_path_factory.mktemp("junk")
    model = protein_only(d / "hivp.pdb")
    rep = simulate(SimulateConfig(out=d / "sim", model=model, n=N, box=36, apix=2.5, snr=1.0, seed=3, device="cpu"))
    rng = np.random.default_rng(7)
    junk = np.sort(rng.choice(N, JUNK, replace=False))
    adk = Path(str(resources.files("cryogmm.data"))) / "adk_open.pdb"
    simulate(SimulateConfig(out=d / "adk", model=adk, n=JUNK // 2, box=36, apix=2.5, snr=1.0, seed=11, device="cpu"))
    with mrcfile.open(d / "adk" / "particles.mrcs") as m:
        other = np.array(m.data)
    noise = rng.standard_normal((JUNK - JUNK // 2, 36, 36)) * rep["noise_sd"]
    with mrcfile.mmap(d / "sim" / "particles.mrcs", mode="r+") as m:
        m.data[junk] = np.concatenate([noise, other]).astype(np.float32)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        hetero_train.train_hetero(hetero_config.HeteroConfig(
            star=d / "sim" / "particles.star", model=model, out=d / "run", map=d / "sim" / "truth_map.mrc",
            decoder="segments", segments=8, zdim=2, epochs=6, batch=32, lowpass_A=10.0, kl_warmup=2, seed=0,
            device="cpu"))
    finally:
        torch.set_num_threads(threads)
    return d, junk


def _mean_fsc_to_truth(sim, table, sel, truth):
    sub = table.subset(sel).with_half_sets()
    src = ImageSource.from_table(sub)
    _, _, vol, _ = reconstruct_table(sub, src, device="cpu")
    src.close()
    return float(fsc(vol, truth)[1:10].mean())  # shells to 10 Å (36 px at 2.5 Å)


def test_junk_is_rejected_and_the_kept_map_is_clean(junk_sim, capsys):
    from cryogmm.cli import main

    d, junk = junk_sim
    out = d / "an"
    rc = main(["hetero", "analyze", str(d / "run"), "--out", str(out), "--pcs", "1", "--frames", "2", "--clusters",
               "2", "--no-backproject", "--junk", "3", "--device", "cpu"])
    assert rc == 0
    assert "rejected" in capsys.readouterr().out
    rep = json.loads((out / "report.json").read_text())
    sim = d / "sim"
    table = read_particles(sim / "particles.star")
    names = table.particles["rlnImageName"].to_numpy()
    rejected = set(read_particles(out / "rejected.star").particles["rlnImageName"])
    kept = read_particles(out / "kept.cs")
    assert kept.n + len(rejected) == N and rep["junk"]["rejected"]["n"] == len(rejected)
    tp = len(rejected & set(names[junk]))
    precision, recall = tp / max(1, len(rejected)), tp / JUNK
    assert precision >= 0.9 and recall >= 0.9, (precision, recall)
    for name in ("kept.star", "rejected.cs", "kept_map.mrc", "rejected_map.mrc", "landscape.png", "landscape.npz"):
        assert (out / name).is_file(), name
    # the kept particles' map is as good as the clean set's (FSC to the true map, to 10 Å)
    truth = torch.as_tensor(mapio.read_map(sim / "truth_map.mrc")[0])
    clean = np.setdiff1d(np.arange(N), junk)
    kept_idx = np.flatnonzero(~np.isin(names, list(rejected)))
    f_clean = _mean_fsc_to_truth(sim, table, clean, truth)
    f_kept = _mean_fsc_to_truth(sim, table, kept_idx, truth)
    assert f_kept >= f_clean - 1e-3, (f_kept, f_clean)
    assert rep["junk"]["kept"]["resolution_A"] < rep["junk"]["rejected"]["resolution_A"]
    # per-particle scores in the latent table; both kinds of junk score above every particle
    lat = read_particles(out / "particles_latent.star").particles
    fz = lat["rlnCryogmmFitZ"].to_numpy()
    assert fz[junk].min() > np.delete(fz, junk).max()
    assert {"rlnCryogmmFitScore", "rlnCryogmmFitT", "rlnCryogmmFitResidual", "rlnCryogmmLatentOutlier"} <= set(lat.columns)
    # landscape: free energy over PC1/PC2 with trajectory and centres; occupancies from the halves
    land = np.load(out / "landscape.npz")
    f, occ = land["free_energy"], land["occupancy"]
    assert f.ndim == 2 and occ.sum() == N and np.nanmin(f) == 0 and np.isnan(f[occ == 0]).all()
    assert land["edges_pc1"].shape == (f.shape[0] + 1,) and land["centers_pc"].shape == (2, 2)
    assert "trajectory_pc1" in land
    assert rep["occupancy_error_method"] == "halves"
    occ_sum = sum(c["occupancy"] for c in rep["clusters"])
    assert occ_sum == pytest.approx(1.0) and all(c["occupancy_error"] >= 0 for c in rep["clusters"])


def test_one_dimensional_latent_gets_a_profile(tmp_path):
    from cryogmm.hetero.analyze import AnalyzeConfig, analyze_hetero
    from cryogmm.simulate.particles import SimulateConfig, simulate

    model = protein_only(tmp_path / "hivp.pdb")
    simulate(SimulateConfig(out=tmp_path / "sim", model=model, n=120, box=36, apix=2.5, snr=1.0, seed=1,
                            device="cpu"))
    hetero_train.train_hetero(hetero_config.HeteroConfig(
        star=tmp_path / "sim" / "particles.star", model=model, out=tmp_path / "run", map=tmp_path / "sim" / "truth_map.mrc",
        decoder="displacement", zdim=1, epochs=1, batch=60, lowpass_A=12.0, seed=0, device="cpu", hidden=32))
    rep = analyze_hetero(AnalyzeConfig(run=tmp_path / "run", pcs=1, frames=2, clusters=2, backproject=False,
                                       device="cpu"))
    land = np.load(tmp_path / "run" / "analyze" / "landscape.npz")
    assert rep["landscape"]["dims"] == 1 and land["free_energy"].ndim == 1 and "edges_pc2" not in land
    assert (tmp_path / "run" / "analyze" / "landscape.png").is_file()


@pytest.mark.parametrize("value", ["0", "-1", "nan", "inf", "x"])
def test_bad_junk_threshold(tmp_path, capsys, value):
    from cryogmm.cli import main

    rc = main(["hetero", "analyze", str(tmp_path / "run"), "--out", str(tmp_path / "an"), "--junk", value])
    err = capsys.readouterr().err
    assert rc == 2 and "--junk" in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "an").exists()
