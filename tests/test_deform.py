"""Deformers: gradients (float64 gradcheck), rigid-body exactness, membership, the interface."""

import math

import numpy as np
import pytest
import torch

from cryogmm.hetero.deform import (
    DisplacementDeformer,
    SegmentDeformer,
    blend_rigid,
    frame_triples,
    make_deformer,
    segment_membership,
)
from cryogmm.core.gaussians import Gaussians
from cryogmm.core.rotations import rotvec_to_rotmat


def _base(n=12, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    return Gaussians(torch.randn(n, 3, generator=g, dtype=dtype) * 10,
                     torch.rand(n, generator=g, dtype=dtype) + 1, torch.rand(n, generator=g, dtype=dtype) + 2)


def _randomize(mod, seed=1):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in mod.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype) * 0.3 + p)


def test_new_deformers_start_at_the_base():
    base = _base(dtype=torch.float32)
    z = torch.randn(5, 3)
    for d in (DisplacementDeformer(base.n, 3), SegmentDeformer(np.arange(base.n), np.zeros(base.n), 4, 3)):
        out = d.deform(base, z)
        assert out.centers.shape == (5, base.n, 3)
        torch.testing.assert_close(out.centers, base.centers.expand(5, -1, -1), atol=1e-5, rtol=0)
        assert out.amplitudes is base.amplitudes and out.sigmas is base.sigmas


def test_gradcheck_displacement_deformer():
    base = _base()
    d = DisplacementDeformer(base.n, 3, hidden=8, layers=1, scale_A=2.0).double()
    _randomize(d)
    z = torch.randn(2, 3, dtype=torch.float64, requires_grad=True)
    c = base.centers.clone().requires_grad_(True)
    assert torch.autograd.gradcheck(lambda z, c: d(base.with_centers(c), z).centers, (z, c))
    # and through the network's parameters
    w = d.net[0].weight
    assert torch.autograd.gradcheck(lambda w_: torch.func.functional_call(d, {"net.0.weight": w_}, (base, z)).centers,
                                    (w.detach().clone().requires_grad_(True),))


def test_gradcheck_segment_deformer():
    base = _base()
    d = SegmentDeformer(np.arange(base.n), np.zeros(base.n), 3, 2, hidden=8, layers=1, temperature=0.5).double()
    _randomize(d)
    z = torch.randn(2, 2, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda z: d(base, z).centers, (z,))
    # the segment mixture parameters (means, widths, weights) get exact gradients too
    names = ("mu", "log_sigma", "logit_w")
    params = tuple(getattr(d, k).detach().clone().requires_grad_(True) for k in names)
    f = lambda *p: torch.func.functional_call(d, dict(zip(names, p)), (base, z.detach())).centers  # noqa: E731
    assert torch.autograd.gradcheck(f, params)


def test_gradcheck_blend_rigid_at_identity():
    # rotation vectors exactly zero: the Taylor branch must still give exact gradients
    pts = torch.randn(5, 3, dtype=torch.float64)
    member = torch.softmax(torch.randn(5, 2, dtype=torch.float64), 1)
    rv = torch.zeros(1, 2, 3, dtype=torch.float64, requires_grad=True)
    tr = torch.zeros(1, 2, 3, dtype=torch.float64, requires_grad=True)
    piv = torch.randn(2, 3, dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda r, t: blend_rigid(pts, member, r, t, piv), (rv, tr))


def test_blend_rigid_moves_a_hard_segment_as_a_rigid_body():
    torch.manual_seed(0)
    pts = torch.randn(30, 3, dtype=torch.float64) * 5
    member = torch.zeros(30, 2, dtype=torch.float64)
    member[:12, 0] = 1
    member[12:, 1] = 1
    rv = torch.tensor([[[0.0, 0.0, math.pi / 2], [0.3, -0.2, 0.1]]], dtype=torch.float64)
    tr = torch.tensor([[[1.0, 2.0, 3.0], [0.0, 0.0, 0.0]]], dtype=torch.float64)
    piv = torch.tensor([[0.0, 0.0, 0.0], [1.0, 1.0, 1.0]], dtype=torch.float64)
    out = blend_rigid(pts, member, rv, tr, piv)[0]
    # segment 0: 90 degrees about z through the origin, then +t
    x, y, z = pts[:12].unbind(1)
    torch.testing.assert_close(out[:12], torch.stack([-y, x, z], 1) + tr[0, 0])
    # segment 1: internal distances kept
    torch.testing.assert_close(torch.cdist(out[12:], out[12:]), torch.cdist(pts[12:], pts[12:]))
    R = rotvec_to_rotmat(rv[0, 1])
    torch.testing.assert_close(out[12:], (pts[12:] - piv[1]) @ R.T + piv[1])


