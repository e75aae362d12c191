"""cryogmm hetero: the forward model, training against simulated ground truth, resume,
analysis outputs, decode, and bad input."""

import json
from importlib import resources
from pathlib import Path

import numpy as np
import pytest
import torch

from cryogmm.hetero import data as hetero_data
from cryogmm.hetero import vae as hetero_vae
from cryogmm.hetero import train as hetero_train
from cryogmm.hetero import analyze as hetero_analyze
from cryogmm.hetero import run as hetero_run
from cryogmm import demo
from cryogmm.hetero import config as hetero_config
from cryogmm.errors import InputError, ModelError, OptionError, StarError
from cryogmm.core.gaussians import Gaussians

DATA = Path(str(resources.files("cryogmm.data")))
OPEN, CLOSED = DATA / "adk_open.pdb", DATA / "adk_closed.pdb"


@pytest.fixture(scope="module")
def adk_sim(tmp_path_factory):
    """Open-to-closed adenylate kinase, CORE-superposed endpoints, 10 frames, 400 particles,
    box 40 at 2.5 Å, SNR 1."""
    from cryogmm.hetero.truth import ADK_CORE, superpose_file
    from cryogmm.simulate.particles import SimulateConfig, simulate

    d = tmp_path_factory.mktemp("adk")
    closed = d / "closed_on_open.pdb"
    superpose_file(CLOSED, OPEN, closed, ADK_CORE)
    simulate(SimulateConfig(out=d / "sim", endpoints=(OPEN, closed), frames=10, n=400, box=40, apix=2.5, snr=1.0,
                            seed=3, device="cpu"))
    return d / "sim"


def _cfg(sim, out, **kw):
    base = dict(star=sim / "particles.star", model=OPEN, out=out, map=sim / "truth_map.mrc", decoder="segments",
                segments=8, zdim=2, epochs=8, batch=32, lowpass_A=10.0, kl_warmup=2, seed=0, device="cpu")
    base.update(kw)
    return hetero_config.HeteroConfig(**base)


