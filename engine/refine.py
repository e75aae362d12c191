"""Orientation refinement against Gaussian mixtures (Chen, Schmid & Chiu; EMAN2 ``e2gmm_refine``).

Gold-standard throughout: each half-set of particles is aligned only against the mixture
fitted to its own half map. One iteration:

1. fit a Gaussian mixture to each half map (k-means seeding, then FRC of projections,
   :mod:`cryogmm.fitmap`; warm-started from the previous iteration);
2. refine every particle's pose locally by Adam on a rotation increment (rotation vector
   applied in the image frame, ``A = exp(delta) A0``) and its origin, maximising the FRC
   between the particle and the CTF-modulated projection of its half's mixture over a band
   of shells: the lower bound is fixed (``low_res_A``), the upper bound is the resolution
   of the last FSC. Images and projections are Fourier-cropped to the band, so the cost
   follows the resolution, not the box;
3. reconstruct both halves with the new poses, FSC, next band. Stops after ``iterations``
   or when the resolution stops improving.

Focused refinement: a mask ``M`` (0..1) scales each Gaussian's width by ``1/(0.25 + 0.75 M)``
at its centre, so the alignment follows high resolution inside the mask and low outside.

Several processes or GPUs (``torch.distributed``; gloo on CPUs, NCCL on GPUs)::

    torchrun --nproc_per_node 2 -m cryogmm.cli refine-poses particles.star --out ref

Each rank aligns its contiguous shard of the particles; the mixtures are fitted on rank 0 and
broadcast; the refined poses are gathered (each row has one owner) and the reconstructions
between iterations summed across ranks (:mod:`cryogmm.distributed`), so every rank holds the
same poses and maps; rank 0 writes the STAR, maps and report. Results equal one process's up
to the order of float sums (each particle's alignment is independent of its batch). The
mixture fits (k-means seeding) react to changes of the maps at the float32 rounding level,
so under ``torchrun`` the Fourier sums are float64 (``accumulate="auto"``) and the maps do
not depend on the sharding; ``accumulate="float64"`` on one process gives the same run.

Precision (``matmul_precision``): the projection's matrix products may use TF32 (``tf32``)
or bf16 autocast (``bf16``) on GPUs; the FRC score, the poses, the reconstruction and the
FSC stay float32 (accumulators float64 across processes). Default ``highest``: float32.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from cryogmm.errors import MapError, OptionError
from cryogmm.jobs import Timer
from cryogmm.rotations import rotmat_angle_deg

__all__ = ["RefineConfig", "refine_poses", "refine_batch", "focus_widths", "BandFrc", "patch_masks", "composite",
           "weighted_kabsch", "conformation_to_orientation"]


@dataclass
class RefineConfig:
    star: Path
    out: Path
    half_maps: tuple[Path, Path] | None = None
    model: Path | None = None
    map: Path | None = None
    mask: Path | None = None
    hetero: Path | None = None
    patches: int = 0
    patch_iterations: int = 2
    sym: str = "C1"
    project_dir: Path | None = None
    iterations: int = 5
    low_res_A: float = 30.0
    start_res_A: float | None = None
    steps: int = 40
    lr_deg: float = 1.0
    lr_A: float = 0.3
    n_gaussians: int | None = None
    max_gaussians: int = 1000
    fit_iterations: int = 300
    batch: int = 128
    seed: int = 0
    device: str | None = None
    matmul_precision: str = "highest"
    prefetch: int = 1
    accumulate: str = "auto"


class BandFrc:
    """FRC over shells ``lo..hi`` on a Fourier-cropped grid of ``crop`` pixels.

    The crop keeps the absolute frequencies: shell ``k`` of the cropped grid is shell ``k``
    of the full box, with pixel ``apix * box / crop``.
    """

    def __init__(self, box: int, apix: float, lo: int, hi: int, device=None):
        self.box, self.lo, self.hi = box, int(lo), int(hi)
        crop = min(box, max(24, 2 * math.ceil(1.6 * hi)))
        crop += crop % 2
        self.crop = crop
        self.apix_crop = apix * box / crop
        ky = torch.fft.fftfreq(crop, d=1.0 / crop, device=device)
        kx = torch.arange(crop // 2 + 1, device=device, dtype=ky.dtype)
        KY, KX = torch.meshgrid(ky, kx, indexing="ij")
        shell = torch.round(torch.sqrt(KX**2 + KY**2)).long()
        keep = (shell >= self.lo) & (shell <= self.hi)
        self.index = torch.nonzero(keep.reshape(-1)).squeeze(1)
        self.shell = shell.reshape(-1)[self.index] - self.lo
        self.n_shells = self.hi - self.lo + 1

    def crop_ft(self, images: torch.Tensor) -> torch.Tensor:
        """Centred real images ``[B, N, N]`` -> band values of their Fourier transforms ``[B, K]``."""
        f = torch.fft.rfft2(torch.fft.ifftshift(images, dim=(-2, -1)))
        c, n = self.crop, self.box
        f = torch.cat([f[:, : c // 2, : c // 2 + 1], f[:, n - c // 2:, : c // 2 + 1]], 1)
        return f.reshape(f.shape[0], -1)[:, self.index]

    def band(self, ft_crop: torch.Tensor) -> torch.Tensor:
        """``[B, crop, crop // 2 + 1]`` -> ``[B, K]``."""
        return ft_crop.reshape(ft_crop.shape[0], -1)[:, self.index]

    def shell_sum(self, v: torch.Tensor) -> torch.Tensor:
        out = torch.zeros(v.shape[0], self.n_shells, dtype=v.dtype, device=v.device)
        return out.index_add(1, self.shell, v)

    def frc(self, x: torch.Tensor, p: torch.Tensor, x_power: torch.Tensor | None = None) -> torch.Tensor:
        """Per-shell FRC ``[B, n_shells]`` between band values ``x`` and ``p`` ``[B, K]``."""
        num = self.shell_sum((x.conj() * p).real)
        px = self.shell_sum(x.real**2 + x.imag**2) if x_power is None else x_power
        pp = self.shell_sum(p.real**2 + p.imag**2)
        return num / torch.sqrt(px * pp).clamp_min(1e-20)


def focus_widths(g, mask: torch.Tensor, apix: float):
    """Scale each Gaussian's width by ``1 / (0.25 + 0.75 M(c))`` with ``M`` the mask
    (``[N, N, N]``, 0..1) sampled trilinearly at its centre."""
    from cryogmm.gmm import Gaussians

    n = mask.shape[-1]
    grid = (g.centers / apix + n // 2) * (2.0 / (n - 1)) - 1.0
    m = torch.nn.functional.grid_sample(mask[None, None].to(g.centers), grid[None, None, None], mode="bilinear",
                                        padding_mode="zeros", align_corners=True).reshape(-1)
    return Gaussians(g.centers, g.amplitudes, g.sigmas / (0.25 + 0.75 * m.clamp(0, 1)))


def refine_batch(g, band: BandFrc, x: torch.Tensor, ctf: torch.Tensor, A0: torch.Tensor, s0: torch.Tensor, *,
                 steps: int, lr_rad: float, lr_A: float, precision: str = "highest"):
    """Local refinement of one batch of particles against one mixture.

    ``x [B, K]`` particle band values, ``ctf [B, K]`` their CTF on the band, ``A0 [B, 3, 3]``
    and ``s0 [B, 2]`` (Å) starting poses. Returns ``(A, shift_A, frc_mean)``. ``precision``
    ``bf16``: the projection runs under bf16 autocast on CUDA (the image comes back float32).
    """
    from cryogmm.jobs import autocast
    from cryogmm.project import project
    from cryogmm.rotations import rotvec_to_rotmat

    B = x.shape[0]
    delta = torch.zeros(B, 3, dtype=A0.dtype, device=A0.device, requires_grad=True)
    shift = s0.clone().requires_grad_(True)
    opt = torch.optim.Adam([{"params": [delta], "lr": lr_rad}, {"params": [shift], "lr": lr_A}])
    # cosine decay: large steps to leave the start, small ones to settle on the optimum
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda t: 0.5 * (1.0 + math.cos(math.pi * min(t, steps) / steps)))
    x_power = band.shell_sum(x.real**2 + x.imag**2)
    g = g.detach()
    for step in range(steps + 1):
        A = rotvec_to_rotmat(delta) @ A0
        with autocast(A0.device, precision):
            img = project(g, A, shift, band.crop, band.apix_crop)
        p = torch.fft.rfft2(torch.fft.ifftshift(img.float(), dim=(-2, -1)))
        p = band.band(p) * ctf
        score = band.frc(x, p, x_power).mean(1)
        if step == steps:  # the last pass only scores the final poses
            break
        opt.zero_grad()
        (-score.sum()).backward()
        opt.step()
        sched.step()
    return A.detach(), shift.detach(), score.detach()


def weighted_kabsch(P: torch.Tensor, Q: torch.Tensor, w: torch.Tensor):
    """Rigid motion that best maps points ``P [B, N, 3]`` onto ``Q [N, 3]`` (or ``[B, N, 3]``)
    with weights ``w [N] >= 0``: ``(Rot [B, 3, 3], t [B, 3])`` minimising
    ``sum_j w_j |Rot p_j + t - q_j|^2`` (Kabsch with the reflection guard)."""
    P = P.double()
    Q = Q.double().expand_as(P)
    w = (w.double() / w.double().sum()).to(P.device)
    pc = (w[None, :, None] * P).sum(1)
    qc = (w[None, :, None] * Q).sum(1)
    H = ((P - pc[:, None]) * w[None, :, None]).transpose(1, 2) @ (Q - qc[:, None])
    U, _, Vt = torch.linalg.svd(H)
    d = torch.sign(torch.linalg.det(Vt.transpose(1, 2) @ U.transpose(1, 2)))
    D = torch.diag_embed(torch.stack([torch.ones_like(d), torch.ones_like(d), d], -1))
    Rot = Vt.transpose(1, 2) @ D @ U.transpose(1, 2)
    t = qc - (Rot @ pc[:, :, None])[:, :, 0]
    return Rot, t


def conformation_to_orientation(R, S, deformed, neutral, weights):
    """Turn each particle's conformational change of a region into a change of orientation.

    ``R [n, 3, 3]``, ``S [n, 2]`` Å: the particles' poses (RELION ``A`` and origin);
    ``deformed [n, N, 3]``: the Gaussian centres of each particle's own conformation;
    ``neutral [N, 3]``: the neutral (reference) centres; ``weights [N]``: how much each
    Gaussian belongs to the region (the mask at its neutral centre times its amplitude).

    The masked RMSD between the particle's conformation and the neutral mixture is minimised
    over rigid motions (weighted Kabsch: ``Rot d_j + t ~ n_j`` in the region). A region point
    of the particle then sits where the neutral region point sits under the pose
    ``A' = A Rot^T`` with origin ``o' = o + (A Rot^T t)[:2]`` (image position ``(A r)[:2] - o``),
    so the projections of the neutral mixture at the new pose and of the particle's own
    conformation at the old one agree inside the mask, for every view. Returns
    ``(R' [n, 3, 3], S' [n, 2], rmsd_before [n], rmsd_after [n])``.
    """
    R = torch.as_tensor(R, dtype=torch.float64)
    S = torch.as_tensor(S, dtype=torch.float64)
    D = torch.as_tensor(deformed, dtype=torch.float64)
    Nn = torch.as_tensor(neutral, dtype=torch.float64)
    w = torch.as_tensor(weights, dtype=torch.float64)
    Rot, t = weighted_kabsch(D, Nn, w)
    wn = w / w.sum()
    before = torch.sqrt((wn * ((D - Nn) ** 2).sum(-1)).sum(-1))
    moved = D @ Rot.transpose(1, 2) + t[:, None]
    after = torch.sqrt((wn * ((moved - Nn) ** 2).sum(-1)).sum(-1))
    A_new = R @ Rot.transpose(1, 2)
    S_new = S + (A_new @ t[:, :, None])[:, :2, 0]
    return A_new, S_new, before, after


def _hetero_poses(cfg, table, mask, R, S, apix, dev, progress):
    """Poses from a heterogeneity run (``cfg.hetero``): the conformation of each particle,
    its region (``mask``) brought back onto the neutral model. Returns ``(R, S, figures)``."""
    from cryogmm.hetero import Run

    run = Run(cfg.hetero, device=dev, star=cfg.star, project_dir=cfg.project_dir)
    if run.data.n != table.n:
        raise OptionError("--hetero", f"the run {cfg.hetero} holds {run.data.n} particles but {cfg.star} has "
                          f"{table.n}: give the particles it was trained on")
    progress("conformation to orientation", 0, table.n)
    z = torch.as_tensor(run.encode_all(), dtype=torch.float32)
    base = run.ref.gaussians.to(dev)
    m = focus_widths(base, mask, apix)  # width scaled by 1/(0.25 + 0.75 M): recover M at each centre
    M = ((base.sigmas / m.sigmas) - 0.25) / 0.75
    w = (M.clamp(0, 1) * base.amplitudes.abs()).detach().cpu()
    if float(w.sum()) <= 0:
        raise MapError(cfg.mask, f"covers none of the heterogeneity run's Gaussians ({cfg.hetero})")
    Rn, Sn, before, after = [], [], [], []
    with torch.no_grad():
        for b0 in range(0, table.n, 512):
            zb = z[b0:b0 + 512].to(dev)
            d = run.vae.deformer(base, zb).centers.cpu()
            a, s, rb, ra = conformation_to_orientation(R[b0:b0 + 512], S[b0:b0 + 512], d, base.centers.cpu(), w)
            Rn.append(a.float()); Sn.append(s.float()); before.append(rb); after.append(ra)
            progress("conformation to orientation", min(b0 + 512, table.n), table.n)
    Rn, Sn = torch.cat(Rn), torch.cat(Sn)
    before, after = torch.cat(before).numpy(), torch.cat(after).numpy()
    dang = rotmat_angle_deg(Rn.double(), R.double()).numpy()
    figures = {"run": str(cfg.hetero), "zdim": int(z.shape[1]),
               "region_rmsd_A": {"before_median": float(np.median(before)), "after_median": float(np.median(after))},
               "pose_change_deg": {"median": float(np.median(dang)), "p90": float(np.percentile(dang, 90))}}
    return Rn, Sn, figures


def _read_half_maps(paths, box, apix):
    from cryogmm.mapio import read_map

    maps = []
    for p in paths:
        m, a = read_map(p, expect_apix=apix)
        if m.shape[0] != box:
            raise MapError(p, f"box {m.shape[0]} differs from the particles' box {box}")
        maps.append(torch.as_tensor(m))
    return maps


def _read_mask(path, box, apix, device):
    from cryogmm import mapio

    m, _ = mapio.read_map(path, expect_apix=apix)
    if m.shape[0] != box:
        raise MapError(path, f"mask box {m.shape[0]} differs from the particles' box {box}")
    if m.min() < -1e-3 or m.max() > 1 + 1e-3:
        raise MapError(path, f"mask values span {m.min():.3g}..{m.max():.3g}; expected 0..1")
    return torch.as_tensor(m, device=device).clamp(0, 1)


@dataclass
class _Ctx:
    """What every iteration needs: the particles, their geometry and the run's options."""
    cfg: RefineConfig
    table: object
    source: object
    box: int
    apix: float
    dev: object
    sets: np.ndarray
    lo_shell: int
    sphere: torch.Tensor
    recon_ops: np.ndarray
    model: object
    rng: np.random.Generator
    progress: object


def _reconstruct(ctx: _Ctx, R, S, wiener=True):
    """Half maps, final map and unmasked FSC from poses ``R``/``S``; with symmetry (not
    expanded) every particle is inserted once per operator."""
    from cryogmm.bridge.images import ImageSource
    from cryogmm.reconstruct import reconstruct_table
    from cryogmm.symmetry import expand_table

    table = ctx.table.with_poses(rotmat=R.double().numpy(), shift_A=S.double().numpy())
    source = ctx.source
    if len(ctx.recon_ops) > 1:
        table = expand_table(table, ctx.recon_ops)
        source = ImageSource.from_table(table)
    return reconstruct_table(table, source, device=ctx.dev, wiener=wiener, prefetch=ctx.cfg.prefetch,
                             accumulate=ctx.cfg.accumulate)


def _fit_mixtures(ctx: _Ctx, gmms, halves, res, it):
    """The two halves' mixtures, fitted on rank 0 and broadcast to the other ranks."""
    from cryogmm import distributed

    out = _fit_mixtures_here(ctx, gmms, halves, res, it) if distributed.is_main() else None
    if distributed.world() > 1:
        out = distributed.broadcast_object(None if out is None else [g.to("cpu") for g in out])
        out = [g.to(ctx.dev) for g in out]
    return out


def _fit_mixtures_here(ctx: _Ctx, gmms, halves, res, it):
    from cryogmm.fitmap import auto_n, auto_threshold, fit_gaussians_frc, gaussians_from_map, map_origin_A
    from cryogmm.gmm import gaussians_from_coords
    from cryogmm.metrics import lowpass

    cfg, apix, box, dev = ctx.cfg, ctx.apix, ctx.box, ctx.dev
    out = list(gmms)
    for h in (0, 1):
        vol = halves[h].to(dev)
        r = max(res, 2 * apix)
        if out[h] is None and ctx.model is not None:
            model = ctx.model
            origin = map_origin_A(cfg.half_maps[h]) if cfg.half_maps else None
            center = (origin + (box // 2) * apix) if origin is not None else model.center_of_mass()
            g0 = gaussians_from_coords(model, model.coords[0], "atoms", resolution_A=res, center_A=center)
            # gold-standard: each half starts from the model randomised at the resolution
            g0.centers += torch.as_tensor(ctx.rng.normal(0, res / 4, g0.centers.shape), dtype=torch.float32)
            out[h], _ = fit_gaussians_frc(g0.to(dev), vol, apix, res, iterations=cfg.fit_iterations, seed=cfg.seed + h)
        elif out[h] is None:
            # seed on the half map low-passed to its resolution: noise must not be seeded
            smooth = lowpass(vol, r, apix)
            n = cfg.n_gaussians
            if n is None:
                thr, _ = auto_threshold(smooth)
                vol_A3 = float((smooth > thr).sum()) * apix**3
                n = min(auto_n(vol_A3, r), cfg.max_gaussians)
            out[h], _ = gaussians_from_map(smooth, apix, resolution_A=r, n=n, iterations=cfg.fit_iterations,
                                           seed=cfg.seed + h, device=dev)
        else:
            out[h], _ = fit_gaussians_frc(out[h], vol, apix, r, iterations=cfg.fit_iterations,
                                          seed=cfg.seed + h + 10 * it)
    return out


def _align_all(ctx: _Ctx, refs, band: BandFrc, R, S, label):
    """Refine every particle's pose against its half's mixture; returns new ``R, S, frc``."""
    from cryogmm.ctf import CtfParams, ctf_rfft2

    from cryogmm import distributed

    cfg, dev = ctx.cfg, ctx.dev
    R_new, S_new = R.clone(), S.clone()
    frc = torch.zeros(ctx.table.n)
    mine = distributed.shard(ctx.table.n) if distributed.world() > 1 else None
    total = ctx.table.n if mine is None else len(mine)
    done = 0
    for idx, imgs in ctx.source.chunks(cfg.batch, indices=mine, prefetch=cfg.prefetch):
        idx = np.asarray(idx)
        x = band.crop_ft(torch.as_tensor(imgs, device=dev))
        c = band.band(ctf_rfft2(CtfParams.from_table(ctx.table, idx), band.crop, band.apix_crop, device=dev))
        for h in (0, 1):
            sel = np.nonzero(ctx.sets[idx] == h)[0]
            if len(sel) == 0:
                continue
            A, sh, score = refine_batch(refs[h], band, x[sel], c[sel], R[idx[sel]].to(dev), S[idx[sel]].to(dev),
                                        steps=cfg.steps, lr_rad=math.radians(cfg.lr_deg), lr_A=cfg.lr_A,
                                        precision=cfg.matmul_precision)
            R_new[idx[sel]], S_new[idx[sel]] = A.cpu(), sh.cpu()
            frc[idx[sel]] = score.cpu()
        done += len(idx)
        ctx.progress(label, done, total)
    if mine is not None:  # every rank gets every particle's new pose
        R_new, S_new, frc = (distributed.gather_rows(t, mine) for t in (R_new, S_new, frc))
    return R_new, S_new, frc


def _iterate(ctx: _Ctx, R, S, halves, gmms, res, mask, iterations, label):
    """The refinement loop (fit mixtures, align, reconstruct, FSC) with an optional focus
    mask; the band's upper bound and the stopping rule follow the FSC inside
    ``mask * sphere``. Returns a dict with the new poses, maps, mixtures and history."""
    from cryogmm.metrics import fsc, resolution_at

    box, apix = ctx.box, ctx.apix
    fmask = ctx.sphere if mask is None else ctx.sphere * mask.cpu()
    history, curves = [], {}
    frc = torch.zeros(ctx.table.n)
    h1 = h2 = final = None
    for it in range(1, iterations + 1):
        t_it = Timer()
        hi_shell = min(box // 2 - 1, max(ctx.lo_shell + 2, int(math.floor(box * apix / res))))
        band = BandFrc(box, apix, ctx.lo_shell, hi_shell, device=ctx.dev)
        gmms = _fit_mixtures(ctx, gmms, halves, res, it)
        refs = [focus_widths(g, mask, apix) if mask is not None else g for g in gmms]
        R_new, S_new, frc = _align_all(ctx, refs, band, R, S, f"{label} iteration {it}")
        t_align = t_it()
        dang = rotmat_angle_deg(R_new, R).numpy()
        dsh = torch.linalg.norm(S_new - S, dim=1).numpy()
        R, S = R_new, S_new
        h1, h2, final, _ = _reconstruct(ctx, R, S)
        curve = fsc(h1, h2, mask=fmask)
        new_res = resolution_at(curve, box, apix)
        curves[f"{label} {it}"] = curve.numpy()
        history.append({
            "iteration": it,
            "band_A": [box * apix / ctx.lo_shell, box * apix / hi_shell],
            "crop_box": band.crop,
            "n_gaussians": [gmms[0].n, gmms[1].n],
            "resolution_A": new_res,
            "resolution_0.5_A": resolution_at(curve, box, apix, 0.5),
            "pose_change_deg": {"median": float(np.median(dang)), "p90": float(np.percentile(dang, 90))},
            "shift_change_A": {"median": float(np.median(dsh)), "p90": float(np.percentile(dsh, 90))},
            "mean_band_frc": float(frc.mean()),
            "seconds_align": t_align,
            "seconds": t_it(),
            "particles_per_s": ctx.table.n / t_align,
        })
        halves = [h1, h2]
        improved = new_res < res * 0.995
        res = min(res, new_res)
        if not improved and it > 1:
            break
    return {"R": R, "S": S, "halves": halves, "final": final, "gmms": gmms, "res": res,
            "history": history, "curves": curves, "frc": frc}


def patch_masks(g, k: int, box: int, apix: float, *, edge_px: float = 4.0, seed: int = 0):
    """Split a mixture into ``k`` patches by amplitude-weighted k-means of its centres and
    make a soft spherical mask per patch (centre: the patch's amplitude-weighted centroid;
    radius: 1.25 times the weighted RMS distance of its Gaussians plus two widths, so weak
    Gaussians fitted to noise far out do not inflate it). Returns
    ``(masks [k, N, N, N], info)`` with ``info`` a list of dicts (centre_A, radius_A, n)."""
    from cryogmm.fitmap import weighted_kmeans

    if not 1 <= k <= g.n:
        raise OptionError("--patches", f"{k}; expected 1..{g.n} (the number of Gaussians)")
    gen = torch.Generator().manual_seed(seed)
    c = g.centers.detach().cpu().double()
    w = g.amplitudes.detach().cpu().double().abs().clamp_min(1e-12)
    centres, labels = weighted_kmeans(c, w, k, iterations=50, generator=gen)
    ax = (torch.arange(box, dtype=torch.float64) - box // 2) * apix
    Z, Y, X = torch.meshgrid(ax, ax, ax, indexing="ij")
    masks, info = [], []
    sig = float(g.sigmas.detach().cpu().median())
    for j in range(k):
        sel = labels == j
        cj = (c[sel] * w[sel, None]).sum(0) / w[sel].sum()
        d2 = ((c[sel] - cj) ** 2).sum(1)
        radius = 1.25 * float(torch.sqrt((d2 * w[sel]).sum() / w[sel].sum())) + 2 * sig
        r = torch.sqrt((X - cj[0]) ** 2 + (Y - cj[1]) ** 2 + (Z - cj[2]) ** 2) / apix
        edge = edge_px
        m = torch.clamp((radius / apix + edge - r) / edge, 0, 1)
        m = 0.5 - 0.5 * torch.cos(math.pi * m)
        masks.append(m.float())
        info.append({"patch": j + 1, "centre_A": cj.tolist(), "radius_A": radius, "n_gaussians": int(sel.sum())})
    return torch.stack(masks), info


def composite(maps, masks, background):
    """Mask-weighted average of per-patch maps: ``(sum_k M_k V_k + w0 V0) / (sum_k M_k + w0)``
    with ``w0 = max(0, 1 - sum_k M_k)`` giving ``background`` where no patch reaches."""
    msum = masks.sum(0)
    w0 = (1.0 - msum).clamp_min(0)
    num = sum(m * v for m, v in zip(masks, maps)) + w0 * background
    return num / (msum + w0).clamp_min(1e-6)


def refine_poses(cfg: RefineConfig, progress=None) -> dict:
    """Run the refinement; write ``refined.star``, ``half1.mrc``, ``half2.mrc``, ``map.mrc``,
    ``fsc.png`` (every iteration), ``report.json`` (and with patches ``composite*.mrc`` and
    ``patches/``) into ``cfg.out``. Returns the report."""
    from cryogmm import distributed, mapio
    from cryogmm.bridge.conventions import rotmat_to_euler_zyz_deg
    from cryogmm.bridge.fileio import OutputDir
    from cryogmm.bridge.images import ImageSource
    from cryogmm.bridge.io import read_particles, write_particles
    from cryogmm.gmm import read_model
    from cryogmm.jobs import pick_device, set_matmul_precision, write_report
    from cryogmm.metrics import fsc, fsc_plot, lowpass, resolution_at, soft_sphere_mask
    from cryogmm.symmetry import expand_table, symmetrize_map, symmetry_operators

    timer = Timer()
    progress = progress or (lambda *a: None)
    for name, v, lo in (("--iterations", cfg.iterations, 1), ("--steps", cfg.steps, 1), ("--batch", cfg.batch, 1),
                        ("--patch-iterations", cfg.patch_iterations, 1), ("--patches", cfg.patches, 0)):
        if v < lo:
            raise OptionError(name, f"{v}; expected at least {lo}")
    if sum(x is not None for x in (cfg.half_maps, cfg.model, cfg.map)) > 1:
        raise OptionError("--half-maps/--map/--model", "give one of half maps, a consensus map or a model to start from")
    if cfg.map is not None and not cfg.start_res_A:
        raise OptionError("--start-res-A", "a consensus --map needs the resolution it is trusted to (it is low-passed "
                          "there, so the two halves share nothing beyond it)")
    if cfg.hetero is not None and cfg.mask is None:
        raise OptionError("--hetero", "conformation to orientation needs --mask, the region to bring into register")
    if cfg.patches and cfg.mask:
        raise OptionError("--patches/--mask", "patches make their own masks; give one or the other")
    if cfg.prefetch < 0:
        raise OptionError("--prefetch", f"{cfg.prefetch}; expected 0 (off) or a number of batches")
    ops = symmetry_operators(cfg.sym)
    dev = pick_device(cfg.device)
    set_matmul_precision(dev, cfg.matmul_precision)
    dev = distributed.setup(dev)
    torch.manual_seed(cfg.seed)
    rng = np.random.default_rng(cfg.seed)

    table = read_particles(cfg.star, project_dir=cfg.project_dir)
    table.require(poses=True, ctf=True, why="pose refinement")
    table = table.with_half_sets(seed=cfg.seed)
    box_u, apix_u = np.unique(table.box), np.unique(np.round(table.apix, 6))
    if len(box_u) != 1 or len(apix_u) != 1:
        raise OptionError("STAR", f"particles of several boxes {box_u.tolist()} or pixel sizes {apix_u.tolist()}")
    box, apix = int(box_u[0]), float(apix_u[0])
    mask = _read_mask(cfg.mask, box, apix, dev) if cfg.mask else None
    halves = _read_half_maps(cfg.half_maps, box, apix) if cfg.half_maps else None
    consensus = _read_half_maps([cfg.map], box, apix)[0] if cfg.map else None
    model = read_model(cfg.model) if cfg.model is not None else None
    n_input = table.n
    # focused or patch work on a symmetric particle: expand, so every copy of the region is aligned
    expanded = len(ops) > 1 and (mask is not None or cfg.patches > 0)
    if expanded:
        table = expand_table(table, ops)
    recon_ops = ops[:1] if expanded else ops
    source = ImageSource.from_table(table)
    sphere = soft_sphere_mask(box, box // 2 - 6, edge_px=3)
    ctx = _Ctx(cfg=cfg, table=table, source=source, box=box, apix=apix, dev=dev, sets=table.half_set - 1,
               lo_shell=max(1, int(round(box * apix / cfg.low_res_A))), sphere=sphere, recon_ops=recon_ops,
               model=model, rng=rng, progress=progress)

    R = torch.as_tensor(table.rotmat, dtype=torch.float32)
    S = torch.as_tensor(table.shift_A, dtype=torch.float32)
    R_in, S_in = R.clone(), S.clone()
    hetero_figures = None
    if cfg.hetero is not None:
        if expanded:
            raise OptionError("--hetero/--sym", "conformation to orientation runs on unexpanded particles (C1)")
        R, S, hetero_figures = _hetero_poses(cfg, table, mask, R, S, apix, dev, progress)
    # ---- starting half maps: given, a low-passed consensus map, or reconstructed from the input poses
    if consensus is not None:
        lp = lowpass(consensus, cfg.start_res_A, apix)
        halves = [lp, lp.clone()]
    elif halves is None or cfg.hetero is not None:  # new poses: their own starting maps
        h1, h2, _, _ = _reconstruct(ctx, R, S, wiener=False)
        halves = [h1, h2]
    fmask = sphere if mask is None else sphere * mask.cpu()
    start_curve = fsc(halves[0], halves[1], mask=fmask)
    res = resolution_at(start_curve, box, apix)
    if cfg.start_res_A:
        res = max(float(cfg.start_res_A), 2 * apix)
    start_res = resolution_at(start_curve, box, apix) if consensus is None else None

    run = _iterate(ctx, R, S, halves, [None, None], res, mask, cfg.iterations, "focused" if mask is not None else "global")
    curves = dict(run["curves"])
    R, S, frc_final = run["R"], run["S"], run["frc"]
    h1, h2 = run["halves"]
    final = run["final"]

    patch_runs, patch_info, comp = [], [], None
    if cfg.patches:
        masks, patch_info = patch_masks(run["gmms"][0], cfg.patches, box, apix, seed=cfg.seed)
        for j in range(cfg.patches):
            mj = masks[j]
            curve0 = fsc(h1, h2, mask=sphere * mj)
            res0 = resolution_at(curve0, box, apix)
            pr = _iterate(ctx, R, S, [h1, h2], run["gmms"], res0, mj.to(dev), cfg.patch_iterations, f"patch {j + 1}")
            curve1 = fsc(pr["halves"][0], pr["halves"][1], mask=sphere * mj)
            patch_info[j].update({"masked_resolution_before_A": res0,
                                  "masked_resolution_A": resolution_at(curve1, box, apix),
                                  "iterations": pr["history"]})
            curves[f"patch {j + 1} (masked)"] = curve1.numpy()
            patch_runs.append(pr)
        comp = [composite([pr["halves"][i] for pr in patch_runs], masks, (h1, h2)[i]) for i in (0, 1)]
        comp.append(composite([pr["final"] for pr in patch_runs], masks, final))
        if len(ops) > 1:
            msum = masks.sum(0).clamp(0, 1)
            comp = [symmetrize_map(v, ops, weight=msum) for v in comp]
        comp_curve = fsc(comp[0], comp[1], mask=sphere)
        curves["composite"] = comp_curve.numpy()
    elif expanded:  # focused on a symmetric particle: put the sharp region back on its mates
        final = symmetrize_map(final, ops, weight=mask.cpu())

    if not distributed.is_main():  # rank 0 writes; the others return the figures they share
        distributed.barrier()
        return {"job": "refine-poses", "rank": distributed.rank(), "processes": distributed.world(),
                "n_particles": int(n_input), "iterations": run["history"],
                "resolution_A": run["history"][-1]["resolution_A"], "device": str(dev), "seconds": timer()}
    with OutputDir(cfg.out) as od:
        eul_in = rotmat_to_euler_zyz_deg(R_in.double().numpy())
        extra = {
            "rlnCryogmmOrigAngleRot": eul_in[:, 0], "rlnCryogmmOrigAngleTilt": eul_in[:, 1],
            "rlnCryogmmOrigAnglePsi": eul_in[:, 2],
            "rlnCryogmmOrigOriginXAngst": S_in[:, 0].double().numpy(),
            "rlnCryogmmOrigOriginYAngst": S_in[:, 1].double().numpy(),
            "rlnCryogmmFrc": frc_final.double().numpy(),
        }
        table = table.relocated(cfg.out)  # image paths that still resolve from the output folder
        out_table = table.with_poses(rotmat=R.double().numpy(), shift_A=S.double().numpy()).with_columns(**extra)
        write_particles(out_table, od.path("refined.star"))
        if str(cfg.star).endswith(".cs") and not expanded:
            write_particles(out_table, od.path("refined.cs"))
        mapio.write_map(od.path("half1.mrc"), h1.numpy(), apix)
        mapio.write_map(od.path("half2.mrc"), h2.numpy(), apix)
        mapio.write_map(od.path("map.mrc"), final.numpy(), apix)
        if comp is not None:
            mapio.write_map(od.path("composite_half1.mrc"), comp[0].numpy(), apix)
            mapio.write_map(od.path("composite_half2.mrc"), comp[1].numpy(), apix)
            mapio.write_map(od.path("composite.mrc"), comp[2].numpy(), apix)
            for j, pr in enumerate(patch_runs):
                d = Path("patches") / f"patch_{j + 1:02d}"
                pt = table.with_poses(rotmat=pr["R"].double().numpy(), shift_A=pr["S"].double().numpy())
                write_particles(pt.with_columns(**{**extra, "rlnCryogmmFrc": pr["frc"].double().numpy()}),
                                od.path(str(d / "refined.star")))
                mapio.write_map(od.path(str(d / "mask.mrc")), masks[j].numpy(), apix)
                mapio.write_map(od.path(str(d / "half1.mrc")), pr["halves"][0].numpy(), apix)
                mapio.write_map(od.path(str(d / "half2.mrc")), pr["halves"][1].numpy(), apix)
                mapio.write_map(od.path(str(d / "map.mrc")), pr["final"].numpy(), apix)
        fsc_plot(curves, box, apix, od.path("fsc.png"))
        n_align = table.n * (len(run["history"]) + sum(len(pr["history"]) for pr in patch_runs))
        t_align = sum(h["seconds_align"] for h in run["history"]) + sum(
            h["seconds_align"] for pr in patch_runs for h in pr["history"])
        report = {
            "job": "refine-poses",
            "star": str(cfg.star),
            "n_particles": int(n_input),
            "n_aligned": int(table.n),
            "symmetry": cfg.sym.upper(),
            "symmetry_expanded": bool(expanded),
            "box": box,
            "apix_A": apix,
            "references": ("half maps" if cfg.half_maps else "model" if cfg.model else
                           "consensus map" if cfg.map else "reconstructed from input poses"),
            "focused": bool(cfg.mask),
            "conformation_to_orientation": hetero_figures,
            "start_resolution_A": start_res,
            "iterations": run["history"],
            "resolution_A": run["history"][-1]["resolution_A"],
            "resolution_masked_by": "focus mask" if mask is not None else "sphere",
            "patches": patch_info,
            "composite_resolution_A": resolution_at(comp_curve, box, apix) if comp is not None else None,
            "particles_per_s": n_align / max(t_align, 1e-9),
            # the final half maps' FSC, shaped as `reconstruct` reports it
            "fsc": {"resolution_A": (box * apix / np.maximum(np.arange(box // 2 + 1), 1e-9)).tolist(),
                    "unmasked": fsc(h1, h2).numpy(), "masked": fsc(h1, h2, mask=sphere).numpy(),
                    **({"focus_masked": fsc(h1, h2, mask=sphere * mask.cpu()).numpy()} if mask is not None else {})},
            "device": str(dev),
            "matmul_precision": cfg.matmul_precision,
            **({"processes": distributed.world()} if distributed.world() > 1 else {}),
            "seconds": timer(),
        }
        write_report(od.path("report.json"), report)
    distributed.barrier()
    return report
