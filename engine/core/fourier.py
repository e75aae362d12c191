"""Fourier-space helpers shared by every similarity and filter: frequency grids, radial shells
and their sums, the half-spectrum weights of real FFTs, Fourier cropping, the low-pass
filter with a raised-cosine edge, and the input checks of real images and maps."""

from __future__ import annotations

import math

import torch

# --------------------------------------------------------------------------- helpers


def as_real_tensor(x, device=None) -> torch.Tensor:
    t = torch.as_tensor(x, device=device)
    if t.is_complex():
        raise ValueError(f"expected a real-valued image or map, got dtype {t.dtype}")
    if not t.is_floating_point():
        t = t.to(torch.get_default_dtype())
    return t


def as_real_pair(a, b) -> tuple[torch.Tensor, torch.Tensor]:
    a = as_real_tensor(a)
    b = as_real_tensor(b, device=a.device)
    dtype = torch.promote_types(a.dtype, b.dtype)
    return a.to(dtype), b.to(dtype)


def spatial_ndim(x: torch.Tensor, ndim: int | None, what: str) -> int:
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


def check_square(shape, ndim: int, what: str) -> int:
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


def shell_of_grid(box: int, ndim: int, device, half: bool) -> torch.Tensor:
    axes = [_fft_k(box, device)] * (ndim - 1) + [_fft_k(box, device, half=half)]
    grids = torch.meshgrid(*axes, indexing="ij")
    k2 = sum(g * g for g in grids)
    # |k|^2 is an integer, so |k| is never exactly m + 1/2: rounding has no ties
    return torch.round(torch.sqrt(k2.to(torch.float64))).to(torch.long)


def _radius_of_grid(box: int, ndim: int, device, dtype, half: bool) -> torch.Tensor:
    axes = [_fft_k(box, device)] * (ndim - 1) + [_fft_k(box, device, half=half)]
    grids = torch.meshgrid(*axes, indexing="ij")
    return torch.sqrt(sum(g.to(dtype) ** 2 for g in grids))


