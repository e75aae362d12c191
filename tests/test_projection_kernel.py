"""The windowed projection kernel (``cryogmm.core.projection.project``) against the dense
reference it replaced: same images to 1e-6 of the maximum in float32 (the tails it leaves out
are below float32 resolution), same gradients, gradcheck in float64 on the windowed and the
chunked paths, no denormals, and only the matrix product under autocast. Speed is measured
by ``benchmarks/projection_kernel.py``, not here."""

from __future__ import annotations

import math

import pytest
import torch

from cryogmm.core import projection
from cryogmm.core.gaussians import Gaussians, axis_factors
from cryogmm.core.projection import project, rotate_centers


def dense_reference(g, R, shift, box, apix):
    """The projection before the windowed kernel: profiles over the whole box, one bmm."""
    xy, _ = rotate_centers(g.centers, R, shift)
    B = xy.shape[0]
    s = g.sigmas.expand(B, -1) if g.sigmas.dim() == 1 else g.sigmas
    a = g.amplitudes.expand(B, -1) if g.amplitudes.dim() == 1 else g.amplitudes
    w = a / (2.0 * math.pi * s**2 * apix)
    gx = axis_factors(xy[..., 0], s, box, apix)
    gy = axis_factors(xy[..., 1], s, box, apix) * w[..., None]
    return torch.bmm(gy.transpose(1, 2), gx)


def rotations(B, dtype, seed=0):
    q, _ = torch.linalg.qr(torch.randn(B, 3, 3, generator=torch.Generator().manual_seed(seed), dtype=torch.float64))
    return (q * torch.sign(torch.linalg.det(q))[:, None, None]).to(dtype)


def mixture(n, box, apix, dtype, seed=0, smin=0.8, smax=2.5, spread=0.3):
    gen = torch.Generator().manual_seed(seed)
    c = torch.randn(n, 3, generator=gen, dtype=torch.float64) * spread * box * apix
    a = torch.rand(n, generator=gen, dtype=torch.float64) + 0.5
    s = torch.rand(n, generator=gen, dtype=torch.float64) * (smax - smin) + smin
    return Gaussians(c.to(dtype), a.to(dtype), s.to(dtype))


CASES = [  # n, box, apix, batch, sigma range (Å), spread of centres (box fraction)
    (400, 48, 1.3, 5, (0.8, 2.5), 0.25),
    (2000, 64, 1.0, 4, (1.5, 1.5), 0.3),
    (300, 96, 2.0, 3, (0.3, 6.0), 0.3),  # mixed widths: narrow ones in wide windows
    (200, 32, 1.0, 3, (0.7, 1.5), 0.8),  # many centres outside the box
]


@pytest.mark.parametrize("n,box,apix,B,srange,spread", CASES)
def test_same_images_as_dense_reference(n, box, apix, B, srange, spread):
    g = mixture(n, box, apix, torch.float32, smin=srange[0], smax=srange[1], spread=spread)
    R = rotations(B, torch.float32)
    sh = torch.randn(B, 2) * 2
    new, old = project(g, R, sh, box, apix), dense_reference(g, R, sh, box, apix)
    assert new.dtype == torch.float32 and new.shape == (B, box, box)
    assert (new - old).abs().max() <= 1e-6 * old.abs().max()
    g64 = g.to(dtype=torch.float64)
    new64, old64 = project(g64, R.double(), sh.double(), box, apix), dense_reference(g64, R.double(), sh.double(), box, apix)
    assert (new64 - old64).abs().max() <= 1e-12 * old64.abs().max()


def test_per_image_centres_and_amplitudes_match_reference():
    B, n, box = 4, 150, 40
    g0 = mixture(n, box, 1.0, torch.float32)
    c = g0.centers + torch.randn(B, n, 3)
    a = g0.amplitudes * (1 + 0.1 * torch.randn(B, n))
    s = g0.sigmas.expand(B, -1) * (1 + 0.1 * torch.rand(B, n))
    g = Gaussians(c, a, s)
    R = rotations(B, torch.float32, 3)
    new, old = project(g, R, None, box, 1.0), dense_reference(g, R, None, box, 1.0)
    assert (new - old).abs().max() <= 1e-6 * old.abs().max()


