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
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from cryogmm.errors import MapError, OptionError

__all__ = ["RefineConfig", "refine_poses", "refine_batch", "focus_widths", "BandFrc"]


@dataclass
class RefineConfig:
    star: Path
    out: Path
    half_maps: tuple[Path, Path] | None = None
    model: Path | None = None
    mask: Path | None = None
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
                 steps: int, lr_rad: float, lr_A: float):
    """Local refinement of one batch of particles against one mixture.

    ``x [B, K]`` particle band values, ``ctf [B, K]`` their CTF on the band, ``A0 [B, 3, 3]``
    and ``s0 [B, 2]`` (Å) starting poses. Returns ``(A, shift_A, frc_mean)``.
    """
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
        img = project(g, A, shift, band.crop, band.apix_crop)
        p = torch.fft.rfft2(torch.fft.ifftshift(img, dim=(-2, -1)))
        p = band.band(p) * ctf
        score = band.frc(x, p, x_power).mean(1)
        if step == steps:  # the last pass only scores the final poses
            break
        opt.zero_grad()
        (-score.sum()).backward()
        opt.step()
        sched.step()
    return A.detach(), shift.detach(), score.detach()


def _read_half_maps(paths, box, apix):
    from cryogmm.mapio import read_map

    maps = []
    for p in paths:
        m, a = read_map(p, expect_apix=apix)
        if m.shape[0] != box:
            raise MapError(p, f"box {m.shape[0]} differs from the particles' box {box}")
        maps.append(torch.as_tensor(m))
    return maps


