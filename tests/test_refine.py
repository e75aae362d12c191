"""Orientation refinement against Gaussian mixtures: rotation increments, local refinement
from perturbed poses back to the truth, the job's outputs, RELION agreement, bad input."""

import json
import shutil
import subprocess

import mrcfile
import numpy as np
import pytest
import torch

from cryogmm.bridge import conventions as conv
from cryogmm.bridge.images import ImageSource
from cryogmm.bridge.io import read_particles
from cryogmm.cli import main as cli
from cryogmm.core.ctf import CtfParams, ctf_rfft2
from cryogmm.demo import example_model
from cryogmm.core.gaussians import Gaussians
from cryogmm.io.structures import gaussians_from_coords, read_model
from cryogmm.poses.align import BandFrc, focus_widths, refine_batch
from cryogmm.core.rotations import rotmat_angle_deg, rotvec_to_rotmat

BOX, APIX = 48, 2.5


def test_rotvec_matches_conventions_and_gradcheck():
    v = torch.tensor([[0.0, 0.0, 0.0], [1e-6, -2e-6, 0.0], [0.3, -0.2, 0.5], [0.0, 3.0, 0.1]], dtype=torch.float64)
    np.testing.assert_allclose(rotvec_to_rotmat(v).numpy(), conv.rotvec_to_rotmat(v.numpy()), atol=1e-12)
    assert torch.autograd.gradcheck(rotvec_to_rotmat, (v.clone().requires_grad_(),))
    A = torch.as_tensor(conv.euler_zyz_deg_to_rotmat(10.0, 20.0, 30.0))
    B = rotvec_to_rotmat(torch.tensor([0.0, 0.0, np.radians(5.0)], dtype=torch.float64)) @ A
    assert rotmat_angle_deg(B, A).item() == pytest.approx(5.0, abs=1e-6)


def test_focus_widths():
    g = Gaussians(torch.tensor([[0.0, 0.0, 0.0], [20.0, 0.0, 0.0]]), torch.ones(2), torch.full((2,), 2.0))
    mask = torch.zeros(32, 32, 32)
    mask[12:20, 12:20, 12:20] = 1.0  # around the centre only
    f = focus_widths(g, mask, 1.0)
    assert f.sigmas[0].item() == pytest.approx(2.0)  # inside: unchanged
    assert f.sigmas[1].item() == pytest.approx(8.0)  # outside: 1 / 0.25


@pytest.fixture(scope="module")
def clean(tmp_path_factory):
    out = tmp_path_factory.mktemp("refine") / "sim"
    assert cli(["simulate", "--model", str(example_model("open")), "--n", "240", "--box", str(BOX), "--apix", str(APIX),
                "--snr", "inf", "--pose-noise-deg", "4", "--shift-noise-A", "1.5", "--seed", "8", "--out", str(out)]) == 0
    return out


def errors(table, truth):
    e = rotmat_angle_deg(torch.as_tensor(table.rotmat), torch.as_tensor(truth.rotmat)).numpy()
    s = np.linalg.norm(table.shift_A - truth.shift_A, axis=1)
    return e, s


def test_local_refinement_recovers_true_poses(clean):
    """Against the true structure, perturbed poses (4°, 1.5 Å) go back to the truth."""
    table, truth = read_particles(clean / "particles.star"), read_particles(clean / "truth.star")
    m = read_model(example_model("open"))
    g = gaussians_from_coords(m, m.coords[0], "residue2", resolution_A=2 * APIX)
    band = BandFrc(BOX, APIX, 2, 18)
    idx = np.arange(64)
    x = band.crop_ft(torch.as_tensor(ImageSource.from_table(table).images(idx)))
    c = band.band(ctf_rfft2(CtfParams.from_table(table, idx), band.crop, band.apix_crop))
    A, sh, score = refine_batch(g, band, x, c, torch.as_tensor(table.rotmat[idx], dtype=torch.float32),
                                torch.as_tensor(table.shift_A[idx], dtype=torch.float32),
                                steps=40, lr_rad=np.radians(1.0), lr_A=0.3)
    e0 = rotmat_angle_deg(torch.as_tensor(table.rotmat[idx]), torch.as_tensor(truth.rotmat[idx])).numpy()
    e1 = rotmat_angle_deg(A.double(), torch.as_tensor(truth.rotmat[idx])).numpy()
    s1 = np.linalg.norm(sh.numpy() - truth.shift_A[idx], axis=1)
    assert np.median(e0) > 2.0
    assert np.median(e1) < 1.0 and np.percentile(e1, 90) < 2.0, (np.median(e1), np.percentile(e1, 90))
    assert np.median(s1) < 0.5
    assert score.mean() > 0.9


