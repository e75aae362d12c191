"""Conformation-dependent backbone library (cryogmm.model.cdl): the shipped table against values of
the published CDL v1.2 table, cctbx's bin rounding, targets that follow φ/ψ, and (peer) the same
targets and RMSZ as cctbx's own CDL on a deposited model."""

import os
import subprocess
import sys
from importlib import resources
from pathlib import Path

import numpy as np
import pytest
import torch

from cryogmm.errors import OptionError
from cryogmm.model import cdl
from cryogmm.model.restraints import Restraints
from cryogmm.model.topology import build_topology
from cryogmm.model.validate import validate_coords

ADK = Path(str(resources.files("cryogmm.data").joinpath("adk_closed.pdb")))
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def pep(tmp_path_factory):
    """Residues 1-9 of adenylate kinase (MRIILLGAP: a Gly, and Ala8 before Pro9)."""
    lines = [l for l in ADK.read_text().splitlines() if l.startswith("ATOM") and int(l[22:26]) <= 9]
    p = tmp_path_factory.mktemp("pep") / "pep.pdb"
    p.write_text("\n".join(lines) + "\nEND\n")
    return build_topology(p, backbone_library="cdl")  # the tests of the CDL path


def test_table_holds_published_values():
    mean, sd, version = cdl.table()
    assert version == "CDL v1.2"
    g = cdl.GROUPS.index("Gly_nonxpro")
    i = j = cdl.bins(-180.0)
    # Gly, (φ, ψ) = (-180, -180): C-N-CA 120.86 (1.62), N-CA-C 110.42 (1.49), C-N 1.327 (0.0115), C=O 1.2356
    assert mean[g, i, j, 0] == pytest.approx(120.86) and sd[g, i, j, 0] == pytest.approx(1.62)
    assert mean[g, i, j, 2] == pytest.approx(110.42) and sd[g, i, j, 2] == pytest.approx(1.49)
    assert mean[g, i, j, 7] == pytest.approx(1.327) and sd[g, i, j, 7] == pytest.approx(0.0115)
    assert mean[g, i, j, 11] == pytest.approx(1.2356)
    assert np.isnan(mean[g, i, j, 1]) and np.isnan(mean[g, i, j, 9])  # Gly has no Cβ
    # (-180, -150): N-CA-C 113.18 (2.37); every class and bin filled for the main chain angles
    assert mean[g, i, cdl.bins(-150.0), 2] == pytest.approx(113.18)
    assert np.isfinite(mean[..., 2]).all() and np.isfinite(sd[..., 2]).all()
    assert 100.0 < np.nanmin(mean[..., 2]) and np.nanmax(mean[..., 2]) < 118.0


def test_bins_round_to_nearest_ten_as_cctbx():
    got = cdl.bins(np.array([-180.0, -175.1, -64.9, -65.1, 4.9, 174.9, 175.1, 180.0]))
    keys = got * 10 - 180
    assert keys.tolist() == [-180, -180, -60, -70, 0, 170, -180, -180]


def test_residue_groups():
    assert cdl.GROUPS[cdl.residue_group("GLY", "ALA")] == "Gly_nonxpro"
    assert cdl.GROUPS[cdl.residue_group("ALA", "PRO")] == "NonPGIV_xpro"
    assert cdl.GROUPS[cdl.residue_group("VAL", "LEU")] == "IleVal_nonxpro"
    assert cdl.residue_group("MSE", "ALA") == -1 and cdl.residue_group("HOH", "ALA") == -1


def _phi_psi(t, x):
    r = Restraints(t, backbone_library="engh-huber")
    return r.phi_psi(torch.as_tensor(x)).numpy()


