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

Steps 2 and 3 are one pass over the stack (:func:`_sweep`): each image is read, Fourier-
transformed and its CTF made once per iteration; its pose is refined, and the same transform
and CTF are inserted with the new pose into its half's reconstruction. The poses, CTF
parameters and half sets live on the job's device for the whole job (the particle table is
read at the start and written at the end); a batch holds particles of both halves (each
projected from its own half's mixture), off the CPU at a fixed size, and the optimiser's step
loop reads nothing back to the host.

Checkpoints: after every iteration ``checkpoint.pt`` (poses, maps, mixtures, history) is
written into the output folder (a temporary name, then renamed); ``resume`` continues from the
last complete iteration, and gives the uninterrupted run's outputs (tested after ``kill -9``).

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

from cryogmm import distributed
from cryogmm.bridge.conventions import rotmat_to_euler_zyz_deg
from cryogmm.bridge.images import ImageSource
from cryogmm.bridge.io import read_particles, write_particles
from cryogmm.core import projection
from cryogmm.core.ctf import CtfParams, ctf_rfft2
from cryogmm.core.fourier import lowpass
from cryogmm.core.masks import soft_sphere_mask
from cryogmm.core.rotations import rotmat_angle_deg
from cryogmm.core.similarity import fsc, resolution_at
from cryogmm.core.symmetry import symmetrize_map, symmetry_operators
from cryogmm.errors import MapError, OptionError
from cryogmm.gmmfit.fit import auto_n, auto_threshold, fit_gaussians_frc, gaussians_from_map
from cryogmm.io import maps as mapio
from cryogmm.io.maps import map_origin_A, read_map
from cryogmm.io.outputs import OutputDir, write_report
from cryogmm.io.plots import fsc_plot
from cryogmm.io.structures import gaussians_from_coords, read_model
from cryogmm.poses.align import BandFrc, cpu_workers, focus_widths, refine_parts, stack_mixtures
from cryogmm.poses.checkpoint import after_iteration, load_checkpoint, resume_fingerprint
from cryogmm.poses.conformation import hetero_poses
from cryogmm.poses.expand import expand_table
from cryogmm.poses.patches import composite, patch_masks
from cryogmm.recon.job import maps_from_accumulator, new_accumulator
from cryogmm.runtime import Timer, pick_device, pin_images, set_matmul_precision


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
    compile: bool = False
    prefetch: int = 1
    accumulate: str = "auto"
    resume: bool = False
    keep_iterations: bool = False


def _read_half_maps(paths, box, apix):
    maps = []
    for p in paths:
        m, a = read_map(p, expect_apix=apix)
        if m.shape[0] != box:
            raise MapError(p, f"box {m.shape[0]} differs from the particles' box {box}")
        maps.append(torch.as_tensor(m))
    return maps


def _read_mask(path, box, apix, device):
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
    ctf: CtfParams | None = None  # every particle's CTF parameters, on ``dev``
    sets_t: torch.Tensor | None = None  # half set (0/1) of every particle, on ``dev``
    ops_t: torch.Tensor | None = None  # ``recon_ops`` on ``dev``

    def __post_init__(self):
        c = CtfParams.from_table(self.table, np.arange(self.table.n))  # a copy: the table may be read-only
        self.ctf = CtfParams(**{f: getattr(c, f).to(self.dev) for f in CtfParams.FIELDS})
        self.sets_t = torch.as_tensor(np.asarray(self.sets), dtype=torch.long, device=self.dev)
        self.ops_t = torch.as_tensor(np.asarray(self.recon_ops), dtype=torch.float32, device=self.dev)


#: pad the last batch to the batch size on the CPU too (off by default: there it is only extra
#: work; tests turn it on to run the padded path that GPUs take)
PAD_ON_CPU = False


def _upload(imgs, dev):
    """A batch of images on ``dev``: on CUDA a non-blocking copy from the pinned tensor the
    prefetch thread made (:func:`cryogmm.runtime.pin_images`; the copy overlaps the work queued
    before it), on the CPU a plain tensor view of the numpy array."""
    if isinstance(imgs, torch.Tensor):
        return imgs.to(dev, non_blocking=True)
    return torch.from_numpy(np.ascontiguousarray(imgs, dtype=np.float32)).to(dev)


def _sweep(ctx: _Ctx, R, S, align=None, wiener=True, label="reconstruct"):
    """One pass over the particles: each image is read, Fourier-transformed and its CTF made
    once; with ``align = (refs, band)`` its pose is refined against its half set's mixture
    (``refs``: one per half) and the image inserted with the new pose into that half's
    reconstruction in the same pass (with symmetry, not expanded, once per operator).

    ``R [n, 3, 3]``, ``S [n, 2]``: poses on the job's device, the particle table is not
    touched. Batches are ``cfg.batch`` particles; off the CPU the last one is padded to that
    size (fixed shapes; the padding is dropped before anything is kept). Returns
    ``(R, S, frc, (half1, half2, final, fsc))`` with the poses and band FRC on the device."""
    cfg, dev, box, apix = ctx.cfg, ctx.dev, ctx.box, ctx.apix
    acc = new_accumulator(box, apix, cfg.accumulate, dev)
    n = ctx.table.n
    R_new, S_new = R.clone(), S.clone()
    frc = torch.zeros(n, device=dev)
    if align is not None:
        refs, band = align
        mix = stack_mixtures(refs)
    mine = distributed.shard(n) if distributed.world() > 1 else None
    total = n if mine is None else len(mine)
    pad_to = cfg.batch if (dev.type != "cpu" or PAD_ON_CPU) else 0
    done = 0
    with cpu_workers(dev if align is not None else None) as pool:
        for idx, imgs in ctx.source.chunks(cfg.batch, indices=mine, prefetch=cfg.prefetch, transform=pin_images(dev)):
            b = len(idx)
            it = torch.as_tensor(np.asarray(idx), dtype=torch.long).to(dev, non_blocking=True)
            f = torch.fft.rfft2(torch.fft.ifftshift(_upload(imgs, dev), dim=(-2, -1)))
            ctf_p = CtfParams(**{k: getattr(ctx.ctf, k)[it] for k in CtfParams.FIELDS})
            c = ctf_rfft2(ctf_p, box, apix, device=dev)
            sets = ctx.sets_t[it]
            A, sh = R[it], S[it]
            if align is not None:
                ia = torch.cat([it, it[-1:].expand(pad_to - b)]) if pad_to > b else it
                fa = f if ia is it else torch.cat([f, f[-1:].expand(pad_to - b, -1, -1)])
                ca = c if ia is it else torch.cat([c, c[-1:].expand(pad_to - b, -1, -1)])
                A, sh, score = refine_parts(pool, mix, ctx.sets_t[ia], band, band.band(band.crop_rfft(fa)),
                                            band.band(band.crop_rfft(ca)), R[ia], S[ia], steps=cfg.steps,
                                            lr_rad=math.radians(cfg.lr_deg), lr_A=cfg.lr_A,
                                            precision=cfg.matmul_precision)
                A, sh, score = A[:b], sh[:b], score[:b]
                R_new[it], S_new[it], frc[it] = A, sh, score
            for op in ctx.ops_t:
                acc.insert_ft(f, A @ op, sh, c, sets)
            done += b
            ctx.progress(label, done, total)
    if mine is not None:  # every rank gets every particle's new pose
        R_new, S_new, frc = (distributed.gather_rows(t, mine) for t in (R_new, S_new, frc))
    return R_new, S_new, frc, maps_from_accumulator(acc, wiener=wiener)


def _reconstruct(ctx: _Ctx, R, S, wiener=True):
    """Half maps, final map and unmasked FSC from poses ``R``/``S`` (a pass without alignment)."""
    return _sweep(ctx, R, S, wiener=wiener)[3]


def _fit_mixtures(ctx: _Ctx, gmms, halves, res, it):
    """The two halves' mixtures, fitted on rank 0 and broadcast to the other ranks."""

    out = _fit_mixtures_here(ctx, gmms, halves, res, it) if distributed.is_main() else None
    if distributed.world() > 1:
        out = distributed.broadcast_object(None if out is None else [g.to("cpu") for g in out])
        out = [g.to(ctx.dev) for g in out]
    return out


def _fit_mixtures_here(ctx: _Ctx, gmms, halves, res, it):
    """The two halves' fits, each on its own worker thread on the CPU (they are independent and
    seeded apart; the model's randomisation is drawn here, in half order, before either starts)."""
    fits = [_fit_one(ctx, gmms[h], halves[h], res, it, h) for h in (0, 1)]
    with cpu_workers(ctx.dev, jobs=len(fits)) as pool:
        return [f() for f in fits] if pool is None else pool.map(lambda f: f(), fits)


def _fit_one(ctx: _Ctx, g, half, res, it, h):
    """The fit of half ``h``'s mixture, as a function to call (everything random drawn now)."""
    cfg, apix, box, dev = ctx.cfg, ctx.apix, ctx.box, ctx.dev
    vol = half.to(dev)
    r = max(res, 2 * apix)
    if g is None and ctx.model is not None:
        model = ctx.model
        origin = map_origin_A(cfg.half_maps[h]) if cfg.half_maps else None
        center = (origin + (box // 2) * apix) if origin is not None else model.center_of_mass()
        g0 = gaussians_from_coords(model, model.coords[0], "atoms", resolution_A=res, center_A=center)
        # gold-standard: each half starts from the model randomised at the resolution
        g0.centers += torch.as_tensor(ctx.rng.normal(0, res / 4, g0.centers.shape), dtype=torch.float32)
        return lambda: fit_gaussians_frc(g0.to(dev), vol, apix, res, iterations=cfg.fit_iterations,
                                         seed=cfg.seed + h)[0]
    if g is None:
        def seeded():
            # seed on the half map low-passed to its resolution: noise must not be seeded
            smooth = lowpass(vol, r, apix)
            n = cfg.n_gaussians
            if n is None:
                thr, _ = auto_threshold(smooth)
                vol_A3 = float((smooth > thr).sum()) * apix**3
                n = min(auto_n(vol_A3, r), cfg.max_gaussians)
            return gaussians_from_map(smooth, apix, resolution_A=r, n=n, iterations=cfg.fit_iterations,
                                      seed=cfg.seed + h, device=dev)[0]
        return seeded
    return lambda: fit_gaussians_frc(g, vol, apix, r, iterations=cfg.fit_iterations, seed=cfg.seed + h + 10 * it)[0]


def _iterate(ctx: _Ctx, R, S, halves, gmms, res, mask, iterations, label, checkpoint=None, state=None):
    """The refinement loop (fit mixtures, then one pass that aligns and reconstructs, FSC) with an
    optional focus mask; the band's upper bound and the stopping rule follow the FSC inside
    ``mask * sphere``. Returns a dict with the new poses, maps, mixtures and history.

    ``checkpoint(run, done)``: called with the loop's state after every complete iteration (and
    with ``done`` once it has ended); ``state``: such a state to continue from."""

    box, apix = ctx.box, ctx.apix
    fmask = ctx.sphere if mask is None else ctx.sphere * mask.cpu()
    history, curves = [], {}
    frc = torch.zeros(ctx.table.n, device=ctx.dev)
    h1 = h2 = final = None
    first = 1
    if state is not None:
        R, S, halves, gmms, res = state["R"], state["S"], state["halves"], state["gmms"], state["res"]
        history, curves, frc, final = state["history"], state["curves"], state["frc"], state["final"]
        first = len(history) + 1
        if state["done"]:
            first = iterations + 1
    run = None
    for it in range(first, iterations + 1):
        t_it = Timer()
        hi_shell = min(box // 2 - 1, max(ctx.lo_shell + 2, int(math.floor(box * apix / res))))
        band = BandFrc(box, apix, ctx.lo_shell, hi_shell, device=ctx.dev)
        gmms = _fit_mixtures(ctx, gmms, halves, res, it)
        t_fit = t_it()
        refs = [focus_widths(g, mask, apix) if mask is not None else g for g in gmms]
        R_new, S_new, frc, (h1, h2, final, _) = _sweep(ctx, R, S, (refs, band), label=f"{label} iteration {it}")
        t_align = t_it() - t_fit
        dang = rotmat_angle_deg(R_new, R).cpu().numpy()
        dsh = torch.linalg.norm(S_new - S, dim=1).cpu().numpy()
        R, S = R_new, S_new
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
            "seconds_fit": t_fit,  # the two half maps' mixture fits
            "seconds_align": t_align,  # the pass that aligns and reconstructs (without the fits)
            "seconds": t_it(),
            "particles_per_s": ctx.table.n / t_align,
        })
        halves = [h1, h2]
        improved = new_res < res * 0.995
        res = min(res, new_res)
        run = {"R": R, "S": S, "halves": halves, "final": final, "gmms": gmms, "res": res,
               "history": history, "curves": curves, "frc": frc}
        if distributed.agree(not improved and it > 1):  # rank 0 decides: every rank stops together
            break
        if checkpoint is not None and it < iterations:
            checkpoint(run, False)
    if run is None:  # resumed after the loop had ended
        run = {"R": R, "S": S, "halves": halves, "final": final, "gmms": gmms, "res": res,
               "history": history, "curves": curves, "frc": frc}
    if checkpoint is not None:
        checkpoint(run, True)
    return run


def _check_options(cfg: RefineConfig):
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


@dataclass
class _Inputs:
    ctx: _Ctx
    n_input: int  # particles before symmetry expansion
    mask: torch.Tensor | None
    halves: list | None
    consensus: torch.Tensor | None
    expanded: bool  # symmetry-expanded for focused or patch work


def _read_inputs(cfg: RefineConfig, ops, dev, rng, progress) -> _Inputs:
    """Particles (with half sets, expanded by the symmetry for focused or patch work), mask,
    starting maps or model, and the refinement context over them."""
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
    sphere = soft_sphere_mask(box, box // 2 - 6, edge_px=3)
    ctx = _Ctx(cfg=cfg, table=table, source=ImageSource.from_table(table), box=box, apix=apix, dev=dev,
               sets=table.half_set - 1, lo_shell=max(1, int(round(box * apix / cfg.low_res_A))), sphere=sphere,
               recon_ops=ops[:1] if expanded else ops, model=model, rng=rng, progress=progress)
    return _Inputs(ctx=ctx, n_input=n_input, mask=mask, halves=halves, consensus=consensus, expanded=expanded)


def _start_maps(inp: _Inputs, R, S):
    """Starting half maps (given, a low-passed consensus map, or reconstructed from the poses),
    the resolution the alignment starts at, and the starting FSC resolution to report."""
    ctx, cfg = inp.ctx, inp.ctx.cfg
    box, apix, halves = ctx.box, ctx.apix, inp.halves
    if inp.consensus is not None:
        lp = lowpass(inp.consensus, cfg.start_res_A, apix)
        halves = [lp, lp.clone()]
    elif halves is None or cfg.hetero is not None:  # new poses: their own starting maps
        h1, h2, _, _ = _reconstruct(ctx, R, S, wiener=False)
        halves = [h1, h2]
    fmask = ctx.sphere if inp.mask is None else ctx.sphere * inp.mask.cpu()
    start_curve = fsc(halves[0], halves[1], mask=fmask)
    res = resolution_at(start_curve, box, apix)
    if cfg.start_res_A:
        res = max(float(cfg.start_res_A), 2 * apix)
    start_res = resolution_at(start_curve, box, apix) if inp.consensus is None else None
    return halves, res, start_res


def _refine_patches(inp: _Inputs, run: dict, ops, curves: dict) -> dict:
    """Patch by patch: k-means patches of the mixture as masks, each refined from the global
    result, then the composite maps (symmetrised by the patches' masks)."""
    ctx, cfg = inp.ctx, inp.ctx.cfg
    box, apix, sphere = ctx.box, ctx.apix, ctx.sphere
    h1, h2 = run["halves"]
    masks, patch_info = patch_masks(run["gmms"][0], cfg.patches, box, apix, seed=cfg.seed)
    patch_runs = []
    for j in range(cfg.patches):
        mj = masks[j]
        curve0 = fsc(h1, h2, mask=sphere * mj)
        res0 = resolution_at(curve0, box, apix)
        pr = _iterate(ctx, run["R"], run["S"], [h1, h2], run["gmms"], res0, mj.to(ctx.dev), cfg.patch_iterations,
                      f"patch {j + 1}")
        curve1 = fsc(pr["halves"][0], pr["halves"][1], mask=sphere * mj)
        patch_info[j].update({"masked_resolution_before_A": res0,
                              "masked_resolution_A": resolution_at(curve1, box, apix),
                              "iterations": pr["history"]})
        curves[f"patch {j + 1} (masked)"] = curve1.numpy()
        patch_runs.append(pr)
    comp = [composite([pr["halves"][i] for pr in patch_runs], masks, (h1, h2)[i]) for i in (0, 1)]
    comp.append(composite([pr["final"] for pr in patch_runs], masks, run["final"]))
    if len(ops) > 1:
        msum = masks.sum(0).clamp(0, 1)
        comp = [symmetrize_map(v, ops, weight=msum) for v in comp]
    comp_curve = fsc(comp[0], comp[1], mask=sphere)
    curves["composite"] = comp_curve.numpy()
    return {"runs": patch_runs, "info": patch_info, "masks": masks, "maps": comp, "curve": comp_curve}


def _write_maps_and_patches(od, inp: _Inputs, table, extra: dict, h1, h2, final, patches: dict | None):
    apix = inp.ctx.apix
    mapio.write_map(od.path("half1.mrc"), h1.numpy(), apix)
    mapio.write_map(od.path("half2.mrc"), h2.numpy(), apix)
    mapio.write_map(od.path("map.mrc"), final.numpy(), apix)
    if patches is None:
        return
    comp = patches["maps"]
    mapio.write_map(od.path("composite_half1.mrc"), comp[0].numpy(), apix)
    mapio.write_map(od.path("composite_half2.mrc"), comp[1].numpy(), apix)
    mapio.write_map(od.path("composite.mrc"), comp[2].numpy(), apix)
    for j, pr in enumerate(patches["runs"]):
        d = Path("patches") / f"patch_{j + 1:02d}"
        pt = table.with_poses(rotmat=pr["R"].cpu().double().numpy(), shift_A=pr["S"].cpu().double().numpy())
        write_particles(pt.with_columns(**{**extra, "rlnCryogmmFrc": pr["frc"].cpu().double().numpy()}),
                        od.path(str(d / "refined.star")))
        mapio.write_map(od.path(str(d / "mask.mrc")), patches["masks"][j].numpy(), apix)
        mapio.write_map(od.path(str(d / "half1.mrc")), pr["halves"][0].numpy(), apix)
        mapio.write_map(od.path(str(d / "half2.mrc")), pr["halves"][1].numpy(), apix)
        mapio.write_map(od.path(str(d / "map.mrc")), pr["final"].numpy(), apix)


def refine_poses(cfg: RefineConfig, progress=None) -> dict:
    """Run the refinement; write ``refined.star``, ``half1.mrc``, ``half2.mrc``, ``map.mrc``,
    ``fsc.png`` (every iteration), ``report.json`` (and with patches ``composite*.mrc`` and
    ``patches/``) into ``cfg.out``. Returns the report. ``cfg.compile`` holds for this job only."""
    with projection.use_compile(cfg.compile or projection.compile_enabled()):
        return _refine_poses(cfg, progress)


def _refine_poses(cfg: RefineConfig, progress) -> dict:
    timer = Timer()
    progress = progress or (lambda *a: None)
    _check_options(cfg)
    ops = symmetry_operators(cfg.sym)
    dev = pick_device(cfg.device)
    set_matmul_precision(dev, cfg.matmul_precision)
    dev = distributed.setup(dev)
    torch.manual_seed(cfg.seed)
    rng = np.random.default_rng(cfg.seed)
    inp = _read_inputs(cfg, ops, dev, rng, progress)
    seconds_read = timer()
    ctx, mask, expanded = inp.ctx, inp.mask, inp.expanded
    table, box, apix, sphere = ctx.table, ctx.box, ctx.apix, ctx.sphere

    R = torch.as_tensor(table.rotmat, dtype=torch.float32)
    S = torch.as_tensor(table.shift_A, dtype=torch.float32)
    R_in, S_in = R.clone(), S.clone()
    fp = resume_fingerprint(cfg)
    state = load_checkpoint(cfg, fp, dev) if cfg.resume else None
    if state is not None:  # the starting maps and figures of the interrupted run
        hetero_figures, start_res = state["extra"]["hetero"], state["extra"]["start_resolution_A"]
        seconds_start = None  # made by the interrupted run
        halves, res = state["halves"], state["res"]
    else:
        hetero_figures, seconds_start = None, None
        if cfg.hetero is not None:
            if expanded:
                raise OptionError("--hetero/--sym", "conformation to orientation runs on unexpanded particles (C1)")
            R, S, hetero_figures = hetero_poses(cfg, table, mask, R, S, apix, dev, progress)
        R, S = R.to(dev), S.to(dev)  # the poses stay on the device for the whole job
        t_start = Timer()
        halves, res, start_res = _start_maps(inp, R, S)
        seconds_start = t_start()
    ck_extra = {"hetero": hetero_figures, "start_resolution_A": start_res}
    run = _iterate(ctx, R, S, halves, [None, None], res, mask, cfg.iterations,
                   "focused" if mask is not None else "global",
                   checkpoint=lambda r, done: after_iteration(cfg, fp, r, done, ck_extra, table), state=state)
    curves = dict(run["curves"])
    R, S, frc_final = run["R"].cpu(), run["S"].cpu(), run["frc"].cpu()
    h1, h2 = run["halves"]
    final = run["final"]
    patches = None
    if cfg.patches:
        patches = _refine_patches(inp, run, ops, curves)
    elif expanded:  # focused on a symmetric particle: put the sharp region back on its mates
        final = symmetrize_map(final, ops, weight=mask.cpu())

    if not distributed.is_main():  # rank 0 writes; the others return the figures they share
        distributed.barrier()
        return {"job": "refine-poses", "rank": distributed.rank(), "processes": distributed.world(),
                "n_particles": int(inp.n_input), "iterations": run["history"],
                "resolution_A": run["history"][-1]["resolution_A"], "device": str(dev), "seconds": timer()}
    patch_runs = patches["runs"] if patches else []
    seconds_before_write = timer()
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
        _write_maps_and_patches(od, inp, table, extra, h1, h2, final, patches)
        fsc_plot(curves, box, apix, od.path("fsc.png"), mask="soft spherical" + (" x focus" if mask is not None else ""))
        n_align = table.n * (len(run["history"]) + sum(len(pr["history"]) for pr in patch_runs))
        t_align = sum(h["seconds_align"] for h in run["history"]) + sum(
            h["seconds_align"] for pr in patch_runs for h in pr["history"])
        report = {
            "job": "refine-poses",
            "star": str(cfg.star),
            "n_particles": int(inp.n_input),
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
            "patches": patches["info"] if patches else [],
            "composite_resolution_A": resolution_at(patches["curve"], box, apix) if patches else None,
            "particles_per_s": n_align / max(t_align, 1e-9),
            # the final half maps' FSC, shaped as `reconstruct` reports it
            "fsc": {"resolution_A": (box * apix / np.maximum(np.arange(box // 2 + 1), 1e-9)).tolist(),
                    "unmasked": fsc(h1, h2).numpy(), "masked": fsc(h1, h2, mask=sphere).numpy(),
                    **({"focus_masked": fsc(h1, h2, mask=sphere * mask.cpu()).numpy()} if mask is not None else {})},
            "device": str(dev),
            **({"cpu_threads": torch.get_num_threads()} if dev.type == "cpu" else {}),  # = the pass's workers
            "matmul_precision": cfg.matmul_precision,
            "compiled_projection": projection.compile_enabled(),
            **({"resumed_after_iteration": len(state["history"])} if state is not None else {}),
            **({"processes": distributed.world()} if distributed.world() > 1 else {}),
            # where the time went: reading inputs, the starting maps, the iterations (each
            # iteration's own split: ``seconds_fit`` / ``seconds_align``), writing the outputs
            "seconds_phases": {"read": seconds_read, "start_maps": seconds_start,
                               "iterations": sum(h["seconds"] for h in run["history"]),
                               "write": timer() - seconds_before_write},
            "seconds": timer(),
        }
        write_report(od.path("report.json"), report)
    distributed.barrier()
    return report
