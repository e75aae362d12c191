"""Half-set cross-validation of heterogeneity (issue 18, item 3): ``hetero train --halves``
trains one network per rlnRandomSubset half; ``analyze`` scores every state's model from each
half against both halves' back-projected maps. The bias test: a run whose half 1 was trained
from a reference with a displaced region is flagged; the clean run is not. Bad --halves input is
refused (one line, exit 2, nothing written). HIV protease particles (not adenylate kinase)."""

import json
import shutil

import numpy as np
import pytest
import torch

from cryogmm.bridge.io import read_particles, write_particles
from cryogmm.bridge.results import with_results
from cryogmm.hetero.crossval import fsc_tolerance, map_quality, normalised_fsc
from cryogmm.io.structures import read_model, write_models

from test_hetero_null import protein_only

N = 400


def _train_args(star, model, out, sim):
    return ["hetero", "train", str(star), "--model", str(model), "--out", str(out), "--map", str(sim / "truth_map.mrc"),
            "--segments", "8", "--zdim", "2", "--epochs", "6", "--batch", "32", "--lowpass-A", "10",
            "--kl-warmup", "2", "--device", "cpu"]


def displaced(model_path, out, first=40, last=60, shift_A=6.0):
    """The model with residues ``first..last`` of its first chain moved rigidly by ``shift_A``
    away from the molecule's centre (a wrong reference region)."""
    m = read_model(model_path)
    x = m.coords[0].copy()
    chain0 = m.chain == m.chain[0]
    sel = chain0 & (m.seq_id >= first) & (m.seq_id <= last)
    d = x[sel].mean(0) - x.mean(0)
    x[sel] += shift_A * d / np.linalg.norm(d)
    write_models(out, m, x[None])
    return out, sel


@pytest.fixture(scope="module")
def halves_sim(tmp_path_factory):
    """400 protease particles (box 36 at 2.5 Å, SNR 1, rlnRandomSubset from the simulator) and
    a clean --halves run (segments, 6 epochs per half)."""
    from cryogmm.cli import main
    from cryogmm.simulate.particles import SimulateConfig, simulate

    d = tmp_path_factory.mktemp("crossval")
    model = protein_only(d / "hivp.pdb")
    simulate(SimulateConfig(out=d / "sim", model=model, n=N, box=36, apix=2.5, snr=1.0, seed=5, device="cpu"))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert main(_train_args(d / "sim" / "particles.star", model, d / "clean", d / "sim") + ["--halves"]) == 0
    finally:
        torch.set_num_threads(threads)
    return d, model


@pytest.mark.slow
def test_halves_run_layout(halves_sim):
    d, _ = halves_sim
    run = d / "clean"
    meta = json.loads((run / "halves.json").read_text())
    rep = json.loads((run / "report.json").read_text())
    assert meta["halves"] == ["half1", "half2"] and sum(meta["n_half"]) == N == rep["n_particles"]
    full = read_particles(d / "sim" / "particles.star")
    for h, name in ((1, "half1"), (2, "half2")):
        t = read_particles(run / name / "particles.star")
        assert (t.half_set == h).all() and t.n == int((full.half_set == h).sum())
        assert (run / name / "checkpoint.pt").is_file()
        assert json.loads((run / name / "report.json").read_text())["n_particles"] == t.n
    assert read_particles(run / "particles.star").n == N
    # decode on the halves folder itself names the halves (one line, exit 2)
    from cryogmm.cli import main

    (d / "z.txt").write_text("0 0\n")
    assert main(["hetero", "decode", str(run), "--z", str(d / "z.txt"), "--out", str(d / "dec")]) == 2
    assert not (d / "dec").exists()


@pytest.mark.slow
def test_wrong_reference_in_one_half_is_flagged_clean_is_not(halves_sim, capsys):
    from cryogmm.cli import main

    d, model = halves_sim
    # the clean run: nothing flagged
    assert main(["hetero", "analyze", str(d / "clean"), "--out", str(d / "an_clean"), "--pcs", "1", "--frames", "2",
                 "--clusters", "2", "--no-backproject", "--device", "cpu"]) == 0
    assert "flagged: none" in capsys.readouterr().out
    clean = json.loads((d / "an_clean" / "report.json").read_text())["crossval"]
    scored = [s for s in clean["states"] if "skipped" not in s]
    assert len(scored) == 2 and clean["flagged_states"] == []
    for s in scored:
        # both halves' models fit both halves' maps (the same conformation)
        assert min(s[k] for k in ("model1_vs_map1", "model1_vs_map2", "model2_vs_map2", "model2_vs_map1")) > 0.5, s
        for f in s["files"]:
            assert (d / "an_clean" / f).is_file(), f
    for f in ("crossval.png", "crossval_models_half1.pdb", "crossval_models_half2.pdb"):
        assert (d / "an_clean" / f).is_file(), f

    # half 1 given a reference with a displaced region; half 2 as before
    wrong = d / "wrong"
    wrong.mkdir()
    for f in ("halves.json", "particles.star"):
        shutil.copy(d / "clean" / f, wrong / f)
    shutil.copytree(d / "clean" / "half2", wrong / "half2")
    bad_model, moved = displaced(model, d / "hivp_displaced.pdb")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert main(_train_args(d / "clean" / "half1" / "particles.star", bad_model, wrong / "half1", d / "sim")) == 0
    finally:
        torch.set_num_threads(threads)
    assert main(["hetero", "analyze", str(wrong), "--out", str(d / "an_wrong"), "--pcs", "1", "--frames", "2",
                 "--clusters", "2", "--no-backproject", "--device", "cpu"]) == 0
    rep = json.loads((d / "an_wrong" / "report.json").read_text())["crossval"]
    scored = [s for s in rep["states"] if "skipped" not in s]
    assert sorted(rep["flagged_states"]) == sorted(s["state"] for s in scored), rep["flagged_states"]
    for s in scored:
        # half 1's model is the one the independent half does not support
        assert "half1_other_model_better" in s["flags"], s["flags"]
        assert not any(f.startswith("half2") for f in s["flags"]), s["flags"]
        assert s["model1_vs_map2"] < s["model2_vs_map2"] - s["tolerance"]
    # the decoded half-1 models still carry the displaced region (what was flagged is real)
    m1 = read_model(d / "an_wrong" / "crossval_models_half1.pdb").coords
    truth = read_model(model).coords[0]
    dev = np.sqrt(((m1[:, moved] - truth[moved]) ** 2).sum(-1).mean(-1))
    assert dev.min() > 2.0, dev