def test_segment_membership_rows_sum_to_one_and_sharpen():
    t = torch.linspace(0, 1, 50)
    mu = torch.tensor([0.2, 0.5, 0.8])
    ls = torch.log(torch.full((3,), 0.1))
    lw = torch.zeros(3)
    soft = segment_membership(t, mu, ls, lw, 1.0)
    hard = segment_membership(t, mu, ls, lw, 0.01)
    torch.testing.assert_close(soft.sum(1), torch.ones(50))
    assert hard.max(1).values.min() > soft.max(1).values.min()
    # contiguous segments in residue order: argmax is non-decreasing along the chain
    assert torch.all(torch.diff(hard.argmax(1)) >= 0)


def test_per_chain_segments_never_span_two_chains():
    chain = np.repeat([0, 1], 20)
    d = SegmentDeformer(np.arange(40), chain, 5, 2, per_chain=True)
    _randomize(d, seed=3)
    m = d.residue_membership().detach()
    assert torch.all(m[:20, 3:] < 1e-6) and torch.all(m[20:, :3] < 1e-6)  # 3 segments for A, 2 for B
    torch.testing.assert_close(m.sum(1), torch.ones(40))
    with pytest.raises(ValueError, match="at least one per chain"):
        SegmentDeformer(np.arange(40), np.repeat([0, 1, 2, 3], 10), 3, 2, per_chain=True)


def test_move_points_follows_the_gaussians():
    base = _base(n=6, dtype=torch.float32)
    owner = torch.tensor([0, 0, 1, 2, 3, 4, 5, 5])
    pts = base.centers[owner] + 0.1
    z = torch.randn(3, 2)
    for kind in ("displacement", "segments"):
        d = make_deformer(kind, n=base.n, zdim=2, residue_of=np.arange(6), chain_of_residue=np.zeros(6), segments=2)
        _randomize(d, seed=4)
        moved_g = d(base, z).centers
        moved_p = d.move_points(base, z, base.centers, torch.arange(base.n))
        torch.testing.assert_close(moved_p, moved_g, atol=1e-5, rtol=1e-5)
        assert d.move_points(base, z, pts, owner).shape == (3, len(owner), 3)
    with pytest.raises(ValueError, match="unknown deformer"):
        make_deformer("voxels", n=3, zdim=2)


def test_displacement_atoms_turn_with_their_residues_local_frame():
    """One Gaussian per residue: when the offsets move the whole chain rigidly, every atom moves
    with the same rigid motion (side chains turn with the backbone), exactly; chains of fewer
    than three residues and ``residue2`` models (several Gaussians a residue) only translate."""
    res, chain = np.arange(10), np.array([0] * 6 + [1] * 4)
    t = frame_triples(res, chain)
    assert t[0].tolist() == [0, 1, 2] and t[5].tolist() == [3, 4, 5] and t[6].tolist() == [6, 7, 8]
    assert frame_triples(np.array([0, 0, 1, 1]), np.zeros(2, int)) is None
    g = torch.Generator().manual_seed(0)
    c0 = torch.randn(10, 3, generator=g) * 4
    base = Gaussians(c0, torch.ones(10), torch.ones(10))
    d = make_deformer("displacement", n=10, zdim=2, residue_of=res, chain_of_residue=chain)
    R = rotvec_to_rotmat(torch.tensor([[0.1, 0.3, -0.2]]))[0]
    shift = torch.tensor([1.0, -2.0, 0.5])
    with torch.no_grad():  # the last layer's bias alone: the same offsets at every z
        d.net[-1].bias.copy_((c0 @ R.T + shift - c0).reshape(-1))
    owner = torch.tensor([0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 3, 7, 0])
    pts = c0[owner] + torch.randn(len(owner), 3, generator=g)
    moved = d.move_points(base, torch.zeros(2, 2), pts, owner)
    torch.testing.assert_close(moved, (pts @ R.T + shift).expand(2, -1, -1), atol=1e-5, rtol=0)
    # a chain of two: its frames are undefined, its atoms follow the offsets only
    d2 = make_deformer("displacement", n=2, zdim=2, residue_of=np.arange(2), chain_of_residue=np.zeros(2, int))
    assert d2.triples is None
