"""Gaussians from atomic models (three levels), and simulation from maps and trajectories."""

import json

import numpy as np
import pytest
import torch

from cryogmm.cli import main as cli
from cryogmm.demo import example_model
from cryogmm.core.gaussians import ELECTRONS, gaussians_to_map, sigma_from_resolution
from cryogmm.io.structures import gaussians_from_coords, read_model
from cryogmm.io.maps import read_map
from cryogmm.core.fourier import lowpass
from cryogmm.core.similarity import real_space_correlation


@pytest.fixture(scope="module")
def adk():
    return read_model(example_model("open"))


def test_heavy_atoms_and_electrons(adk):
    assert adk.coords.shape == (1, 1656, 3)
    assert set(adk.element) <= {"C", "N", "O", "S"}
    g = gaussians_from_coords(adk, adk.coords[0], "atoms", resolution_A=4.0)
    assert g.n == 1656
    assert g.amplitudes.sum().item() == pytest.approx(sum(ELECTRONS[e] for e in adk.element))
    assert torch.allclose(g.sigmas, torch.tensor(sigma_from_resolution(4.0)))
    # centred on the electron-weighted centre
    c = (g.centers * g.amplitudes[:, None]).sum(0) / g.amplitudes.sum()
    assert c.abs().max().item() < 1e-3


@pytest.mark.parametrize("mode, min_cc", [("ca", 0.95), ("residue2", 0.97)])
def test_coarse_levels_keep_mass(adk, mode, min_cc):
    n_res = len(np.unique(adk.res_id))
    n_gly = len(np.unique(adk.res_id[adk.res_name == "GLY"]))
    g = gaussians_from_coords(adk, adk.coords[0], mode, resolution_A=4.0)
    expected = n_res if mode == "ca" else 2 * n_res - n_gly
    assert g.n == expected
    full = gaussians_from_coords(adk, adk.coords[0], "atoms", resolution_A=4.0)
    assert g.amplitudes.sum().item() == pytest.approx(full.amplitudes.sum().item())
    assert (g.sigmas >= sigma_from_resolution(4.0) - 1e-6).all()
    # at low resolution the coarse mixture makes nearly the same map
    box, apix = 40, 3.0
    m_full = lowpass(gaussians_to_map(full, box, apix), 10.0, apix)
    m_coarse = lowpass(gaussians_to_map(g, box, apix), 10.0, apix)
    assert real_space_correlation(m_full, m_coarse) > min_cc  # measured: ca 0.966, residue2 > 0.97


def test_ca_mode_places_gaussians_on_calpha(adk):
    g = gaussians_from_coords(adk, adk.coords[0], "ca", resolution_A=4.0, center_A=np.zeros(3))
    ca = adk.coords[0][adk.atom_name == "CA"]
    np.testing.assert_allclose(g.centers.numpy(), ca, atol=1e-4)


def test_simulate_from_map_reconstructs_it(tmp_path):
    """A map in, particles out, the map back (projection along rays, CTF, noise-free)."""
    src = tmp_path / "src"
    assert cli(["simulate", "--model", str(example_model("open")), "--n", "1", "--box", "40", "--apix", "3",
                "--out", str(src)]) == 0
    out = tmp_path / "from_map"
    assert cli(["simulate", "--map", str(src / "truth_map.mrc"), "--n", "500", "--snr", "inf", "--seed", "4",
                "--out", str(out)]) == 0
    rep = json.loads((out / "report.json").read_text())
    assert rep["box"] == 40 and rep["apix_A"] == 3.0
    assert cli(["reconstruct", str(out / "particles.star"), "--out", str(tmp_path / "rec"), "--no-wiener"]) == 0
    m, _ = read_map(tmp_path / "rec" / "map.mrc")
    t, _ = read_map(src / "truth_map.mrc")
    cc = real_space_correlation(lowpass(torch.as_tensor(m), 9.0, 3.0), lowpass(torch.as_tensor(t), 9.0, 3.0))
    assert cc > 0.97


def test_simulate_from_trajectory_file(tmp_path):
    het = tmp_path / "het"
    assert cli(["simulate", "--endpoints", str(example_model("open")), str(example_model("closed")), "--frames", "3",
                "--n", "5", "--box", "48", "--apix", "3", "--out", str(het)]) == 0
    traj = tmp_path / "traj"
    assert cli(["simulate", "--trajectory", str(het / "truth_models.pdb"), "--n", "30", "--box", "48", "--apix", "3",
                "--seed", "9", "--out", str(traj)]) == 0
    rep = json.loads((traj / "report.json").read_text())
    assert rep["n_frames"] == 3
    assert (traj / "truth_models.pdb").is_file()


def test_weighted_kmeans_labels_are_the_nearest_centres():
    """k-means' distance block (``|c|^2 - 2 p.c``, ``|p|^2`` added after the minimum): every
    label is the nearest centre by the float64 distance, over several chunks, and a converged
    run's centres are the weighted means of their points."""
    from cryogmm.core.kmeans import weighted_kmeans

    g = torch.Generator().manual_seed(3)
    blobs = torch.randn(12, 3, generator=g) * 30.0
    pts = (blobs[torch.randint(0, 12, (5000,), generator=g)] + torch.randn(5000, 3, generator=g) * 2.0) + 40.0
    w = torch.rand(5000, generator=g) + 0.1
    centres, labels = weighted_kmeans(pts, w, 12, iterations=50, generator=g, chunk=700)
    d = torch.cdist(pts.double(), centres.double())
    assert torch.equal(labels, d.argmin(1))
    for j in range(12):
        sel = labels == j
        mean = (pts[sel].double() * w[sel, None].double()).sum(0) / w[sel].double().sum()
        assert torch.allclose(centres[j].double(), mean, atol=1e-3)
