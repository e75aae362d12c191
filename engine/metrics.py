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
from pathlib import Path

import torch

__all__ = [
    "n_shells",
    "radial_shell_index",
    "shell_voxel_counts",
    "shell_resolution_A",
    "frc",
    "frc_loss",
    "fsc",
    "soft_sphere_mask",
    "soft_mask_from_map",
    "resolution_at",
    "real_space_correlation",
    "fourier_correlation",
    "inner_product",
    "cross_correlation",
    "relative_entropy",
    "lowpass",
    "peak_shift",
    "fsc_plot",
]


# --------------------------------------------------------------------------- helpers


def _as_real_tensor(x, device=None) -> torch.Tensor:
    t = torch.as_tensor(x, device=device)
    if t.is_complex():
        raise ValueError(f"expected a real-valued image or map, got dtype {t.dtype}")
    if not t.is_floating_point():
        t = t.to(torch.get_default_dtype())
    return t


def _as_real_pair(a, b) -> tuple[torch.Tensor, torch.Tensor]:
    a = _as_real_tensor(a)
    b = _as_real_tensor(b, device=a.device)
    dtype = torch.promote_types(a.dtype, b.dtype)
    return a.to(dtype), b.to(dtype)


def _spatial_ndim(x: torch.Tensor, ndim: int | None, what: str) -> int:
    if ndim is None:
        if x.ndim in (2, 3):
            return x.ndim
        raise ValueError(
            f"{what}: cannot tell images from maps in a tensor of shape {tuple(x.shape)}; "
            "pass ndim=2 (images [..., N, N]) or ndim=3 (maps [..., N, N, N])"
        )
    if ndim not in (2, 3):
        raise ValueError(f"{what}: ndim must be 2 or 3, got {ndim}")
    if x.ndim < ndim:
        raise ValueError(f"{what}: expected at least {ndim} dimensions, got shape {tuple(x.shape)}")
    return ndim


def _check_square(shape, ndim: int, what: str) -> int:
    spatial = tuple(int(s) for s in shape[-ndim:])
    if len(set(spatial)) != 1:
        kind = "square images [..., N, N]" if ndim == 2 else "cubic maps [..., N, N, N]"
        raise ValueError(f"{what}: expected {kind}, got shape {tuple(shape)}")
    if spatial[0] < 2:
        raise ValueError(f"{what}: box must be at least 2 pixels, got shape {tuple(shape)}")
    return spatial[0]


