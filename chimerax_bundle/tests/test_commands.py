"""The cryogmm bundle in a real headless ChimeraX 1.7.1 (PyPI library build, see cxharness.py):
commands registered from the bundle metadata, fit (atoms move, map correlation rises, geometry
sane, stop, undo), validate (outliers of a distorted model), series / hetero runs as coordinate
sets, gmm markers, simulated maps, UserErrors, and one CLI launch that renders a PNG."""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

import cxharness


def run(session, text, **kw):
    from chimerax.core.commands import run as cxrun

    return cxrun(session, text, **kw)


def ca_rmsd(a, b, atoms):
    ca = atoms.names == "CA"
    return float(np.sqrt(((a[ca] - b[ca]) ** 2).sum(1).mean()))


def rigid_perturb(xyz, deg, shift, seed=0, noise=0.0):
    """Rotate ``xyz`` by ``deg`` about a random axis through its centroid, translate by ``shift``
    Å along a random direction, add N(0, noise) per coordinate (seeded)."""
    rng = np.random.default_rng(seed)
    axis = rng.normal(size=3)
    axis /= np.linalg.norm(axis)
    th = np.radians(deg)
    k = np.array([[0, -axis[2], axis[1]], [axis[2], 0, -axis[0]], [-axis[1], axis[0], 0]])
    R = np.eye(3) + np.sin(th) * k + (1 - np.cos(th)) * (k @ k)
    d = rng.normal(size=3)
    c = xyz.mean(0)
    out = (xyz - c) @ R.T + c + shift * d / np.linalg.norm(d)
    return out + rng.normal(scale=noise, size=xyz.shape) if noise else out


def molmap_correlation(session, structure, volume, resolution):
    """ChimeraX's own figure: `molmap` of the model at the resolution, then `measure correlation`
    (about the mean, inside the molmap's contour) with the map."""
    mm = run(session, f"molmap {structure.atomspec} {resolution} gridSpacing {volume.data.step[0]:.4f}", log=False)
    _, corm = run(session, f"measure correlation {mm.atomspec} inMap {volume.atomspec}", log=False)
    run(session, f"close {mm.atomspec}", log=False)
    return float(corm)


# --------------------------------------------------------------------------- metadata / registration

def test_commands_come_from_bundle_metadata(session):
    bi = session.toolshed.find_bundle("ChimeraX-CryoGMM", session.logger, installed=True)
    assert bi is not None, "bundle not registered by the toolshed"
    names = {c.name for c in bi.commands}
    assert names == {"cryogmm", "cryogmm fit", "cryogmm stop", "cryogmm validate", "cryogmm series",
                     "cryogmm open", "cryogmm gmm", "cryogmm simulate"}
    from chimerax.core.commands import command_function

    run(session, "cryogmm")  # first use registers every subcommand through register_command
    for n in names:
        assert callable(command_function(n)), n


# --------------------------------------------------------------------------- simulate / gmm

def test_simulate_map_matches_chimerax_molmap(session, adk_paths):
    s = run(session, f"open {adk_paths['closed']}")[0]
    v, rep = run(session, "cryogmm simulate #1 resolution 6 noise 0")
    assert rep is None and v.data.step[0] == pytest.approx(2.0)
    # every atom lies inside the map, in density well above the map's mean
    inside = v.interpolated_values(s.atoms.scene_coords)
    m = v.full_matrix()
    assert np.all(inside > m.mean() + 2 * m.std())
    # ChimeraX's own molmap of the model at the same resolution: same density
    assert molmap_correlation(session, s, v, 6) > 0.95
    # noise is seeded and scales as asked
    v2, _ = run(session, "cryogmm simulate #1 resolution 6 noise 0.5 seed 3")
    d = v2.full_matrix() - m
    assert d.std() == pytest.approx(0.5 * m.std(), rel=0.02)