def refine_poses(cfg: RefineConfig, progress=None) -> dict:
    """Run the refinement; write ``refined.star``, ``half1.mrc``, ``half2.mrc``, ``map.mrc``,
    ``fsc.png`` (every iteration), ``report.json`` into ``cfg.out``. Returns the report."""
    from cryogmm import mapio
    from cryogmm.bridge.conventions import rotmat_to_euler_zyz_deg
    from cryogmm.bridge.fileio import OutputDir
    from cryogmm.bridge.images import ImageSource
    from cryogmm.bridge.io import read_particles, write_particles
    from cryogmm.ctf import CtfParams, ctf_rfft2
    from cryogmm.fitmap import auto_n, auto_threshold, fit_gaussians_frc, gaussians_from_map, map_origin_A
    from cryogmm.gmm import gaussians_from_coords, read_model
    from cryogmm.jobs import Timer, pick_device, write_report
    from cryogmm.metrics import fsc, fsc_plot, lowpass, resolution_at, soft_sphere_mask
    from cryogmm.reconstruct import reconstruct_table
    from cryogmm.rotations import rotmat_angle_deg

    timer = Timer()
    progress = progress or (lambda *a: None)
    for name, v, lo in (("--iterations", cfg.iterations, 1), ("--steps", cfg.steps, 1), ("--batch", cfg.batch, 1)):
        if v < lo:
            raise OptionError(name, f"{v}; expected at least {lo}")
    if cfg.half_maps and cfg.model:
        raise OptionError("--half-maps/--model", "give half maps or a model to seed the mixtures, not both")
    dev = pick_device(cfg.device)
    torch.manual_seed(cfg.seed)
    rng = np.random.default_rng(cfg.seed)

    table = read_particles(cfg.star, project_dir=cfg.project_dir)
    table.require(poses=True, ctf=True, why="pose refinement")
    table = table.with_half_sets(seed=cfg.seed)
    box_u, apix_u = np.unique(table.box), np.unique(np.round(table.apix, 6))
    if len(box_u) != 1 or len(apix_u) != 1:
        raise OptionError("STAR", f"particles of several boxes {box_u.tolist()} or pixel sizes {apix_u.tolist()}")
    box, apix = int(box_u[0]), float(apix_u[0])
    source = ImageSource.from_table(table)
    mask = None
    if cfg.mask:
        m, _ = mapio.read_map(cfg.mask, expect_apix=apix)
        if m.shape[0] != box:
            raise MapError(cfg.mask, f"mask box {m.shape[0]} differs from the particles' box {box}")
        if m.min() < -1e-3 or m.max() > 1 + 1e-3:
            raise MapError(cfg.mask, f"mask values span {m.min():.3g}..{m.max():.3g}; expected 0..1")
        mask = torch.as_tensor(m, device=dev).clamp(0, 1)
    if cfg.model is not None:
        model = read_model(cfg.model)
    fsc_mask = soft_sphere_mask(box, box // 2 - 6, edge_px=3)

    # ---- starting half maps: given, or reconstructed from the particles' own poses
    if cfg.half_maps:
        halves = _read_half_maps(cfg.half_maps, box, apix)
    else:
        h1, h2, _, _ = reconstruct_table(table, source, device=dev, wiener=False)
        halves = [h1, h2]
    res = resolution_at(fsc(halves[0], halves[1], mask=fsc_mask), box, apix)
    if cfg.start_res_A:
        res = max(float(cfg.start_res_A), 2 * apix)
    lo_shell = max(1, int(round(box * apix / cfg.low_res_A)))

    R = torch.as_tensor(table.rotmat, dtype=torch.float32)
    S = torch.as_tensor(table.shift_A, dtype=torch.float32)
    R_in, S_in = R.clone(), S.clone()
    sets = table.half_set - 1
    gmms = [None, None]
    history, curves = [], {}
    frc_final = torch.zeros(table.n)
    for it in range(1, cfg.iterations + 1):
        t_it = Timer()
        hi_shell = min(box // 2 - 1, max(lo_shell + 2, int(math.floor(box * apix / res))))
        band = BandFrc(box, apix, lo_shell, hi_shell, device=dev)
        # 1. a mixture per half, fitted to that half's map only
        for h in (0, 1):
            vol = halves[h].to(dev)
            if gmms[h] is None and cfg.model is not None:
                origin = map_origin_A(cfg.half_maps[h]) if cfg.half_maps else None
                center = (origin + (box // 2) * apix) if origin is not None else model.center_of_mass()
                g0 = gaussians_from_coords(model, model.coords[0], "atoms", resolution_A=res, center_A=center)
                # gold-standard: each half starts from the model randomised at the resolution
                g0.centers += torch.as_tensor(rng.normal(0, res / 4, g0.centers.shape), dtype=torch.float32)
                gmms[h], _ = fit_gaussians_frc(g0.to(dev), vol, apix, res, iterations=cfg.fit_iterations, seed=cfg.seed + h)
            elif gmms[h] is None:
                # seed on the half map low-passed to its resolution: noise must not be seeded
                smooth = lowpass(vol, max(res, 2 * apix), apix)
                n = cfg.n_gaussians
                if n is None:
                    thr, _ = auto_threshold(smooth)
                    vol_A3 = float((smooth > thr).sum()) * apix**3
                    n = min(auto_n(vol_A3, max(res, 2 * apix)), cfg.max_gaussians)
                gmms[h], _ = gaussians_from_map(smooth, apix, resolution_A=max(res, 2 * apix), n=n,
                                                iterations=cfg.fit_iterations, seed=cfg.seed + h, device=dev)
            else:
                gmms[h], _ = fit_gaussians_frc(gmms[h], vol, apix, max(res, 2 * apix),
                                               iterations=cfg.fit_iterations, seed=cfg.seed + h + 10 * it)
        refs = [focus_widths(g, mask, apix) if mask is not None else g for g in gmms]
        # 2. local pose refinement, particle batches streamed from disk
        R_new, S_new = R.clone(), S.clone()
        done = 0
        for idx, imgs in source.chunks(cfg.batch):
            idx = np.asarray(idx)
            x = band.crop_ft(torch.as_tensor(imgs, device=dev))
            c = ctf_rfft2(CtfParams.from_table(table, idx), band.crop, band.apix_crop, device=dev)
            c = band.band(c)
            for h in (0, 1):
                sel = np.nonzero(sets[idx] == h)[0]
                if len(sel) == 0:
                    continue
                A, sh, score = refine_batch(refs[h], band, x[sel], c[sel], R[idx[sel]].to(dev), S[idx[sel]].to(dev),
                                            steps=cfg.steps, lr_rad=math.radians(cfg.lr_deg), lr_A=cfg.lr_A)
                R_new[idx[sel]], S_new[idx[sel]] = A.cpu(), sh.cpu()
                frc_final[idx[sel]] = score.cpu()
            done += len(idx)
            progress(f"refine iteration {it}", done, table.n)
        t_align = t_it()
        dang = rotmat_angle_deg(R_new, R).numpy()
        dsh = torch.linalg.norm(S_new - S, dim=1).numpy()
        R, S = R_new, S_new
        # 3. reconstruct both halves with the new poses, FSC, next band
        table = table.with_poses(rotmat=R.double().numpy(), shift_A=S.double().numpy())
        h1, h2, final, curve = reconstruct_table(table, source, device=dev)
        curve_m = fsc(h1, h2, mask=fsc_mask)
        new_res = resolution_at(curve_m, box, apix)
        curves[f"iteration {it}"] = curve_m.numpy()
        history.append({
            "iteration": it,
            "band_A": [box * apix / lo_shell, box * apix / hi_shell],
            "crop_box": band.crop,
            "n_gaussians": [gmms[0].n, gmms[1].n],
            "resolution_A": new_res,
            "resolution_0.5_A": resolution_at(curve_m, box, apix, 0.5),
            "pose_change_deg": {"median": float(np.median(dang)), "p90": float(np.percentile(dang, 90))},
            "shift_change_A": {"median": float(np.median(dsh)), "p90": float(np.percentile(dsh, 90))},
            "mean_band_frc": float(frc_final.mean()),
            "seconds_align": t_align,
            "seconds": t_it(),
            "particles_per_s": table.n / t_align,
        })
        progress("iterations", it, cfg.iterations)
        halves = [h1, h2]
        improved = new_res < res * 0.995
        res = min(res, new_res)
        if not improved and it > 1:
            break

    with OutputDir(cfg.out) as od:
        eul_in = rotmat_to_euler_zyz_deg(R_in.double().numpy())
        extra = {
            "rlnCryogmmOrigAngleRot": eul_in[:, 0], "rlnCryogmmOrigAngleTilt": eul_in[:, 1],
            "rlnCryogmmOrigAnglePsi": eul_in[:, 2],
            "rlnCryogmmOrigOriginXAngst": S_in[:, 0].double().numpy(),
            "rlnCryogmmOrigOriginYAngst": S_in[:, 1].double().numpy(),
            "rlnCryogmmFrc": frc_final.double().numpy(),
        }
        out_table = table.with_columns(**extra)
        write_particles(out_table, od.path("refined.star"))
        if str(cfg.star).endswith(".cs"):
            write_particles(out_table, od.path("refined.cs"))
        mapio.write_map(od.path("half1.mrc"), h1.numpy(), apix)
        mapio.write_map(od.path("half2.mrc"), h2.numpy(), apix)
        mapio.write_map(od.path("map.mrc"), final.numpy(), apix)
        fsc_plot(curves, box, apix, od.path("fsc.png"))
        report = {
            "job": "refine-poses",
            "star": str(cfg.star),
            "n_particles": int(table.n),
            "box": box,
            "apix_A": apix,
            "references": "half maps" if cfg.half_maps else ("model" if cfg.model else "reconstructed from input poses"),
            "focused": bool(cfg.mask),
            "iterations": history,
            "resolution_A": history[-1]["resolution_A"],
            "device": str(dev),
            "seconds": timer(),
        }
        write_report(od.path("report.json"), report)
    return report