def _fft_k(box: int, device, half: bool = False) -> torch.Tensor:
    """Integer wave numbers (cycles per box) of one axis, fftfreq (or rfftfreq) order."""
    if half:
        return torch.arange(box // 2 + 1, device=device)
    i = torch.arange(box, device=device)
    return torch.where(i < (box + 1) // 2, i, i - box)


def _shell_of_grid(box: int, ndim: int, device, half: bool) -> torch.Tensor:
    axes = [_fft_k(box, device)] * (ndim - 1) + [_fft_k(box, device, half=half)]
    grids = torch.meshgrid(*axes, indexing="ij")
    k2 = sum(g * g for g in grids)
    # |k|^2 is an integer, so |k| is never exactly m + 1/2: rounding has no ties
    return torch.round(torch.sqrt(k2.to(torch.float64))).to(torch.long)


def _radius_of_grid(box: int, ndim: int, device, dtype, half: bool) -> torch.Tensor:
    axes = [_fft_k(box, device)] * (ndim - 1) + [_fft_k(box, device, half=half)]
    grids = torch.meshgrid(*axes, indexing="ij")
    return torch.sqrt(sum(g.to(dtype) ** 2 for g in grids))


def _half_spectrum_weights(box: int, device, dtype) -> torch.Tensor:
    """How many full-spectrum voxels each rfft column stands for (1 or 2, conjugate pairs).

    Column kx = 0 and, for even boxes, kx = N/2 hold their own conjugate partners.
    """
    kx = torch.arange(box // 2 + 1, device=device)
    return torch.where((kx == 0) | (2 * kx == box), 1.0, 2.0).to(dtype)


def _shell_sums(values: torch.Tensor, shell: torch.Tensor, ns: int) -> torch.Tensor:
    """Sum ``values [B, M]`` into shells ``0..ns-1``; ``shell [M]`` >= ns is dropped."""
    idx = shell.clamp(max=ns)  # bin ns collects everything beyond Nyquist
    out = values.new_zeros(values.shape[0], ns + 1)
    return out.index_add(1, idx, values)[:, :ns]


# --------------------------------------------------------------------------- shells


def n_shells(box: int) -> int:
    """Number of Fourier shells kept in FRC/FSC curves for a box of ``box`` pixels: ``box // 2 + 1``.

    Shell 0 is the DC term, shell ``box // 2`` is at (or, for odd boxes, just below) Nyquist.
    """
    return int(box) // 2 + 1


def radial_shell_index(shape, device=None) -> torch.Tensor:
    """Shell index of every voxel of a full, unshifted FFT grid.

    Args:
        shape: ``(N, N)`` for images or ``(N, N, N)`` for maps (square / cubic only).
        device: torch device of the result.

    Returns:
        LongTensor of ``shape``: ``round(|k|)`` with ``k`` in cycles per box, in
        ``torch.fft.fftfreq`` order (index 0 is the DC term). Values above ``N // 2`` are
        the corners beyond Nyquist, which FRC/FSC curves leave out.
    """
    shape = tuple(int(s) for s in shape)
    if len(shape) not in (2, 3):
        raise ValueError(f"radial_shell_index: shape must be (N, N) or (N, N, N), got {shape}")
    box = _check_square(shape, len(shape), "radial_shell_index")
    return _shell_of_grid(box, len(shape), device, half=False)


def shell_voxel_counts(box: int, ndim: int = 3, device=None) -> torch.Tensor:
    """Number of full-spectrum Fourier voxels in each shell, ``[n_shells(box)]`` (int64).

    For independent noise the FRC/FSC of a shell with ``n`` voxels has standard deviation
    close to ``1 / sqrt(n)``.
    """
    shell = _shell_of_grid(int(box), ndim, device, half=False).reshape(-1)
    ns = n_shells(box)
    return torch.bincount(shell.clamp(max=ns), minlength=ns + 1)[:ns]


def shell_resolution_A(box: int, apix: float, device=None) -> torch.Tensor:
    """Resolution of each shell in Å, ``[n_shells(box)]``: ``box * apix / i``, ``inf`` at shell 0.

    The matching spatial frequency is ``i / (box * apix)`` 1/Å.
    """
    i = torch.arange(n_shells(box), device=device, dtype=torch.get_default_dtype())
    return (float(box) * float(apix)) / i  # 1/0 -> inf at the DC shell


# --------------------------------------------------------------------------- FRC / FSC


def _shell_correlation(x1: torch.Tensor, x2: torch.Tensor, ndim: int, eps: float, what: str):
    box = _check_square(x1.shape, ndim, what)
    _check_square(x2.shape, ndim, what)
    x1, x2 = torch.broadcast_tensors(x1, x2)
    batch = x1.shape[:-ndim]
    dims = tuple(range(-ndim, 0))
    f1 = torch.fft.rfftn(x1, dim=dims, norm="ortho").reshape(-1, box ** (ndim - 1) * (box // 2 + 1))
    f2 = torch.fft.rfftn(x2, dim=dims, norm="ortho").reshape(f1.shape)
    w = _half_spectrum_weights(box, x1.device, x1.dtype).expand(*([box] * (ndim - 1)), -1).reshape(-1)
    shell = _shell_of_grid(box, ndim, x1.device, half=True).reshape(-1)
    ns = n_shells(box)

    cross = _shell_sums((f1.real * f2.real + f1.imag * f2.imag) * w, shell, ns)
    p1 = _shell_sums((f1.real**2 + f1.imag**2) * w, shell, ns)
    p2 = _shell_sums((f2.real**2 + f2.imag**2) * w, shell, ns)
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
    a, b = _as_real_pair(img1, img2)
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
    a, b = _as_real_pair(map1, map2)
    if mask is not None:
        m = _as_real_tensor(mask, device=a.device).to(a.dtype)
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


# --------------------------------------------------------------------------- masks


def _raised_cosine(d: torch.Tensor, start: float, width: float) -> torch.Tensor:
    """1 for d <= start, 0 for d >= start + width, raised cosine in between."""
    if width <= 0:
        return (d <= start).to(d.dtype)
    t = ((d - start) / width).clamp(0.0, 1.0)
    return 0.5 * (1.0 + torch.cos(math.pi * t))


def soft_sphere_mask(
    box: int,
    radius_px: float,
    edge_px: float = 6,
    device=None,
    dtype=torch.float32,
    ndim: int = 3,
) -> torch.Tensor:
    """A sphere (or, with ``ndim=2``, a disc) with a raised-cosine edge.

    Args:
        box: box size ``N`` in pixels; the centre is voxel ``(N//2, N//2, N//2)``.
        radius_px: radius in pixels within which the mask is 1.
        edge_px: width of the cosine fall-off; the mask is 0 beyond ``radius_px + edge_px``.
            ``0`` gives a hard mask.

    Returns:
        ``[N, N, N]`` (or ``[N, N]``) tensor with values in [0, 1], non-increasing with the
        distance from the centre.
    """
    c = torch.arange(int(box), device=device, dtype=torch.float64) - int(box) // 2
    grids = torch.meshgrid(*([c] * ndim), indexing="ij")
    r = torch.sqrt(sum(g * g for g in grids))
    return _raised_cosine(r, float(radius_px), float(edge_px)).to(dtype)


def soft_mask_from_map(map, threshold: float, extend_px: float = 3, edge_px: float = 6) -> torch.Tensor:
    """A soft mask around the density of ``map`` (as ``relion_mask_create`` makes them).

    Voxels with ``map >= threshold`` form the initial binary mask; it is grown by
    ``extend_px`` pixels (Euclidean distance; a negative value shrinks it) and then given
    a raised-cosine edge ``edge_px`` pixels wide, falling from 1 at distance ``extend_px``
    to 0 at ``extend_px + edge_px`` from the binary mask.

    Args:
        map: ``[N, N, N]`` map (or a 2-D image); not batched.
        threshold: density value for binarisation, in the map's units.

    Returns:
        Mask of the map's shape, on its device, in its dtype (float32 for integer maps).
        Not differentiable (binarisation).
    """
    import numpy as np
    from scipy import ndimage

    m = _as_real_tensor(map)
    binary = (m >= threshold).detach().cpu().numpy()
    if not binary.any():
        raise ValueError(
            f"soft_mask_from_map: threshold {threshold} is above the map's maximum "
            f"{float(m.max()):.6g}: expected a threshold that selects some voxels"
        )
    outside = ndimage.distance_transform_edt(~binary) if not binary.all() else np.zeros(binary.shape)
    inside = ndimage.distance_transform_edt(binary)
    # signed distance: 0 on the boundary layer of the binary mask, negative deeper inside
    signed = np.where(binary, 1.0 - inside, outside)
    d = torch.as_tensor(signed, device=m.device, dtype=torch.float64)
    return _raised_cosine(d, float(extend_px), float(edge_px)).to(m.dtype)


# --------------------------------------------------------------------------- correlations


def _reduce_dims(shape, dims):
    if dims is None:
        return tuple(range(len(shape)))
    if isinstance(dims, int):
        return (dims,)
    return tuple(dims)


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
    a, b = _as_real_pair(a, b)
    if mask is None:
        a, b = torch.broadcast_tensors(a, b)
        w = torch.ones((), device=a.device, dtype=a.dtype)
    else:
        w = _as_real_tensor(mask, device=a.device).to(a.dtype)
        a, b, w = torch.broadcast_tensors(a, b, w)
    dims = _reduce_dims(a.shape, dims)
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
    a, b = _as_real_pair(a, b)
    nd = _spatial_ndim(a, ndim, "fourier_correlation")
    box = _check_square(a.shape, nd, "fourier_correlation")
    _check_square(b.shape, nd, "fourier_correlation")
    a, b = torch.broadcast_tensors(a, b)
    dims = tuple(range(-nd, 0))
    fa = torch.fft.rfftn(a, dim=dims, norm="ortho")
    fb = torch.fft.rfftn(b, dim=dims, norm="ortho")
    w = _half_spectrum_weights(box, a.device, a.dtype).expand(fa.shape[-nd:])
    shell = _shell_of_grid(box, nd, a.device, half=True)
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
    sim, ref = _as_real_pair(sim, ref)
    sim, ref = torch.broadcast_tensors(sim, ref)
    dims = _reduce_dims(sim.shape, dims)
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


# --------------------------------------------------------------------------- filters, shifts


def lowpass(x, resolution_A: float, apix: float, edge_shells: float = 2, ndim: int | None = None) -> torch.Tensor:
    """Soft Fourier low-pass filter of images or maps.

    The filter is 1 below, and 0 above, the cut-off shell ``k_c = N * apix / resolution_A``
    (cycles per box), with a raised-cosine edge ``edge_shells`` wide centred on ``k_c``
    (value 0.5 at ``resolution_A``), as RELION's ``--lowpass`` filters with their edge
    width; ``edge_shells=0`` is a hard cut at ``|k| <= k_c``. ``|k|`` is the exact (not
    rounded) distance from the origin.

    Args:
        x: ``[..., N, N]`` images or ``[..., N, N, N]`` maps (see module docstring for ``ndim``).
        resolution_A: cut-off resolution in Å; apix: pixel size in Å.

    Returns:
        Filtered real tensor of ``x``'s shape. Differentiable.
    """
    x = _as_real_tensor(x)
    nd = _spatial_ndim(x, ndim, "lowpass")
    box = _check_square(x.shape, nd, "lowpass")
    dims = tuple(range(-nd, 0))
    k = _radius_of_grid(box, nd, x.device, x.dtype, half=True)
    kc = box * float(apix) / float(resolution_A)
    h = _raised_cosine(k, kc - float(edge_shells) / 2.0, float(edge_shells))
    f = torch.fft.rfftn(x, dim=dims)
    return torch.fft.irfftn(f * h, s=x.shape[-nd:], dim=dims)


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
    a, b = _as_real_pair(a, b)
    nd = _spatial_ndim(a, ndim, "peak_shift")
    box = _check_square(a.shape, nd, "peak_shift")
    _check_square(b.shape, nd, "peak_shift")
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


# --------------------------------------------------------------------------- plots


def fsc_plot(curves: dict, box: int, apix: float, path, thresholds=(0.143, 0.5), title: str | None = None) -> Path:
    """Write a PNG of FSC curves against spatial frequency (1/Å).

    Each curve (``name -> [n_shells(box)]`` tensor/array) is drawn with its resolution at
    every threshold in the legend (see :func:`resolution_at`); the thresholds are drawn as
    dashed lines. The file is written through :func:`cryogmm.bridge.fileio.atomic_output`,
    so it appears only when complete. Uses matplotlib's Agg canvas, no pyplot state.

    Returns:
        ``Path(path)``.
    """
    import numpy as np
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    from cryogmm.bridge.fileio import atomic_output

    fig = Figure(figsize=(6.0, 4.0), dpi=120)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    for name, curve in curves.items():
        y = torch.as_tensor(curve).detach().to("cpu", torch.float64).reshape(-1).numpy()[: n_shells(box)]
        x = np.arange(len(y)) / (float(box) * float(apix))
        res = ", ".join(f"{resolution_at(y, box, apix, t):.2f} Å @ {t:g}" for t in thresholds)
        ax.plot(x, y, lw=1.5, label=f"{name} ({res})")
    for t in thresholds:
        ax.axhline(t, ls="--", lw=0.8, color="0.4")
    ax.axhline(0.0, lw=0.5, color="0.7")
    ax.set_xlim(0.0, 1.0 / (2.0 * float(apix)))
    ax.set_ylim(-0.1, 1.05)
    ax.set_xlabel("spatial frequency (1/Å)")
    ax.set_ylabel("FSC")
    if title:
        ax.set_title(title)
    ax.legend(fontsize=8, loc="upper right")
    fig.tight_layout()
    with atomic_output(path) as tmp:
        fig.savefig(tmp, format=Path(path).suffix.lstrip(".") or "png")
    return Path(path)
