"""Projection of Gaussians: analytic integrals, known rotations and shifts, gradients."""

import math

import numpy as np
import pytest
import torch
from scipy import integrate

from cryogmm.bridge.conventions import euler_zyz_deg_to_rotmat, image_position_A, rotmat_to_euler_zyz_deg
from cryogmm.core.gaussians import Gaussians, gaussians_to_map
from cryogmm.core.projection import project, project_map


def one_gaussian(c=(3.0, -2.0, 5.0), a=10.0, s=2.0, dtype=torch.float64):
    return Gaussians(torch.tensor([c], dtype=dtype), torch.tensor([a], dtype=dtype), torch.tensor([s], dtype=dtype))


def rot(*eul, dtype=torch.float64):
    return torch.tensor(euler_zyz_deg_to_rotmat(*eul), dtype=dtype)[None]


def test_single_gaussian_matches_numerical_line_integral():
    """image(p) * apix == integral of the 3D density along the beam through p (quadrature)."""
    g = one_gaussian()
    box, apix = 32, 1.5
    A = rot(30.0, 50.0, -70.0)
    o = torch.tensor([[1.5, -2.25]], dtype=torch.float64)
    img = project(g, A, o, box, apix)[0]
    c, a, s = np.array([3.0, -2.0, 5.0]), 10.0, 2.0
    Am = A[0].numpy()

    def density(r):
        return a / (2 * math.pi * s * s) ** 1.5 * math.exp(-np.sum((r - c) ** 2) / (2 * s * s))

    for iy, ix in [(16, 16), (18, 14), (12, 19), (20, 20)]:
        p = np.array([(ix - box // 2) * apix, (iy - box // 2) * apix])
        # beam point (p + o, z) in the image frame -> map point A^T (p + o, z)

        def f(z):
            return density(Am.T @ np.array([p[0] + o[0, 0].item(), p[1] + o[0, 1].item(), z]))

        val, _ = integrate.quad(f, -40, 40, epsabs=1e-12)
        assert img[iy, ix].item() * apix == pytest.approx(val, rel=1e-6, abs=1e-12)


def test_total_mass_is_amplitude_over_pixel_area():
    g = one_gaussian(c=(0.0, 0.0, 0.0), s=2.5)
    img = project(g, rot(10, 20, 30), None, 48, 1.0)[0]
    assert img.sum().item() == pytest.approx(10.0, rel=1e-6)


@pytest.mark.parametrize(
    "eul, point, expected_xy",
    [
        ((0, 0, 0), (1, 2, 3), (1, 2)),
        ((90, 0, 0), (1, 0, 0), (0, -1)),  # rot about z by 90: x -> -y
        ((0, 0, 90), (1, 0, 0), (0, -1)),  # psi acts the same at tilt 0
        ((0, 90, 0), (0, 0, 1), (-1, 0)),  # tilt about y: z -> -x
        ((0, 90, 0), (1, 0, 0), (0, 0)),   # x goes along the beam
    ],
)
def test_known_rotations_place_the_peak(eul, point, expected_xy):
    """A Gaussian at ``point`` (in units of 4 Å) peaks at the hand-computed pixel."""
    box, apix, unit = 40, 1.0, 4.0
    g = one_gaussian(c=tuple(unit * v for v in point), s=1.0)
    img = project(g, rot(*eul), None, box, apix)[0]
    iy, ix = np.unravel_index(int(img.argmax()), img.shape)
    assert (ix - box // 2, iy - box // 2) == (unit * expected_xy[0], unit * expected_xy[1])
    # and the conventions module says the same
    pos = image_position_A(euler_zyz_deg_to_rotmat(*eul), np.array(point) * unit, np.zeros(2))
    np.testing.assert_allclose(pos, np.array(expected_xy) * unit, atol=1e-9)


def test_shift_sign_follows_relion():
    """rlnOriginXAngst = +6 Å with 2 Å pixels moves features by -3 px (DESIGN.md)."""
    g = one_gaussian(c=(0.0, 0.0, 0.0), s=1.5)
    box, apix = 32, 2.0
    img = project(g, rot(0, 0, 0), torch.tensor([[6.0, 0.0]], dtype=torch.float64), box, apix)[0]
    iy, ix = np.unravel_index(int(img.argmax()), img.shape)
    assert (ix - box // 2, iy - box // 2) == (-3, 0)


def test_euler_round_trip_and_orthogonality():
    rng = np.random.default_rng(0)
    eul = np.stack([rng.uniform(-180, 180, 200), rng.uniform(0.5, 179.5, 200), rng.uniform(-180, 180, 200)], 1)
    A = euler_zyz_deg_to_rotmat(*eul.T)
    np.testing.assert_allclose(A @ np.swapaxes(A, 1, 2), np.broadcast_to(np.eye(3), A.shape), atol=1e-12)
    np.testing.assert_allclose(np.linalg.det(A), 1.0, atol=1e-12)
    back = rotmat_to_euler_zyz_deg(A)
    np.testing.assert_allclose(euler_zyz_deg_to_rotmat(*back.T), A, atol=1e-10)
    # degenerate tilts: all rotation in psi
    A0 = euler_zyz_deg_to_rotmat(40.0, 0.0, 10.0)
    np.testing.assert_allclose(rotmat_to_euler_zyz_deg(A0), [0.0, 0.0, 50.0], atol=1e-9)
    A180 = euler_zyz_deg_to_rotmat(40.0, 180.0, 10.0)
    np.testing.assert_allclose(euler_zyz_deg_to_rotmat(*rotmat_to_euler_zyz_deg(A180)), A180, atol=1e-9)


def test_gaussian_projection_agrees_with_map_projection():
    rng = np.random.default_rng(1)
    n = 40
    g = Gaussians(torch.tensor(rng.normal(0, 8, (n, 3)), dtype=torch.float32),
                  torch.tensor(rng.uniform(1, 8, n), dtype=torch.float32),
                  torch.tensor(rng.uniform(2.0, 3.0, n), dtype=torch.float32))
    box, apix = 48, 1.5
    vol = gaussians_to_map(g, box, apix)
    A = torch.tensor(euler_zyz_deg_to_rotmat([0, 33, 120], [0, 70, 15], [0, -40, 200]), dtype=torch.float32)
    o = torch.tensor([[0.0, 0.0], [2.0, -3.0], [-1.2, 0.7]])
    p1, p2 = project(g, A, o, box, apix), project_map(vol, A, o, apix)
    for i in range(3):
        cc = np.corrcoef(p1[i].flatten(), p2[i].flatten())[0, 1]
        assert cc > 0.995
        assert p2[i].sum().item() == pytest.approx(p1[i].sum().item(), rel=0.01)


def test_map_of_gaussians_integrates_to_amplitudes():
    g = Gaussians(torch.tensor([[0.0, 0.0, 0.0], [5.0, -3.0, 2.0]]), torch.tensor([6.0, 8.0]), torch.tensor([2.0, 1.5]))
    vol = gaussians_to_map(g, 40, 1.0)
    assert vol.sum().item() == pytest.approx(14.0, rel=1e-4)
    # the centre voxel of the first Gaussian (index N//2) holds its peak density (+ the other's tail)
    peak = 6.0 / (2 * math.pi * 4.0) ** 1.5
    assert vol[20, 20, 20].item() == pytest.approx(peak, rel=0.02)


def test_gradcheck_projection():
    torch.manual_seed(0)
    c = torch.randn(3, 3, dtype=torch.float64, requires_grad=True)
    a = torch.rand(3, dtype=torch.float64, requires_grad=True)
    s = (torch.rand(3, dtype=torch.float64) + 1.0).requires_grad_()
    A = rot(20, 40, 60).requires_grad_()
    o = torch.tensor([[0.3, -0.4]], dtype=torch.float64, requires_grad=True)

    def f(c, a, s, A, o):
        return project(Gaussians(c, a, s), A, o, 8, 1.0)

    assert torch.autograd.gradcheck(f, (c, a, s, A, o), eps=1e-6, atol=1e-6)


def test_batched_per_image_centers_match_loop():
    torch.manual_seed(0)
    B, n = 4, 5
    c = torch.randn(B, n, 3) * 4
    a, s = torch.rand(n) + 0.5, torch.rand(n) + 1.0
    A = torch.tensor(euler_zyz_deg_to_rotmat(np.arange(B) * 30.0, 40.0, 10.0), dtype=torch.float32)
    batch = project(Gaussians(c, a, s), A, None, 16, 1.0)
    for b in range(B):
        one = project(Gaussians(c[b], a, s), A[b:b + 1], None, 16, 1.0)[0]
        torch.testing.assert_close(batch[b], one)
