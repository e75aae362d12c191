"""Reconstruction: noise-free sets reach Nyquist, FSC grows with particle count, and the job
writes what it promises."""

import json

import numpy as np
import pytest
import torch

from cryogmm.cli import main as cli
from cryogmm.demo import example_model
from cryogmm.io.structures import gaussians_from_model
from cryogmm.core.gaussians import gaussians_to_map
from cryogmm.io.maps import read_map
from cryogmm.core.similarity import fsc, real_space_correlation, resolution_at
from cryogmm.core.fourier import lowpass
from cryogmm.core.projection import project
from cryogmm.recon.accumulator import FourierAccumulator
from cryogmm.core.rotations import random_rotations


def test_noise_free_reconstruction_reaches_nyquist():
    """Projections without CTF or noise: half maps agree to Nyquist, the map matches the truth."""
    box, apix = 32, 3.0
    g = gaussians_from_model(example_model("open"), "residue2", resolution_A=2 * apix)
    truth = gaussians_to_map(g, box, apix)
    R = torch.as_tensor(random_rotations(800, np.random.default_rng(0)), dtype=torch.float32)
    sh = torch.as_tensor(np.random.default_rng(1).normal(0, 2, (800, 2)), dtype=torch.float32)
    acc = FourierAccumulator(box, apix)
    for i in range(0, 800, 200):
        s = slice(i, i + 200)
        acc.insert(project(g, R[s], sh[s], box, apix), R[s], sh[s], None, torch.arange(i, i + 200) % 2)
    h1, h2 = acc.reconstruct([0]), acc.reconstruct([1])
    curve = fsc(h1, h2)
    assert resolution_at(curve, box, apix, 0.143) <= 2.2 * apix
    m = acc.reconstruct()
    # against the truth over the frequencies a reconstruction can hold (inside Nyquist)
    cc = real_space_correlation(lowpass(m, 2.2 * apix, apix), lowpass(truth, 2.2 * apix, apix))
    assert cc > 0.98
    assert fsc(m, truth)[1:12].min() > 0.95  # 3/4 of Nyquist; beyond, the truth map holds aliased power


@pytest.fixture(scope="module")
def noisy(tmp_path_factory):
    out = tmp_path_factory.mktemp("noisy") / "sim"
    assert cli(["simulate", "--model", str(example_model("open")), "--n", "1600", "--box", "40", "--apix", "3",
                "--snr", "0.05", "--seed", "3", "--out", str(out)]) == 0
    return out


def test_fsc_improves_with_particle_count(noisy, tmp_path):
    """More particles, better resolution; the full set correlates with the truth."""
    import starfile

    blocks = starfile.read(noisy / "particles.star", always_dict=True)
    res = {}
    for n in (200, 1600):
        star = tmp_path / f"p{n}.star"
        starfile.write({"optics": blocks["optics"], "particles": blocks["particles"].iloc[:n]}, star)
        # the stack is beside the original STAR
        assert cli(["reconstruct", str(star), "--out", str(tmp_path / f"r{n}"), "--project-dir", str(noisy)]) == 0
        res[n] = json.loads((tmp_path / f"r{n}" / "report.json").read_text())
    assert res[1600]["resolution_A"] < res[200]["resolution_A"] - 1.0
    curve200 = np.array(res[200]["fsc"]["masked"])
    curve1600 = np.array(res[1600]["fsc"]["masked"])
    assert np.mean(curve1600[2:12]) > np.mean(curve200[2:12])
    m, apix = read_map(tmp_path / "r1600" / "map.mrc")
    t, _ = read_map(noisy / "truth_map.mrc")
    r = res[1600]["resolution_A"]
    cc = real_space_correlation(lowpass(torch.as_tensor(m), r, apix), lowpass(torch.as_tensor(t), r, apix))
    assert cc > 0.9


def test_reconstruct_outputs_and_report(noisy, tmp_path):
    out = tmp_path / "rec"
    assert cli(["reconstruct", str(noisy / "particles.star"), "--out", str(out)]) == 0
    for f in ("map.mrc", "half1.mrc", "half2.mrc", "fsc.png", "report.json"):
        assert (out / f).is_file(), f
    rep = json.loads((out / "report.json").read_text())
    assert rep["n_half1"] + rep["n_half2"] == 1600 and rep["halves_from_star"]
    assert 2 * 3.0 <= rep["resolution_A"] < 20
    assert not list(out.glob(".partial-*"))
