"""Point-group symmetry: operators, map rotation against a known rotation, symmetrisation,
and symmetry expansion (a symmetric mixture projects identically at every expanded pose)."""

import numpy as np
import pytest
import torch

from cryogmm.errors import OptionError
from cryogmm.core.gaussians import Gaussians, gaussians_to_map
from cryogmm.core.projection import project
from cryogmm.core.symmetry import rotate_map, symmetrize_map, symmetry_operators


@pytest.mark.parametrize("sym,k", [("C1", 1), ("c2", 2), ("C7", 7), ("D2", 4), ("D7", 14)])
def test_operators_form_a_group(sym, k):
    ops = symmetry_operators(sym)
    assert ops.shape == (k, 3, 3)
    np.testing.assert_allclose(ops[0], np.eye(3), atol=1e-12)
    for a in ops:
        np.testing.assert_allclose(a @ a.T, np.eye(3), atol=1e-12)
        assert np.linalg.det(a) == pytest.approx(1.0)
        for b in ops:  # closure
            assert np.min(np.abs(ops - a @ b).reshape(k, -1).max(1)) < 1e-9


def test_d2_axes_follow_relion():
    ops = symmetry_operators("D2")
    # RELION: n-fold along z, first two-fold along x
    assert any(np.allclose(o, np.diag([1.0, -1.0, -1.0])) for o in ops)
    assert any(np.allclose(o, np.diag([-1.0, -1.0, 1.0])) for o in ops)


@pytest.mark.parametrize("bad", ["X2", "C0", "", "D", "I"])
def test_bad_symmetry(bad):
    with pytest.raises(OptionError, match="--sym"):
        symmetry_operators(bad)