def half_spectrum_weights(box: int, device, dtype) -> torch.Tensor:
    """How many full-spectrum voxels each rfft column stands for (1 or 2, conjugate pairs).

    Column kx = 0 and, for even boxes, kx = N/2 hold their own conjugate partners.
    """
    kx = torch.arange(box // 2 + 1, device=device)
    return torch.where((kx == 0) | (2 * kx == box), 1.0, 2.0).to(dtype)


def shell_sums(values: torch.Tensor, shell: torch.Tensor, ns: int) -> torch.Tensor:
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
    box = check_square(shape, len(shape), "radial_shell_index")
    return shell_of_grid(box, len(shape), device, half=False)


def shell_voxel_counts(box: int, ndim: int = 3, device=None) -> torch.Tensor:
    """Number of full-spectrum Fourier voxels in each shell, ``[n_shells(box)]`` (int64).

    For independent noise the FRC/FSC of a shell with ``n`` voxels has standard deviation
    close to ``1 / sqrt(n)``.
    """
    shell = shell_of_grid(int(box), ndim, device, half=False).reshape(-1)
    ns = n_shells(box)
    return torch.bincount(shell.clamp(max=ns), minlength=ns + 1)[:ns]


def shell_resolution_A(box: int, apix: float, device=None) -> torch.Tensor:
    """Resolution of each shell in Å, ``[n_shells(box)]``: ``box * apix / i``, ``inf`` at shell 0.

    The matching spatial frequency is ``i / (box * apix)`` 1/Å.
    """
    i = torch.arange(n_shells(box), device=device, dtype=torch.get_default_dtype())
    return (float(box) * float(apix)) / i  # 1/0 -> inf at the DC shell


# --------------------------------------------------------------------------- correlations


def reduce_dims(shape, dims):
    if dims is None:
        return tuple(range(len(shape)))
    if isinstance(dims, int):
        return (dims,)
    return tuple(dims)


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
    x = as_real_tensor(x)
    nd = spatial_ndim(x, ndim, "lowpass")
    box = check_square(x.shape, nd, "lowpass")
    dims = tuple(range(-nd, 0))
    k = _radius_of_grid(box, nd, x.device, x.dtype, half=True)
    kc = box * float(apix) / float(resolution_A)
    h = raised_cosine(k, kc - float(edge_shells) / 2.0, float(edge_shells))
    f = torch.fft.rfftn(x, dim=dims)
    return torch.fft.irfftn(f * h, s=x.shape[-nd:], dim=dims)


def band_crop(box: int, hi: int) -> int:
    """The even grid size that keeps Fourier shells up to ``hi`` of a ``box`` grid with a
    margin (Nyquist at 1.6 ``hi``, so interpolation and the pixel sampling of a projection
    fold nothing into the band), at least 24 and at most ``box``. Work limited to shells
    ``<= hi`` (band FRC alignment, the FRC fit of a mixture) runs on this grid with pixel
    ``apix * box / crop``: shell ``k`` there is shell ``k`` of the full box."""
    crop = min(int(box), max(24, 2 * math.ceil(1.6 * int(hi))))
    return crop + crop % 2 if crop < box else int(box)


def fourier_crop(vol: torch.Tensor, m: int) -> torch.Tensor:
    """A cubic map resampled to ``m^3`` voxels over the same box by cropping its spectrum
    (the origin stays; the voxel grows by n/m)."""
    n = vol.shape[-1]
    f = torch.fft.fftshift(torch.fft.fftn(vol))
    a = n // 2 - m // 2
    f = f[a:a + m, a:a + m, a:a + m]
    return torch.fft.ifftn(torch.fft.ifftshift(f)).real * (m / n) ** 3


def raised_cosine(d: torch.Tensor, start: float, width: float) -> torch.Tensor:
    """1 for d <= start, 0 for d >= start + width, raised cosine in between."""
    if width <= 0:
        return (d <= start).to(d.dtype)
    t = ((d - start) / width).clamp(0.0, 1.0)
    return 0.5 * (1.0 + torch.cos(math.pi * t))


class _RfftnOrtho(torch.autograd.Function):
    """``rfftn(x, norm="ortho")`` over the last ``ndim`` axes, whose gradient is one inverse real
    FFT (``irfftn``) of the incoming half-spectrum gradient instead of autograd's zero-padded
    full complex inverse FFT (about half the work and memory; the same gradient to rounding)."""

    @staticmethod
    def forward(ctx, x, ndim):
        ctx.shape, ctx.ndim = tuple(x.shape[-ndim:]), ndim
        return torch.fft.rfftn(x, dim=tuple(range(-ndim, 0)), norm="ortho")

    @staticmethod
    def backward(ctx, grad):
        # The adjoint of the half spectrum y = P F x (F the orthonormal DFT, P keeping the
        # last axis' first n//2+1 bins) is Re(F^H P^T g) = F^H h, with h the Hermitian part of
        # the zero-padded g: g/2 off the self-conjugate planes (last index 0 and, n even,
        # n/2), (g(k) + conj g(-k))/2 on them. irfftn is F^H for such an h.
        ndim, n = ctx.ndim, ctx.shape[-1]
        dims = tuple(range(-ndim, 0))
        h = grad * 0.5
        planes = [0] + ([n // 2] if n % 2 == 0 else [])
        for j in planes:
            p = grad[..., j]
            pd = tuple(range(-(ndim - 1), 0))  # p's spatial axes: k -> -k (mod n) on each
            neg = torch.roll(torch.flip(p, dims=pd), shifts=(1,) * (ndim - 1), dims=pd)
            h[..., j] = 0.5 * (p + neg.conj())
        return torch.fft.irfftn(h, s=ctx.shape, dim=dims, norm="ortho"), None


def rfftn_ortho(x: torch.Tensor, ndim: int = 3) -> torch.Tensor:
    """``torch.fft.rfftn(x, norm="ortho")`` over the last ``ndim`` axes of a real tensor, with a
    cheaper gradient (an ``irfftn`` instead of a full complex FFT): the FSC map term's FFT."""
    if not x.requires_grad:
        return torch.fft.rfftn(x, dim=tuple(range(-ndim, 0)), norm="ortho")
    return _RfftnOrtho.apply(x, ndim)
