"""Tests for cryogmm.metrics: analytic cases, statistics of noise, gradcheck, conventions."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from cryogmm.core import similarity as core_similarity
from cryogmm.core import fourier as core_fourier
from cryogmm.core import masks as core_masks
from cryogmm.io import plots as io_plots

F64 = torch.float64


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


def randn(*shape, seed=0):
    return torch.randn(*shape, generator=gen(seed), dtype=F64)


def k_radius(box, ndim):
    """|k| (cycles per box) on the full unshifted FFT grid, computed independently."""
    k = torch.fft.fftfreq(box, dtype=F64) * box
    grids = torch.meshgrid(*([k] * ndim), indexing="ij")
    return torch.sqrt(sum(g * g for g in grids))


def gaussian_blob(box, centre, sigma, ndim):
    c = torch.arange(box, dtype=F64)
    grids = torch.meshgrid(*([c] * ndim), indexing="ij")
    r2 = sum((g - float(x0)) ** 2 for g, x0 in zip(grids, centre))
    return torch.exp(-r2 / (2 * sigma**2))


# ----------------------------------------------------------------------------- shells


def test_shell_index_2d_by_hand():
    idx = core_fourier.radial_shell_index((4, 4))
    # fftfreq order: k = 0, 1, -2, -1
    expected = torch.tensor([[0, 1, 2, 1], [1, 1, 2, 1], [2, 2, 3, 2], [1, 1, 2, 1]])
    assert idx.dtype == torch.long
    assert torch.equal(idx, expected)


def test_shell_index_3d_matches_rounded_radius():
    for box in (8, 9):
        idx = core_fourier.radial_shell_index((box, box, box))
        assert idx.shape == (box, box, box)
        assert torch.equal(idx, torch.round(k_radius(box, 3)).long())
    assert core_fourier.n_shells(16) == 9 and core_fourier.n_shells(17) == 9


def test_shell_counts_and_resolution():
    box = 16
    counts = core_fourier.shell_voxel_counts(box, ndim=3)
    idx = core_fourier.radial_shell_index((box,) * 3)
    assert counts.shape == (core_fourier.n_shells(box),)
    assert counts[0] == 1 and counts[1] == 18  # |k|^2 in {1, 2}
    assert counts.sum() == (idx <= box // 2).sum()
    res = core_fourier.shell_resolution_A(box, 1.5)
    assert math.isinf(res[0])
    assert torch.allclose(res[1:], 24.0 / torch.arange(1, 9, dtype=res.dtype))
    assert res[-1] == pytest.approx(3.0)  # Nyquist = 2 * apix


def test_non_square_is_refused():
    with pytest.raises(ValueError, match="square"):
        core_similarity.frc(torch.zeros(8, 6), torch.zeros(8, 6))
    with pytest.raises(ValueError, match="cubic"):
        core_similarity.fsc(torch.zeros(8, 8, 6), torch.zeros(8, 8, 6))
    with pytest.raises(ValueError, match="ndim"):
        core_fourier.lowpass(torch.zeros(2, 8, 8, 8), 4.0, 1.0)


# ----------------------------------------------------------------------------- FSC / FRC


def test_fsc_identical_maps_is_one():
    x = randn(20, 20, 20)
    assert torch.allclose(core_similarity.fsc(x, x), torch.ones(core_fourier.n_shells(20), dtype=F64), atol=1e-12)
    img = randn(3, 16, 16)
    assert torch.allclose(core_similarity.frc(img, img), torch.ones(3, 9, dtype=F64), atol=1e-12)


def test_fsc_independent_noise_is_zero_within_expectation():
    box, trials = 20, 64
    a, b = randn(trials, box, box, box, seed=1), randn(trials, box, box, box, seed=2)
    curves = core_similarity.fsc(a, b)
    assert curves.shape == (trials, core_fourier.n_shells(box))
    n = core_fourier.shell_voxel_counts(box).to(F64)
    mean = curves.mean(0)[1:]
    # one curve: std about 1/sqrt(n); the mean of `trials` curves: 1/sqrt(n * trials)
    assert (mean.abs() < 3.0 / torch.sqrt(n[1:] * trials)).all()
    ratio = curves.std(0)[1:] * torch.sqrt(n[1:])
    big = n[1:] >= 50
    assert ((ratio[big] > 0.7) & (ratio[big] < 1.3)).all()


def test_fsc_of_noisy_halves_follows_snr_relation():
    box, reps = 32, 4
    k = k_radius(box, 3)
    amp = torch.exp(-0.5 * (k / 5.0) ** 2)  # signal spectrum (amplitude) vs |k|
    sigma_n = 0.3
    white = randn(reps, box, box, box, seed=3)
    signal = torch.fft.ifftn(torch.fft.fftn(white, dim=(-3, -2, -1)) * amp, dim=(-3, -2, -1)).real
    h1 = signal + sigma_n * randn(reps, box, box, box, seed=4)
    h2 = signal + sigma_n * randn(reps, box, box, box, seed=5)
    measured = core_similarity.fsc(h1, h2).mean(0)

    shell = core_fourier.radial_shell_index((box,) * 3).reshape(-1)
    ns = core_fourier.n_shells(box)
    keep = shell < ns
    counts = torch.bincount(shell[keep], minlength=ns).to(F64)
    mean_amp2 = torch.zeros(ns, dtype=F64).index_add(0, shell[keep], (amp**2).reshape(-1)[keep]) / counts
    snr = mean_amp2 / sigma_n**2  # white noise of unit variance has unit power per voxel
    expected = snr / (1 + snr)
    assert expected[2] > 0.9 and expected[-1] < 0.05  # the curve spans the whole range
    assert torch.allclose(measured[2:], expected[2:], atol=0.06)


def test_frc_fsc_symmetric_and_scale_invariant():
    a, b = randn(2, 12, 12, seed=6), randn(2, 12, 12, seed=7)
    f = core_similarity.frc(a, b)
    assert torch.allclose(core_similarity.frc(b, a), f, atol=1e-12)
    assert torch.allclose(core_similarity.frc(3.0 * a, 0.2 * b), f, atol=1e-12)
    assert torch.allclose(core_similarity.frc(-a, b), -f, atol=1e-12)
    x, y = randn(12, 12, 12, seed=8), randn(12, 12, 12, seed=9)
    g = core_similarity.fsc(x, x + y)
    assert torch.allclose(core_similarity.fsc(x + y, x), g, atol=1e-12)
    assert torch.allclose(core_similarity.fsc(1e3 * x, 1e-3 * (x + y)), g, atol=1e-10)


def test_frc_broadcasts_and_accepts_numpy():
    ref = randn(10, 10, seed=10)
    batch = randn(4, 10, 10, seed=11)
    out = core_similarity.frc(ref.numpy(), batch.numpy())
    assert isinstance(out, torch.Tensor) and out.shape == (4, 6)
    assert torch.allclose(out[2], core_similarity.frc(ref, batch[2]))


def test_fsc_mask_multiplies_both_maps():
    x, y = randn(12, 12, 12, seed=12), randn(12, 12, 12, seed=13)
    mask = core_masks.soft_sphere_mask(12, 3, 2, dtype=F64)
    assert torch.allclose(core_similarity.fsc(x, y, mask=mask), core_similarity.fsc(x * mask, y * mask))


def test_frc_loss():
    a, b = randn(3, 10, 10, seed=14), randn(3, 10, 10, seed=15)
    assert torch.allclose(core_similarity.frc_loss(a, a), torch.zeros(3, dtype=F64), atol=1e-12)
    curve = core_similarity.frc(a, b)
    assert torch.allclose(core_similarity.frc_loss(a, b, shell_range=(2, 4)), 1 - curve[:, 2:5].mean(-1))
    w = torch.arange(6, dtype=F64)
    expected = 1 - (curve[:, 1:] * w[1:]).sum(-1) / w[1:].sum()
    assert torch.allclose(core_similarity.frc_loss(a, b, weights=w), expected)
    assert torch.allclose(core_similarity.frc_loss(a, b, weights=w[1:]), expected)
    with pytest.raises(ValueError, match="shell_range"):
        core_similarity.frc_loss(a, b, shell_range=(3, 9))


# ----------------------------------------------------------------------------- resolution


def test_resolution_at_synthetic_curves():
    box, apix = 64, 1.5
    i = torch.arange(core_fourier.n_shells(box), dtype=F64)
    curve = 1 - i / 20  # crosses 0.143 at shell 17.14, 0.5 at shell 10
    assert core_similarity.resolution_at(curve, box, apix) == pytest.approx(box * apix / (20 * (1 - 0.143)))
    assert core_similarity.resolution_at(curve.numpy(), box, apix, threshold=0.5) == pytest.approx(box * apix / 10)
    assert core_similarity.resolution_at(torch.ones(33), box, apix) == pytest.approx(2 * apix)  # never drops
    assert core_similarity.resolution_at([1.0, 0.1] + [0.0] * 31, box, apix) == pytest.approx(box * apix)
    dip = curve.clone()
    dip[0] = -1.0  # the DC shell is ignored
    assert core_similarity.resolution_at(dip, box, apix) == pytest.approx(core_similarity.resolution_at(curve, box, apix))


def test_lowpassed_map_crosses_half_near_the_cutoff():
    box, apix, res = 32, 1.2, 4.8  # cut-off at shell k_c = 8
    x = randn(box, box, box, seed=16)
    y = core_fourier.lowpass(x, res, apix)
    kc = box * apix / res
    found = box * apix / core_similarity.resolution_at(core_similarity.fsc(x, y), box, apix, threshold=0.5)  # in shells
    # FSC is 1 while the filter passes anything; it falls after the edge (k_c + 1 shells)
    assert kc <= found <= kc + 2
    # the filter itself is 0.5 at the cut-off shell and keeps low shells untouched
    fx, fy = torch.fft.fftn(x), torch.fft.fftn(y)
    shell = core_fourier.radial_shell_index((box,) * 3)
    gain = lambda s: ((fy * fx.conj()).real[shell == s].sum() / (fx.abs() ** 2)[shell == s].sum()).item()
    assert gain(int(kc)) == pytest.approx(0.5, abs=0.08)
    assert gain(3) == pytest.approx(1.0, abs=1e-9)
    assert abs(gain(int(kc) + 3)) < 1e-9


# ----------------------------------------------------------------------------- gradcheck


def test_gradcheck_frc_and_loss():
    a = randn(2, 6, 6, seed=17).requires_grad_()
    b = randn(2, 6, 6, seed=18).requires_grad_()
    assert torch.autograd.gradcheck(core_similarity.frc, (a, b))
    assert torch.autograd.gradcheck(lambda p, q: core_similarity.frc_loss(p, q, shell_range=(1, 3)), (a, b))
    x = randn(4, 4, 4, seed=19).requires_grad_()
    y = randn(4, 4, 4, seed=20).requires_grad_()
    assert torch.autograd.gradcheck(core_similarity.fsc, (x, y))


def test_gradcheck_gromacs_measures():
    sim = (torch.rand(2, 3, 3, 3, generator=gen(21), dtype=F64) + 0.1).requires_grad_()
    ref = torch.rand(3, 3, 3, generator=gen(22), dtype=F64) + 0.1
    for norm in (False, True):
        assert torch.autograd.gradcheck(lambda s: core_similarity.relative_entropy(s, ref, normalize=norm), (sim,))
        assert torch.autograd.gradcheck(lambda s: core_similarity.inner_product(s, ref, normalize=norm), (sim,))
    assert torch.autograd.gradcheck(lambda s: core_similarity.cross_correlation(s, ref), (sim,))


def test_gradcheck_correlations_and_lowpass():
    a = randn(2, 5, 5, 5, seed=23).requires_grad_()
    b = randn(5, 5, 5, seed=24)
    mask = core_masks.soft_sphere_mask(5, 1, 2, dtype=F64)
    assert torch.autograd.gradcheck(lambda p: core_similarity.real_space_correlation(p, b, mask, dims=(-3, -2, -1)), (a,))
    assert torch.autograd.gradcheck(lambda p: core_similarity.fourier_correlation(p, b, 2.5, 1.0, ndim=3), (a,))
    assert torch.autograd.gradcheck(lambda p: core_fourier.lowpass(p, 2.5, 1.0, ndim=3), (a,))


# ----------------------------------------------------------------------------- GROMACS measures


def test_inner_product_by_hand():
    ref = torch.tensor([1.0, 2.0, 0.0, -1.0], dtype=F64)
    sim = torch.tensor([2.0, 1.0, 3.0, 4.0], dtype=F64, requires_grad=True)
    s = core_similarity.inner_product(sim, ref, normalize=False, dims=-1)
    assert s.item() == pytest.approx((2 + 2 + 0 - 4) / 4)
    s.backward()
    assert torch.allclose(sim.grad, ref / 4)  # GROMACS: reference / N_voxel
    # normalised: reference by the sum of its positive values (3), sim by its sum (10)
    assert core_similarity.inner_product(sim, ref, dims=-1).item() == pytest.approx((2 + 2 - 4) / 3 / 10 / 4)


def test_cross_correlation_by_hand_and_gromacs_gradient():
    ref = torch.tensor([1.0, 2.0, 3.0], dtype=F64)
    sim = torch.tensor([1.0, 3.0, 2.0], dtype=F64)
    assert core_similarity.cross_correlation(sim, ref, dims=-1).item() == pytest.approx(0.5)
    r = randn(4, 4, 4, seed=25)
    assert core_similarity.cross_correlation(r, r).item() == pytest.approx(1.0)
    assert core_similarity.cross_correlation(2 * r + 3, r).item() == pytest.approx(1.0)
    assert core_similarity.cross_correlation(-r, r).item() == pytest.approx(-1.0)
    assert core_similarity.cross_correlation(torch.ones(4, 4, 4), r).item() == 0.0  # GROMACS: 0, not NaN

    s = randn(4, 4, 4, seed=26).requires_grad_()
    core_similarity.cross_correlation(s, r).backward()
    dr, ds = r - r.mean(), s.detach() - s.detach().mean()
    cov, srr, sss = (dr * ds).sum(), (dr * dr).sum(), (ds * ds).sum()
    gromacs = (dr - cov / sss * ds) / (torch.sqrt(sss) * torch.sqrt(srr))
    assert torch.allclose(s.grad, gromacs)


def test_relative_entropy_by_hand():
    ref = torch.tensor([1.0, 2.0, 0.0, -1.0, 1.0], dtype=F64)
    sim = torch.tensor([2.0, 1.0, 3.0, 4.0, -2.0], dtype=F64, requires_grad=True)
    s = core_similarity.relative_entropy(sim, ref, normalize=False, dims=-1)
    # voxels with ref <= 0 or sim <= 0 are skipped: 1 log(2/1) + 2 log(1/2) = -log 2
    assert s.item() == pytest.approx(-math.log(2))
    s.backward()
    assert torch.equal(sim.grad, torch.tensor([0.5, 2.0, 0.0, 0.0, 0.0], dtype=F64))  # ref / sim


def test_relative_entropy_is_maximal_at_the_reference():
    ref = torch.rand(6, 6, 6, generator=gen(27), dtype=F64) + 0.05
    assert core_similarity.relative_entropy(ref, ref).item() == pytest.approx(0.0, abs=1e-12)
    assert core_similarity.relative_entropy(7.0 * ref, ref).item() == pytest.approx(0.0, abs=1e-12)  # normalised
    noise = torch.rand(20, 6, 6, 6, generator=gen(28), dtype=F64)
    others = core_similarity.relative_entropy(ref * (0.5 + noise), ref)
    assert others.shape == (20,) and (others < 0).all()
    # without normalisation the measure rewards scale: S(2 ref) = log 2 * sum ref
    raw = core_similarity.relative_entropy(2 * ref, ref, normalize=False)
    assert raw.item() == pytest.approx(math.log(2) * ref.sum().item())


def test_gromacs_measures_on_a_batch():
    ref = torch.rand(5, 5, 5, generator=gen(29), dtype=F64) + 0.1
    sims = torch.rand(3, 5, 5, 5, generator=gen(30), dtype=F64) + 0.1
    for fn in (core_similarity.inner_product, core_similarity.cross_correlation, core_similarity.relative_entropy):
        out = fn(sims, ref)
        assert out.shape == (3,)
        assert torch.allclose(out[1], fn(sims[1], ref))


# ----------------------------------------------------------------------------- correlations


def test_real_space_correlation_with_mask_and_dims():
    a, b = randn(3, 8, 8, seed=31), randn(3, 8, 8, seed=32)
    b = b + 0.5 * a
    mask = torch.zeros(8, 8, dtype=F64)
    mask[2:6, 1:7] = 1
    out = core_similarity.real_space_correlation(a, b, mask, dims=(-2, -1))
    assert out.shape == (3,)
    sel = mask.bool()
    for i in range(3):
        expected = np.corrcoef(a[i][sel].numpy(), b[i][sel].numpy())[0, 1]
        assert out[i].item() == pytest.approx(expected)
    assert core_similarity.real_space_correlation(a, b).shape == ()


def test_fourier_correlation():
    a, b = randn(16, 16, 16, seed=33), randn(16, 16, 16, seed=34)
    b = b + a
    # without a low-pass and without DC it is the Pearson correlation (Parseval)
    assert core_similarity.fourier_correlation(a, b).item() == pytest.approx(core_similarity.real_space_correlation(a, b).item())
    # a map and its 4 Å low-pass agree perfectly below 8 Å, not over all frequencies
    y = core_fourier.lowpass(a, 4.0, 1.0)
    assert core_similarity.fourier_correlation(a, y, lowpass_A=8.0, apix=1.0).item() == pytest.approx(1.0, abs=1e-9)
    assert core_similarity.fourier_correlation(a, y).item() < 0.9
    imgs = randn(4, 16, 16, seed=35)
    assert core_similarity.fourier_correlation(imgs, imgs, 5.0, 1.0, ndim=2).shape == (4,)


# ----------------------------------------------------------------------------- peak_shift


@pytest.mark.parametrize("ndim", [2, 3])
def test_peak_shift_sign_convention_with_roll(ndim):
    box = 16
    x = gaussian_blob(box, [8, 7, 9][:ndim], 1.5, ndim) + 0.1 * randn(*([box] * ndim), seed=36)
    s = [3, -5, 2][:ndim]
    t = core_similarity.peak_shift(x, torch.roll(x, s, tuple(range(ndim))))
    assert torch.allclose(t, -torch.tensor(s, dtype=F64), atol=1e-6)


@pytest.mark.parametrize("ndim", [2, 3])
@pytest.mark.parametrize("shift", [(2.0, -3.0, 1.0), (1.5, -2.5, 0.5)])
def test_peak_shift_recovers_integer_and_half_shifts_of_a_blob(ndim, shift):
    box = 24 if ndim == 2 else 16
    c = [box // 2] * ndim
    a = gaussian_blob(box, c, 1.5, ndim)
    b = gaussian_blob(box, [ci + si for ci, si in zip(c, shift)], 1.5, ndim)  # b = a moved by +shift
    t = core_similarity.peak_shift(a, b)
    assert t.shape == (ndim,)
    assert torch.allclose(t, -torch.tensor(shift[:ndim], dtype=F64), atol=0.05)


def test_peak_shift_batched():
    box = 16
    a = gaussian_blob(box, [8, 8], 1.5, 2)
    shifts = torch.tensor([[1.0, 2.0], [-3.0, 0.5], [0.0, 0.0]], dtype=F64)
    b = torch.stack([gaussian_blob(box, [8 + s[0], 8 + s[1]], 1.5, 2) for s in shifts])
    assert torch.allclose(core_similarity.peak_shift(a, b, ndim=2), -shifts, atol=0.05)


# ----------------------------------------------------------------------------- masks


def test_soft_sphere_mask_values():
    box, radius, edge = 24, 6.0, 4.0
    m = core_masks.soft_sphere_mask(box, radius, edge)
    assert m.shape == (box,) * 3 and m.dtype == torch.float32
    assert m[12, 12, 12] == 1.0
    c = torch.arange(box, dtype=F64) - box // 2
    r = torch.sqrt(sum(g**2 for g in torch.meshgrid(c, c, c, indexing="ij")))
    assert (m[r <= radius] == 1).all()
    assert (m[r >= radius + edge] == 0).all()
    order = torch.argsort(r.reshape(-1))
    assert (torch.diff(m.reshape(-1)[order].double()) <= 1e-7).all()  # non-increasing with r
    assert m[12, 12, 12 + 8].item() == pytest.approx(0.5)  # r = radius + edge / 2
    disc = core_masks.soft_sphere_mask(box, radius, edge, ndim=2, dtype=F64)
    assert disc.shape == (box, box) and torch.allclose(disc, m[12].double(), atol=1e-6)


def test_soft_mask_from_map():
    box = 24
    vol = torch.zeros(box, box, box)
    vol[10:14, 10:14, 10:14] = 2.0
    m = core_masks.soft_mask_from_map(vol, 1.0, extend_px=2, edge_px=3)
    assert m.shape == vol.shape
    # grown by 2 px in Euclidean distance: faces move out by 2, corners round off
    assert (m[10:14, 10:14, 8:16] == 1).all() and (m[8:16, 10:14, 10:14] == 1).all()
    assert m[8, 8, 8].item() < 1  # sqrt(12) px from the cube's corner voxel
    assert m[12, 12, 16].item() == pytest.approx(0.5 + 0.5 * math.cos(math.pi / 3))  # 1 px into the edge
    assert (m[:, :, :4] == 0).all() and (m[:, :, 19:] == 0).all()
    shrunk = core_masks.soft_mask_from_map(vol, 1.0, extend_px=-1, edge_px=0)
    assert shrunk.sum() == 8  # the 4^3 cube eroded to 2^3
    with pytest.raises(ValueError, match="threshold"):
        core_masks.soft_mask_from_map(vol, 5.0)


# ----------------------------------------------------------------------------- plot


def test_fsc_plot_writes_png(tmp_path):
    box, apix = 32, 1.0
    i = np.arange(core_fourier.n_shells(box))
    curves = {"half maps": 1 / (1 + np.exp((i - 10) / 1.5)), "model": torch.tensor(1 - i / 20.0)}
    out = io_plots.fsc_plot(curves, box, apix, tmp_path / "plots" / "fsc.png")
    assert out == tmp_path / "plots" / "fsc.png"
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert [p.name for p in out.parent.iterdir()] == ["fsc.png"]  # no temp file left
