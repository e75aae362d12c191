"""Simulation: seeded, known truth, heterogeneous sets, noise at the requested SNR."""

import json

import mrcfile
import numpy as np
import pytest
import starfile

from cryogmm.cli import main as cli
from cryogmm.demo import example_model


def sim(tmp_path, name, *extra):
    out = tmp_path / name
    rc = cli(["simulate", "--model", str(example_model("open")), "--n", "60", "--box", "40", "--apix", "3",
              "--seed", "5", "--out", str(out), *extra])
    assert rc == 0
    return out


def test_outputs_and_seeding(tmp_path):
    a = sim(tmp_path, "a")
    b = sim(tmp_path, "b")
    for f in ("particles.star", "particles.mrcs", "truth.star", "truth_map.mrc", "report.json"):
        assert (a / f).is_file()
    np.testing.assert_array_equal(mrcfile.read(a / "particles.mrcs"), mrcfile.read(b / "particles.mrcs"))
    blocks = starfile.read(a / "particles.star", always_dict=True)
    assert set(blocks) == {"optics", "particles"}
    assert blocks["optics"]["rlnImagePixelSize"].iloc[0] == 3.0
    assert len(blocks["particles"]) == 60
    with mrcfile.open(a / "particles.mrcs") as m:
        assert m.data.shape == (60, 40, 40) and m.voxel_size.x == pytest.approx(3.0)


def test_noise_matches_snr(tmp_path):
    clean = mrcfile.read(sim(tmp_path, "clean", "--snr", "inf") / "particles.mrcs")
    noisy_dir = sim(tmp_path, "noisy", "--snr", "0.5")
    noisy = mrcfile.read(noisy_dir / "particles.mrcs")
    noise = noisy - clean
    snr = clean.var(axis=(1, 2)).mean() / noise.var()
    assert snr == pytest.approx(0.5, rel=0.1)
    rep = json.loads((noisy_dir / "report.json").read_text())
    assert rep["noise_sd"] == pytest.approx(float(noise.std()), rel=0.02)


def test_pose_perturbation_recorded_against_truth(tmp_path):
    from cryogmm.bridge.io import read_particles

    out = sim(tmp_path, "pert", "--pose-noise-deg", "5", "--shift-noise-A", "2")
    obs, truth = read_particles(out / "particles.star"), read_particles(out / "truth.star")
    rel = np.einsum("nij,nkj->nik", obs.rotmat, truth.rotmat)
    ang = np.degrees(np.arccos(np.clip((np.trace(rel, axis1=1, axis2=2) - 1) / 2, -1, 1)))
    assert 2.0 < np.sqrt(np.mean(ang**2)) < 10.0
    d = obs.shift_A - truth.shift_A
    assert 1.0 < d.std() < 3.0


def test_heterogeneous_endpoints_record_true_frame(tmp_path):
    out = tmp_path / "het"
    rc = cli(["simulate", "--endpoints", str(example_model("open")), str(example_model("closed")),
              "--frames", "5", "--n", "50", "--box", "48", "--apix", "3", "--seed", "2", "--out", str(out)])
    assert rc == 0
    truth = starfile.read(out / "truth.star", always_dict=True)["particles"]
    frames = truth["rlnCryogmmTrueFrame"].to_numpy()
    assert frames.min() >= 0 and frames.max() <= 4 and len(np.unique(frames)) > 2
    import gemmi

    st = gemmi.read_structure(str(out / "truth_models.pdb"))
    assert len(st) == 5
    first = np.array([a.pos.tolist() for r in st[0][0] for a in r])
    last = np.array([a.pos.tolist() for r in st[4][0] for a in r])
    open_ = gemmi.read_structure(str(example_model("open")))
    ref = np.array([a.pos.tolist() for r in open_[0][0] for a in r])
    np.testing.assert_allclose(first, ref, atol=1e-3)
    assert np.sqrt(((first - last) ** 2).sum(1).mean()) > 3.0  # open and closed differ by several Å
