"""Model-refinement proofs beside the benchmarks: the ideal/kinked helix builder (analytic
φ/ψ and kink), Blau & Lindahl's straight-into-kinked helix test, the rotamer rebuild
(outlier χ back to the true rotamer without new clashes) and geometry-only refinement of a
deposited fragment (every figure improves or stays at 0, atoms move < 0.3 Å RMS)."""

import sys
from importlib import resources
from pathlib import Path

import numpy as np
import pytest
import torch

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"
sys.path.insert(0, str(BENCH))

import geometry_only  # noqa: E402
import refine_model_helix as helix  # noqa: E402

TEST_STEPS = 40  # measured: seeds 0, 1, 2 -> 0.95, 1.06, 0.92 Å (benchmarks/results/refine_model_helix.json)
ADK = Path(str(resources.files("cryogmm.data").joinpath("adk_closed.pdb")))


def _fragment(d: Path, last: int = 40) -> Path:
    lines = [ln for ln in ADK.read_text().splitlines() if ln.startswith("ATOM") and int(ln[22:26]) <= last]
    p = d / "truth.pdb"
    p.write_text("\n".join(lines) + "\nEND\n")
    return p


def _circ(a, b, period=360.0):
    d = np.mod(np.asarray(a) - np.asarray(b), period)
    return np.minimum(d, period - d)


def test_helix_builder_geometry(tmp_path):
    """The NeRF helices have the φ/ψ they were built from (measured by the restraint code),
    ideal bonds, a kink of ~43° in the kinked one and none in the straight one."""
    from cryogmm.model.restraints import Restraints
    from cryogmm.model.topology import build_topology
    from cryogmm.model.validate import validate_coords

    n = 25
    for kinked in (False, True):
        phi, psi = helix.helix_angles(n, kinked)
        p = helix.write_pdb(helix.build_backbone(phi, psi), tmp_path / f"h{int(kinked)}.pdb")
        t = build_topology(p)
        r = Restraints(t)
        pp = r.phi_psi(torch.as_tensor(t.coords)).numpy()
        res = t.rama_res  # rama entries are residues 2..n-1
        labels = [int(t.res_label(int(k)).split("ALA")[1]) - 1 for k in res]
        np.testing.assert_allclose(_circ(pp[:, 0], phi[labels]), 0, atol=0.2)  # PDB coordinates carry 3 decimals
        np.testing.assert_allclose(_circ(pp[:, 1], psi[labels]), 0, atol=0.2)  # PDB coordinates carry 3 decimals
        f = validate_coords(t, t.coords)
        assert f["bond_outliers"] == 0 and f["rama_outlier_pct"] == 0.0 and f["chiral_outliers"] == 0
        ca = t.coords[t.atom_name == "CA"]
        ang = helix.kink_angle(ca)
        if kinked:
            assert 38.0 < ang < 48.0
        else:
            assert ang < 2.0


