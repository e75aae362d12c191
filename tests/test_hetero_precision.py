"""Precision options of hetero train (issue 18, item 1): resolution annealing of the loss band
and the per-particle latent polish after training, on HIV protease (not adenylate kinase)."""

from pathlib import Path

import numpy as np
import pytest
import torch

from cryogmm.errors import OptionError
from cryogmm.hetero import config as hetero_config
from cryogmm.hetero import run as hetero_run
from cryogmm.hetero import train as hetero_train
from cryogmm.hetero import vae as hetero_vae

HIVP = Path(__file__).parent / "data" / "hivp_1hvr_xk2.pdb"


def _cfg(**kw):
    base = dict(star=Path("p.star"), model=HIVP, out=Path("o"), epochs=10, lowpass_A=6.0)
    base.update(kw)
    return hetero_config.HeteroConfig(**base)


def test_band_resolution_anneals_linearly_in_frequency():
    cfg = _cfg(lowpass_start_A=12.0, anneal_epochs=4)
    res = [hetero_train.band_resolution(cfg, e) for e in range(10)]
    assert res[0] == pytest.approx(12.0)
    assert res[2] == pytest.approx(1.0 / (0.5 / 12.0 + 0.5 / 6.0))  # halfway in 1/Å, 8 Å
    assert all(r == pytest.approx(6.0) for r in res[4:])
    assert all(a > b for a, b in zip(res[:4], res[1:5]))
    assert hetero_train.band_resolution(_cfg(lowpass_start_A=6.0), 0) is None  # no annealing: the whole band
    assert hetero_train.band_resolution(_cfg(lowpass_A=8.0), 0) is None  # the default start is not coarser
    # the default: from DEFAULT_ANNEAL_START_A (8 Å) to lowpass_A over half the epochs
    assert hetero_config.DEFAULT_ANNEAL_START_A == 8.0
    assert [hetero_train.band_resolution(_cfg(), e) for e in (0, 5)] == pytest.approx([8.0, 6.0])
    # default anneal_epochs: half of the epochs
    assert hetero_train.band_resolution(_cfg(lowpass_start_A=12.0), 5) == pytest.approx(6.0)
    assert hetero_train.band_resolution(_cfg(lowpass_start_A=12.0), 4) > 6.0


@pytest.mark.parametrize("kw,opt", [({"lowpass_start_A": 4.0}, "--lowpass-start-A"),
                                    ({"polish_steps": -1}, "--polish-steps")])
def test_bad_precision_options_are_refused(kw, opt):
    with pytest.raises(OptionError) as e:
        hetero_train._check_config(_cfg(**kw))
    assert opt in str(e.value)


def test_default_band_is_4A_or_the_nyquist(two_state_sim):
    from cryogmm.hetero.data import load_particles

    sim, _ = two_state_sim  # 2.5 Å pixels: Nyquist 5 Å is coarser than the default 4 Å
    d = load_particles(sim / "particles.star", lowpass_A=None)
    assert d.lowpass_A == 5.0 and d.crop == load_particles(sim / "particles.star", lowpass_A=5.0).crop
    assert load_particles(sim / "particles.star", lowpass_A=7.0).lowpass_A == 7.0
    assert hetero_config.DEFAULT_LOWPASS_A == 4.0 and hetero_config.HeteroConfig(
        star=sim, model=HIVP, out=sim).polish_steps == 10


def protein_only(out: Path) -> Path:
    lines = [x for x in HIVP.read_text().splitlines()
             if x.startswith("ATOM") or (x.startswith("HETATM") and x[17:20] == "CSO")]
    out.write_text("\n".join(lines) + "\nEND\n")
    return out


@pytest.fixture(scope="module")
def two_state_sim(tmp_path_factory):
    """HIV protease with chain B turned 8° about the dimer centre: 10 frames, 240 particles, box 36
    at 2.5 Å, SNR 1."""
    from scipy.spatial.transform import Rotation

    from cryogmm.io.structures import read_model, write_models
    from cryogmm.simulate.particles import SimulateConfig, simulate

    d = tmp_path_factory.mktemp("prec")
    start = protein_only(d / "hivp.pdb")
    m = read_model(start)
    xyz = m.coords[0].copy()
    b = m.chain == "B"
    c = xyz.mean(0)
    xyz[b] = (xyz[b] - c) @ Rotation.from_rotvec(np.deg2rad(8.0) * np.array([0.3, 1.0, 0.2])
                                                 / np.linalg.norm([0.3, 1.0, 0.2])).as_matrix().T + c
    end = d / "end.pdb"
    write_models(end, m, xyz[None])
    simulate(SimulateConfig(out=d / "sim", endpoints=(start, end), frames=10, n=240, box=36, apix=2.5, snr=1.0,
                            seed=5, device="cpu"))
    return d / "sim", start