def test_targets_follow_phi_psi(pep):
    t = pep
    eh = Restraints(t, backbone_library="engh-huber")
    r = Restraints(t, backbone_library="cdl")
    assert r.backbone_library == "cdl" and len(r.cdl) == len(t.rama) == 7  # residues 2-8
    mean, sd, _ = cdl.table()
    pp = _phi_psi(t, t.coords)
    nac = list(cdl.ANGLES).index(("N", "CA", "C"))
    for k, row in enumerate(r.cdl.rama_rows):
        a = r.cdl.angle_rows[k, nac]
        g = r.cdl.groups[k]
        i, j = cdl.bins(pp[row, 0]), cdl.bins(pp[row, 1])
        assert np.degrees(float(r.angle_ideal[a])) == pytest.approx(mean[g, i, j, nac])
        assert np.degrees(float(r.angle_sigma[a])) == pytest.approx(sd[g, i, j, nac])
        assert 105.0 < np.degrees(float(eh.angle_ideal[a])) < 115.0  # Engh & Huber: one value per residue type
    names = {cdl.GROUPS[g] for g in r.cdl.groups}
    assert "Gly_nonxpro" in names and "NonPGIV_xpro" in names
    # only backbone restraints differ from the dictionary's
    changed = np.nonzero(~np.isclose(r.angle_ideal.numpy(), eh.angle_ideal.numpy()))[0]
    assert len(changed) and set(changed) <= set(r.cdl.angle_rows.ravel().tolist())
    # turn ψ of the first CDL residue by 90°: its targets move to the new bin at the next refresh
    row = r.cdl.rama_rows[0]
    n_at, ca, c = t.rama[row, 1], t.rama[row, 2], t.rama[row, 3]
    res = t.res_index[ca]
    x = t.coords.copy()
    axis = (x[c] - x[ca]) / np.linalg.norm(x[c] - x[ca])
    th = np.radians(90.0)
    K = np.array([[0, -axis[2], axis[1]], [axis[2], 0, -axis[0]], [-axis[1], axis[0], 0]])
    R = np.eye(3) + np.sin(th) * K + (1 - np.cos(th)) * K @ K
    down = np.nonzero((t.res_index > res) | ((t.res_index == res) & np.isin(t.atom_name, ["O", "OXT"])))[0]
    x[down] = (x[down] - x[c]) @ R.T + x[c]
    before = float(r.angle_ideal[r.cdl.angle_rows[0, nac]])
    pp2 = _phi_psi(t, x)
    assert abs(((pp2[row, 1] - pp[row, 1] + 180) % 360) - 180) == pytest.approx(90.0, abs=1e-6)
    assert pp2[row, 0] == pytest.approx(pp[row, 0])
    assert r.refresh_targets(torch.as_tensor(x)) == len(r.cdl)
    g = r.cdl.groups[0]
    want = mean[g, cdl.bins(pp2[row, 0]), cdl.bins(pp2[row, 1]), nac]
    assert np.degrees(float(r.angle_ideal[r.cdl.angle_rows[0, nac]])) == pytest.approx(want)
    assert want != pytest.approx(np.degrees(before))
    assert n_at >= 0


def test_cis_peptide_keeps_dictionary_targets(pep):
    r = Restraints(pep)
    pp = np.zeros((len(pep.rama), 2))
    trans = r.cdl.targets(pp, np.full(len(r.cdl), 180.0))
    cis = r.cdl.targets(pp, np.full(len(r.cdl), 5.0))
    assert len(trans[0]) and len(trans[3])
    assert all(len(a) == 0 for a in cis)


def test_validate_reports_the_library(pep):
    a = validate_coords(pep, pep.coords)
    assert a["backbone_library"] == "cdl" and a["n_cdl_residues"] == len(pep.rama) == 7
    t = build_topology(pep.structure, backbone_library="engh-huber")
    b = validate_coords(t, t.coords)
    assert b["backbone_library"] == "engh-huber" and b["n_cdl_residues"] == 0
    assert a["angle_rmsz"] != pytest.approx(b["angle_rmsz"])
    assert a["n_angles"] == b["n_angles"] and a["n_bonds"] == b["n_bonds"]


def test_bad_library_one_line(pep):
    with pytest.raises(OptionError, match="--backbone-library"):
        build_topology(pep.structure, backbone_library="cdl2")
    r = subprocess.run([sys.executable, "-m", "cryogmm", "validate", str(ADK), "--backbone-library", "eh"],
                       capture_output=True, text=True)
    assert r.returncode == 2 and "--backbone-library" in r.stderr


MOLP = os.environ.get("MOLP", "/tmp/model/molp")


@pytest.mark.peer
@pytest.mark.skipif(not (Path(MOLP) / "venv" / "bin" / "python").exists(), reason="MolProbity judge not set up")
def test_same_targets_and_rmsz_as_cctbx_cdl(tmp_path):
    """HIV protease + inhibitor (two chains, CSO): cctbx (Phenix's CDL) and ours agree restraint
    by restraint on the backbone, and on the RMSZ over every matched bond and angle."""
    sys.path.insert(0, str(REPO / "benchmarks"))
    from cdl_vs_molprobity import compare

    s = compare(REPO / "tests" / "data" / "hivp_1hvr_xk2.pdb", MOLP)
    for kind in ("bond", "angle"):
        k = s[kind]
        assert k["backbone_same_target_and_sigma"] >= 0.98 * k["backbone_restraints"]
        assert k["rmsz_cryogmm_cdl"] == pytest.approx(k["rmsz_cctbx_cdl"], abs=0.02)
