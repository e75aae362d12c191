"""Simulated particle datasets with known ground truth.

From an atomic model (projected as Gaussians) or a map (projected along rays): random or
given poses, per-particle defocus, RELION's CTF, Gaussian noise at a chosen SNR, optional
pose perturbation (so a refinement has something to recover), and heterogeneous sets
from a multi-model file or from two endpoints with frames between them.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
import numpy as np
import pandas as pd
import torch
from cryogmm.errors import ModelError, OptionError
from cryogmm.io import maps as mapio
from cryogmm.bridge import conventions as conv
from cryogmm.io.outputs import OutputDir
from cryogmm.bridge.io import read_particles, write_particles
from cryogmm.bridge.table import ParticleTable
from cryogmm.core.ctf import CtfParams, apply_ctf, ctf_rfft2
from cryogmm.io.structures import gaussians_from_coords, read_model, write_models
from cryogmm.core.gaussians import gaussians_to_map
from cryogmm.runtime import Timer, pick_device
from cryogmm.io.outputs import write_report
from cryogmm.core.projection import project, project_map
from cryogmm.core.rotations import perturb_rotations
from cryogmm.core.rotations import random_rotations
from cryogmm.core.gaussians import Gaussians



@dataclass
class SimulateConfig:
    out: Path
    model: Path | None = None
    map: Path | None = None
    trajectory: Path | None = None
    endpoints: tuple[Path, Path] | None = None
    frames: int = 10
    n: int = 1000
    box: int | None = None
    apix: float | None = None
    snr: float = 0.1
    defocus_um: tuple[float, float] = (1.0, 2.5)
    astigmatism_A: float = 300.0
    voltage_kV: float = 300.0
    cs_mm: float = 2.7
    amp_contrast: float = 0.1
    bfactor_A2: float = 0.0
    shift_sd_A: float = 2.0
    pose_noise_deg: float = 0.0
    shift_noise_A: float = 0.0
    resolution_A: float | None = None
    gaussians: str = "atoms"
    poses: Path | None = None
    seed: int = 0
    batch: int = 128
    device: str | None = None


def _rel(p) -> str:
    return str(p) if p is not None else None


def simulate(cfg: SimulateConfig, progress=None) -> dict:
    """Make ``cfg.out/{particles.star, particles.mrcs, truth.star, truth_map.mrc, report.json}``
    (and ``truth_models.pdb`` for heterogeneous sets). Returns the report."""

    timer = Timer()
    progress = progress or (lambda *a: None)
    sources = [x for x in (cfg.model, cfg.map, cfg.trajectory, cfg.endpoints) if x]
    if len(sources) != 1:
        raise OptionError("--model/--map/--trajectory/--endpoints", "give exactly one source of the structure")
    if cfg.n < 1:
        raise OptionError("--n", f"{cfg.n} particles; expected at least 1")
    if cfg.snr <= 0:
        raise OptionError("--snr", f"{cfg.snr}; expected a positive signal-to-noise ratio (inf for no noise)")
    if cfg.endpoints and cfg.frames < 2:
        raise OptionError("--frames", f"{cfg.frames}; expected at least 2 frames between the endpoints")
    dev = pick_device(cfg.device)
    rng = np.random.default_rng(cfg.seed)
    torch.manual_seed(cfg.seed)

    # ---- the structure: Gaussians per frame, or a map
    vol = None
    model = None
    frames_coords = None
    if cfg.map:
        data, map_apix = mapio.read_map(cfg.map)
        apix = float(cfg.apix or map_apix)
        if map_apix > 0 and abs(map_apix - apix) > 1e-3 * apix:
            raise OptionError("--apix", f"{apix:g} Å differs from the pixel size {map_apix:g} Å of {cfg.map}")
        box = int(cfg.box or data.shape[0])
        if box != data.shape[0]:
            raise OptionError("--box", f"{box} differs from the size {data.shape[0]} of {cfg.map}")
        vol = torch.as_tensor(data, device=dev)
        center = None
    else:
        box = int(cfg.box or 64)
        apix = float(cfg.apix or 2.0)
        if cfg.model:
            model = read_model(cfg.model)
            frames_coords = model.coords[:1]
        elif cfg.trajectory:
            model = read_model(cfg.trajectory)
            if model.n_frames < 2:
                raise ModelError(cfg.trajectory, "holds one model; a trajectory needs at least two (MODEL records)")
            frames_coords = model.coords
        else:
            a, b = cfg.endpoints
            model = read_model(a, others=[b])
            t = np.linspace(0.0, 1.0, cfg.frames)[:, None, None]
            frames_coords = (1 - t) * model.coords[0] + t * model.coords[1]
        center = model.center_of_mass()
        res = cfg.resolution_A or 2.0 * apix
        gs = [gaussians_from_coords(model, c, cfg.gaussians, resolution_A=res, center_A=center) for c in frames_coords]
        centers_all = torch.stack([g.centers for g in gs]).to(dev)
        amps, sigmas = gs[0].amplitudes.to(dev), gs[0].sigmas.to(dev)
        extent = float(centers_all.abs().max()) + 3 * float(sigmas.max())
        if extent > box // 2 * apix:
            raise OptionError("--box", f"the model reaches {extent:.0f} Å from its centre but a {box}-pixel box at "
                              f"{apix:g} Å holds {box // 2 * apix:.0f} Å: use a larger --box or --apix")
    n_frames = 1 if frames_coords is None else len(frames_coords)
    hetero = n_frames > 1

    # ---- poses, CTF, frames
    if cfg.poses:
        given = read_particles(cfg.poses)
        given.require(poses=True, ctf=False)
        if given.n < cfg.n:
            raise OptionError("--poses", f"{cfg.poses} holds {given.n} poses; --n asks for {cfg.n}")
        R_true = given.rotmat[: cfg.n]
        shift_true = given.shift_A[: cfg.n]
    else:
        R_true = random_rotations(cfg.n, rng)
        shift_true = rng.normal(0.0, cfg.shift_sd_A, (cfg.n, 2)) if cfg.shift_sd_A > 0 else np.zeros((cfg.n, 2))
    # store what the STAR can hold exactly: Euler angles at 1e-6 degrees
    eul_true = np.round(conv.rotmat_to_euler_zyz_deg(R_true), 6)
    R_true = conv.euler_zyz_deg_to_rotmat(*eul_true.T)
    shift_true = np.round(shift_true, 6)
    d0, d1 = sorted(cfg.defocus_um)
    du = rng.uniform(d0, d1, cfg.n) * 1e4
    dv = du - rng.uniform(0.0, cfg.astigmatism_A, cfg.n)
    dang = rng.uniform(0.0, 180.0, cfg.n)
    du, dv, dang = np.round(du, 3), np.round(dv, 3), np.round(dang, 4)
    frame = rng.integers(0, n_frames, cfg.n) if hetero else np.zeros(cfg.n, dtype=int)
    half = np.where(rng.permutation(cfg.n) < (cfg.n + 1) // 2, 1, 2)
    ctf_all = CtfParams(defocus_u_A=du, defocus_v_A=dv, defocus_angle_deg=dang, voltage_kV=cfg.voltage_kV,
                        cs_mm=cfg.cs_mm, amp_contrast=cfg.amp_contrast, bfactor_A2=cfg.bfactor_A2)

    # ---- observed poses (perturbed)
    R_obs, shift_obs = R_true, shift_true
    if cfg.pose_noise_deg > 0:
        R_obs = perturb_rotations(R_true, cfg.pose_noise_deg, rng)
    if cfg.shift_noise_A > 0:
        shift_obs = shift_true + rng.normal(0.0, cfg.shift_noise_A, shift_true.shape)
    eul_obs = np.round(conv.rotmat_to_euler_zyz_deg(R_obs), 6)
    shift_obs = np.round(shift_obs, 6)

    def clean_images(idx):
        R = torch.as_tensor(R_true[idx], dtype=torch.float32, device=dev)
        sh = torch.as_tensor(shift_true[idx], dtype=torch.float32, device=dev)
        if vol is not None:
            img = project_map(vol, R, sh, apix)
        else:

            g = Gaussians(centers_all[torch.as_tensor(frame[idx], device=dev)], amps, sigmas)
            img = project(g, R, sh, box, apix)
        c = ctf_rfft2(CtfParams(**{f: getattr(ctf_all, f)[idx] for f in CtfParams.FIELDS}), box, apix, device=dev)
        return apply_ctf(img, c)

    # noise level from the signal variance of a fixed pilot batch
    pilot = np.arange(min(cfg.n, 256))
    signal_var = float(clean_images(pilot).var(dim=(-2, -1)).mean())
    noise_sd = 0.0 if np.isinf(cfg.snr) else float(np.sqrt(signal_var / cfg.snr))
    gen = torch.Generator(device="cpu").manual_seed(cfg.seed + 1)

    with OutputDir(cfg.out) as od:
        with mapio.write_stack(od.path("particles.mrcs"), cfg.n, box, apix) as stack:
            for i in range(0, cfg.n, cfg.batch):
                idx = np.arange(i, min(i + cfg.batch, cfg.n))
                img = clean_images(idx).cpu()
                if noise_sd > 0:
                    img = img + noise_sd * torch.randn(img.shape, generator=gen)
                stack[i:i + len(idx)] = img.numpy()
                progress("simulate", int(idx[-1]) + 1, cfg.n)

        # ---- metadata: what a user would get from RELION 3.1, and the truth beside it
        optics = pd.DataFrame({
            "rlnOpticsGroup": [1],
            "rlnOpticsGroupName": ["opticsGroup1"],
            "rlnAmplitudeContrast": [cfg.amp_contrast],
            "rlnSphericalAberration": [cfg.cs_mm],
            "rlnVoltage": [cfg.voltage_kV],
            "rlnImagePixelSize": [apix],
            "rlnImageSize": [box],
            "rlnImageDimensionality": [2],
        })

        def particles(eul, shift):
            return pd.DataFrame({
                "rlnImageName": [f"{i + 1:06d}@particles.mrcs" for i in range(cfg.n)],
                "rlnMicrographName": [f"sim/mic{i // 100:05d}.mrc" for i in range(cfg.n)],
                "rlnDefocusU": du, "rlnDefocusV": dv, "rlnDefocusAngle": dang,
                "rlnPhaseShift": np.zeros(cfg.n), "rlnCtfBfactor": np.full(cfg.n, cfg.bfactor_A2),
                "rlnCtfScalefactor": np.ones(cfg.n),
                "rlnAngleRot": eul[:, 0], "rlnAngleTilt": eul[:, 1], "rlnAnglePsi": eul[:, 2],
                "rlnOriginXAngst": shift[:, 0], "rlnOriginYAngst": shift[:, 1],
                "rlnOpticsGroup": np.ones(cfg.n, dtype=int),
                "rlnRandomSubset": half,
            })

        write_particles(ParticleTable(particles(eul_obs, shift_obs), optics.copy()), od.path("particles.star"))
        truth = particles(eul_true, shift_true)
        if hetero:
            truth["rlnCryogmmTrueFrame"] = frame
        write_particles(ParticleTable(truth, optics.copy()), od.path("truth.star"))

        # ---- the noise-free map (particle-weighted average over frames), overlaying the model
        if vol is not None:
            truth_map = vol.cpu()
            origin = None
        else:
            counts = np.bincount(frame, minlength=n_frames) / cfg.n
            truth_map = sum(float(w) * gaussians_to_map(gs[k].to(dev), box, apix).cpu()
                            for k, w in enumerate(counts) if w > 0)
            origin = center - (box // 2) * apix
        mapio.write_map(od.path("truth_map.mrc"), truth_map.numpy(), apix, origin_A=origin)
        if hetero:
            write_models(od.path("truth_models.pdb"), model, frames_coords)

        report = {
            "job": "simulate",
            "n_particles": cfg.n,
            "box": box,
            "apix_A": apix,
            "snr": None if np.isinf(cfg.snr) else cfg.snr,
            "signal_variance": signal_var,
            "noise_sd": noise_sd,
            "defocus_um": [d0, d1],
            "voltage_kV": cfg.voltage_kV,
            "cs_mm": cfg.cs_mm,
            "amp_contrast": cfg.amp_contrast,
            "pose_noise_deg": cfg.pose_noise_deg,
            "shift_noise_A": cfg.shift_noise_A,
            "source": {"model": _rel(cfg.model), "map": _rel(cfg.map), "trajectory": _rel(cfg.trajectory),
                       "endpoints": [str(p) for p in cfg.endpoints] if cfg.endpoints else None},
            "gaussians": None if vol is not None else {"mode": cfg.gaussians, "n": int(amps.numel()),
                                                        "resolution_A": cfg.resolution_A or 2.0 * apix},
            "model_center_A": None if center is None else center.tolist(),
            "n_frames": n_frames,
            "seed": cfg.seed,
            "device": str(dev),
            "seconds": timer(),
            "outputs": ["particles.star", "particles.mrcs", "truth.star", "truth_map.mrc"]
                       + (["truth_models.pdb"] if hetero else []),
        }
        write_report(od.path("report.json"), report)
    return report
