"""refine-model: geometry-only regularisation, map refinement with known truth (a displaced
and noisy fragment of adenylate kinase back into the map of the true model), outputs, and
bad input."""

import json
from importlib import resources
from pathlib import Path

import numpy as np
import pytest
import torch

from cryogmm.errors import MapError, OptionError
from cryogmm.model.refine.config import RefineModelConfig
from cryogmm.core.rotations import rotvec_to_rotmat
from cryogmm.model.refine.job import refine_model
from cryogmm.model.topology import build_topology, write_model

ADK = Path(str(resources.files("cryogmm.data").joinpath("adk_closed.pdb")))


@pytest.fixture(scope="module")
def fragment(tmp_path_factory):
    """Residues 1-40 of 1AKE (truth), a noisy displaced copy (start) and the truth's 4 Å map."""
    from cryogmm.core.gaussians import ELECTRONS, sigma_from_resolution
    from cryogmm.io.maps import write_map
    from cryogmm.model.density import splat

    d = tmp_path_factory.mktemp("frag")
    lines = [l for l in ADK.read_text().splitlines() if l.startswith("ATOM") and int(l[22:26]) <= 40]
    truth = d / "truth.pdb"
    truth.write_text("\n".join(lines) + "\nEND\n")
    t = build_topology(truth, add_hydrogens=False)
    x = t.coords[~t.is_h]
    lo = x.min(0) - 8.0
    n = 48
    amp = torch.tensor([ELECTRONS.get(e, 6) for e in t.element[~t.is_h]], dtype=torch.float64)
    m = splat(torch.as_tensor(x), amp, sigma_from_resolution(4.0), (n, n, n), 1.0, lo).numpy()
    rng = np.random.default_rng(0)
    m = m + rng.normal(scale=0.1 * m.std(), size=m.shape)
    write_map(d / "map.mrc", m, 1.0, origin_A=lo)
    start = t.coords.copy()
    start += np.array([1.2, -0.8, 0.6])
    start += rng.normal(scale=0.25, size=start.shape)
    write_model(t, start, d / "start.pdb")
    return d


def test_rotvec_small_angle_and_orthonormal():
    v = torch.tensor([[0.0, 0.0, 0.0], [0.3, -0.2, 0.5], [1e-7, 0, 0]], dtype=torch.float64)
    R = rotvec_to_rotmat(v)
    assert torch.allclose(R[0], torch.eye(3, dtype=torch.float64))
    assert torch.allclose(R @ R.transpose(-1, -2), torch.eye(3, dtype=torch.float64).expand(3, 3, 3), atol=1e-12)
    vv = v[1:2].clone().requires_grad_(True)
    assert torch.autograd.gradcheck(lambda q: rotvec_to_rotmat(q), (vv,))


@pytest.mark.slow
def test_map_refinement_recovers_truth(fragment, tmp_path):
    out = tmp_path / "ref"
    rep = refine_model(RefineModelConfig(model=fragment / "start.pdb", map=fragment / "map.mrc", resolution_A=4.0,
                                         out=out, stages=("rigid", "full"), n_patches=4, steps=40,
                                         reference=fragment / "truth.pdb"))
    b, a = rep["before"], rep["after"]
    assert b["ca_rmsd_to_reference_A"] > 1.2
    assert a["ca_rmsd_to_reference_A"] < 0.7  # start: 1.6 Å (1.4 Å shift + 0.25 Å per-atom noise)
    assert a["map_cc_mask"] > b["map_cc_mask"] + 0.05
    assert a["bond_rmsz"] < b["bond_rmsz"] and a["clashscore"] <= b["clashscore"]
    # the polish kept the weakest geometry weight whose model met the targets (RMSZ 0.7, no
    # Rama outlier, rotamer outliers <= 1 %, clashscore <= 1): the rounds before it missed them
    sched = [r for r in rep["log"] if r.get("phase") == "polish_schedule"][0]
    met = [r for r in sched["rounds"] if r["met_target"]]
    assert met and sched["rounds"][-1] is met[0] and sched["kept_w_geometry"] == met[0]["w_geometry"]
    w = [r["w_geometry"] for r in sched["rounds"]]
    assert w == sorted(w)
    assert a["bond_rmsz"] <= 0.7 + 1e-6 and a["angle_rmsz"] <= 0.7 + 1e-6 and a["rama_outlier_pct"] == 0
    for f in ("refined.pdb", "refined.cif", "trajectory.pdb", "report.json"):
        assert (out / f).stat().st_size > 0
    traj = (out / "trajectory.pdb").read_text()
    assert traj.count("\nMODEL") + traj.startswith("MODEL") == rep["trajectory_frames"] > 2
    # the refined file holds every heavy atom of the input, in place
    t_in, t_out = build_topology(fragment / "start.pdb"), build_topology(out / "refined.pdb")
    assert (~t_in.is_h).sum() == (~t_out.is_h).sum()


