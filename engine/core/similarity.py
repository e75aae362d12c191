"""Similarity, resolution and masking measures for images and maps.

Conventions (DESIGN.md): maps are indexed ``[z, y, x]``, images ``[y, x]``; the real-space
centre of a box of ``N`` pixels is index ``N // 2``; lengths are in Å, pixel units only
where a name says ``_px`` or ``shells``.

Fourier space uses the unshifted FFT layout of ``torch.fft`` (``fftfreq`` order). The
wave vector ``k`` is counted in cycles per box (integers ``-N//2 .. (N-1)//2`` per axis);
a *shell* is the set of Fourier voxels with the same ``round(|k|)``. Shell ``i`` has
spatial frequency ``i / (N * apix)`` 1/Å and resolution ``N * apix / i`` Å. Curves keep
shells ``0 .. N//2`` (``n_shells(N) = N // 2 + 1``, the last one at Nyquist, ``2 * apix``);
the corners of the cube beyond Nyquist are left out.

Every function is pure and batch-first: leading dimensions are batch dimensions and are
broadcast between the two inputs. Inputs may be torch tensors or numpy arrays (converted
with ``torch.as_tensor``); results are torch tensors on the inputs' device, except
:func:`resolution_at` (a Python float for reports) and :func:`fsc_plot` (a file).
Functions that enter losses (``frc``, ``frc_loss``, ``fsc``, the correlations, the
GROMACS similarity measures, ``lowpass``) are differentiable.

Functions that act on "an image or a map" take ``ndim`` (2 or 3), the number of trailing
spatial dimensions. ``ndim=None`` is accepted only for an unbatched input (a 2-D tensor is
an image, a 3-D tensor a map); a batch of images ``[B, N, N]`` needs ``ndim=2``, because it
cannot be told apart from a map by its shape.
"""

from __future__ import annotations

import math

import torch

from cryogmm.core.fourier import (
    as_real_pair,
    as_real_tensor,
    check_square,
    half_spectrum_weights,
    n_shells,
    reduce_dims,
    shell_of_grid,
    shell_sums,
    spatial_ndim,
)

# --------------------------------------------------------------------------- FRC / FSC