def test_gmm_markers_sit_in_the_density(session, adk_paths):
    s = run(session, f"open {adk_paths['closed']}")[0]
    run(session, "cryogmm simulate #1 resolution 8 noise 0")
    ms, info = run(session, "cryogmm gmm #2 resolution 8 iterations 30")
    assert ms.num_atoms == info["n"] > 20
    # each Gaussian centre lies within 6 Å of an atom of the model the map was made from
    from scipy.spatial import cKDTree

    d, _ = cKDTree(s.atoms.scene_coords).query(ms.atoms.scene_coords)
    assert np.percentile(d, 95) < 6.0, np.percentile(d, 95)
    assert info["fsc_mean_to_resolution"] > 0.8


def test_simulate_particles_through_the_engine(session, adk_paths, tmp_path):
    """`particles N out DIR`: a particle set with known truth from the open model (in-process
    when the STAR bridge imports here, else through the separate engine's CLI)."""
    from chimerax.cryogmm import bridge

    if not bridge.star_in_process() and bridge.engine_cli() is None:
        pytest.skip("cryogmm.bridge needs numpy >= 2 here and no separate engine `cryogmm` was found: set CRYOGMM_CLI")
    run(session, f"open {adk_paths['closed']}")
    _, rep = run(session, f"cryogmm simulate #1 resolution 6 particles 40 snr 0.5 out {tmp_path / 'sim'}")
    for name in ("particles.star", "particles.mrcs", "truth.star", "truth_map.mrc", "report.json"):
        assert (tmp_path / "sim" / name).is_file(), name
    text = (tmp_path / "sim" / "particles.star").read_text()
    assert text.count("@") >= 40  # one image name per particle


# --------------------------------------------------------------------------- fit

@pytest.fixture()
def displaced(session, adk_paths):
    """Closed AdK (truth), a 4 Å map simulated from it (10% noise), the model displaced by a
    3° rotation, a 1.5 Å shift and 0.3 Å coordinate noise. Returns (structure, map, truth xyz)."""
    s = run(session, f"open {adk_paths['closed']}")[0]
    v, _ = run(session, "cryogmm simulate #1 resolution 4 spacing 1.33 noise 0.1 seed 1")
    truth = s.atoms.coords.copy()
    s.atoms.coords = rigid_perturb(truth, 3.0, 1.5, seed=2, noise=0.3)
    return s, v, truth


@pytest.mark.slow
def test_fit_moves_atoms_raises_correlation_keeps_geometry(session, displaced, out_dir):
    s, v, truth = displaced
    start = s.atoms.coords.copy()
    cc0 = molmap_correlation(session, s, v, 4)
    t0 = time.time()
    job = run(session, "cryogmm fit #1 #2 resolution 4 stages rigid,full steps 25 updateEvery 5")
    secs = time.time() - t0
    assert job.report is not None and job.error is None and not job.stopped
    end = s.atoms.coords.copy()
    moved = float(np.sqrt(((end - start) ** 2).sum(1).mean()))
    cc1 = molmap_correlation(session, s, v, 4)
    r0, r1 = ca_rmsd(start, truth, s.atoms), ca_rmsd(end, truth, s.atoms)
    b, a = job.report["before"], job.report["after"]
    figures = dict(seconds=secs, updates=job.updates, rms_moved_A=moved, molmap_cc_before=cc0, molmap_cc_after=cc1,
                   ca_rmsd_to_truth_before=r0, ca_rmsd_to_truth_after=r1,
                   **{f"{k}_{w}": d[k] for w, d in (("before", b), ("after", a))
                      for k in ("map_cc_mask", "bond_rmsz", "angle_rmsz", "rama_outlier_pct", "rotamer_outlier_pct",
                                "clashscore")})
    (out_dir / "fit_figures.json").write_text(json.dumps(figures, indent=1), encoding="utf-8")
    # atoms moved, on screen, more than once while it ran
    assert moved > 1.0 and job.updates >= 3, figures
    # toward the truth and into the map (ChimeraX's own correlation and the engine's)
    assert r1 < 0.6 * r0, figures
    assert cc1 > cc0 + 0.05 and a["map_cc_mask"] > b["map_cc_mask"] + 0.05, figures
    # the geometry ends sane (the 0.3 Å noise start has bond RMSZ ~37, ~28% Ramachandran outliers)
    assert a["bond_rmsz"] < 1.5 and a["angle_rmsz"] < 1.5, figures
    assert a["rama_outlier_pct"] < min(5.0, b["rama_outlier_pct"] / 5), figures
    assert a["clashscore"] < 10, figures
    # one undo step back to the start, redo to the result
    run(session, "undo")
    np.testing.assert_allclose(s.atoms.coords, start, atol=1e-6)
    run(session, "redo")
    np.testing.assert_allclose(s.atoms.coords, end, atol=1e-6)