def _grads(fn, g, R, sh, box, apix, W):
    ins = [t.clone().requires_grad_() for t in (g.centers, g.amplitudes, g.sigmas, R, sh)]
    (fn(Gaussians(*ins[:3]), ins[3], ins[4], box, apix) * W).sum().backward()
    return [t.grad for t in ins]


def test_gradients_match_dense_reference_float32():
    box, apix, B = 48, 1.2, 4
    g = mixture(300, box, apix, torch.float32, seed=1)
    R, sh = rotations(B, torch.float32, 1), torch.randn(B, 2)
    W = torch.randn(B, box, box, generator=torch.Generator().manual_seed(2))
    for new, old in zip(_grads(project, g, R, sh, box, apix, W), _grads(dense_reference, g, R, sh, box, apix, W)):
        assert (new - old).abs().max() <= 1e-5 * old.abs().max()


def _gradcheck_case(box, sigma_lo, sigma_hi, B=2, n=4):
    gen = torch.Generator().manual_seed(0)
    c = (torch.randn(n, 3, generator=gen, dtype=torch.float64) * box / 6).requires_grad_()
    a = (torch.rand(n, generator=gen, dtype=torch.float64) + 0.5).requires_grad_()
    s = (torch.rand(n, generator=gen, dtype=torch.float64) * (sigma_hi - sigma_lo) + sigma_lo).requires_grad_()
    R = rotations(B, torch.float64, 5).requires_grad_()
    o = torch.randn(B, 2, generator=gen, dtype=torch.float64).requires_grad_()
    return (c, a, s, R, o)


def test_gradcheck_windowed_path():
    box = 40  # window (~2 * 9 sigma + 2 px) well inside the box
    inputs = _gradcheck_case(box, 0.6, 1.0)
    assert projection.window_width(1.0, 1.0, torch.float64) < box

    def f(c, a, s, R, o):
        return project(Gaussians(c, a, s), R, o, box, 1.0)

    assert torch.autograd.gradcheck(f, inputs, eps=1e-6, atol=1e-6)


def test_gradcheck_chunked_one_image_at_a_time(monkeypatch):
    monkeypatch.setitem(projection.CHUNK_BYTES, "cpu", 1)  # one image per chunk
    inputs = _gradcheck_case(24, 0.7, 1.2, B=3)

    def f(c, a, s, R, o):
        return project(Gaussians(c, a, s), R, o, 24, 1.0)

    assert torch.autograd.gradcheck(f, inputs, eps=1e-6, atol=1e-6)


def test_chunking_does_not_change_images(monkeypatch):
    g = mixture(500, 48, 1.0, torch.float32)
    R = rotations(7, torch.float32)
    whole = project(g, R, None, 48, 1.0)
    monkeypatch.setitem(projection.CHUNK_BYTES, "cpu", 1)
    torch.testing.assert_close(project(g, R, None, 48, 1.0), whole, rtol=0, atol=1e-7 * float(whole.abs().max()))


def test_no_denormals_even_with_mixed_widths():
    # a 0.2 Å Gaussian in windows sized for a 6 Å one: its far window values would underflow
    g = Gaussians(torch.tensor([[0.0, 0.0, 0.0], [10.0, -7.0, 3.0], [200.0, 0.0, 0.0]]),
                  torch.tensor([1.0, 1e-3, 1.0]), torch.tensor([0.2, 6.0, 1.0]))
    img = project(g, rotations(3, torch.float32), None, 64, 1.0)
    tiny = torch.finfo(torch.float32).tiny
    nz = img[img != 0].abs()
    assert bool((nz >= tiny).all())
    assert torch.isfinite(img).all()