def _shell_correlation(x1: torch.Tensor, x2: torch.Tensor, ndim: int, eps: float, what: str):
    box = check_square(x1.shape, ndim, what)
    check_square(x2.shape, ndim, what)
    x1, x2 = torch.broadcast_tensors(x1, x2)
    batch = x1.shape[:-ndim]
    dims = tuple(range(-ndim, 0))
    f1 = torch.fft.rfftn(x1, dim=dims, norm="ortho").reshape(-1, box ** (ndim - 1) * (box // 2 + 1))
    f2 = torch.fft.rfftn(x2, dim=dims, norm="ortho").reshape(f1.shape)
    w = half_spectrum_weights(box, x1.device, x1.dtype).expand(*([box] * (ndim - 1)), -1).reshape(-1)
    shell = shell_of_grid(box, ndim, x1.device, half=True).reshape(-1)
    ns = n_shells(box)

    cross = shell_sums((f1.real * f2.real + f1.imag * f2.imag) * w, shell, ns)
    p1 = shell_sums((f1.real**2 + f1.imag**2) * w, shell, ns)
    p2 = shell_sums((f2.real**2 + f2.imag**2) * w, shell, ns)
    # FRC is invariant to scaling either input: divide by each input's total power (a
    # constant, so detached) to make eps a *relative* floor on a shell's power.
    tiny = torch.finfo(x1.dtype).tiny
    t1 = p1.sum(-1, keepdim=True).detach().clamp_min(tiny)
    t2 = p2.sum(-1, keepdim=True).detach().clamp_min(tiny)
    den = torch.sqrt((p1 / t1).clamp_min(eps)) * torch.sqrt((p2 / t2).clamp_min(eps))
    curve = cross / (torch.sqrt(t1) * torch.sqrt(t2)) / den
    return curve.reshape(*batch, ns)


def frc(img1, img2, eps: float = 1e-12) -> torch.Tensor:
    """Fourier ring correlation of square images.

    Args:
        img1, img2: ``[..., N, N]`` real images (``[y, x]``), batch dims broadcast.
        eps: floor on a ring's power, relative to the image's total power; rings with
            less power than that (e.g. all-zero rings) give values shrunk towards 0
            instead of 0/0.

    Returns:
        ``[..., n_shells(N)]`` real tensor, ``FRC_i = Re sum F1 F2* / sqrt(sum |F1|^2 sum |F2|^2)``
        over the Fourier pixels of ring ``i`` (``round(|k|) = i``, ``k`` in cycles per box).
        Ring 0 is the DC term (+-1). Symmetric in its arguments and invariant to positive
        rescaling of either. Differentiable (usable as a loss).
    """
    a, b = as_real_pair(img1, img2)
    return _shell_correlation(a, b, 2, eps, "frc")


def frc_loss(img1, img2, shell_range=(1, None), weights=None, eps: float = 1e-12) -> torch.Tensor:
    """``1 - mean FRC`` over rings ``lo..hi`` inclusive, per image pair.

    Args:
        img1, img2: ``[..., N, N]`` images.
        shell_range: ``(lo, hi)`` ring indices, inclusive; ``hi=None`` means Nyquist
            (``N // 2``). The default skips the DC ring.
        weights: optional non-negative ring weights, either ``[n_shells(N)]`` (indexed by
            ring) or ``[hi - lo + 1]`` (for the selected rings only); the mean becomes
            ``sum w FRC / sum w``.

    Returns:
        ``[...]`` loss, 0 for identical images, up to 2 for anti-correlated ones.
    """
    curve = frc(img1, img2, eps=eps)
    ns = curve.shape[-1]
    lo, hi = shell_range
    hi = ns - 1 if hi is None else int(hi)
    lo = int(lo)
    if not 0 <= lo <= hi < ns:
        raise ValueError(f"frc_loss: shell_range must satisfy 0 <= lo <= hi <= {ns - 1}, got {shell_range}")
    sel = curve[..., lo : hi + 1]
    if weights is None:
        return 1.0 - sel.mean(-1)
    w = torch.as_tensor(weights, device=curve.device, dtype=curve.dtype)
    if w.shape[-1] == ns and ns != hi - lo + 1:
        w = w[..., lo : hi + 1]
    if w.shape[-1] != hi - lo + 1:
        raise ValueError(
            f"frc_loss: weights must have length {ns} (all rings) or {hi - lo + 1} (rings {lo}..{hi}), "
            f"got {tuple(w.shape)}"
        )
    return 1.0 - (sel * w).sum(-1) / w.sum(-1)


def fsc(map1, map2, mask=None, eps: float = 1e-12) -> torch.Tensor:
    """Fourier shell correlation of cubic maps.

    Args:
        map1, map2: ``[..., N, N, N]`` real maps (``[z, y, x]``); batch dims broadcast.
        mask: optional real-space mask broadcastable to the maps (e.g.
            :func:`soft_sphere_mask`); both maps are multiplied by it first.
        eps: relative floor on a shell's power, as in :func:`frc`.

    Returns:
        ``[..., n_shells(N)]``; shell ``i`` is at ``i / (N * apix)`` 1/Å (see
        :func:`shell_resolution_A`). Differentiable.
    """
    a, b = as_real_pair(map1, map2)
    if mask is not None:
        m = as_real_tensor(mask, device=a.device).to(a.dtype)
        a, b = a * m, b * m
    return _shell_correlation(a, b, 3, eps, "fsc")


def resolution_at(fsc_curve, box: int, apix: float, threshold: float = 0.143) -> float:
    """Resolution in Å where an FSC curve first drops below ``threshold``.

    The curve is read from shell 1 on (the DC shell is ignored): the result is the first
    crossing between shells ``i - 1 >= 1`` and ``i`` with ``fsc[i - 1] >= threshold >
    fsc[i]``, interpolated linearly in spatial frequency between the two shells. If the
    curve is already below the threshold at shell 1, the result is shell 1's resolution
    (``box * apix``: nothing resolved); if it never drops below, the Nyquist resolution
    ``2 * apix``.

    Args:
        fsc_curve: ``[n_shells(box)]`` curve (tensor, array or list); a longer curve is cut
            at Nyquist.
        box: box size in pixels; apix: pixel size in Å.
    """
    c = torch.as_tensor(fsc_curve).detach().to("cpu", torch.float64)
    if c.ndim != 1:
        raise ValueError(f"resolution_at: expected one curve [n_shells], got shape {tuple(c.shape)}")
    c = c[: n_shells(box)].tolist()
    length = float(box) * float(apix)
    if len(c) < 2:
        return 2.0 * float(apix)
    if not c[1] >= threshold:
        return length
    for i in range(2, len(c)):
        if not c[i] >= threshold:  # also stops at NaN
            lo, hi = c[i - 1], c[i]
            t = (lo - threshold) / (lo - hi) if math.isfinite(hi) else 0.0
            return length / (i - 1 + t)
    return 2.0 * float(apix)


def real_space_correlation(a, b, mask=None, dims=None) -> torch.Tensor:
    """Pearson correlation of ``a`` and ``b``, weighted by ``mask``.

    ``r = sum w (a - <a>)(b - <b>) / sqrt(sum w (a - <a>)^2 sum w (b - <b>)^2)`` with the
    weighted means ``<a> = sum w a / sum w`` (``w = 1`` without a mask; a soft mask weights
    voxels, a binary one selects them).

    Args:
        a, b: real tensors broadcastable to each other; mask: broadcastable weights >= 0.
        dims: reduction axes (int or tuple); default all, i.e. one number. For a batch of
            maps ``[B, N, N, N]`` pass ``dims=(-3, -2, -1)`` to get ``[B]``.

    Returns:
        Correlation in [-1, 1] over the remaining (batch) dims; 0 where either input is
        constant over the (masked) region. Differentiable.
    """
    a, b = as_real_pair(a, b)
    if mask is None:
        a, b = torch.broadcast_tensors(a, b)
        w = torch.ones((), device=a.device, dtype=a.dtype)
    else:
        w = as_real_tensor(mask, device=a.device).to(a.dtype)
        a, b, w = torch.broadcast_tensors(a, b, w)
    dims = reduce_dims(a.shape, dims)
    wsum = (w * torch.ones_like(a)).sum(dims, keepdim=True)
    da = a - (w * a).sum(dims, keepdim=True) / wsum
    db = b - (w * b).sum(dims, keepdim=True) / wsum
    cov = (w * da * db).sum(dims)
    va = (w * da * da).sum(dims)
    vb = (w * db * db).sum(dims)
    ok = (va > 0) & (vb > 0)
    den = torch.sqrt(torch.where(ok, va, 1.0)) * torch.sqrt(torch.where(ok, vb, 1.0))
    return torch.where(ok, cov / den, torch.zeros_like(cov))


def fourier_correlation(
    a, b, lowpass_A: float | None = None, apix: float = 1.0, ndim: int | None = None, include_dc: bool = False
) -> torch.Tensor:
    """Correlation of the Fourier transforms, optionally limited to low resolution.

    ``c = Re sum F_a F_b* / sqrt(sum |F_a|^2 sum |F_b|^2)`` over the selected Fourier
    voxels of the full spectrum: those in shells with resolution ``>= lowpass_A`` Å (shell
    ``i`` with ``i <= N * apix / lowpass_A``), or all of them when ``lowpass_A`` is None.
    The DC term is left out unless ``include_dc``, so that with no low-pass the result
    equals the (unmasked) Pearson :func:`real_space_correlation` (Parseval).

    Args:
        a, b: ``[..., N, N]`` images or ``[..., N, N, N]`` maps; see the module docstring
            for ``ndim``. apix: pixel size in Å.

    Returns:
        ``[...]`` correlations. Differentiable.
    """
    a, b = as_real_pair(a, b)
    nd = spatial_ndim(a, ndim, "fourier_correlation")
    box = check_square(a.shape, nd, "fourier_correlation")
    check_square(b.shape, nd, "fourier_correlation")
    a, b = torch.broadcast_tensors(a, b)
    dims = tuple(range(-nd, 0))
    fa = torch.fft.rfftn(a, dim=dims, norm="ortho")
    fb = torch.fft.rfftn(b, dim=dims, norm="ortho")
    w = half_spectrum_weights(box, a.device, a.dtype).expand(fa.shape[-nd:])
    shell = shell_of_grid(box, nd, a.device, half=True)
    keep = torch.ones_like(shell, dtype=torch.bool)
    if lowpass_A is not None:
        keep &= shell <= (box * float(apix)) / float(lowpass_A)
    if not include_dc:
        keep &= shell > 0
    w = w * keep
    cross = ((fa.real * fb.real + fa.imag * fb.imag) * w).sum(dims)
    pa = ((fa.real**2 + fa.imag**2) * w).sum(dims)
    pb = ((fb.real**2 + fb.imag**2) * w).sum(dims)
    ok = (pa > 0) & (pb > 0)
    den = torch.sqrt(torch.where(ok, pa, 1.0)) * torch.sqrt(torch.where(ok, pb, 1.0))
    return torch.where(ok, cross / den, torch.zeros_like(cross))


# --------------------------------------------------------------------------- GROMACS measures
#
# Density-guided simulation (Blau, Lindahl et al.; GROMACS reference manual, "Applying
# forces from three-dimensional densities", and src/gromacs/math/densityfit.{h,cpp}).
# GROMACS maximises S (the potential is U = -k S), so all three are similarities: larger
# is better. With ``normalize=True`` the densities are first scaled as by the mdp option
# ``density-guided-simulation-normalize-densities = yes`` (the GROMACS default).


def _normalize_positive(x: torch.Tensor, dims) -> torch.Tensor:
    """Divide by the sum of the positive values (GROMACS ``normalizeSumPositiveValuesToUnity``)."""
    s = torch.relu(x).sum(dims, keepdim=True)
    return x / torch.where(s > 0, s, torch.ones_like(s))


def _gmx_pair(sim, ref, dims, normalize):
    sim, ref = as_real_pair(sim, ref)
    sim, ref = torch.broadcast_tensors(sim, ref)
    dims = reduce_dims(sim.shape, dims)
    if normalize:
        sim = _normalize_positive(sim, dims)
        ref = _normalize_positive(ref, dims)
    return sim, ref, dims


def inner_product(sim, ref, normalize: bool = True, dims=(-3, -2, -1)) -> torch.Tensor:
    """GROMACS ``inner-product`` similarity: ``S = (1 / N_voxel) sum_v ref_v sim_v``.

    Its derivative is ``dS/dsim_v = ref_v / N_voxel`` (with ``normalize=False``; with
    normalisation autograd adds the derivative of ``sim``'s normaliser).

    Args:
        sim: simulated density ``[..., N, N, N]`` (the variable); ref: reference density,
            broadcastable. Any grid shape works; ``dims`` are the voxel axes.
        normalize: scale both densities so that their positive values sum to 1 first
            (GROMACS default). GROMACS divides the simulated density by the sum of the
            atoms' amplitudes, which is the same number for non-negative densities
            contained in the box; here it is computed from ``sim`` and differentiated.

    Returns:
        ``[...]`` similarity. Differentiable w.r.t. both inputs.
    """
    sim, ref, dims = _gmx_pair(sim, ref, dims, normalize)
    n = math.prod(sim.shape[d] for d in dims)
    return (ref * sim).sum(dims) / n


def cross_correlation(sim, ref, dims=(-3, -2, -1)) -> torch.Tensor:
    """GROMACS ``cross-correlation`` similarity (Pearson correlation over all voxels).

    ``S = sum_v (ref_v - <ref>)(sim_v - <sim>) / sqrt(sum_v (ref_v - <ref>)^2 sum_v (sim_v - <sim>)^2)``,
    with derivative (GROMACS ``CrossCorrelationGradientAtVoxel``)
    ``dS/dsim_v = [(ref_v - <ref>) - (C / S_sim)(sim_v - <sim>)] / sqrt(S_ref S_sim)`` where
    ``C`` is the covariance sum and ``S_ref``, ``S_sim`` the squared-deviation sums.
    GROMACS returns 0 when either density is constant; so does this. Normalisation does
    not change it (positive scale invariance), so there is no ``normalize`` option.

    Args:
        sim, ref: ``[..., N, N, N]`` densities (broadcast); ``dims`` the voxel axes.

    Returns:
        ``[...]`` in [-1, 1]. Differentiable.
    """
    sim, ref, dims = _gmx_pair(sim, ref, dims, normalize=False)
    return real_space_correlation(sim, ref, dims=dims)


def relative_entropy(sim, ref, normalize: bool = True, dims=(-3, -2, -1)) -> torch.Tensor:
    """GROMACS ``relative-entropy`` similarity (negative Kullback-Leibler divergence).

    ``S = sum_{v: ref_v > 0 and sim_v > 0} ref_v (log sim_v - log ref_v)``: as in GROMACS,
    voxels where the reference or the simulated density is ``<= 0`` contribute nothing and
    get zero gradient. Derivative: ``dS/dsim_v = ref_v / sim_v`` on those voxels, 0
    elsewhere (with ``normalize=False``).

    Without normalisation ``S`` grows without bound with the scale of ``sim``. With
    ``normalize=True`` (GROMACS default) both densities are scaled so that their positive
    values sum to 1; then ``S <= 0`` with equality for ``sim == ref`` whenever ``sim > 0``
    on the reference's support (dropping ``sim <= 0`` voxels, GROMACS's convention, can
    make ``S`` positive in degenerate cases). As in :func:`inner_product` the normaliser of
    ``sim`` is computed from ``sim`` and differentiated.

    Args:
        sim: simulated density ``[..., N, N, N]``; ref: reference, broadcastable;
            ``dims``: the voxel axes.

    Returns:
        ``[...]`` similarity (nats). Differentiable w.r.t. ``sim``.
    """
    sim, ref, dims = _gmx_pair(sim, ref, dims, normalize)
    valid = (ref > 0) & (sim > 0)
    one = torch.ones((), device=sim.device, dtype=sim.dtype)
    # keep log() away from non-positive values, so no NaN leaks into the gradient
    s = torch.where(valid, sim, one)
    r = torch.where(valid, ref, one)
    return torch.where(valid, r * (torch.log(s) - torch.log(r)), torch.zeros_like(s)).sum(dims)


def peak_shift(a, b, ndim: int | None = None) -> torch.Tensor:
    """Shift, in pixels, that moves ``b`` onto ``a``: the cross-correlation peak.

    Sign convention: the result ``t`` (ordered like the axes, ``[dz, dy, dx]`` or
    ``[dy, dx]``) is the shift to apply to ``b`` so that it matches ``a``:
    ``a(r) ~ b(r - t)``, i.e. ``a ~ torch.roll(b, t)`` for integer ``t``. Hence
    ``peak_shift(x, torch.roll(x, s)) == -s``, and ``-peak_shift(a, b)`` is where the
    features of ``a`` moved to in ``b``.

    The integer peak of the circular cross-correlation ``c(t) = sum_r a(r) b(r - t)`` is
    refined per axis by a parabola through the peak and its two neighbours (sub-pixel;
    exact for half-pixel shifts of symmetric peaks). Shifts are in ``[-N//2, N - N//2 - 1]``
    before refinement.

    Args:
        a, b: ``[..., N, N]`` images or ``[..., N, N, N]`` maps (batch dims broadcast; see
            the module docstring for ``ndim``).

    Returns:
        ``[..., 2]`` or ``[..., 3]`` float tensor. Not differentiable (argmax).
    """
    a, b = as_real_pair(a, b)
    nd = spatial_ndim(a, ndim, "peak_shift")
    box = check_square(a.shape, nd, "peak_shift")
    check_square(b.shape, nd, "peak_shift")
    a, b = torch.broadcast_tensors(a.detach(), b.detach())
    batch = a.shape[:-nd]
    dims = tuple(range(-nd, 0))
    c = torch.fft.irfftn(torch.fft.rfftn(a, dim=dims) * torch.fft.rfftn(b, dim=dims).conj(), s=a.shape[-nd:], dim=dims)
    c = c.reshape(-1, box**nd)
    flat = c.argmax(-1)
    idx = torch.stack(torch.unravel_index(flat, (box,) * nd), -1)  # [B, nd]
    strides = torch.tensor([box ** (nd - 1 - d) for d in range(nd)], device=c.device)
    c0 = c.gather(1, flat[:, None])[:, 0]
    shifts = []
    for d in range(nd):
        nb = []
        for step in (-1, 1):
            j = idx.clone()
            j[:, d] = (j[:, d] + step) % box
            nb.append(c.gather(1, (j * strides).sum(-1, keepdim=True))[:, 0])
        cm, cp = nb
        curv = cm - 2 * c0 + cp
        frac = torch.where(curv < 0, (cm - cp) / (2 * torch.where(curv < 0, curv, -1.0)), 0.0)
        t = (idx[:, d] + box // 2) % box - box // 2
        shifts.append(t.to(c.dtype) + frac)
    return torch.stack(shifts, -1).reshape(*batch, nd)