@pytest.mark.slow
def test_fit_runs_on_a_worker_thread_and_stops(session, displaced):
    from chimerax.core.errors import UserError

    s, v, truth = displaced
    start = s.atoms.coords.copy()
    job = run(session, "cryogmm fit #1 #2 resolution 4 stages rigid steps 400 updateEvery 2 wait false")
    assert job.running  # the command returned while the refinement runs
    with pytest.raises(UserError, match="already running"):
        run(session, "cryogmm fit #1 #2 resolution 4")
    # frames drawn by the main thread pick up coordinates as they arrive
    seen = []
    deadline = time.time() + 180
    while job.updates < 3 and time.time() < deadline:
        session.triggers.activate_trigger("new frame", session.main_view)
        seen.append(s.atoms.coords[0].copy())
        time.sleep(0.05)
    assert job.updates >= 3 and job.running
    assert len({tuple(np.round(c, 4)) for c in seen}) >= 3  # the atoms moved between frames
    run(session, "cryogmm stop")
    assert job.stopped and not job.running and job.finished
    kept = s.atoms.coords.copy()
    assert float(np.abs(kept - start).max()) > 0.01  # current coordinates kept, not reset
    session.triggers.activate_trigger("new frame", session.main_view)
    np.testing.assert_array_equal(s.atoms.coords, kept)  # nothing moves after stop
    with pytest.raises(UserError, match="no cryogmm fit is running"):
        run(session, "cryogmm stop")
    run(session, "undo")
    np.testing.assert_allclose(s.atoms.coords, start, atol=1e-6)


def test_fit_in_a_moved_model_frame(session, adk_paths):
    """The same fit with the model placed in the scene by a 30° turn and a 12 Å shift (its
    coordinates compensated, so it overlays the map as before) gives the same atoms in the
    scene: the engine works in the map's frame and coordinates come back in the model's."""
    from chimerax.geometry import rotation, translation

    s = run(session, f"open {adk_paths['closed']}")[0]
    run(session, "cryogmm simulate #1 resolution 6 noise 0.1")
    s.atoms.coords = rigid_perturb(s.atoms.coords, 2.0, 1.0, seed=4)
    scene = s.atoms.scene_coords.copy()
    run(session, "cryogmm fit #1 #2 resolution 6 stages rigid steps 5")
    ref = s.atoms.scene_coords.copy()
    assert float(np.sqrt(((ref - scene) ** 2).sum(1).mean())) > 0.3  # the fit did move the model
    run(session, "undo")
    place = translation((12.0, -4.0, 3.0)) * rotation((0, 0, 1), 30.0)
    s.scene_position = place
    s.atoms.coords = place.inverse().transform_points(scene)
    np.testing.assert_allclose(s.atoms.scene_coords, scene, atol=1e-6)
    run(session, "cryogmm fit #1 #2 resolution 6 stages rigid steps 5")
    np.testing.assert_allclose(s.atoms.scene_coords, ref, atol=0.02)