def test_fsc_tolerance_and_normalisation():
    box, shells = 32, 8
    ones = np.ones(box // 2 + 1)
    mask = torch.ones(box, box, box)
    zero = [np.zeros(box // 2 + 1)] * 2
    high = [np.full(box // 2 + 1, 0.95)] * 2
    t0 = fsc_tolerance(zero, [ones] * 2, ones, mask, box, shells, min_tol=0.0)
    assert fsc_tolerance(high, [ones] * 2, ones, mask, box, shells, min_tol=0.0) < 0.2 * t0  # (1 - F^2)
    small = mask.clone()
    small[:, :, : box // 2] = 0
    assert fsc_tolerance(zero, [ones] * 2, ones, small, box, shells, min_tol=0.0) == pytest.approx(t0 * np.sqrt(2))
    assert fsc_tolerance(zero, [0.5 * ones] * 2, ones, mask, box, shells, min_tol=0.0) == pytest.approx(2 * t0)
    assert fsc_tolerance(high, [ones] * 2, ones, mask, box, shells, min_tol=0.05) == 0.05
    # a map of half the quality (C_ref) shows a model at half the FSC: normalised, the same
    rng = np.random.default_rng(0)
    cref = rng.uniform(0.3, 1.0, box // 2 + 1)
    model = rng.uniform(0.2, 0.9, box // 2 + 1)
    w = rng.uniform(0.1, 1.0, box // 2 + 1)
    assert normalised_fsc(model * cref, cref, w, shells) == pytest.approx(
        normalised_fsc(model * 0.5 * cref, 0.5 * cref, w, shells))
    assert normalised_fsc(0.7 * cref, cref, w, shells) == pytest.approx(0.7)
    # C_ref of two random halves: identical halves give 1, independent noise about 0
    a = torch.as_tensor(rng.standard_normal((box, box, box)))
    assert map_quality(a, a, mask)[1:shells + 1] == pytest.approx(1.0)
    assert np.abs(map_quality(a, torch.as_tensor(rng.standard_normal((box, box, box))), mask)[3:shells + 1]).max() < 0.6


def _star_with_halves(tmp_path, n, half):
    from cryogmm.bridge.table import ParticleTable
    from cryogmm.simulate.particles import SimulateConfig, simulate

    model = protein_only(tmp_path / "hivp.pdb")
    simulate(SimulateConfig(out=tmp_path / "sim", model=model, n=n, box=24, apix=4.0, snr=1.0, seed=1,
                            device="cpu"))
    t = read_particles(tmp_path / "sim" / "particles.star")
    if half is None:
        t = ParticleTable(t.particles.drop(columns="rlnRandomSubset"), t.optics, source=t.source)
    else:
        t = with_results(t, columns={"rlnRandomSubset": np.asarray(half)})
    star = tmp_path / "sim" / "input.star"
    write_particles(t, star)
    return star, model


@pytest.mark.parametrize("case", ["missing", "partial", "unequal"])
def test_bad_halves_refused(tmp_path, capsys, case):
    from cryogmm.cli import main

    n = 40
    half = {"missing": np.ones(n, int), "partial": np.r_[np.ones(20, int), np.full(19, 2), [0]],
            "unequal": np.r_[np.ones(28, int), np.full(12, 2)]}[case]
    star, model = _star_with_halves(tmp_path, n, None if case == "missing" else half)
    rc = main(["hetero", "train", str(star), "--model", str(model), "--out", str(tmp_path / "run"), "--halves",
               "--epochs", "1", "--device", "cpu"])
    err = capsys.readouterr().err
    assert rc == 2 and len(err.strip().splitlines()) == 1 and str(star) in err, err
    assert ("rlnRandomSubset" in err) if case != "unequal" else ("unequal" in err)
    assert not (tmp_path / "run").exists()