def test_rotamer_rebuild_recovers_truth(tmp_path):
    """LEU35 and TYR24 of a 1AKE fragment set to χ1 = 0° (outliers, clashing) in the map of
    the true fragment: the rebuild puts both back within 15° of their true χ, with no more
    clashes than the truth and no rotamer outliers left."""
    from cryogmm.core.gaussians import ELECTRONS, sigma_from_resolution
    from cryogmm.io.maps import write_map
    from cryogmm.model.density import splat
    from cryogmm.model.refine.config import RefineModelConfig
    from cryogmm.model.refine.job import refine_model
    from cryogmm.model.rotamers import set_torsion
    from cryogmm.model.restraints import Restraints
    from cryogmm.core.rotations import dihedral
    from cryogmm.model.topology import build_topology, write_model
    from cryogmm.model.validate import rotamer_table, validate_coords

    truth = _fragment(tmp_path)
    t = build_topology(truth)
    heavy = ~t.is_h
    x = t.coords[heavy]
    lo = x.min(0) - 8.0
    amp = torch.tensor([ELECTRONS.get(e, 6) for e in t.element[heavy]], dtype=torch.float64)
    m = splat(torch.as_tensor(x), amp, sigma_from_resolution(3.0), (48, 48, 48), 1.0, lo).numpy()
    m = m + np.random.default_rng(0).normal(scale=0.05 * m.std(), size=m.shape)
    write_map(tmp_path / "map.mrc", m, 1.0, origin_A=lo)

    def chis(topo):
        return {topo.res_label(ri): (chi, p) for ri, _, chi, p in rotamer_table(Restraints(topo), torch.as_tensor(topo.coords))}

    true_chis = chis(t)
    targets = ("A/LEU35", "A/TYR24")
    xx = torch.as_tensor(t.coords.copy())
    nbr = [[] for _ in range(t.n_atoms)]
    for i, j in t.bonds:
        nbr[i].append(j)
        nbr[j].append(i)
    for tname, (quads, res) in t.chis.items():
        for k in range(len(res)):
            if t.res_label(int(res[k])) in targets:
                q = quads[k, 0]
                cur = float(torch.rad2deg(dihedral(*(xx[int(q[m])] for m in range(4)))))
                xx = set_torsion(xx, q, -cur, nbr, t)
    write_model(t, xx.numpy(), tmp_path / "start.pdb")
    ts = build_topology(tmp_path / "start.pdb")
    start_chis = chis(ts)
    for lab in targets:
        assert start_chis[lab][1] < 0.003  # outliers now
        assert _circ(start_chis[lab][0][0], 0.0) < 1.0
    n_clash_truth = validate_coords(t, t.coords)["n_clashes"]
    assert validate_coords(ts, ts.coords)["n_clashes"] > n_clash_truth

    rep = refine_model(RefineModelConfig(model=tmp_path / "start.pdb", map=tmp_path / "map.mrc", resolution_A=3.0,
                                         out=tmp_path / "out", stages=("rotamers",), rebuild_rotamers=True, threads=1))
    assert [r["changed"] for r in rep["log"] if r.get("phase") == "rotamers"][0] >= 2
    tr = build_topology(tmp_path / "out" / "refined.pdb")
    after = chis(tr)
    for lab in targets:
        period = np.array([360.0, 180.0]) if lab.startswith("A/TYR") else 360.0  # Tyr χ2 is 2-fold
        assert np.all(_circ(after[lab][0], true_chis[lab][0], period) < 15.0), (lab, after[lab], true_chis[lab])
        assert after[lab][1] >= 0.003
    assert rep["after"]["n_clashes"] <= n_clash_truth
    assert rep["after"]["rotamer_outlier_pct"] == 0.0


def test_geometry_only_fragment(tmp_path):
    """Geometry-only refinement of deposited residues 1-40 of 1AKE: every figure of our
    validation improves or stays at 0, atoms move < 0.3 Å RMS."""
    truth = _fragment(tmp_path)
    row = geometry_only.run(truth, tmp_path / "out", steps=50, molp=None, threads=1)
    assert row["rms_moved_A"] < geometry_only.MAX_RMS_MOVE_A
    bad = {k: (row["ours_before"][k], row["ours_after"][k]) for k, v in row["ours_verdict"].items()
           if v not in geometry_only.OK}
    assert not bad, bad
    assert row["ours_after"]["bond_rmsz"] < 0.8 * row["ours_before"]["bond_rmsz"]


def test_geometry_only_verdict_flags_worse():
    v = geometry_only.verdict({"clashscore": 1.0, "bond_rmsz": 0.0, "rama_favoured_pct": 90.0},
                              {"clashscore": 2.0, "bond_rmsz": 0.0, "rama_favoured_pct": 95.0},
                              {"clashscore": -1, "bond_rmsz": -1, "rama_favoured_pct": +1})
    assert v == {"clashscore": "worse", "bond_rmsz": "stays 0", "rama_favoured_pct": "improves"}


@pytest.mark.slow
def test_helix_relative_entropy_unaligned(tmp_path):
    """Blau & Lindahl's test: the straight helix, randomly displaced (20°, 3 Å), refined by
    relative entropy into the kinked helix's 4 Å map reaches < 1 Å Cα RMSD in most seeds,
    with clean geometry."""
    seeds = (0, 1, 2)
    case = helix.make_case(tmp_path, seeds=seeds)
    assert case["aligned_ca_rmsd_A"] > 2.0
    rmsd, clean = [], []
    for s in seeds:
        r = helix.run_one(case["starts"][f"seed{s}"], case, "relative-entropy", 4.0, TEST_STEPS,
                          tmp_path / f"out{s}", {})
        assert r["before"]["ca_rmsd_to_reference_A"] > 2.0
        rmsd.append(r["after"]["ca_rmsd_to_reference_A"])
        assert r["after"]["bond_rmsz"] < 1.0
        clean.append(r["after"]["rama_outlier_pct"] == 0.0)
    assert sum(d < 1.0 for d in rmsd) >= 2, rmsd
    # seed 0 ends with one residue on the Ramachandran outlier contour or just inside it depending
    # on float-level differences (torch's thread pool after an earlier 1-thread run moves the
    # result by 1e-4 Å): "most seeds" for the outlier count too
    assert sum(clean) >= 2, clean