@pytest.mark.slow
def test_refine_poses_job(clean, tmp_path):
    out = tmp_path / "ref"
    rc = cli(["refine-poses", str(clean / "particles.star"), "--out", str(out), "--iterations", "2",
              "--fit-iterations", "80", "--max-gaussians", "500", "--steps", "30", "--batch", "120"])
    assert rc == 0
    for f in ("refined.star", "half1.mrc", "half2.mrc", "map.mrc", "fsc.png", "report.json"):
        assert (out / f).is_file(), f
    rep = json.loads((out / "report.json").read_text())
    it = rep["iterations"][0]
    assert {"resolution_A", "pose_change_deg", "particles_per_s", "band_A"} <= set(it)
    assert len(rep["fsc"]["masked"]) == len(rep["fsc"]["resolution_A"]) == BOX // 2 + 1
    from cryogmm.core.similarity import resolution_at

    assert resolution_at(torch.tensor(rep["fsc"]["masked"]), BOX, APIX) == pytest.approx(rep["resolution_A"])
    start, truth = read_particles(clean / "particles.star"), read_particles(clean / "truth.star")
    refined = read_particles(out / "refined.star")
    e0, s0 = errors(start, truth)
    e1, s1 = errors(refined, truth)
    assert np.median(e1) < 1.2 < np.median(e0), (np.median(e0), np.median(e1))
    assert np.median(s1) < np.median(s0)
    # every input column kept, the input poses beside the new ones
    cols = set(refined.particles.columns)
    assert set(start.particles.columns) <= cols
    np.testing.assert_allclose(refined.particles["rlnCryogmmOrigAngleTilt"],
                               conv.rotmat_to_euler_zyz_deg(start.rotmat)[:, 1], atol=1e-4)
    # RELION reconstructs our refined poses at least as well as we do (same FSC within noise)
    if shutil.which("relion_reconstruct"):
        shutil.copy(clean / "particles.mrcs", out / "particles.mrcs")
        for h in (1, 2):
            subprocess.run(["relion_reconstruct", "--i", "refined.star", "--o", f"r{h}.mrc", "--ctf", "--subset", str(h)],
                           cwd=out, check=True, capture_output=True)
        from cryogmm.core.similarity import fsc, resolution_at
        from cryogmm.core.masks import soft_sphere_mask

        m = soft_sphere_mask(BOX, BOX // 2 - 6, edge_px=3)
        r = [torch.as_tensor(mrcfile.read(out / f"r{h}.mrc").copy()) for h in (1, 2)]
        relion_res = resolution_at(fsc(r[0], r[1], mask=m), BOX, APIX)
        assert relion_res <= rep["resolution_A"] * 1.05


def test_bad_inputs(clean, tmp_path, capsys):
    def fails(argv, needle):
        rc = cli(argv)
        err = capsys.readouterr().err.strip().splitlines()
        assert rc == 2 and len(err) == 1 and needle in err[0], err
        assert not (tmp_path / "o").exists()

    with mrcfile.new(tmp_path / "h.mrc") as m:
        m.set_data(np.zeros((BOX, BOX, BOX), np.float32))
        m.voxel_size = 1.0
    with mrcfile.new(tmp_path / "small.mrc") as m:
        m.set_data(np.zeros((32, 32, 32), np.float32))
        m.voxel_size = APIX
    star = str(clean / "particles.star")
    fails(["refine-poses", star, "--half-maps", str(tmp_path / "h.mrc"), str(tmp_path / "h.mrc"),
           "--out", str(tmp_path / "o")], "pixel size")
    fails(["refine-poses", star, "--half-maps", str(tmp_path / "small.mrc"), str(tmp_path / "small.mrc"),
           "--out", str(tmp_path / "o")], "box")
    fails(["refine-poses", star, "--mask", str(tmp_path / "small.mrc"), "--out", str(tmp_path / "o")], "small.mrc")
    import starfile

    b = starfile.read(clean / "particles.star", always_dict=True)
    b["particles"] = b["particles"].drop(columns=["rlnAngleRot", "rlnAngleTilt", "rlnAnglePsi"])
    starfile.write(b, clean / "noposes.star", overwrite=True)
    fails(["refine-poses", str(clean / "noposes.star"), "--out", str(tmp_path / "o")], "rlnAngleRot")
    fails(["refine-poses", star, "--sym", "X3", "--out", str(tmp_path / "o")], "--sym")
    fails(["refine-poses", star, "--patches", "2", "--mask", str(tmp_path / "h.mrc"), "--out", str(tmp_path / "o")],
          "--patches/--mask")
    fails(["refine-poses", star, "--map", str(tmp_path / "h.mrc"), "--out", str(tmp_path / "o")], "--start-res-A")
    fails(["refine-poses", star, "--map", str(tmp_path / "h.mrc"), "--model", str(example_model("open")),
           "--out", str(tmp_path / "o")], "--half-maps/--map/--model")


@pytest.mark.slow
def test_refine_poses_seeded_from_model(clean, tmp_path):
    """--model: mixtures seeded on the model's heavy atoms (randomised per half), then fitted."""
    out = tmp_path / "ref_model"
    assert cli(["refine-poses", str(clean / "particles.star"), "--model", str(example_model("open")), "--out", str(out),
                "--iterations", "1", "--fit-iterations", "60", "--steps", "30"]) == 0
    rep = json.loads((out / "report.json").read_text())
    assert rep["references"] == "model"
    truth = read_particles(clean / "truth.star")
    e0, _ = errors(read_particles(clean / "particles.star"), truth)
    e1, _ = errors(read_particles(out / "refined.star"), truth)
    assert np.median(e1) < 0.6 * np.median(e0), (np.median(e0), np.median(e1))  # measured 2.54 -> 1.24 deg


@pytest.mark.slow
def test_refine_poses_from_cryosparc_cs(clean, tmp_path):
    """A cryoSPARC .cs in: poses read through the bridge, refined, written back as STAR and .cs."""
    cs = clean / "particles.cs"
    assert cli(["convert", str(clean / "particles.star"), str(cs)]) == 0
    out = tmp_path / "ref_cs"
    assert cli(["refine-poses", str(cs), "--out", str(out), "--iterations", "1", "--fit-iterations", "60",
                "--max-gaussians", "400", "--steps", "30", "--project-dir", str(clean)]) == 0
    truth = read_particles(clean / "truth.star")
    e0, _ = errors(read_particles(cs, project_dir=clean), truth)
    for f in ("refined.star", "refined.cs"):
        e1, _ = errors(read_particles(out / f, project_dir=clean), truth)
        assert np.median(e1) < 0.6 * np.median(e0), (f, np.median(e0), np.median(e1))


@pytest.mark.slow
def test_patch_by_patch_composite(clean, tmp_path):
    """--patches: a focused run per k-means patch, and the mask-weighted composite."""
    out = tmp_path / "ref_patch"
    assert cli(["refine-poses", str(clean / "particles.star"), "--out", str(out), "--iterations", "1",
                "--patches", "2", "--patch-iterations", "1", "--fit-iterations", "60", "--max-gaussians", "400",
                "--steps", "25"]) == 0
    rep = json.loads((out / "report.json").read_text())
    assert len(rep["patches"]) == 2 and rep["composite_resolution_A"] is not None
    for f in ("composite.mrc", "composite_half1.mrc", "composite_half2.mrc", "patches/patch_01/refined.star",
              "patches/patch_02/mask.mrc", "patches/patch_02/half1.mrc"):
        assert (out / f).is_file(), f
    masks = [mrcfile.read(out / f"patches/patch_0{k}/mask.mrc") for k in (1, 2)]
    assert all(0.0 <= m.min() and m.max() <= 1.0 + 1e-6 and m.max() > 0.99 for m in masks)
    # the patches split the molecule: their mask centres are apart
    c = [np.array(p["centre_A"]) for p in rep["patches"]]
    assert np.linalg.norm(c[0] - c[1]) > 10.0
    truth = read_particles(clean / "truth.star")
    e0, _ = errors(read_particles(clean / "particles.star"), truth)
    for k in (1, 2):
        e1, _ = errors(read_particles(out / f"patches/patch_0{k}/refined.star"), truth)
        assert np.median(e1) < 0.6 * np.median(e0)
    # the composite is a proper map of the molecule: it correlates with the truth as the global map does
    from cryogmm.core.similarity import real_space_correlation

    t = torch.as_tensor(mrcfile.read(clean / "truth_map.mrc").copy())
    cg = real_space_correlation(torch.as_tensor(mrcfile.read(out / "map.mrc").copy()), t)
    cc = real_space_correlation(torch.as_tensor(mrcfile.read(out / "composite.mrc").copy()), t)
    assert cc > cg - 0.02, (cg, cc)


def test_conformation_to_orientation_matches_projections():
    """A region moved rigidly in each particle's conformation: the new pose makes the neutral
    region project exactly where the particle's own region projects (ground truth by the
    projector), and the masked RMSD drops to zero."""
    from scipy.spatial.transform import Rotation

    from cryogmm.core.projection import project
    from cryogmm.poses.conformation import conformation_to_orientation
    from cryogmm.core.rotations import weighted_kabsch

    rng = np.random.default_rng(4)
    N, n = 60, 5
    neutral = torch.as_tensor(rng.normal(0, 12, (N, 3)))
    region = torch.zeros(N, dtype=torch.bool)
    region[:25] = True
    Q = Rotation.random(n, random_state=1).as_matrix() * 1.0
    Q = np.stack([Rotation.from_rotvec(0.2 * Rotation.from_matrix(q).as_rotvec()).as_matrix() for q in Q])
    t = rng.normal(0, 3, (n, 3))
    deformed = neutral[None].repeat(n, 1, 1).clone()
    # the region moves rigidly; the rest moves differently (it must be ignored by the weights)
    deformed[:, region] = torch.as_tensor(np.einsum("bij,nj->bni", Q, neutral[region].numpy()) + t[:, None])
    deformed[:, ~region] += torch.as_tensor(rng.normal(0, 2, (n, int((~region).sum()), 3)))
    w = region.double()
    Rot, tt = weighted_kabsch(deformed, neutral, w)
    np.testing.assert_allclose(Rot.numpy(), np.transpose(Q, (0, 2, 1)), atol=1e-9)  # the inverse motion
    A = torch.as_tensor(Rotation.random(n, random_state=2).as_matrix())
    S = torch.as_tensor(rng.normal(0, 2, (n, 2)))
    A2, S2, before, after = conformation_to_orientation(A, S, deformed, neutral, w)
    assert before.min() > 1.0 and after.max() < 1e-9
    ones, sig = torch.ones(int(region.sum()), dtype=torch.float64), torch.full((int(region.sum()),), 2.0, dtype=torch.float64)
    for b in range(n):
        img_particle = project(Gaussians(deformed[b, region], ones, sig), A[b:b + 1], S[b:b + 1], 48, 1.5)
        img_neutral = project(Gaussians(neutral[region], ones, sig), A2[b:b + 1], S2[b:b + 1], 48, 1.5)
        torch.testing.assert_close(img_neutral, img_particle, atol=1e-9, rtol=1e-7)


@pytest.fixture(scope="module")
def two_domain(tmp_path_factory):
    """The two-domain particle of benchmarks/refine_focused.py, small: 300 particles, SNR 1."""
    import importlib.util
    from pathlib import Path

    spec = importlib.util.spec_from_file_location(
        "refine_focused", Path(__file__).resolve().parents[1] / "benchmarks" / "refine_focused.py")
    rf = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(rf)
    return rf, rf.two_domain_dataset(tmp_path_factory.mktemp("two_domain"), n=300, snr=1.0, seed=1)


@pytest.mark.slow
def test_focused_refinement_registers_the_moving_domain(two_domain, tmp_path):
    """Two domains, domain B swung 2-20° in half the particles: refinement focused on B (mask)
    brings B into register better than global refinement from the same start, and B's
    masked FSC rises (benchmarks/refine_focused.py runs the full-size case)."""
    from cryogmm.poses.job import RefineConfig, refine_poses

    rf, paths = two_domain
    common = dict(star=paths["star"], iterations=1, steps=30, fit_iterations=100, max_gaussians=600, seed=1)
    refine_poses(RefineConfig(out=tmp_path / "global", **common))
    refine_poses(RefineConfig(out=tmp_path / "focused", mask=paths["mask"], **common))
    g = {**rf.domain_figures(tmp_path / "global", paths), **rf.register_error(tmp_path / "global" / "refined.star", paths)}
    f = {**rf.domain_figures(tmp_path / "focused", paths), **rf.register_error(tmp_path / "focused" / "refined.star", paths)}
    assert f["register_error_deg_median_displaced"] < 0.8 * g["register_error_deg_median_displaced"], (g, f)
    assert f["masked_mean_fsc"] > g["masked_mean_fsc"], (g, f)


@pytest.mark.slow
def test_conformation_to_orientation_job(two_domain, tmp_path):
    """--hetero RUN --mask: a short heterogeneity run on the two-domain set, then its
    conformations of domain B turned into pose changes; the displaced half moves towards
    domain B's register (benchmarks/refine_conformation.py runs the full-size case)."""
    from cryogmm.hetero.config import HeteroConfig
    from cryogmm.hetero.train import train_hetero
    from cryogmm.poses.job import RefineConfig, refine_poses

    rf, paths = two_domain
    train_hetero(HeteroConfig(star=paths["star"], model=paths["model"], out=tmp_path / "hetero", decoder="segments",
                              segments=4, per_chain=True, zdim=2, epochs=6, seed=1, device="cpu"))
    rep = refine_poses(RefineConfig(star=paths["star"], out=tmp_path / "conf", mask=paths["mask"],
                                    hetero=tmp_path / "hetero", iterations=1, steps=30, fit_iterations=100,
                                    max_gaussians=600, seed=1))
    c = rep["conformation_to_orientation"]
    assert c["zdim"] == 2 and c["region_rmsd_A"]["after_median"] < c["region_rmsd_A"]["before_median"]
    start = rf.register_error(paths["star"], paths)
    after = rf.register_error(tmp_path / "conf" / "refined.star", paths)
    assert after["register_error_deg_median_displaced"] < 0.7 * start["register_error_deg_median_displaced"], (start, after)