@pytest.mark.slow
def test_geometry_only_improves_and_stays(fragment, tmp_path):
    # the deposited fragment: every figure improves (or stays at its best) while atoms move < 0.3 Å
    rep = refine_model(RefineModelConfig(model=fragment / "truth.pdb", out=tmp_path / "geo", geometry_only=True,
                                         steps=40))
    b, a = rep["before"], rep["after"]
    for k in ("bond_rmsz", "angle_rmsz"):
        assert a[k] < b[k], k
    for k in ("clashscore", "rotamer_outlier_pct", "cbeta_deviations"):
        assert a[k] <= b[k], k
    assert a["rama_outlier_pct"] <= b["rama_outlier_pct"]
    assert rep["rms_moved_A"] < 0.3


def test_bad_input(fragment, tmp_path):
    from cryogmm.cli import main
    from cryogmm.io.maps import write_map

    with pytest.raises(OptionError, match="--map"):
        refine_model(RefineModelConfig(model=fragment / "start.pdb", out=tmp_path / "a"))
    with pytest.raises(OptionError, match="--similarity"):
        refine_model(RefineModelConfig(model=fragment / "start.pdb", out=tmp_path / "a", map=fragment / "map.mrc",
                                       resolution_A=4, similarity="magic"))
    far = tmp_path / "far.mrc"
    write_map(far, np.zeros((16, 16, 16), np.float32), 1.0, origin_A=(500.0, 500.0, 500.0))
    with pytest.raises(MapError, match="does not overlap"):
        refine_model(RefineModelConfig(model=fragment / "start.pdb", out=tmp_path / "a", map=far, resolution_A=4))
    assert not (tmp_path / "a" / "refined.pdb").exists()
    assert main(["refine-model", str(fragment / "start.pdb"), "--map", str(fragment / "map.mrc"), "--resolution",
                 "4", "--stages", "warp", "--out", str(tmp_path / "b")]) == 2


@pytest.mark.slow
def test_demo_model(tmp_path):
    from cryogmm.demo import demo_model

    r = demo_model(tmp_path / "demo", seed=0)
    b, a = r["before"], r["after"]
    assert a["ca_rmsd_to_reference_A"] < 0.6 < b["ca_rmsd_to_reference_A"]
    assert a["rama_outlier_pct"] == 0 and a["clashscore"] <= 2
    assert a["bond_rmsz"] < 1 and a["angle_rmsz"] < 1
    assert (Path(r["out"]) / "refined.pdb").exists()


def test_motion_domains_finds_a_hinge():
    """Two blocks of patches, one turned 20° about its centre and shifted: two domains, each
    block whole; a small third block that moved with the second joins it."""
    from cryogmm.model.refine.domains import motion_domains

    rng = np.random.default_rng(0)
    x0 = rng.normal(size=(440, 3)) * 5
    x0[200:, 0] += 25
    lab = np.repeat(np.arange(22), 20)
    res = np.arange(440) // 4
    th = np.radians(20)
    R = np.array([[np.cos(th), -np.sin(th), 0], [np.sin(th), np.cos(th), 0], [0, 0, 1]])
    x1 = x0.copy()
    c = x0[200:].mean(0)
    x1[200:] = (x0[200:] - c) @ R.T + c + np.array([1.0, 2.0, 0.0])
    x1 += rng.normal(size=x1.shape) * 0.2
    dom, dist = motion_domains(x0, x1, lab, res, threshold_A=1.5, min_residues=12)
    assert len(np.unique(dom[:200])) == 1 and len(np.unique(dom[200:])) == 1
    assert dom[0] != dom[-1]
    assert dist.shape == (22, 22) and dist[0, 1] < 1.0 < dist[0, 15]
    # nothing moved: one domain
    dom1, _ = motion_domains(x0, x0 + 0.01, lab, res)
    assert len(np.unique(dom1)) == 1


