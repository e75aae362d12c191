"""Projection of Gaussian mixtures and of maps into particle images.

Conventions (``cryogmm.bridge.conventions``): a point ``r`` of the map lands at image
coordinates ``(A r)[:2] - o`` for RELION's matrix ``A`` and origin ``o`` (Å); images are
``[B, N, N]`` indexed ``[y, x]`` with the centre at ``N // 2``. Image values are sums of map
voxels along the beam, the scale ``relion_project`` writes.

The kernel (:func:`project`) is separable: an image is ``Gy^T Gx`` with ``Gx[n, x]`` and
``Gy[n, y]`` the 1D profiles of the Gaussians. A profile is built only on a window of
``W`` pixels around its centre (where it exceeds ``eps``, the dtype's resolution / 128, and
``max(exp(-u^2/2) - eps, 0)`` is what is drawn: continuous, exactly zero outside, never a
denormal), scattered into a reused zeroed buffer a few images at a time, and multiplied.
Only the compact windows are kept for the backward pass, which has closed-form gradients.
Rotations and profiles stay in the input's float dtype even under autocast; only the
matrix products follow an active autocast (bf16) or TF32 setting.
"""

from __future__ import annotations

import math

import torch

from cryogmm.core.gaussians import Gaussians

# bytes of the two scatter buffers per chunk of images: cache-sized on CPUs, large on GPUs
CHUNK_BYTES = {"cpu": 4 << 20}
CHUNK_BYTES_DEFAULT = 512 << 20


def rotate_centers(centers: torch.Tensor, rotmat: torch.Tensor, shift_A: torch.Tensor | None = None):
    """Image-plane positions of Gaussian centres: ``(A c)[:2] - shift``.

    ``centers`` [N, 3] or [B, N, 3]; ``rotmat`` [B, 3, 3]; ``shift_A`` [B, 2] or None.
    Returns ``[B, N, 2]`` (x, y) in Å and the depth ``[B, N]``. Always in the centres' dtype
    (autocast is switched off here: a bf16 rotation moves atoms by tenths of an Å).
    """
    with torch.autocast(centers.device.type, enabled=False):
        pos = torch.matmul(centers, rotmat.to(centers.dtype).transpose(-1, -2))  # [B, N, 3]
        xy = pos[..., :2]
        if shift_A is not None:
            xy = xy - shift_A.to(centers.dtype)[:, None, :]
    return xy, pos[..., 2]


def profile_cutoff(dtype: torch.dtype) -> float:
    """``eps``: profile values below it are not drawn (the dtype's resolution / 128)."""
    return torch.finfo(dtype).eps / 128.0


def window_width(sigma_max: float, apix: float, dtype: torch.dtype) -> int:
    """Pixels per profile window: covers ``+-sqrt(-2 ln eps)`` sigma of the widest Gaussian."""
    cut = math.sqrt(-2.0 * math.log(profile_cutoff(dtype)))
    return math.floor(2.0 * cut * sigma_max / apix) + 2