# --------------------------------------------------------------------------- validate

def test_validate_flags_the_distorted_residues(session, adk_paths):
    s = run(session, f"open {adk_paths['closed']}")[0]
    base = run(session, "cryogmm validate #1")
    # distort residues 100-107: 1.2 Å random moves of every atom (seeded)
    res = [r for r in s.residues if 100 <= r.number <= 107]
    from chimerax.atomic import Residues

    atoms = Residues(res).atoms
    atoms.coords = atoms.coords + np.random.default_rng(5).normal(scale=1.2, size=(len(atoms), 3))
    rep = run(session, "cryogmm validate #1")
    assert rep["bond_rmsz"] > 2 * base["bond_rmsz"]
    assert rep["rama_outlier_pct"] > base["rama_outlier_pct"]
    flagged = rep["flagged_residues"]
    new_rama = set(flagged["rama_outlier"])
    assert new_rama and all(98 <= int("".join(ch for ch in x.split("/")[1] if ch.isdigit())) <= 109 for x in new_rama)
    # the distorted stretch is flagged, coloured and selected
    hit = {f"{r.chain_id}/{r.name}{r.number}" for r in res}
    out = set(flagged["rama_outlier"]) | set(flagged["rotamer_outlier"]) | set(flagged["clash"])
    assert len(hit & out) >= 3, (hit, out)
    sel = {f"{r.chain_id}/{r.name}{r.number}" for r in s.atoms[s.atoms.selecteds].unique_residues}
    assert sel == out
    from chimerax.cryogmm.checks import COLORS

    red = [r for r in s.residues if f"{r.chain_id}/{r.name}{r.number}" in flagged["rama_outlier"]
           and f"{r.chain_id}/{r.name}{r.number}" not in flagged["clash"]]
    for r in red:
        assert tuple(r.ribbon_color) == COLORS["rama_outlier"]


def test_validate_with_map(session, adk_paths):
    run(session, f"open {adk_paths['closed']}")
    run(session, "cryogmm simulate #1 resolution 4 spacing 1.33 noise 0")
    rep = run(session, "cryogmm validate #1 map #2 resolution 4 select false")
    assert rep["map_cc_mask"] > 0.95 and rep["qscore_mean"] > 0.5


# --------------------------------------------------------------------------- beyond proteins

DATA = Path(__file__).resolve().parents[2] / "tests" / "data"


def _turn(xyz, mask, deg, axis, centre):
    axis = np.asarray(axis, float) / np.linalg.norm(axis)
    th = np.radians(deg)
    k = np.array([[0, -axis[2], axis[1]], [axis[2], 0, -axis[0]], [-axis[1], axis[0], 0]])
    R = np.eye(3) + np.sin(th) * k + (1 - np.cos(th)) * (k @ k)
    out = xyz.copy()
    out[mask] = (xyz[mask] - centre) @ R.T + centre
    return out


def _rms(a, b):
    return float(np.sqrt(((a - b) ** 2).sum(1).mean()))


@pytest.mark.slow
def test_fit_and_validate_an_rna_hairpin(session):
    """The 23-nt RNA hairpin of 1K5I with its 3' half turned 10°: `cryogmm fit` (motion auto)
    brings the phosphates back under 1 Å into a 4 Å map of the deposited model, and
    `cryogmm validate` reports the nucleic-acid figures (base planarity, puckers, suites)."""
    path = DATA / "rna_1k5i.pdb"
    if not path.exists():
        pytest.skip(f"{path} is not in this checkout")
    s = run(session, f"open {path}")[0]
    v, _ = run(session, "cryogmm simulate #1 resolution 4 spacing 1.0 noise 0.1 seed 3")
    truth = s.atoms.coords.copy()
    num = s.atoms.residues.numbers
    hinge = truth[(num >= 10) & (num <= 14)].mean(0)
    s.atoms.coords = _turn(truth, num >= 13, 10.0, (1.0, 0.3, 0.2), hinge)
    p = s.atoms.names == "P"
    before = _rms(s.atoms.coords[p], truth[p])
    job = run(session, "cryogmm fit #1 #2 resolution 4")
    assert job.report is not None and job.error is None
    after = _rms(s.atoms.coords[p], truth[p])
    assert before > 1.5 and after < 1.0, (before, after)
    rep = run(session, "cryogmm validate #1 map #2 resolution 4 select false")
    assert rep["by_kind"]["nucleic acid"]["n_residues"] == 23
    assert rep["base_plane_rmsz"] < 1.0 and rep["n_pucker_outliers"] <= 1
    assert rep["suites"] == 22 and rep["suite_outliers"] <= 5
    assert rep["map_cc_mask"] > 0.8