def test_peptide_flip_scan_restores_flipped_peptides(tmp_path):
    """Two peptides of 1AKE 1-40 turned by 180 deg about their CA-CA axis (out of reach of
    gradient refinement) are turned back by the scan against the truth's 3 Å map; the truth
    itself gets no flip."""
    from types import SimpleNamespace

    from cryogmm.core.gaussians import ELECTRONS, sigma_from_resolution
    from cryogmm.io.maps import MapGrid
    from cryogmm.model.density import splat
    from cryogmm.model.rotamers import _peptides, fit_peptides
    from cryogmm.model.restraints import Restraints

    lines = [l for l in ADK.read_text().splitlines() if l.startswith("ATOM") and int(l[22:26]) <= 40]
    p = tmp_path / "truth.pdb"
    p.write_text("\n".join(lines) + "\nEND\n")
    t = build_topology(p)
    rs = Restraints(t)
    heavy = ~t.is_h
    lo = t.coords[heavy].min(0) - 6.0
    amp = torch.tensor([ELECTRONS.get(e, 6) for e in t.element[heavy]], dtype=torch.float64)
    m = splat(torch.as_tensor(t.coords[heavy]), amp, sigma_from_resolution(3.0), (48, 48, 48), 1.0, lo).numpy()
    m = m + np.random.default_rng(0).normal(scale=0.1 * m.std(), size=m.shape)
    grid = MapGrid(data=m.astype(np.float32), apix=1.0, origin_A=lo, path="sim")
    truth = rs.with_h(torch.as_tensor(t.coords))

    rf = SimpleNamespace(topo=t, rs=rs, x_all=truth.clone(), on_coords=None, log=[])
    assert fit_peptides(rf, grid)["flipped"] == 0

    pep = _peptides(t)
    rows = [r for r in pep if int(r[5]) in (11, 24)]  # residues 12 and 25 (0-based 11, 24)
    x = t.coords.copy()
    for ca0, c, o, n, ca1, *_ in rows:
        axis = (x[ca1] - x[ca0]) / np.linalg.norm(x[ca1] - x[ca0])
        k = np.array([[0, -axis[2], axis[1]], [axis[2], 0, -axis[0]], [-axis[1], axis[0], 0]])
        R = np.eye(3) + 2 * (k @ k)  # 180 degrees
        x[[c, o, n]] = (x[[c, o, n]] - x[ca0]) @ R.T + x[ca0]
    rf.x_all = rs.with_h(torch.as_tensor(x))
    o_idx = [int(r[2]) for r in rows]
    assert np.linalg.norm(x[o_idx] - t.coords[o_idx], axis=1).min() > 2.0
    row = fit_peptides(rf, grid)
    assert row["flipped"] == 2
    back = rf.x_all.numpy()[o_idx]
    assert np.linalg.norm(back - t.coords[o_idx], axis=1).max() < 0.1


