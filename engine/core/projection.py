"""Projection of Gaussian mixtures and of maps into particle images.

Conventions (``cryogmm.bridge.conventions``): a point ``r`` of the map lands at image
coordinates ``(A r)[:2] - o`` for RELION's matrix ``A`` and origin ``o`` (Å); images are
``[B, N, N]`` indexed ``[y, x]`` with the centre at ``N // 2``. Image values are sums of map
voxels along the beam, the scale ``relion_project`` writes.

The kernel (:func:`project`) is separable: an image is ``Gy^T Gx`` with ``Gx[n, x]`` and
``Gy[n, y]`` the 1D profiles of the Gaussians. A profile is built only on a window of
``W`` pixels (where it exceeds ``eps``, the dtype's resolution / 128; ``W`` rounded up so that
a window moves as whole 16-byte elements) placed inside the box; ``exp(-u^2/2)`` floored at
``eps e^-4`` is drawn (no exp underflows, no denormal anywhere, the floor far below the dtype's
resolution), scattered by one index copy (both axes) into a reused zeroed buffer a few images
at a time (``CHUNK_BYTES``), and multiplied, only over the region of the image that some window
reaches (the rest is exactly 0). On CPUs the forward sorts each image's Gaussians by their y
windows and multiplies tiles of them, each only over the rows its windows span (``TILE_GAUSSIANS``:
about half the arithmetic of the whole region at box 64); its buffers are kept per thread
between calls (``_scratch``). Only the compact windows are rebuilt for the backward pass,
which has closed-form gradients. Rotations and profiles stay in the input's float dtype even
under autocast and TF32; only the matrix products follow an active autocast (bf16) or TF32
setting. ``with use_compile():`` builds the windows with ``torch.compile`` inside its block
(off by default; ``CRYOGMM_COMPILE=1`` turns it on for the process).
"""

from __future__ import annotations

import contextlib
import math
import os
import threading

import numpy as np
import torch

from cryogmm.core.gaussians import Gaussians

LOG2E = 1.0 / math.log(2.0)  # exponents of the profiles are kept in base 2 (exp2 is cheaper than exp)
# bytes of the two scatter buffers per chunk of images: cache-sized on CPUs, large on GPUs
CHUNK_BYTES = {"cpu": 4 << 20}
CHUNK_BYTES_DEFAULT = 512 << 20


def rotate_centers(centers: torch.Tensor, rotmat: torch.Tensor, shift_A: torch.Tensor | None = None):
    """Image-plane positions of Gaussian centres: ``(A c)[:2] - shift``.

    ``centers`` [N, 3] or [B, N, 3]; ``rotmat`` [B, 3, 3]; ``shift_A`` [B, 2] or None.
    Returns ``[B, N, 2]`` (x, y) in Å and the depth ``[B, N]`` (views of :func:`rotate_rows`).
    """
    pos = rotate_rows(centers, rotmat)
    xy = pos[:, :2].transpose(1, 2)
    if shift_A is not None:
        xy = xy - shift_A.to(centers.dtype)[:, None, :]
    return xy, pos[:, 2]


def rotate_rows(centers: torch.Tensor, rotmat: torch.Tensor) -> torch.Tensor:
    """``A c`` for every image and centre, laid out ``[B, 3, N]``: one matrix product (the rows of
    all rotations times the centres). Always in the centres' dtype (autocast is switched off here:
    a bf16 rotation moves atoms by tenths of an Å), and where float32 matrix products may run in
    TF32 (GPUs with ``--matmul-precision tf32|bf16``) as three broadcast products instead (TF32
    keeps 10 bits: hundredths of an Å)."""
    with torch.autocast(centers.device.type, enabled=False):
        R = rotmat.to(centers.dtype)
        if _tf32_possible(centers):  # [B, N, 3] = sum_i c_i R[:, :, i]
            pos = centers[..., 0, None] * R[:, None, :, 0]
            for i in (1, 2):
                pos = pos + centers[..., i, None] * R[:, None, :, i]
            return pos.transpose(1, 2)
        if centers.dim() == 2:
            return torch.matmul(R.reshape(-1, 3), centers.T).view(R.shape[0], 3, -1)
        return torch.matmul(R, centers.transpose(-1, -2))  # batch dimensions broadcast