def test_autocast_changes_only_the_matrix_product():
    g = mixture(300, 48, 1.0, torch.float32)
    R = rotations(2, torch.float32)
    ref = project(g, R, None, 48, 1.0)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        xy, _ = rotate_centers(g.centers, R)
        img = project(g, R, None, 48, 1.0)
    assert xy.dtype == torch.float32
    torch.testing.assert_close(xy, rotate_centers(g.centers, R)[0])
    assert img.dtype == torch.float32
    assert (img - ref).abs().max() <= 2e-2 * ref.abs().max()  # bf16 inputs, float32 accumulation


def test_repeated_calls_on_two_threads_are_stable():
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        for seed in range(6):
            g = mixture(800, 56, 1.1, torch.float32, seed=seed)
            R = rotations(9, torch.float32, seed)
            new, old = project(g, R, None, 56, 1.1), dense_reference(g, R, None, 56, 1.1)
            assert (new - old).abs().max() <= 1e-6 * old.abs().max()
    finally:
        torch.set_num_threads(threads)


def test_compiled_windows_give_the_same_images():
    """``use_compile()`` (torch.compile of the profile windows) changes no image beyond float32
    rounding and is switched off again after its block, also after an exception. Skipped where
    torch.compile cannot build a CPU kernel here (no C++ toolchain)."""
    g = mixture(300, 40, 1.0, torch.float32)
    R = rotations(3, torch.float32)
    ref = project(g, R, None, 40, 1.0)
    assert not projection.compile_enabled()
    try:
        with projection.use_compile():
            assert projection.compile_enabled()
            img = project(g, R, None, 40, 1.0)
    except Exception as exc:  # the inductor backend needs a working C++ compiler
        assert not projection.compile_enabled()
        pytest.skip(f"torch.compile unavailable on this machine: {type(exc).__name__}: {str(exc)[:200]}")
    assert not projection.compile_enabled()
    assert (img - ref).abs().max() <= 1e-6 * ref.abs().max()


def test_compile_switch_is_scoped():
    """``use_compile`` restores the setting it found, nested and after an exception, without
    compiling anything (no projection inside)."""
    assert not projection.compile_enabled()
    with projection.use_compile():
        assert projection.compile_enabled()
        with projection.use_compile(False):
            assert not projection.compile_enabled()
        assert projection.compile_enabled()
        with pytest.raises(RuntimeError):
            with projection.use_compile(False):
                raise RuntimeError("inside")
        assert projection.compile_enabled()
    assert not projection.compile_enabled()


@pytest.mark.parametrize("per_image", [False, True])
def test_rotation_without_matrix_product_is_the_same(monkeypatch, per_image):
    """Where TF32 could take the rotation (CUDA), ``rotate_centers`` rotates by broadcast
    products instead: the same positions to float32 rounding, so the same images (run here on
    the CPU by switching that path on)."""
    g = mixture(500, 48, 1.0, torch.float32, seed=4)
    R = rotations(5, torch.float32, 4)
    if per_image:
        g = g.with_centers(g.centers + 0.5 * torch.randn(5, 500, 3, generator=torch.Generator().manual_seed(4)))
    sh = torch.randn(5, 2, generator=torch.Generator().manual_seed(5))
    xy0, z0 = rotate_centers(g.centers, R, sh)
    img0 = project(g, R, sh, 48, 1.0)
    monkeypatch.setattr(projection, "_tf32_possible", lambda t: True)
    xy1, z1 = rotate_centers(g.centers, R, sh)
    scale = float(g.centers.abs().max())
    assert (xy1 - xy0).abs().max() <= 4 * torch.finfo(torch.float32).eps * scale
    assert (z1 - z0).abs().max() <= 4 * torch.finfo(torch.float32).eps * scale
    # a rounding of the positions moves a narrow Gaussian's image by a few 1e-6 of the maximum
    # (the float32 dense reference is itself up to ~6e-6 from float64)
    assert (project(g, R, sh, 48, 1.0) - img0).abs().max() <= 5e-6 * img0.abs().max()