def test_flip_for_rama_turns_back_a_flipped_peptide(tmp_path):
    """Without a map: a peptide of 1AKE 1-40 turned by 180 deg leaves Ramachandran outliers;
    flip_for_rama turns it back (the series' frame repair)."""
    from cryogmm.model.rotamers import _peptides, flip_for_rama
    from cryogmm.model.restraints import Restraints
    from cryogmm.model.validate import rama_table

    lines = [l for l in ADK.read_text().splitlines() if l.startswith("ATOM") and int(l[22:26]) <= 40]
    p = tmp_path / "truth.pdb"
    p.write_text("\n".join(lines) + "\nEND\n")
    t = build_topology(p)
    rs = Restraints(t)
    truth = rs.with_h(torch.as_tensor(t.coords))
    n_true = sum(v == "outlier" for v in rama_table(rs, truth)[3])
    ca0, c, o, n, ca1, r0, r1 = [r for r in _peptides(t) if int(r[5]) == 24][0]
    x = t.coords.copy()
    axis = (x[ca1] - x[ca0]) / np.linalg.norm(x[ca1] - x[ca0])
    k = np.array([[0, -axis[2], axis[1]], [axis[2], 0, -axis[0]], [-axis[1], axis[0], 0]])
    x[[c, o, n]] = (x[[c, o, n]] - x[ca0]) @ (np.eye(3) + 2 * (k @ k)).T + x[ca0]
    xs = rs.with_h(torch.as_tensor(x))
    verdict = rama_table(rs, xs)[3]
    out = [int(t.rama_res[i]) for i, v in enumerate(verdict) if v == "outlier"]
    assert len(out) > n_true
    y, turned = flip_for_rama(rs, xs, out)
    assert turned == 1
    assert sum(v == "outlier" for v in rama_table(rs, y)[3]) == n_true
    assert float(np.linalg.norm(y.numpy()[o] - t.coords[o])) < 1.0


@pytest.mark.slow
def test_geometry_only_repairs_a_ramachandran_outlier(tmp_path):
    """Geometry-only refinement of 1AKE 1-40 with one peptide turned the wrong way round: the
    Ramachandran repair leaves no outlier, and the atoms away from it move < 0.3 Å RMS."""
    from cryogmm.model.rotamers import _peptides

    lines = [l for l in ADK.read_text().splitlines() if l.startswith("ATOM") and int(l[22:26]) <= 40]
    p = tmp_path / "truth.pdb"
    p.write_text("\n".join(lines) + "\nEND\n")
    t = build_topology(p)
    ca0, c, o, n, ca1, r0, r1 = [r for r in _peptides(t) if int(r[5]) == 24][0]
    x = t.coords.copy()
    axis = (x[ca1] - x[ca0]) / np.linalg.norm(x[ca1] - x[ca0])
    k = np.array([[0, -axis[2], axis[1]], [axis[2], 0, -axis[0]], [-axis[1], axis[0], 0]])
    x[[c, o, n]] = (x[[c, o, n]] - x[ca0]) @ (np.eye(3) + 2 * (k @ k)).T + x[ca0]
    write_model(t, x, tmp_path / "flipped.pdb")
    rep = refine_model(RefineModelConfig(model=tmp_path / "flipped.pdb", geometry_only=True, out=tmp_path / "geo",
                                         steps=40))
    assert rep["before"]["rama_outlier_pct"] > 0
    assert rep["after"]["rama_outlier_pct"] == 0
    assert any(r.get("phase") == "rama_repair" for r in rep["log"])
    y = build_topology(tmp_path / "geo" / "refined.pdb").coords
    far = np.abs(t.res_index - 24) > 3
    heavy = ~t.is_h
    assert float(np.sqrt((((y - x)[far & heavy]) ** 2).sum(1).mean())) < 0.3  # the geometry-only goal


def test_cli_quick_preset(fragment, tmp_path):
    """--quick: one rotamer + full-atom round at 50 steps per phase; the report says so and
    the fragment still comes back towards its truth."""
    from cryogmm.cli import main
    from cryogmm.model.refine.config import QUICK_STAGES, QUICK_STEPS

    out = tmp_path / "q"
    assert main(["refine-model", str(fragment / "start.pdb"), "--map", str(fragment / "map.mrc"), "--resolution", "4",
                 "--quick", "--patches", "4", "--reference", str(fragment / "truth.pdb"), "--out", str(out)]) == 0
    rep = json.loads((out / "report.json").read_text())
    assert tuple(rep["stages"]) == QUICK_STAGES and rep["steps_per_phase"] == QUICK_STEPS
    assert not any(r.get("phase") == "full" and "step" in r for r in rep["log"])  # straight to the polish
    assert rep["after"]["ca_rmsd_to_reference_A"] < 0.7 < rep["before"]["ca_rmsd_to_reference_A"]
    assert rep["after"]["rama_outlier_pct"] == 0 and rep["after"]["bond_rmsz"] <= 0.7 + 1e-6