def _tf32_possible(t: torch.Tensor) -> bool:
    """Whether a float32 matrix product of ``t`` may run in TF32 here (CUDA with TF32 allowed)."""
    return (t.dtype == torch.float32 and t.device.type == "cuda"
            and (torch.backends.cuda.matmul.allow_tf32 or torch.get_float32_matmul_precision() != "highest"))


def profile_cutoff(dtype: torch.dtype) -> float:
    """``eps``: profile values below it are not drawn (the dtype's resolution / 128)."""
    return torch.finfo(dtype).eps / 128.0


def profile_cut(dtype: torch.dtype) -> float:
    """Half the width of a profile's window in sigma: ``sqrt(-2 ln eps)``."""
    return math.sqrt(-2.0 * math.log(profile_cutoff(dtype)))


def window_width(sigma_max: float, apix: float, dtype: torch.dtype) -> int:
    """Pixels per profile window: covers ``+-sqrt(-2 ln eps)`` sigma of the widest Gaussian."""
    return math.floor(2.0 * profile_cut(dtype) * sigma_max / apix) + 2


def _granule(box: int, dtype: torch.dtype) -> int:
    """Values moved as one element by the scatter: 16 bytes (a complex128) where the row length
    allows, so that a window of ``W`` values is ``W / g`` elements of an index copy."""
    g = max(1, 16 // torch.empty((), dtype=dtype).element_size())
    while box % g:
        g //= 2
    return g


_GRANULE_DTYPE = {1: None, 2: torch.float64, 4: torch.complex128}


def _units(t, g: int):
    """A float tensor (last dim contiguous) seen as elements of ``g`` values: a float64 or
    complex128 view whose last dimension is ``g`` times shorter."""
    if g == 1:
        return t
    return t.view(torch.float64 if t.element_size() * g == 8 else torch.complex128)


class _Geometry:
    """Where the profile windows of a batch lie. ``t [B, 2 (x, y), N]`` image-plane centres
    (Å), ``s [B, N]`` widths (Å). Everything per window is laid out ``[B, 2, N]`` so that a
    chunk of images is one contiguous block.

    Each profile is drawn on ``W`` pixels (``window_width`` rounded up to the scatter granule
    ``g``) starting at a multiple of ``g`` kept inside the box, so rows have no padding (a window
    that would cross the box edge is shifted inward, where the Gaussian is below ``eps``
    anyway); ``W`` is at most the box. The images are computed only on the batch's region
    ``[lo, hi)`` per axis where some window lies (the rest of the box is exactly 0).
    With ``d`` the pixels from the centre to the window's first pixel and ``nsa2 = -apix^2 /
    (2 s^2 ln 2)``, the profile at the window's pixel ``k`` is ``2^(nsa2 (d + k)^2)`` (the same
    as ``exp``, in base 2: a third faster on CPUs), floored at ``eps e^-4``. ``start [B, 2, N]``
    is each window's first value (in scatter elements) in its row of the batch's region;
    ``chunk`` images at a time keep the scatter buffer and the windows within ``CHUNK_BYTES``.
    Both profile buffers of a chunk (x rows ``[c, N, Lx]``, then y rows ``[c, N, Ly]``) are one
    flat buffer, filled by one index copy."""

    def __init__(self, t, s, box: int, apix: float):
        dt = t.dtype
        self.box = box
        log_eps = math.log(profile_cutoff(dt))
        # profile values are floored at eps e^-4 (an exp that would underflow is ~50x slower on
        # CPUs, flush-to-zero or not, and makes denormals; products of two floors and a weight
        # stay normal down to weights of ~1e-17 in float32); the floor is 4 e-folds below the
        # cut eps, far below the dtype's resolution, so no threshold pass is needed
        self.floor = (log_eps - 4.0) * LOG2E  # in base 2 (as nsa2)
        cut = profile_cut(dt)
        g = self.g = _granule(box, dt)
        W = window_width(float(s.max()), apix, dt)
        W = min(box, -(-(W + g - 1) // g) * g)
        self.W = W
        h = box // 2
        B, _, N = t.shape
        dev = t.device
        tp = t / apix  # [B, 2, N] centre in pixels from the box centre
        # first pixel of each window as an index into the box, in scatter elements of g pixels
        m = torch.sub(tp, s[:, None, :], alpha=cut / apix).ceil_().add_(h).div_(g).floor_().clamp_(0, (box - W) // g)
        ends = torch.stack([m.amin((0, 2)), m.amax((0, 2))]).tolist()
        # the region, widened to whole 64-byte rows where the box allows (what matrix-product
        # kernels move at once; same images, the extra columns are 0)
        v = max(g, 64 // t.element_size())
        self.L = [min(box, -(-(int(b) * g + W - int(a) * g) // v) * v) for a, b in zip(*ends)]
        self.lo = [min(int(a) * g, box - L) for a, L in zip(ends[0], self.L)]  # x, y
        self.hi = [a + L for a, L in zip(self.lo, self.L)]
        self.start = m.sub_(torch.tensor([a // g for a in self.lo], device=dev, dtype=dt)[:, None])
        # pixels from the centre to the window's first pixel: both from the box centre, so no
        # rounding of the offset by box // 2
        lo_t = torch.tensor([float(v - h) for v in self.lo], device=dev, dtype=dt)[:, None]
        self.d = torch.mul(self.start, float(g)).add_(lo_t).sub_(tp)
        self.nsa2 = torch.mul(s, s).reciprocal_().mul_(-apix * apix / 2.0 * LOG2E)[:, None, :, None]  # [B, 1, N, 1]
        self.kr = torch.arange(W, device=dev, dtype=dt)
        self.mm_ok = (dev.type == "cpu" and torch.get_float32_matmul_precision() == "highest"
                      and not torch.is_autocast_enabled("cpu"))
        self.coef = None

    def layout(self, rows_y: int, extra: int = 0):
        """Images per chunk (``chunk``: the scatter buffer, the windows and ``extra`` values per
        image within ``CHUNK_BYTES``) and each window's row offset (scatter elements) in the
        chunk's buffer (``base [chunk, 2, N]``): x rows ``[c, N, Lx]``, then y rows ``[c, N,
        rows_y]``."""
        B, _, N = self.d.shape
        Lx, g = self.L[0], self.g
        per_image = (N * (Lx + rows_y + 4 * self.W) + extra) * self.d.element_size()
        self.chunk = max(1, min(B, CHUNK_BYTES.get(self.d.device.type, CHUNK_BYTES_DEFAULT) // per_image))
        slot = torch.arange(self.chunk * N, device=self.d.device).view(self.chunk, N)
        self.base = torch.stack([slot * (Lx // g), slot * (rows_y // g) + self.chunk * N * (Lx // g)], 1)

    def coefficients(self):
        """``[d, 1]`` of every window, ``[2, B 2 N]`` (the left operand of the offsets' product,
        with ``powers [2, W]`` its right), or None where the offsets are a broadcast sum."""
        if self.mm_ok and self.coef is None:
            self.coef = _scratch("coefficients", 2 * self.d.numel(), self.d).view(2, -1)
            self.coef[0] = self.d.view(-1)
            self.coef[1] = 1.0
            self.powers = torch.stack([torch.ones_like(self.kr), self.kr])
        return self.coef

    def chunk_rows(self):
        """The images of each chunk (``chunk``, the last fewer) as ``slice``s, and the scatter rows
        (index of each window's first element, ``[c 2 N]``) of each, cut from one kept buffer."""
        B, _, N = self.d.shape
        n = -(-B // self.chunk)
        rows = _scratch("rows", n * self.chunk * 2 * N, self.base)
        rows[:B * 2 * N].view(B, 2, N).copy_(self.start)
        rows.view(n, self.chunk, 2, N).add_(self.base)
        sl = [slice(i, min(B, i + self.chunk)) for i in range(0, B, self.chunk)]
        return sl, rows[:B * 2 * N].split([2 * N * (x.stop - x.start) for x in sl])

    def windows(self, sl, keep_q: bool = False, out=None, e_out=None):
        """Profile windows of the images ``sl``: ``e [c, 2 (x, y), N, W]`` and, with ``keep_q``,
        the offsets ``q = d + k`` (pixels, same shape; else None). ``out``: a contiguous tensor
        of ``e``'s size to make them in (a buffer reused chunk after chunk: no fresh pages), or
        with ``keep_q`` to make ``q`` in, and ``e`` in ``e_out``. See :meth:`draw`."""
        n = self.d.shape[2]
        coef = self.coefficients()
        part = self.d[sl] if coef is None else coef[:, 2 * n * sl.start:2 * n * sl.stop]
        return self.draw(part, self.nsa2[sl], out, keep_q, e_out)

    def draw(self, part, nsa2, out=None, keep_q: bool = False, e_out=None):
        """The windows of ``c`` images from their part of the offsets' operand (``[2, c 2 N]``
        columns of :meth:`coefficients`, or ``d [c, 2, N]`` where there are none) and their
        ``nsa2 [c, 1, N, 1]``; ``out``, ``keep_q`` and ``e_out`` as :meth:`windows`.

        On CPUs with float32 matrix products at full precision the offsets come from one matrix
        product ``[d, 1] @ [1, k]`` (exact products, one rounding per value: the same values as
        the broadcast sum, which is slower over rows of ``W``; the product's left operand is
        the transposed view of ``[2, B 2 N]`` rows, which BLAS reads as is). The exponent is
        ``nsa2 q^2`` from the exact ``q`` (folding the width into the product instead would
        round ``d`` and ``k`` scaled before they cancel: several times the error near the peak)."""
        c, n = nsa2.shape[0], nsa2.shape[2]
        if self.coef is not None:
            q = torch.mm(part.T, self.powers, out=None if out is None else out.view(-1, self.W)).view(c, 2, n, self.W)
        else:
            q = torch.add(part[..., None], self.kr, out=out)
        arg = (torch.mul(q, q, out=e_out) if keep_q else q.mul_(q)).mul_(nsa2)
        e = arg.clamp_min_(self.floor).exp2_()
        return e, (q if keep_q else None)


# Tiles of the forward. Each image's Gaussians are taken in the order of their y windows and
# cut into T tiles of P (the last padded with copies of weight 0): the y profiles of a tile span
# only the E rows from its first window, so a tile's image is one [E, P] x [P, Lx] product added
# into those rows of the image (one index_add_ a chunk), instead of [Ly, N] x [N, Lx] over the
# whole region: for a compact molecule about half the arithmetic at box 64, a third at 128.
#: Gaussians per tile of the forward's product on CPUs (a product this deep still runs near full
#: speed; GPUs, whose matrix products are cheap beside the windows, keep one product per image)
TILE_GAUSSIANS = 192
#: the forward tiles the product only when a tile's rows are at most this fraction of the region's
TILE_MAX_ROWS = 0.8


_SCRATCH = threading.local()
#: the largest buffer kept between calls (per name and thread)
SCRATCH_KEEP_BYTES = 64 << 20


def _scratch(name: str, numel: int, like: torch.Tensor) -> torch.Tensor:
    """A flat buffer of ``numel`` values of ``like``'s dtype for this thread's kernel, kept
    between calls on CPUs (fresh pages of a few MB, mapped and zero-filled by the system on
    every call, cost as much as the work in them; GPUs have their caching allocator). Buffers
    named ``zeros`` are all 0 when given and must be left so. Buffers over ``SCRATCH_KEEP_BYTES``
    (one huge image a chunk) are made afresh and not kept."""
    if like.device.type != "cpu" or numel * like.element_size() > SCRATCH_KEEP_BYTES:
        return like.new_zeros(numel) if name == "zeros" else like.new_empty(numel)
    bufs = _SCRATCH.__dict__.setdefault("bufs", {})
    key = (name, like.dtype)
    b = bufs.get(key)
    if b is None or b.numel() < numel:
        bufs[key] = b = like.new_zeros(numel)
    return b[:numel]


def _order_by(key):
    """Stable order of each row of the whole numbers ``key [B, N]`` (within +-32767): a radix
    sort in NumPy on CPUs (several times faster than ``torch.argsort`` there)."""
    if key.device.type == "cpu":
        return torch.from_numpy(np.argsort(key.to(torch.int16).numpy(), axis=1, kind="stable"))
    return torch.argsort(key, dim=1, stable=True)


def _sorted_by_y(t, s, w, T: int, box: int, apix: float):
    """The Gaussians of each image in the order of their y windows' first pixel, padded to ``T``
    tiles of ``P`` with copies of weight 0: ``t, s, w`` so reordered and ``P``."""
    B, _, N = t.shape
    P = -(-N // T)
    key = torch.sub(t[:, 1], s, alpha=profile_cut(t.dtype)).div_(apix).clamp_(-box, box)
    order = _order_by(key)
    if T * P > N:
        order = torch.cat([order, order[:, -1:].expand(B, T * P - N)], 1)
    t, s, w = t.gather(2, order[:, None].expand(B, 2, -1)), s.gather(1, order), w.gather(1, order)
    w[:, N:] = 0.0
    return t, s, w, P


def _window_values(d, nsa2, kr, floor: float, w):
    """The forward's profile windows in one expression (what ``torch.compile`` fuses into one
    loop): ``d [c, 2, N]``, ``nsa2 [c, 1, N, 1]``, ``kr [W]``, weights ``w [c, N]`` on the y
    profiles. Returns ``[c, 2, N, W]``."""
    q = d[..., None] + kr
    e = torch.exp2((q * q * nsa2).clamp_min(floor))
    return torch.stack([e[:, 0], e[:, 1] * w[..., None]], 1)


COMPILE_ENV = "CRYOGMM_COMPILE"
#: whether the profile windows are built by ``torch.compile`` (see :func:`use_compile`); the
#: compiled function is made once, on first use
_COMPILE = {"on": os.environ.get(COMPILE_ENV, "") not in ("", "0"), "fn": None}


def _compiled_windows():
    if _COMPILE["fn"] is None:
        _COMPILE["fn"] = torch.compile(_window_values, dynamic=True)
    return _COMPILE["fn"]


@contextlib.contextmanager
def use_compile(enabled: bool = True):
    """Within the ``with`` block, build the projection's profile windows with ``torch.compile``
    (``enabled=True``: one fused loop instead of a few elementwise passes; the matrix products
    and the scatter stay as they are) or without it (``False``); the setting before the block
    comes back after it, also on an exception. Off by default, on for the whole process with
    the environment variable ``CRYOGMM_COMPILE=1``. The first call with a new shape compiles
    (seconds to a minute), so it pays only for long jobs. Not for concurrent use from several
    threads with different settings (one process-wide switch)."""
    before = _COMPILE["on"]
    _COMPILE["on"] = bool(enabled)
    try:
        yield
    finally:
        _COMPILE["on"] = before


def set_compile(enabled: bool) -> bool:
    """Process-wide default of :func:`use_compile` (stays until changed; prefer the scoped
    ``with use_compile():``). Returns whether it is on."""
    _COMPILE["on"] = bool(enabled)
    return _COMPILE["on"]


def compile_enabled() -> bool:
    """Whether the projection builds its windows with ``torch.compile`` here and now."""
    return _COMPILE["on"]


def _runs(buf, W: int, g: int):
    """The flat buffer as overlapping runs of ``W`` values (``W / g`` elements of ``g`` values),
    one run starting at every element, so that one row index moves a whole window."""
    u = _units(buf, g)
    n = W // g
    return u.as_strided((u.numel() - n + 1, n), (1, 1))


def _mm_dtype(dev: torch.device):
    if torch.is_autocast_enabled(dev.type):
        return torch.get_autocast_dtype(dev.type)
    return None


def _bmm(a, b, out, mm_dtype):
    if mm_dtype is None:
        torch.bmm(a, b, out=out)
    else:
        out.copy_(torch.bmm(a.to(mm_dtype), b.to(mm_dtype)))


class _SeparableProject(torch.autograd.Function):
    """Images ``[B, box, box]`` from image-plane centres ``t [B, 2 (x, y), N]`` (Å), widths ``s``
    and weights ``w`` (``[B, N]``): ``sum_n w_n gy_n(y) gx_n(x)``. The profiles are made a
    chunk of images at a time, forward and again in backward (nothing of size ``W`` is kept)."""

    @staticmethod
    def forward(ctx, t, s, w, box, apix, mm_dtype):
        ctx.save_for_backward(t, s, w)
        ctx.meta = (box, apix, mm_dtype)
        B, _, N = t.shape
        T, P = 1, N
        if N >= 2 * TILE_GAUSSIANS and t.device.type == "cpu":
            T = min(16, N // TILE_GAUSSIANS)
        if T > 1:  # tiles (see TILE_GAUSSIANS): the windows of a tile's y profiles lie close together
            t, s, w, P = _sorted_by_y(t, s, w, T, box, apix)
        geo = _Geometry(t, s, box, apix)
        (lx, ly), (hx, hy), (Lx, Ly) = geo.lo, geo.hi, geo.L
        W, g, M = geo.W, geo.g, t.shape[2]
        E = Ly
        if T > 1:  # a tile's y profiles span E rows from its first window's
            sy = geo.start[:, 1].view(B, T, P)
            first = sy.amin(2)
            E = (int((sy.amax(2) - first).max()) + W // g) * g
            if E > TILE_MAX_ROWS * Ly:
                T, P, E = 1, M, Ly
            else:
                first.clamp_max_((Ly - E) // g)
                sy.sub_(first[..., None])
        geo.layout(E, T * E * Lx if T > 1 else 0)
        chunk = geo.chunk
        full = Lx == box and Ly == box
        out = t.new_empty(B, box, box) if full and T == 1 else t.new_zeros(B, box, box)
        if T > 1:  # each tile row adds into its row of ``out``'s region
            tiles = _scratch("tiles", chunk * T * E * Lx, t).view(chunk * T, E, Lx)
            target = out.view(B * box, box)[:, lx:hx]
            first = first.long().mul_(g).add_(torch.arange(ly, B * box, box, device=t.device)[:, None])
            out_rows = (first[..., None] + torch.arange(E, device=t.device)).view(B, T * E)
        elif not full:
            img = _scratch("image", chunk * Ly * Lx, t).view(chunk, Ly, Lx)  # BLAS wants a contiguous result
        nx = chunk * M * Lx
        buf = _scratch("zeros", nx + chunk * M * E, t)  # x rows [chunk, M, Lx], then y rows [chunk, M, E]
        runs = _runs(buf, W, g)
        gx, gy = buf[:nx].view(chunk * T, P, Lx), buf[nx:].view(chunk * T, P, E)
        fn = _compiled_windows() if _COMPILE["on"] else None
        scratch = _scratch("windows", chunk * 2 * M * W, t).view(chunk, 2, M, W)  # each chunk's windows
        # what each chunk needs, cut once: scatter rows, offsets' coefficients, widths, weights
        # (and tile rows); what all full chunks share, viewed once
        slices, rows = geo.chunk_rows()
        sizes = [sl.stop - sl.start for sl in slices]
        coef = geo.coefficients()
        coefs = coef.split([2 * M * c for c in sizes], 1) if coef is not None else geo.d.split(sizes)
        nsa2s, ws = geo.nsa2.split(sizes), w.view(B, M, 1).split(sizes)
        if T > 1:
            out_rows = out_rows.view(-1).split([T * E * c for c in sizes])
        full_views = (scratch, _units(scratch, g).view(-1, W // g), gy.transpose(1, 2), gx, tiles if T > 1 else None)
        try:
            for k, (sl, c) in enumerate(zip(slices, sizes)):
                if c == chunk:
                    e, eu, gyt, gxc, tl = full_views
                else:
                    e = scratch[:c]
                    eu = _units(e, g).view(-1, W // g)
                    gyt = buf[nx:nx + c * M * E].view(c * T, P, E).transpose(1, 2)
                    gxc = buf[:c * M * Lx].view(c * T, P, Lx)
                    tl = tiles[:c * T] if T > 1 else None
                if fn is not None:
                    e.copy_(fn(geo.d[sl], geo.nsa2[sl], geo.kr, geo.floor, w[sl]))
                else:
                    geo.draw(coefs[k], nsa2s[k], out=e)
                    e[:, 1].mul_(ws[k])
                runs.index_copy_(0, rows[k], eu)
                if T > 1:
                    _bmm(gyt, gxc, tl, mm_dtype)
                    target.index_add_(0, out_rows[k], tl.view(-1, Lx))
                elif full:
                    _bmm(gyt, gxc, out[sl], mm_dtype)
                else:
                    _bmm(gyt, gxc, img[:c], mm_dtype)
                    out[sl, ly:hy, lx:hx] = img[:c]
                runs.index_fill_(0, rows[k], 0)
        except BaseException:
            buf.zero_()  # the reused buffer stays all 0 (an interrupt may land between copy and fill)
            raise
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):
        t, s, w = ctx.saved_tensors
        box, apix, mm_dtype = ctx.meta
        B, _, N = t.shape
        geo = _Geometry(t, s, box, apix)
        (lx, ly), (hx, hy), (Lx, Ly) = geo.lo, geo.hi, geo.L
        geo.layout(geo.L[1])
        W, g, chunk = geo.W, geo.g, geo.chunk
        g_t, g_s, g_w = torch.empty_like(t), torch.empty_like(s), torch.empty_like(w)
        nx = chunk * N * Lx
        buf = _scratch("zeros", nx + chunk * N * Ly, t)
        dbuf = _scratch("profile gradients", nx + chunk * N * Ly, t)
        runs, druns = _runs(buf, W, g), _runs(dbuf, W, g)
        # the windows, their offsets, the weighted windows and their gradients of a chunk
        win = [_scratch(name, chunk * 2 * N * W, t).view(chunk, 2, N, W) for name in ("windows", "offsets",
                                                                                        "weighted", "d windows")]
        try:
            for sl, rows in zip(*geo.chunk_rows()):
                c = sl.stop - sl.start
                e, q = geo.windows(sl, keep_q=True, out=win[1][:c], e_out=win[0][:c])
                ew = win[2][:c]
                ew[:, 0] = e[:, 0]
                torch.mul(e[:, 1], w[sl, :, None], out=ew[:, 1])
                runs.index_copy_(0, rows, _units(ew, g).view(-1, W // g))
                gx, gy = buf[:c * N * Lx].view(c, N, Lx), buf[nx:nx + c * N * Ly].view(c, N, Ly)
                gr = grad[sl, ly:hy, lx:hx]
                # image = gy^T gx: d gx = gy image', d gy = gx image'^T
                _bmm(gy, gr, dbuf[:c * N * Lx].view(c, N, Lx), mm_dtype)
                _bmm(gx, gr.transpose(1, 2), dbuf[nx:nx + c * N * Ly].view(c, N, Ly), mm_dtype)
                d = win[3][:c]  # d loss / d profile values
                torch.index_select(druns, 0, rows, out=_units(d, g).view(-1, W // g))
                runs.index_fill_(0, rows, 0)
                g_w[sl] = (d[:, 1] * e[:, 1]).sum(-1)
                d[:, 1].mul_(w[sl, :, None])
                # e = exp(-r2 q^2), r2 = apix^2 / 2 s^2, q = pixel - c / apix:
                # de/dc = 2 r2 q e / apix, de/ds = 2 r2 q^2 e / s
                r2 = (apix * apix / 2.0) / (s[sl] * s[sl])
                d.mul_(e).mul_(q)
                g_t[sl] = d.sum(-1) * (2.0 * r2 / apix)[:, None]
                g_s[sl] = d.mul_(q).sum((1, 3)) * (2.0 * r2 / s[sl])
        except BaseException:
            buf.zero_()  # the reused buffer stays all 0
            raise
        return g_t, g_s, g_w, None, None, None


def project(g: Gaussians, rotmat: torch.Tensor, shift_A: torch.Tensor | None, box: int, apix: float) -> torch.Tensor:
    """Project a mixture at ``B`` poses: ``[B, box, box]``.

    Separable: with ``X[b, n, x]`` and ``Y[b, n, y]`` the per-Gaussian 1D factors, the batch
    of images is the batched matrix product ``Y^T diag(w) X`` (windowed, see the module
    docstring). Differentiable in centres, amplitudes, widths, rotations and shifts. ``g``
    may carry per-image centres ``[B, N, 3]`` (a deformed mixture); amplitudes and widths
    ``[N]`` or ``[B, N]``. Under an active autocast only the matrix products change dtype.
    """
    dev = g.centers.device
    dt = g.centers.dtype
    mm_dtype = _mm_dtype(dev)
    with torch.autocast(dev.type, enabled=False):
        t = rotate_rows(g.centers, rotmat)[:, :2]  # [B, 2 (x, y), N]
        if shift_A is not None:
            t = t - shift_A.to(dt)[:, :, None]
        B = t.shape[0]
        s = (g.sigmas.expand(B, -1) if g.sigmas.dim() == 1 else g.sigmas).to(dt)
        a = (g.amplitudes.expand(B, -1) if g.amplitudes.dim() == 1 else g.amplitudes).to(dt)
        w = a / (s * s).mul_(2.0 * math.pi * apix)  # line integral / apix = sum of voxels
        return _SeparableProject.apply(t, s, w, int(box), float(apix), mm_dtype)


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