def test_refine_poses_compile_holds_for_its_job_only(monkeypatch):
    """``refine-poses --compile`` turns the compiled windows on for that job and off again after
    it (also when it fails), instead of leaving them on in the process."""
    from types import SimpleNamespace

    from cryogmm.poses import job

    seen = []

    def fake(cfg, progress):
        seen.append(projection.compile_enabled())
        if cfg.fail:
            raise RuntimeError("job failed")
        return {}

    monkeypatch.setattr(job, "_refine_poses", fake)
    assert not projection.compile_enabled()
    job.refine_poses(SimpleNamespace(compile=True, fail=False))
    with pytest.raises(RuntimeError):
        job.refine_poses(SimpleNamespace(compile=True, fail=True))
    job.refine_poses(SimpleNamespace(compile=False, fail=False))
    assert seen == [True, True, False]
    assert not projection.compile_enabled()


@pytest.mark.parametrize("n,chunk_one,signs", [(50, False, False), (53, True, False), (61, False, True)])
def test_tiled_forward_same_images(monkeypatch, n, chunk_one, signs):
    """The forward's tiles (Gaussians sorted by their y windows, each tile multiplied over its own
    rows; tiles of 4 here so that small cases use them): the same images as the dense reference,
    with padding of the last tile (53, 61 not multiples), one image a chunk, and weights of both
    signs (in float64 to 1e-12)."""
    monkeypatch.setattr(projection, "TILE_GAUSSIANS", 4)
    if chunk_one:
        monkeypatch.setitem(projection.CHUNK_BYTES, "cpu", 1)
    box, apix, B = 64, 1.0, 5
    products, real = [], projection._bmm  # a tile product has more matrices than the batch images
    monkeypatch.setattr(projection, "_bmm", lambda a, b, out, dt: products.append(out.shape[0]) or real(a, b, out, dt))
    for dt, tol in ((torch.float32, 1e-6), (torch.float64, 1e-12)):
        g = mixture(n, box, apix, dt, seed=n, smin=0.8, smax=1.6, spread=0.15)
        if signs:
            g = Gaussians(g.centers, g.amplitudes * torch.where(torch.arange(n) % 3 == 0, -1.0, 1.0).to(dt), g.sigmas)
        R, sh = rotations(B, dt, 2), torch.randn(B, 2, dtype=dt)
        products.clear()
        new, old = project(g, R, sh, box, apix), dense_reference(g, R, sh, box, apix)
        assert max(products) > B, "tiles not used"
        assert (new - old).abs().max() <= tol * old.abs().max()
        monkeypatch.setattr(projection, "TILE_MAX_ROWS", 0.0)  # the same without tiles
        assert (project(g, R, sh, box, apix) - new).abs().max() <= tol * old.abs().max()
        monkeypatch.setattr(projection, "TILE_MAX_ROWS", 0.8)


def test_gradcheck_tiled_forward(monkeypatch):
    """Tiles change only the forward's arithmetic: its images still differentiate to the
    closed-form backward (tiles of 2, the last padded)."""
    monkeypatch.setattr(projection, "TILE_GAUSSIANS", 2)
    inputs = _gradcheck_case(40, 0.6, 1.0, B=2, n=7)

    def f(c, a, s, R, o):
        return project(Gaussians(c, a, s), R, o, 40, 1.0)

    assert torch.autograd.gradcheck(f, inputs, eps=1e-6, atol=1e-6)


def test_kept_buffer_stays_zero_after_an_interrupted_call(monkeypatch):
    """The scatter buffer is kept between calls and must stay all 0: an exception between its
    copy and its fill leaves it so, and the next call draws the same images."""
    g = mixture(300, 48, 1.0, torch.float32, seed=3)
    R = rotations(3, torch.float32, 3)
    ref = project(g, R, None, 48, 1.0)

    def broken(*args):
        raise KeyboardInterrupt

    with monkeypatch.context() as m:
        m.setattr(projection, "_bmm", broken)
        with pytest.raises(KeyboardInterrupt):
            project(g, R, None, 48, 1.0)
    bufs = projection._SCRATCH.bufs
    assert all(float(b.abs().max()) == 0.0 for (name, _), b in bufs.items() if name == "zeros")
    torch.testing.assert_close(project(g, R, None, 48, 1.0), ref, rtol=0, atol=0)