def _windows(coord, sig, box: int, apix: float, W: int):
    """Profile windows. ``coord [c, 2, N]`` (x and y, Å), ``sig [c, N]`` (Å). Returns the drawn
    values ``e [c, 2, N, W]`` (``exp(-u^2/2)`` where above ``eps``, else exactly 0), the offsets
    ``q`` (pixel minus centre, pixels, same shape) and the first pixel ``k0 [c, 2, N]`` (int64,
    clamped to ``[-W, box]``: windows beyond the box land in the buffer's padding)."""
    log_eps = math.log(profile_cutoff(coord.dtype))
    cut = math.sqrt(-2.0 * log_eps)
    sig = sig[:, None, :]
    t = coord / apix  # centre in pixels from the box centre
    k0 = torch.ceil(t - cut * sig / apix).clamp_(-W - box // 2, box - box // 2)
    q = (k0 - t)[..., None] + torch.arange(W, device=coord.device, dtype=coord.dtype)
    arg = (q * q).mul_((-apix * apix / 2.0) / (sig * sig)[..., None])
    # clamped before exp (an exp that underflows is ~50x slower on CPUs and makes denormals),
    # then zeroed below eps
    e = arg.clamp_min_(log_eps - 1.0).exp_()
    e = torch.nn.functional.threshold_(e, math.exp(log_eps), 0.0)
    return e, q, k0.long() + box // 2


def _runs(buf, W: int):
    """The flat buffer seen as overlapping runs of ``W`` values, one starting at every element:
    ``runs[i] = buf[i:i + W]``, so that one row index moves a whole window."""
    return buf.as_strided((buf.numel() - W + 1, W), (1, 1))


def _mm_dtype(dev: torch.device):
    if torch.is_autocast_enabled(dev.type):
        return torch.get_autocast_dtype(dev.type)
    return None


def _bmm(a, b, out, mm_dtype):
    if mm_dtype is None:
        torch.bmm(a, b, out=out)
    else:
        out.copy_(torch.bmm(a.to(mm_dtype), b.to(mm_dtype)))


def _plan(xy, s, box: int, apix: float):
    """Window width, padded row length and images per chunk (memory budget ``CHUNK_BYTES``)."""
    B, N, _ = xy.shape
    W = window_width(float(s.max()), apix, xy.dtype)
    P = box + 2 * W
    budget = CHUNK_BYTES.get(xy.device.type, CHUNK_BYTES_DEFAULT)
    return W, P, max(1, min(B, budget // (2 * P * N * xy.element_size())))


class _SeparableProject(torch.autograd.Function):
    """Images ``[B, box, box]`` from image-plane positions ``xy [B, N, 2]`` (Å), widths ``s``
    and weights ``w`` (``[B, N]``): ``sum_n w_n gy_n(y) gx_n(x)``. The profiles are made a
    chunk of images at a time, forward and again in backward (nothing of size ``W`` is kept)."""

    @staticmethod
    def forward(ctx, xy, s, w, box, apix, mm_dtype):
        B, N, _ = xy.shape
        W, P, chunk = _plan(xy, s, box, apix)
        coords = xy.transpose(1, 2).contiguous()  # [B, 2, N]
        out = xy.new_empty(B, box, box)
        buf = xy.new_zeros(chunk * 2 * N * P)  # [c, 2 (x, y), N, P] profiles, padded rows
        runs = _runs(buf, W)
        base = torch.arange(chunk * 2 * N, device=xy.device).view(chunk, 2, N) * P + W
        for i in range(0, B, chunk):
            sl = slice(i, min(B, i + chunk))
            c = sl.stop - sl.start
            e, _, k0 = _windows(coords[sl], s[sl], box, apix, W)
            e[:, 1].mul_(w[sl, :, None])
            rows = (base[:c] + k0).view(-1)
            runs.index_copy_(0, rows, e.reshape(-1, W))
            g = buf[:c * 2 * N * P].view(c, 2, N, P)[..., W:W + box]
            _bmm(g[:, 1].transpose(1, 2), g[:, 0], out[sl], mm_dtype)
            runs.index_fill_(0, rows, 0.0)
        ctx.save_for_backward(xy, s, w)
        ctx.meta = (box, apix, mm_dtype)
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):
        xy, s, w = ctx.saved_tensors
        box, apix, mm_dtype = ctx.meta
        B, N, _ = xy.shape
        W, P, chunk = _plan(xy, s, box, apix)
        grad = grad.contiguous()
        coords = xy.transpose(1, 2).contiguous()
        g_xy, g_s, g_w = xy.new_empty(B, 2, N), torch.empty_like(s), torch.empty_like(w)
        buf, hbuf = xy.new_zeros(chunk * 2 * N * P), xy.new_zeros(chunk * 2 * N * P)  # hbuf's pads stay 0
        runs, hruns = _runs(buf, W), _runs(hbuf, W)
        base = torch.arange(chunk * 2 * N, device=xy.device).view(chunk, 2, N) * P + W
        for i in range(0, B, chunk):
            sl = slice(i, min(B, i + chunk))
            c = sl.stop - sl.start
            e, q, k0 = _windows(coords[sl], s[sl], box, apix, W)
            rows = base[:c] + k0
            runs.index_copy_(0, rows[:, 0].reshape(-1), e[:, 0].reshape(-1, W))
            runs.index_copy_(0, rows[:, 1].reshape(-1), (e[:, 1] * w[sl, :, None]).view(-1, W))
            g = buf[:c * 2 * N * P].view(c, 2, N, P)[..., W:W + box]
            h = hbuf[:c * 2 * N * P].view(c, 2, N, P)[..., W:W + box]
            # image = gy^T gx: d gx = gy image', d gy = gx image'^T
            _bmm(g[:, 1], grad[sl], h[:, 0], mm_dtype)
            _bmm(g[:, 0], grad[sl].transpose(1, 2), h[:, 1], mm_dtype)
            rows = rows.view(-1)
            d = hruns.index_select(0, rows).view(c, 2, N, W)  # d loss / d profile values
            runs.index_fill_(0, rows, 0.0)
            g_w[sl] = (d[:, 1] * e[:, 1]).sum(-1)
            d[:, 1].mul_(w[sl, :, None])
            # e = exp(-r2 q^2), r2 = apix^2 / 2 s^2, q = pixel - c / apix:
            # de/dc = 2 r2 q e / apix, de/ds = 2 r2 q^2 e / s
            r2 = (apix * apix / 2.0) / (s[sl] * s[sl])
            d.mul_(e).mul_(q)
            g_xy[sl] = d.sum(-1) * (2.0 * r2 / apix)[:, None, :]
            g_s[sl] = d.mul_(q).sum((1, 3)) * (2.0 * r2 / s[sl])
        return g_xy.transpose(1, 2), g_s, g_w, None, None, None


def project(g: Gaussians, rotmat: torch.Tensor, shift_A: torch.Tensor | None, box: int, apix: float) -> torch.Tensor:
    """Project a mixture at ``B`` poses: ``[B, box, box]``.

    Separable: with ``X[b, n, x]`` and ``Y[b, n, y]`` the per-Gaussian 1D factors, the batch
    of images is the batched matrix product ``Y^T diag(w) X`` (windowed, see the module
    docstring). Differentiable in centres, amplitudes, widths, rotations and shifts. ``g``
    may carry per-image centres ``[B, N, 3]`` (a deformed mixture); amplitudes and widths
    ``[N]`` or ``[B, N]``. Under an active autocast only the matrix products change dtype.
    """
    xy, _ = rotate_centers(g.centers, rotmat, shift_A)
    B = xy.shape[0]
    dt = xy.dtype
    with torch.autocast(xy.device.type, enabled=False):
        s = (g.sigmas.expand(B, -1) if g.sigmas.dim() == 1 else g.sigmas).to(dt)
        a = (g.amplitudes.expand(B, -1) if g.amplitudes.dim() == 1 else g.amplitudes).to(dt)
        w = a / (2.0 * math.pi * s**2 * apix)  # line integral / apix = sum of voxels
    mm_dtype = _mm_dtype(xy.device)
    with torch.autocast(xy.device.type, enabled=False):
        return _SeparableProject.apply(xy, s, w, int(box), float(apix), mm_dtype)


#: bytes of the sample points (and their samples) one step of :func:`project_map` may hold
PROJECT_MAP_BYTES = {"cpu": 256 << 20}
PROJECT_MAP_BYTES_DEFAULT = 1 << 30


def project_map(volume: torch.Tensor, rotmat: torch.Tensor, shift_A: torch.Tensor | None, apix: float,
                max_bytes: int | None = None) -> torch.Tensor:
    """Project a cubic map ``[N, N, N]`` at ``B`` poses by trilinear sampling along rays: ``[B, N, N]``.

    The image pixel ``p`` sums the map at ``A^T (p + o, z)`` over the ``N`` depth samples
    ``z``, the real-space form of the projection ``relion_project`` computes. Used by
    ``cryogmm simulate --map`` and the mixture fits (their target projections).

    Memory: the sample points of ``b`` images by ``d`` depth planes (``16 b d N^2`` bytes with
    their samples) are made at a time, with ``b d`` as large as ``max_bytes`` allows (default
    ``PROJECT_MAP_BYTES`` by device: 256 MiB on CPUs, 1 GiB elsewhere; at least one plane), so
    a box of 256 or 400 never holds its whole ``[B, N^3, 3]`` point grid.
    """
    n = volume.shape[-1]
    dev, dt = volume.device, volume.dtype
    B = rotmat.shape[0]
    budget = PROJECT_MAP_BYTES.get(dev.type, PROJECT_MAP_BYTES_DEFAULT) if max_bytes is None else int(max_bytes)
    per_plane = 16 * n * n  # 3 coordinates and 1 sample, 4 bytes each
    planes = max(1, min(n, budget // per_plane))
    images = max(1, min(B, budget // (per_plane * n))) if planes == n else 1
    ax = (torch.arange(n, device=dev, dtype=dt) - n // 2) * apix
    yy, xx = torch.meshgrid(ax, ax, indexing="ij")
    vol = volume[None, None]
    R_all = rotmat.to(dt)
    # (p + o) A for row vectors p = (x, y, z): the origin's part is one vector per image
    o_all = None
    if shift_A is not None:
        o = shift_A.to(dt)
        o_all = torch.cat([o, torch.zeros_like(o[:, :1])], -1)[:, None, :] @ R_all  # [B, 1, 3]
    out = volume.new_zeros(B, n, n)
    for i in range(0, B, images):
        R = R_all[i:i + images]
        b = R.shape[0]
        for z0 in range(0, n, planes):
            zz = ax[z0:z0 + planes]
            # r = A^T p for the points of these planes, as row vectors: x R[0] + y R[1] + z R[2]
            xy = (xx[..., None] * R[:, None, None, 0, :] + yy[..., None] * R[:, None, None, 1, :])  # [b, y, x, 3]
            r = xy[:, None] + zz[None, :, None, None, None] * R[:, None, None, None, 2, :]  # [b, d, y, x, 3]
            if o_all is not None:
                r = r + o_all[i:i + b, :, None, None, :].reshape(b, 1, 1, 1, 3)
            # voxel index (x first) -> grid_sample's [-1, 1]
            grid = r.mul_(2.0 / ((n - 1) * apix)).add_((n // 2) * 2.0 / (n - 1) - 1.0)
            samp = torch.nn.functional.grid_sample(vol.expand(b, -1, -1, -1, -1), grid, mode="bilinear",
                                                   padding_mode="zeros", align_corners=True)  # [b, 1, d, y, x]
            out[i:i + b] += samp[:, 0].sum(1)
    return out