def test_rotate_map_moves_a_blob_by_a_known_rotation():
    box, apix = 32, 2.0
    g = Gaussians(torch.tensor([[10.0, 0.0, 0.0]]), torch.ones(1), torch.full((1,), 2.5))
    v = gaussians_to_map(g, box, apix)
    R = symmetry_operators("C4")[1]  # +90 degrees about z: x -> y
    w = rotate_map(v, R)
    expected = gaussians_to_map(Gaussians(torch.tensor([[0.0, 10.0, 0.0]]), torch.ones(1), torch.full((1,), 2.5)), box, apix)
    assert torch.corrcoef(torch.stack([w.reshape(-1), expected.reshape(-1)]))[0, 1] > 0.999
    com = lambda m: [(m.sum(dims) * (torch.arange(box) - box // 2)).sum().item() / m.sum().item()
                     for dims in ((0, 1), (0, 2), (1, 2))]  # x, y, z
    np.testing.assert_allclose(com(w), [0.0, 5.0, 0.0], atol=0.05)


def test_symmetrize_keeps_symmetric_and_fixes_asymmetric():
    box, apix = 32, 2.0
    ops = symmetry_operators("C3")
    c = np.array([[9.0, 2.0, 3.0]])
    sym_c = np.concatenate([c @ o.T for o in ops])
    g = Gaussians(torch.tensor(sym_c, dtype=torch.float32), torch.ones(3), torch.full((3,), 2.5))
    v = gaussians_to_map(g, box, apix)
    s = symmetrize_map(v, ops)
    assert torch.corrcoef(torch.stack([s.reshape(-1), v.reshape(-1)]))[0, 1] > 0.999
    one = gaussians_to_map(Gaussians(torch.tensor(c, dtype=torch.float32), torch.ones(1), torch.full((1,), 2.5)), box, apix)
    s1 = symmetrize_map(one, ops)
    assert torch.corrcoef(torch.stack([s1.reshape(-1), v.reshape(-1)]))[0, 1] > 0.995  # trilinear interpolation
    # weighted: a mask around copy 1 copies that region onto its mates
    mask = (gaussians_to_map(Gaussians(torch.tensor(c, dtype=torch.float32), torch.ones(1), torch.full((1,), 5.0)), box, apix) > 1e-3).float()
    sw = symmetrize_map(one * 3.0, ops, weight=mask)
    assert torch.corrcoef(torch.stack([sw.reshape(-1), v.reshape(-1)]))[0, 1] > 0.99


def test_expanded_poses_project_identically():
    """A symmetric map projects the same at A and at every A R_k: the basis of expansion."""
    from scipy.spatial.transform import Rotation

    ops = symmetry_operators("D3")
    base = np.array([[12.0, 3.0, 4.0], [6.0, -5.0, -8.0]])
    cen = np.concatenate([base @ o.T for o in ops])
    g = Gaussians(torch.tensor(cen, dtype=torch.float64), torch.ones(len(cen), dtype=torch.float64),
                  torch.full((len(cen),), 2.0, dtype=torch.float64))
    A = Rotation.random(3, random_state=0).as_matrix()
    imgs = [project(g, torch.as_tensor(A @ o), None, 40, 1.5) for o in ops]
    for im in imgs[1:]:
        torch.testing.assert_close(im, imgs[0], atol=1e-9, rtol=1e-7)


@pytest.fixture(scope="module")
def dimer(tmp_path_factory):
    """A C2 dimer of adenylate kinase (two-fold along z through the box centre), simulated."""
    from cryogmm.cli import main as cli
    from cryogmm.demo import example_model

    d = tmp_path_factory.mktemp("dimer")
    lines = [l for l in example_model("open").read_text().splitlines() if l.startswith("ATOM")]
    xyz = np.array([[float(l[30:38]), float(l[38:46]), float(l[46:54])] for l in lines])
    shift = np.array([24.0, 0.0, 0.0]) - xyz.mean(0)
    out = []
    for name, R in (("A", np.eye(3)), ("B", np.diag([-1.0, -1.0, 1.0]))):  # B: two-fold about z
        for l, p in zip(lines, (xyz + shift) @ R.T):
            out.append(f"{l[:21]}{name}{l[22:30]}{p[0]:8.3f}{p[1]:8.3f}{p[2]:8.3f}{l[54:]}")
        out.append("TER")
    (d / "dimer.pdb").write_text("\n".join(out + ["END"]) + "\n")
    assert cli(["simulate", "--model", str(d / "dimer.pdb"), "--n", "200", "--box", "48", "--apix", "3.0",
                "--snr", "1", "--pose-noise-deg", "4", "--shift-noise-A", "1.5", "--seed", "3",
                "--out", str(d / "sim")]) == 0
    return d


@pytest.mark.slow
def test_refine_with_c2_symmetry(dimer, tmp_path):
    """--sym C2: the reconstruction is symmetric and right; focused (mask on one subunit) runs
    on the symmetry-expanded particles and re-symmetrises the map."""
    import json

    import mrcfile

    from cryogmm.bridge.io import read_particles
    from cryogmm.cli import main as cli
    from cryogmm.core.similarity import real_space_correlation
    from cryogmm.core.rotations import rotmat_angle_deg

    sim = dimer / "sim"
    out = tmp_path / "c2"
    assert cli(["refine-poses", str(sim / "particles.star"), "--sym", "C2", "--out", str(out), "--iterations", "1",
                "--fit-iterations", "60", "--max-gaussians", "400", "--steps", "25"]) == 0
    rep = json.loads((out / "report.json").read_text())
    assert rep["symmetry"] == "C2" and not rep["symmetry_expanded"]
    m = torch.as_tensor(mrcfile.read(out / "map.mrc").copy())
    c2 = symmetry_operators("C2")[1]
    assert real_space_correlation(m, rotate_map(m, c2)) > 0.98
    truth = torch.as_tensor(mrcfile.read(sim / "truth_map.mrc").copy())
    assert real_space_correlation(m, truth) > 0.9
    t = read_particles(sim / "truth.star")
    err = lambda tab: np.median(rotmat_angle_deg(torch.as_tensor(tab.rotmat), torch.as_tensor(t.rotmat)).numpy())
    e0, e1 = err(read_particles(sim / "particles.star")), err(read_particles(out / "refined.star"))
    assert e1 < 0.6 * e0, (e0, e1)

    # focused on subunit A: expanded (two rows per particle), final map re-symmetrised
    from cryogmm.io import maps as mapio
    from cryogmm.io.structures import gaussians_from_model
    from cryogmm.core.masks import soft_mask_from_map

    g = gaussians_from_model(dimer / "dimer.pdb", "ca", resolution_A=6.0)
    keep = g.centers[:, 0] > 0  # chain A's side, in the frame simulate centred
    from cryogmm.core.gaussians import Gaussians, gaussians_to_map

    half = gaussians_to_map(Gaussians(g.centers[keep], g.amplitudes[keep], g.sigmas[keep]), 48, 3.0)
    mask = soft_mask_from_map(half, 0.05 * float(half.max()), extend_px=1, edge_px=3)
    mapio.write_map(tmp_path / "maskA.mrc", mask.numpy(), 3.0)
    outf = tmp_path / "c2_focused"
    assert cli(["refine-poses", str(out / "refined.star"), "--half-maps", str(out / "half1.mrc"), str(out / "half2.mrc"),
                "--sym", "C2", "--mask", str(tmp_path / "maskA.mrc"), "--out", str(outf), "--iterations", "1",
                "--fit-iterations", "60", "--max-gaussians", "400", "--steps", "25"]) == 0
    repf = json.loads((outf / "report.json").read_text())
    assert repf["symmetry_expanded"] and repf["n_aligned"] == 2 * repf["n_particles"]
    exp = read_particles(outf / "refined.star")
    assert exp.n == 400 and set(exp.particles["rlnCryogmmSymCopy"]) == {1, 2}
    # each copy stays a view of the same particle: copy k against the true pose times R_k (one
    # subunit carries half the signal, so focused poses are not expected to beat global ones)
    for k, R in enumerate(symmetry_operators("C2"), start=1):
        rows = exp.subset(np.flatnonzero(exp.particles["rlnCryogmmSymCopy"].to_numpy() == k))
        ek = np.median(rotmat_angle_deg(torch.as_tensor(rows.rotmat), torch.as_tensor(t.rotmat @ R)).numpy())
        assert ek < e0, (k, e0, e1, ek)
    mf = torch.as_tensor(mrcfile.read(outf / "map.mrc").copy())
    assert real_space_correlation(mf, rotate_map(mf, c2)) > 0.98
    assert real_space_correlation(mf, truth) > 0.9