def test_fourier_projection_equals_real_space_projection():
    from scipy.spatial.transform import Rotation

    from cryogmm.core.ctf import rfft2_frequencies
    from cryogmm.core.projection import project

    g = torch.Generator().manual_seed(0)
    gs = Gaussians(torch.randn(30, 3, generator=g, dtype=torch.float64) * 8,
                   torch.rand(30, generator=g, dtype=torch.float64) + 1,
                   torch.rand(30, generator=g, dtype=torch.float64) + 2.5)
    R = torch.as_tensor(Rotation.random(4, random_state=1).as_matrix())
    sh = torch.randn(4, 2, generator=g, dtype=torch.float64) * 3
    box, apix, crop = 64, 2.0, 24
    img = project(gs, R, sh, box, apix)
    f = torch.fft.rfft2(torch.fft.ifftshift(img, dim=(-2, -1)), norm="ortho")
    f = f[:, torch.as_tensor(hetero_data._crop_rows(box, crop)), : crop // 2 + 1]
    ky, kx = rfft2_frequencies(crop, apix * box / crop, dtype=torch.float64)
    p = hetero_data.project_fourier(gs, R, sh, kx[0], ky[:, 0]) / (apix**3 * box)
    # the real-space drawing is exact up to sampling (widths >= 2.5 Å at 2 Å pixels)
    assert float((f - p).abs().max()) < 1e-4 * float(f.abs().max())


@pytest.mark.parametrize("per_image", [False, True])
def test_fourier_projection_gradients(per_image):
    """The closed-form backward of the Fourier projection: gradcheck in float64, and the same
    gradients as autograd through the plain formula (centres, amplitudes and widths)."""
    import math

    from scipy.spatial.transform import Rotation

    g = torch.Generator().manual_seed(3)
    B, N = 3, 7
    shape = (B, N) if per_image else (N,)
    cen = (torch.randn(B, N, 3, generator=g, dtype=torch.float64) * 6).requires_grad_(True)
    amp = (torch.rand(*shape, generator=g, dtype=torch.float64) + 0.5).requires_grad_(True)
    sig = (torch.rand(*shape, generator=g, dtype=torch.float64) + 1.0).requires_grad_(True)
    R = torch.as_tensor(Rotation.random(B, random_state=2).as_matrix())
    sh = torch.randn(B, 2, generator=g, dtype=torch.float64)
    kx = torch.fft.rfftfreq(10, 2.0).double()
    ky = torch.fft.fftfreq(10, 2.0).double()

    def fn(c, a, s):
        return torch.view_as_real(hetero_data.project_fourier(Gaussians(c, a, s), R, sh, kx, ky))

    assert torch.autograd.gradcheck(fn, (cen, amp, sig))

    def plain(c, a, s):
        xy = torch.einsum("bij,bnj->bni", R, c)[..., :2] - sh[:, None, :]
        a = a.expand(B, -1)
        s2 = 2.0 * math.pi**2 * s.expand(B, -1)[..., None] ** 2
        cx = torch.polar(torch.exp(-s2 * kx**2) * a[..., None], -2.0 * math.pi * xy[..., 0, None] * kx)
        cy = torch.polar(torch.exp(-s2 * ky**2), -2.0 * math.pi * xy[..., 1, None] * ky)
        return torch.bmm(cy.transpose(1, 2), cx)

    w = torch.randn(B, len(ky), len(kx), generator=g, dtype=torch.complex128)
    ours = hetero_data.project_fourier(Gaussians(cen, amp, sig), R, sh, kx, ky)
    ref = plain(cen, amp, sig)
    assert torch.allclose(ours, ref, rtol=1e-12, atol=1e-12)
    g1 = torch.autograd.grad(((ours * w).real.sum() + (ours.abs() ** 2).sum()), (cen, amp, sig))
    g2 = torch.autograd.grad(((ref * w).real.sum() + (ref.abs() ** 2).sum()), (cen, amp, sig))
    for x, y in zip(g1, g2):
        assert torch.allclose(x, y, rtol=1e-10, atol=1e-10)


def test_crop_size_reaches_the_lowpass():
    assert hetero_data.crop_size(64, 2.0, 8.0) == 34
    assert hetero_data.crop_size(64, 2.0, 4.0) == 64  # never beyond the box
    assert hetero_data.crop_size(40, 2.5, 10.0) % 2 == 0


def test_segments_train_recovers_the_motion(adk_sim, tmp_path):
    rep = hetero_train.train_hetero(_cfg(adk_sim, tmp_path / "run"))
    assert rep["epochs"] == 8 and len(rep["history"]) == 8
    assert rep["history"][-1]["data"] < rep["history"][0]["data"]
    an = hetero_analyze.analyze_hetero(hetero_analyze.AnalyzeConfig(run=tmp_path / "run", pcs=1, frames=3, clusters=2,
                                                    backproject=True, truth=adk_sim / "truth.star", device="cpu"))
    t = an["truth"]
    assert t["abs_spearman_pc1_vs_frame"] > 0.8, t
    # decoded models are closer to the true frames than the starting model is
    assert t["median_ca_rmsd_decoded_vs_true_A"] < 0.7 * t["median_ca_rmsd_reference_vs_true_A"], t
    # the residues that move are the ones that move in the truth (LID and NMP domains)
    assert t["per_residue_motion_pearson"] > 0.8, t
    out = tmp_path / "run" / "analyze"
    for name in ("z.npy", "particles_latent.star", "particles_latent.cs", "pc1_trajectory.pdb", "pc1_model_00.mrc",
                 "pc1_backproj_01.mrc", "cluster_0.star", "cluster_1.cs", "latent.png", "segments.csv",
                 "segments.pdb", "cluster_centers.pdb", "report.json"):
        assert (out / name).is_file(), name
    from cryogmm.bridge.io import read_particles
    from cryogmm.io.structures import read_model

    z = np.load(out / "z.npy")
    t2 = read_particles(out / "particles_latent.star")
    np.testing.assert_allclose(t2.particles[["rlnCryogmmLatent0", "rlnCryogmmLatent1"]].to_numpy(), z, atol=1e-5)
    n_clusters = sum(read_particles(out / f"cluster_{c}.cs").n for c in range(2))
    assert n_clusters == 400
    assert read_model(out / "pc1_trajectory.pdb").n_frames == 3
    rows = (out / "segments.csv").read_text().splitlines()
    assert rows[0] == "segment,chain,first,last,residues"
    assert sum(int(r.split(",")[-1]) for r in rows[1:]) == 214
    # decode: one model per latent row; a z file of the wrong width is refused
    np.savetxt(tmp_path / "z.txt", z[:5])
    hetero_run.decode_hetero(tmp_path / "run", tmp_path / "z.txt", tmp_path / "five.pdb")
    assert read_model(tmp_path / "five.pdb").n_frames == 5
    np.savetxt(tmp_path / "z3.txt", np.zeros((2, 3)))
    with pytest.raises(InputError, match="rows of 3 values but the run's latent space has 2"):
        hetero_run.decode_hetero(tmp_path / "run", tmp_path / "z3.txt", tmp_path / "bad.pdb")
    assert not (tmp_path / "bad.pdb").exists()


def test_resume_continues_exactly(adk_sim, tmp_path):
    full = hetero_train.train_hetero(_cfg(adk_sim, tmp_path / "a", epochs=3, decoder="displacement"))
    hetero_train.train_hetero(_cfg(adk_sim, tmp_path / "b", epochs=2, decoder="displacement"))
    res = hetero_train.train_hetero(_cfg(adk_sim, tmp_path / "b", epochs=3, decoder="displacement", resume=True))
    assert res["resumed_from_epoch"] == 2 and len(res["history"]) == 3
    np.testing.assert_allclose(res["history"][-1]["loss"], full["history"][-1]["loss"], rtol=1e-5)
    sa = torch.load(tmp_path / "a" / "checkpoint.pt", weights_only=True)["model"]
    sb = torch.load(tmp_path / "b" / "checkpoint.pt", weights_only=True)["model"]
    for k in sa:
        torch.testing.assert_close(sa[k], sb[k], rtol=1e-4, atol=1e-6)
    # a finished run is not overwritten, and a resume with other settings is refused
    with pytest.raises(OptionError, match="already holds a training run"):
        hetero_train.train_hetero(_cfg(adk_sim, tmp_path / "b", epochs=3, decoder="displacement"))
    with pytest.raises(OptionError, match="differs from the checkpoint"):
        hetero_train.train_hetero(_cfg(adk_sim, tmp_path / "b", epochs=4, decoder="segments", resume=True))
    with pytest.raises(InputError, match="no checkpoint here"):
        hetero_train.train_hetero(_cfg(adk_sim, tmp_path / "c", resume=True))


def test_resume_without_lowpass_keeps_the_checkpoints_band(adk_sim, tmp_path):
    # trained at 10 Å (coarser than the default band, 5 Å here: Nyquist at 2.5 Å/px); a resume
    # that does not repeat --lowpass-A continues at 10 Å instead of resolving the default anew
    hetero_train.train_hetero(_cfg(adk_sim, tmp_path / "r", epochs=1))
    res = hetero_train.train_hetero(_cfg(adk_sim, tmp_path / "r", epochs=2, lowpass_A=None, resume=True))
    assert res["resumed_from_epoch"] == 1 and len(res["history"]) == 2
    assert json.loads((tmp_path / "r" / "config.json").read_text())["lowpass_A"] == 10.0


def test_displacement_restraints_hold_the_chain(adk_sim, tmp_path):
    rep = hetero_train.train_hetero(_cfg(adk_sim, tmp_path / "d", decoder="displacement", epochs=4))
    # mean squared deviation from 3.8 Å over the 213 Cα bonds stays small
    assert rep["history"][-1]["bond"] / 213 < 0.1


def test_restraint_terms_analytic():
    pairs = {"bonds": torch.tensor([[0, 1]]), "side": torch.tensor([[1, 2]]), "side_max": torch.tensor([2.0]),
             "clash": torch.tensor([[0, 2]]), "clash_min": torch.tensor([3.6])}
    c = torch.tensor([[[0.0, 0, 0], [4.8, 0, 0], [4.8, 2.5, 0]]])
    t = hetero_vae.restraint_terms(c, pairs)
    torch.testing.assert_close(t["bond"], torch.tensor([1.0]))
    torch.testing.assert_close(t["sidechain"], torch.tensor([0.25]))
    torch.testing.assert_close(t["clash"], torch.tensor([0.0]))
    c2 = torch.tensor([[[0.0, 0, 0], [3.8, 0, 0], [2.6, 0, 0]]])
    t2 = hetero_vae.restraint_terms(c2, pairs)
    torch.testing.assert_close(t2["clash"], torch.tensor([1.0]))
    torch.testing.assert_close(t2["bond"], torch.tensor([0.0]))


# --------------------------------------------------------------------------- bad input
def test_model_outside_the_box_is_refused(adk_sim, tmp_path):
    from cryogmm.io.structures import read_model
    from cryogmm.io.structures import write_models

    m = read_model(OPEN)
    far = tmp_path / "far.pdb"
    write_models(far, m, m.coords[0] + np.array([0.0, 0.0, 80.0]))
    with pytest.raises(ModelError, match=r"far.pdb: .*residue\(s\).*outside the 40-px box"):
        hetero_train.train_hetero(_cfg(adk_sim, tmp_path / "run", model=far))
    assert not (tmp_path / "run" / "checkpoint.pt").exists()


def test_star_without_poses_is_refused(adk_sim, tmp_path):
    from cryogmm.bridge.io import read_particles, write_particles

    t = read_particles(adk_sim / "particles.star")
    p = t.particles.drop(columns=["rlnAngleRot", "rlnAngleTilt", "rlnAnglePsi"])
    nopose = adk_sim / "noposes.star"
    write_particles(t._copy(particles=p), nopose)
    with pytest.raises(StarError, match=r"noposes.star: missing columns rlnAngleRot, rlnAngleTilt, rlnAnglePsi"):
        hetero_train.train_hetero(_cfg(adk_sim, tmp_path / "run", star=nopose))
    assert not (tmp_path / "run").exists()


def test_cli_exit_codes(adk_sim, tmp_path, capsys):
    from cryogmm.cli import main

    rc = main(["hetero", "train", str(adk_sim / "particles.star"), "--model", str(tmp_path / "missing.pdb"),
               "--out", str(tmp_path / "run"), "--device", "cpu"])
    assert rc == 2
    assert "missing.pdb: no such file" in capsys.readouterr().err
    rc = main(["hetero", "analyze", str(tmp_path / "nothing"), "--device", "cpu"])
    assert rc == 2
    assert "no checkpoint here" in capsys.readouterr().err
    rc = main(["hetero", "train", str(adk_sim / "particles.star"), "--model", str(OPEN), "--out",
               str(tmp_path / "run"), "--zdim", "0"])
    err = capsys.readouterr().err
    assert rc == 2 and "--zdim" in err and "got '0'" in err and len(err.strip().splitlines()) == 1


def test_report_is_json(adk_sim, tmp_path):
    rep = hetero_train.train_hetero(_cfg(adk_sim, tmp_path / "r", epochs=1, loss="correlation", gaussians="residue2"))
    on_disk = json.loads((tmp_path / "r" / "report.json").read_text())
    assert on_disk["job"] == "hetero train" and on_disk["n_gaussians"] == rep["n_gaussians"] > 214
    assert np.isfinite(on_disk["history"][0]["loss"])


@pytest.mark.slow
def test_segments_separate_the_moving_domain(tmp_path):
    """Two-domain motion: the LID (residues 122-159) of the open model swings 35 degrees about
    its hinge, the rest stays. Three learned segments start as equal thirds of the chain
    (boundaries 71|72 and 142|143: the LID is split and 18% of the residues sit with the wrong
    domain); training must move the boundaries to the hinges."""
    from scipy.spatial.transform import Rotation

    from cryogmm.io.structures import read_model
    from cryogmm.io.structures import write_models
    from cryogmm.simulate.particles import SimulateConfig, simulate

    m = read_model(OPEN)
    x = m.coords[0]
    ca = m.atom_name == "CA"
    lid = (m.seq_id >= 122) & (m.seq_id <= 159)
    hinge = 0.5 * (x[ca & (m.seq_id == 121)][0] + x[ca & (m.seq_id == 160)][0])
    axis = np.cross(x[lid].mean(0) - hinge, x[~lid].mean(0) - hinge)
    axis /= np.linalg.norm(axis)
    frames = []
    for t in np.linspace(0, 1, 10):
        R = Rotation.from_rotvec(axis * np.deg2rad(35) * t).as_matrix()
        y = x.copy()
        y[lid] = (x[lid] - hinge) @ R.T + hinge
        frames.append(y)
    write_models(tmp_path / "traj.pdb", m, np.array(frames))
    sim = tmp_path / "sim"
    simulate(SimulateConfig(out=sim, trajectory=tmp_path / "traj.pdb", n=400, box=40, apix=2.5, snr=1.0, seed=5,
                            device="cpu"))
    hetero_train.train_hetero(_cfg(sim, tmp_path / "run", segments=3, epochs=20, lr=3e-3))
    an = hetero_analyze.analyze_hetero(hetero_analyze.AnalyzeConfig(run=tmp_path / "run", pcs=1, frames=3, clusters=2,
                                                    backproject=False, truth=sim / "truth.star", device="cpu"))
    assert an["truth"]["abs_spearman_pc1_vs_frame"] > 0.8, an["truth"]
    assert an["truth"]["per_residue_motion_pearson"] > 0.9, an["truth"]
    # residues whose segment is mostly LID, vs the true LID
    rows = an["segments"]
    seg_of = np.concatenate([np.full(r["residues"], r["segment"]) for r in rows])
    first = np.concatenate([np.arange(r["first"], r["last"] + 1) for r in rows])
    is_lid = (first >= 122) & (first <= 159)
    lid_seg = {s for s in np.unique(seg_of) if is_lid[seg_of == s].mean() > 0.5}
    called = np.isin(seg_of, list(lid_seg))
    assert (called == is_lid).mean() > 0.95, rows


@pytest.mark.slow
def test_demo_hetero(tmp_path):
    rep = demo.demo_hetero(tmp_path / "demo", seed=0)
    assert rep["abs_spearman_pc1_vs_frame"] > 0.8, rep
    assert rep["median_ca_rmsd_decoded_vs_true_A"] < 0.6 * rep["median_ca_rmsd_reference_vs_true_A"], rep