@pytest.fixture
def one_thread():
    """Training these small batches on one torch thread (restored afterwards): steadier and faster
    on a busy 2-core machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_annealing_and_polish_write_polished_latents(two_state_sim, tmp_path, one_thread):
    sim, model = two_state_sim
    cfg = hetero_config.HeteroConfig(star=sim / "particles.star", model=model, out=tmp_path / "run",
                                     map=sim / "truth_map.mrc", decoder="segments", segments=6, zdim=2, epochs=4,
                                     batch=32, lowpass_A=8.0, lowpass_start_A=12.0, anneal_epochs=2,
                                     kl_warmup=2, polish_steps=15, posterior_candidates=0, seed=0, device="cpu")
    rep = hetero_train.train_hetero(cfg)
    assert [h["band_A"] for h in rep["history"]] == pytest.approx([12.0, 1 / (0.5 / 12 + 0.5 / 8), 8.0, 8.0])
    z = np.load(tmp_path / "run" / hetero_config.LATENTS)
    assert z.shape == (240, 2) and np.isfinite(z).all()
    assert hetero_config.LATENTS in rep["outputs"] and rep["latent_polish"]["rows"] == 240
    # the polish lowers every particle's posterior objective on average (it is a MAP fit from
    # the encoder's mean): data + restraints + |z|^2/2, evaluated under the trained network
    run = hetero_run.Run(tmp_path / "run")
    fw = run.forward_model()
    pairs = hetero_vae.restraint_pairs(run.ref, elastic_seq=run.cfg.elastic_seq)
    step = hetero_vae.TrainStep(run.vae, fw, pairs, run.cfg, 0.0)
    z_enc = run.encode_all(polished=False)
    assert np.array_equal(run.encode_all(), z)  # analyze reads the polished latents
    assert run.latent_source == hetero_config.LATENTS
    idx = np.arange(240)
    bt = fw.batch(idx)

    def objective(zz):
        with torch.no_grad():
            zt = torch.as_tensor(zz, dtype=torch.float32)
            d, r, _ = step.objective(bt, zt)
            return (d + r + 0.5 * (zt**2).sum(1)).numpy()

    before, after = objective(z_enc), objective(z)
    assert after.mean() < before.mean()
    assert np.mean(after <= before + 1e-3) > 0.9


def test_posterior_mean_latents(two_state_sim, tmp_path, one_thread):
    """Training writes every particle's posterior-mean latent over k-means centres of the
    polished latents, analyze reads it; the weights are the softmax of the images' data terms
    under each candidate's decoded model (checked against the training objective itself)."""
    sim, model = two_state_sim
    cfg = hetero_config.HeteroConfig(star=sim / "particles.star", model=model, out=tmp_path / "run",
                                     map=sim / "truth_map.mrc", decoder="segments", segments=6, zdim=2, epochs=3,
                                     batch=32, lowpass_A=8.0, kl_warmup=1, polish_steps=5,
                                     posterior_candidates=12, seed=0, device="cpu")
    rep = hetero_train.train_hetero(cfg)
    zp = np.load(tmp_path / "run" / hetero_config.POSTERIOR)
    zm = np.load(tmp_path / "run" / hetero_config.LATENTS)
    assert zp.shape == zm.shape == (240, 2) and np.isfinite(zp).all()
    post = rep["latent_posterior"]
    assert post["candidates"] == 12 and post["of"] == "polished latents"
    assert 1.0 <= post["median_effective_candidates"] <= 12.0
    assert hetero_config.POSTERIOR in rep["outputs"]
    run = hetero_run.Run(tmp_path / "run")
    assert np.array_equal(run.encode_all(), zp) and run.latent_source == hetero_config.POSTERIOR
    # every posterior mean lies in the candidates' convex hull: inside their bounding box
    cand = hetero_train.posterior_candidates(zm, 12, seed=0)
    assert cand.shape == (12, 2)
    assert (zp >= cand.min(0) - 1e-5).all() and (zp <= cand.max(0) + 1e-5).all()
    fw = run.forward_model()
    pairs = hetero_vae.restraint_pairs(run.ref, elastic_seq=run.cfg.elastic_seq)
    step = hetero_vae.TrainStep(run.vae, fw, pairs, run.cfg, 0.0)
    rows = np.arange(40)
    # one candidate: that candidate, with one effective candidate
    z1, e1 = hetero_vae.posterior_mean_latents(step, rows, cand[:1])
    assert np.allclose(z1, cand[0], atol=1e-6) and np.allclose(e1, 1.0)
    # two candidates: the weights are the softmax of minus the data terms
    z2, e2 = hetero_vae.posterior_mean_latents(step, rows, cand[:2], batch=16)
    with torch.no_grad():
        bt = fw.batch(rows)
        d = torch.stack([step.objective(bt, torch.as_tensor(cand[j]).expand(len(rows), -1))[0]
                         for j in range(2)], 1).double()
    w = torch.softmax(-d, 1).numpy()
    assert np.allclose(z2, w @ cand[:2].astype(np.float64), atol=1e-4)
    assert np.allclose(e2, 1.0 / (w**2).sum(1), rtol=1e-4)