@pytest.mark.slow
def test_fit_and_validate_a_protein_with_its_ligand(session):
    """HIV-1 protease with its inhibitor XK2 (no shipped dictionary: restrained to its own
    geometry) and chain B + the inhibitor turned 8°: the fit brings Cα and every ligand atom back
    under 1 Å; validate lists the ligand with its bond/angle RMSZ."""
    path = DATA / "hivp_1hvr_xk2.pdb"
    if not path.exists():
        pytest.skip(f"{path} is not in this checkout")
    s = run(session, f"open {path}")[0]
    v, _ = run(session, "cryogmm simulate #1 resolution 4 spacing 1.0 noise 0.1 seed 3")
    truth = s.atoms.coords.copy()
    res = s.atoms.residues
    moved = (s.atoms.chain_ids == "B") | (res.names == "XK2")
    s.atoms.coords = _turn(truth, moved, 8.0, (0.3, 1.0, 0.2), truth.mean(0))
    ca, lig = s.atoms.names == "CA", res.names == "XK2"
    ca0, lig0 = _rms(s.atoms.coords[ca], truth[ca]), _rms(s.atoms.coords[lig], truth[lig])
    job = run(session, "cryogmm fit #1 #2 resolution 4 steps 50")
    assert job.report is not None and job.error is None
    ca1, lig1 = _rms(s.atoms.coords[ca], truth[ca]), _rms(s.atoms.coords[lig], truth[lig])
    assert ca0 > 1.0 and ca1 < 1.0 and lig1 < 1.0, (ca0, ca1, lig0, lig1)
    rep = run(session, "cryogmm validate #1 select false")
    ligs = {row["residue"]: row for row in rep["ligands"]}
    xk2 = next(row for k, row in ligs.items() if "XK2" in k)
    assert xk2["bond_rmsz"] < 1.0 and xk2["angle_rmsz"] < 1.0
    assert rep["rama_outlier_pct"] <= 2.0 and rep["clashscore"] < 10


# --------------------------------------------------------------------------- series / hetero runs

@pytest.mark.slow
def test_series_is_one_model_with_a_coordset_per_map(session, adk_paths):
    """Three maps of the model translated by 0, 1 and 2 Å along x: the series follows them."""
    s = run(session, f"open {adk_paths['closed']}")[0]
    truth = s.atoms.coords.copy()
    shifts = (0.0, 1.0, 2.0)
    for dx in shifts:
        s.atoms.coords = truth + np.array([dx, 0, 0])
        run(session, "cryogmm simulate #1 resolution 6 noise 0.05")
    s.atoms.coords = truth
    s2 = run(session, "cryogmm series #1 maps #2-4 resolution 6 steps 20")
    assert s2.num_coordsets == 3 and len(s2.coordset_ids) == 3
    ca = s2.atoms.names == "CA"
    got = []
    for i, cid in enumerate(s2.coordset_ids):
        run(session, f"coordset {s2.atomspec} {cid}")
        got.append(float((s2.atoms.coords[ca] - truth[ca]).mean(0)[0]))
    np.testing.assert_allclose(got, shifts, atol=0.3)


