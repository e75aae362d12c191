"""Point-group symmetry: operators, map rotation against a known rotation, symmetrisation,
and symmetry expansion (a symmetric mixture projects identically at every expanded pose)."""

import numpy as np
import pytest
import torch

from cryogmm.errors import OptionError
from cryogmm.gmm import Gaussians, gaussians_to_map
from cryogmm.project import project
from cryogmm.symmetry import rotate_map, symmetrize_map, symmetry_operators


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