@pytest.fixture(scope="module")
def hetero_run(tmp_path_factory):
    """A small real heterogeneity run: open->closed AdK particles (400, box 40, SNR 1), 3 epochs
    of the segments decoder, analysed with 4 frames along PC1. Built with the engine in a
    numpy>=2 environment when the bridge cannot run here (CRYOGMM_CLI or `cryogmm` on PATH)."""
    from chimerax.cryogmm import bridge

    d = tmp_path_factory.mktemp("hetero")
    from importlib import resources

    data = Path(str(resources.files("cryogmm.data")))
    from cryogmm.hetero.truth import ADK_CORE, superpose_file

    closed = d / "closed_on_open.pdb"
    superpose_file(data / "adk_closed.pdb", data / "adk_open.pdb", closed, ADK_CORE)
    steps = [["simulate", "--endpoints", data / "adk_open.pdb", closed, "--frames", 10, "--n", 400, "--box", 40,
              "--apix", 2.5, "--snr", 1.0, "--seed", 3, "--device", "cpu", "--out", d / "sim"],
             ["hetero", "train", d / "sim" / "particles.star", "--model", data / "adk_open.pdb", "--map",
              d / "sim" / "truth_map.mrc", "--out", d / "run", "--segments", 8, "--zdim", 2, "--epochs", 3,
              "--batch", 32, "--lowpass-A", 10, "--kl-warmup", 1, "--device", "cpu"],
             ["hetero", "analyze", d / "run", "--pcs", 1, "--frames", 4, "--clusters", 2, "--no-backproject",
              "--device", "cpu"]]
    if bridge.star_in_process():
        from cryogmm.cli import main

        for a in steps:
            assert main([str(x) for x in a]) in (0, None)
    else:
        if bridge.engine_cli() is None:
            pytest.skip("cryogmm.bridge needs numpy >= 2 (ChimeraX 1.7 has numpy 1.26) and no separate engine "
                        "`cryogmm` was found: set CRYOGMM_CLI")
        for a in steps:
            bridge.run_engine_cli(a, "test")
    return d / "run"


@pytest.mark.slow
def test_open_hetero_run_as_coordsets(session, hetero_run):
    models = run(session, f"cryogmm open {hetero_run}")
    assert len(models) == 1
    m = models[0]
    assert m.num_coordsets == 4  # the 4 frames along PC1
    from cryogmm.io.structures import read_model

    ref = read_model(hetero_run / "analyze" / "pc1_trajectory.pdb")
    assert m.num_atoms == len(ref.element)
    run(session, f"coordset {m.atomspec} 1,4")  # plays (headless: steps through every set)
    xyz = []
    for i in m.coordset_ids:
        m.active_coordset_id = i
        xyz.append(m.atoms.coords.copy())
    xyz = np.array(xyz)
    # the frames differ (the trajectory moves), the first matches the file's first MODEL
    assert float(np.sqrt(((xyz[-1] - xyz[0]) ** 2).sum(1).mean())) > 0.3
    np.testing.assert_allclose(xyz[0], ref.coords[0], atol=1e-3)


@pytest.mark.slow
def test_open_unanalysed_run_analyses_it_first(session, hetero_run, tmp_path):
    """A training run without its analyze/ folder: analysed into a temporary folder (the run
    folder is left as it was), then PC1 opened with the default 10 frames."""
    import shutil

    run_copy = tmp_path / "run"
    shutil.copytree(hetero_run, run_copy, ignore=shutil.ignore_patterns("analyze"))
    before = sorted(p.name for p in run_copy.iterdir())
    models = run(session, f"cryogmm open {run_copy} pcs 1")
    assert len(models) == 1 and models[0].num_coordsets == 10
    assert sorted(p.name for p in run_copy.iterdir()) == before


@pytest.fixture(scope="module")
def crossval_analysis(tmp_path_factory):
    """A --halves heterogeneity run (open->closed AdK, 300 particles with the simulator's
    rlnRandomSubset, box 40, SNR 1; 3 epochs per half) analysed with 2 states: the per-state
    half-set cross-validation and its state models. Built with the engine (in process, or through
    CRYOGMM_CLI when ChimeraX's numpy cannot run the STAR bridge)."""
    from chimerax.cryogmm import bridge

    d = tmp_path_factory.mktemp("crossval")
    from importlib import resources

    data = Path(str(resources.files("cryogmm.data")))
    from cryogmm.hetero.truth import ADK_CORE, superpose_file

    closed = d / "closed_on_open.pdb"
    superpose_file(data / "adk_closed.pdb", data / "adk_open.pdb", closed, ADK_CORE)
    steps = [["simulate", "--endpoints", data / "adk_open.pdb", closed, "--frames", 10, "--n", 300, "--box", 40,
              "--apix", 2.5, "--snr", 1.0, "--seed", 3, "--device", "cpu", "--out", d / "sim"],
             ["hetero", "train", d / "sim" / "particles.star", "--model", data / "adk_open.pdb", "--map",
              d / "sim" / "truth_map.mrc", "--out", d / "run", "--halves", "--segments", 8, "--zdim", 2, "--epochs",
              3, "--batch", 32, "--lowpass-A", 10, "--kl-warmup", 1, "--device", "cpu"],
             ["hetero", "analyze", d / "run", "--out", d / "an", "--pcs", 1, "--frames", 2, "--clusters", 2,
              "--no-backproject", "--device", "cpu"]]
    if bridge.star_in_process():
        from cryogmm.cli import main

        for a in steps:
            assert main([str(x) for x in a]) in (0, None)
    else:
        if bridge.engine_cli() is None:
            pytest.skip("cryogmm.bridge needs numpy >= 2 (ChimeraX 1.7 has numpy 1.26) and no separate engine "
                        "`cryogmm` was found: set CRYOGMM_CLI")
        for a in steps:
            bridge.run_engine_cli(a, "test")
    return d / "an"


def test_series_plays_the_cross_validated_state_models(session, crossval_analysis):
    from chimerax.core.errors import UserError
    from cryogmm.io.structures import read_model

    rep = json.loads((crossval_analysis / "report.json").read_text())["crossval"]
    scored = [s for s in rep["states"] if "skipped" not in s]
    assert scored
    models = run(session, f"cryogmm series crossval {crossval_analysis}")
    assert len(models) == 2
    for h, m in enumerate(models, start=1):
        ref = read_model(crossval_analysis / f"crossval_models_half{h}.pdb")
        assert m.num_coordsets == len(scored) == len(ref.coords)
        assert m.cryogmm_states == [s["state"] for s in scored]
        run(session, f"coordset {m.atomspec} 1,{m.num_coordsets}")
        for i, cid in enumerate(m.coordset_ids):
            m.active_coordset_id = cid
            np.testing.assert_allclose(m.atoms.coords, ref.coords[i], atol=1e-3)
    with pytest.raises(UserError, match="no half-set cross-validation"):
        run(session, f"cryogmm series crossval {crossval_analysis.parent / 'sim'}")
    with pytest.raises(UserError, match="give a model and maps"):
        run(session, "cryogmm series")


# --------------------------------------------------------------------------- errors

def test_bad_arguments_raise_user_errors(session, adk_paths, monkeypatch, tmp_path):
    from chimerax.core.errors import UserError

    run(session, f"open {adk_paths['closed']}")
    with pytest.raises(UserError, match="exactly one map"):
        run(session, "cryogmm fit #1 resolution 4")
    run(session, "cryogmm simulate #1 resolution 6 noise 0")
    with pytest.raises(UserError, match="resolution"):
        run(session, "cryogmm fit #1 #2")
    with pytest.raises(UserError, match="unknown stage"):
        run(session, "cryogmm fit #1 #2 resolution 6 stages rigid,wobble")
    with pytest.raises(UserError, match="unknown similarity"):
        run(session, "cryogmm fit #1 #2 resolution 6 similarity best")
    with pytest.raises(UserError, match="Nyquist"):
        run(session, "cryogmm fit #1 #2 resolution 1")
    with pytest.raises(UserError, match="resolution"):
        run(session, "cryogmm validate #1 map #2")
    with pytest.raises(UserError, match="no cryogmm fit is running"):
        run(session, "cryogmm stop")
    with pytest.raises(UserError, match="neither a cryogmm hetero run"):
        run(session, f"cryogmm open {tmp_path}")
    run(session, "move x 500 models #2")
    with pytest.raises(UserError, match="does not overlap"):
        run(session, "cryogmm fit #1 #2 resolution 6")
    # no engine in ChimeraX's Python: say how to install it
    monkeypatch.setitem(sys.modules, "torch", None)
    with pytest.raises(UserError, match="chimerax -m pip install"):
        run(session, "cryogmm validate #1")


# --------------------------------------------------------------------------- CLI launch + PNG

@pytest.mark.slow
def test_cli_launch_fits_and_renders_png(adk_paths, out_dir, tmp_path):
    """`python -m chimerax.core --nogui --offscreen --exit --cmd ...`: a displaced model refined
    into its simulated map, then an image of the result in its map (when OSMesa is available)."""
    why = cxharness.unavailable_reason()
    if why:
        pytest.skip(why)
    png = out_dir / "cryogmm_fit.png"
    if png.exists():
        png.unlink()
    offscreen = cxharness.osmesa_dir() is not None
    cmds = [f"open {adk_paths['closed']}", "cryogmm simulate #1 resolution 4 spacing 1.33 noise 0.1 seed 1",
            "move x 1.5 models #1 coordinateSystem #1", "turn y 3 models #1 center #1 coordinateSystem #1",
            "cryogmm fit #1 #2 resolution 4 stages rigid,full steps 15",
            "save " + str(tmp_path / "refined.pdb") + " models #1 relModel #2"]
    if offscreen:
        cmds += ["volume #2 sdLevel 2.5 color #6a8fd8", "volume #2 style mesh", "hide #1 atoms; show #1 cartoons", "view",
                 f"save {png} width 900 height 700 supersample 3"]
    env = cxharness.chimerax_env(offscreen=offscreen)
    args = [sys.executable, "-m", "chimerax.core", "--nogui", "--exit", "--cmd", "; ".join(cmds)]
    if offscreen:
        args.insert(4, "--offscreen")
    p = subprocess.run(args, capture_output=True, text=True, encoding="utf-8", errors="replace", env=env, timeout=600)
    log = p.stdout + p.stderr
    (out_dir / "cli_launch.log").write_text(log, encoding="utf-8")
    assert p.returncode == 0, log[-3000:]
    assert "cryogmm fit of" in log and "ERROR" not in log, log[-3000:]
    # the refined model, written by ChimeraX in the map's frame, sits back on the truth
    import gemmi

    def ca(path):
        st = gemmi.read_structure(str(path))
        return np.array([[a.pos.x, a.pos.y, a.pos.z] for r in st[0][0] for a in r if a.name == "CA"])

    rms = float(np.sqrt(((ca(tmp_path / "refined.pdb") - ca(adk_paths["closed"])) ** 2).sum(1).mean()))
    assert rms < 0.8, rms
    if not offscreen:
        pytest.skip("no libOSMesa (ci_install.sh unpacks Debian's libosmesa6): fit checked, no PNG")
    from PIL import Image

    img = np.asarray(Image.open(png).convert("RGB"), dtype=np.float64)
    assert img.shape[:2] == (700, 900)
    assert img.std() > 10  # not a blank frame
