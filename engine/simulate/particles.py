"""Simulated particle datasets with known ground truth.

From an atomic model (projected as Gaussians) or a map (projected along rays): random or
given poses, per-particle defocus, RELION's CTF, Gaussian noise at a chosen SNR, optional
pose perturbation (so a refinement has something to recover), and heterogeneous sets
from a multi-model file or from two endpoints with frames between them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from cryogmm.bridge import conventions as conv
from cryogmm.bridge.io import read_particles, write_particles
from cryogmm.bridge.table import ParticleTable
from cryogmm.core.ctf import CtfParams, apply_ctf, ctf_rfft2
from cryogmm.core.gaussians import Gaussians, gaussians_to_map
from cryogmm.core.projection import project, project_map
from cryogmm.core.rotations import perturb_rotations, random_rotations
from cryogmm.errors import ModelError, OptionError
from cryogmm.io import maps as mapio
from cryogmm.io.outputs import OutputDir, write_report
from cryogmm.io.structures import gaussians_from_coords, read_model, write_models
from cryogmm.runtime import Timer, pick_device


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


def _check_options(cfg: SimulateConfig):
    sources = [x for x in (cfg.model, cfg.map, cfg.trajectory, cfg.endpoints) if x]
    if len(sources) != 1:
        raise OptionError("--model/--map/--trajectory/--endpoints", "give exactly one source of the structure")
    if cfg.n < 1:
        raise OptionError("--n-particles", f"{cfg.n} particles; expected at least 1")
    if cfg.snr <= 0:
        raise OptionError("--snr", f"{cfg.snr}; expected a positive signal-to-noise ratio (inf for no noise)")
    if cfg.endpoints and cfg.frames < 2:
        raise OptionError("--frames", f"{cfg.frames}; expected at least 2 frames between the endpoints")


@dataclass
class _Structure:
    """What the particles are images of: a map, or Gaussians per frame of a model."""

    box: int
    apix: float
    vol: torch.Tensor | None = None  # a map
    model: object = None  # the atomic model (io.structures.Model)
    frames_coords: np.ndarray | None = None  # [F, N, 3]
    gs: list = field(default_factory=list)  # Gaussians per frame
    centers_all: torch.Tensor | None = None  # [F, N, 3] on the device
    amps: torch.Tensor | None = None
    sigmas: torch.Tensor | None = None
    center: np.ndarray | None = None  # model centre of mass, the box centre

    @property
    def n_frames(self) -> int:
        return 1 if self.frames_coords is None else len(self.frames_coords)


def _read_structure(cfg: SimulateConfig, dev) -> _Structure:
    if cfg.map:
        data, map_apix = mapio.read_map(cfg.map)
        apix = float(cfg.apix or map_apix)
        if map_apix > 0 and abs(map_apix - apix) > 1e-3 * apix:
            raise OptionError("--apix", f"{apix:g} Å differs from the pixel size {map_apix:g} Å of {cfg.map}")
        box = int(cfg.box or data.shape[0])
        if box != data.shape[0]:
            raise OptionError("--box", f"{box} differs from the size {data.shape[0]} of {cfg.map}")
        return _Structure(box=box, apix=apix, vol=torch.as_tensor(data, device=dev))
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
    return _Structure(box=box, apix=apix, model=model, frames_coords=frames_coords, gs=gs, centers_all=centers_all,
                      amps=amps, sigmas=sigmas, center=center)


@dataclass
class _Draw:
    """The per-particle truth and what the STAR records (the random draws of a simulation)."""

    R_true: np.ndarray
    shift_true: np.ndarray
    eul_true: np.ndarray
    eul_obs: np.ndarray
    shift_obs: np.ndarray
    du: np.ndarray
    dv: np.ndarray
    dang: np.ndarray
    frame: np.ndarray
    half: np.ndarray
    ctf: CtfParams


def _draw_particles(cfg: SimulateConfig, rng: np.random.Generator, n_frames: int) -> _Draw:
    """Poses (or those of ``cfg.poses``), shifts, CTFs, frames and half sets, then the recorded
    (perturbed) poses; every value rounded to what a STAR file holds exactly."""
    if cfg.poses:
        given = read_particles(cfg.poses)
        given.require(poses=True, ctf=False)
        if given.n < cfg.n:
            raise OptionError("--poses", f"{cfg.poses} holds {given.n} poses; --n-particles asks for {cfg.n}")
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
    frame = rng.integers(0, n_frames, cfg.n) if n_frames > 1 else np.zeros(cfg.n, dtype=int)
    half = np.where(rng.permutation(cfg.n) < (cfg.n + 1) // 2, 1, 2)
    ctf = CtfParams(defocus_u_A=du, defocus_v_A=dv, defocus_angle_deg=dang, voltage_kV=cfg.voltage_kV,
                    cs_mm=cfg.cs_mm, amp_contrast=cfg.amp_contrast, bfactor_A2=cfg.bfactor_A2)
    # ---- observed poses (perturbed)
    R_obs, shift_obs = R_true, shift_true
    if cfg.pose_noise_deg > 0:
        R_obs = perturb_rotations(R_true, cfg.pose_noise_deg, rng)
    if cfg.shift_noise_A > 0:
        shift_obs = shift_true + rng.normal(0.0, cfg.shift_noise_A, shift_true.shape)
    return _Draw(R_true=R_true, shift_true=shift_true, eul_true=eul_true,
                 eul_obs=np.round(conv.rotmat_to_euler_zyz_deg(R_obs), 6), shift_obs=np.round(shift_obs, 6),
                 du=du, dv=dv, dang=dang, frame=frame, half=half, ctf=ctf)


def _clean_images(st: _Structure, d: _Draw, idx, dev) -> torch.Tensor:
    """Noise-free images of particles ``idx`` with their CTF."""
    R = torch.as_tensor(d.R_true[idx], dtype=torch.float32, device=dev)
    sh = torch.as_tensor(d.shift_true[idx], dtype=torch.float32, device=dev)
    if st.vol is not None:
        img = project_map(st.vol, R, sh, st.apix)
    else:
        g = Gaussians(st.centers_all[torch.as_tensor(d.frame[idx], device=dev)], st.amps, st.sigmas)
        img = project(g, R, sh, st.box, st.apix)
    c = ctf_rfft2(CtfParams(**{f: getattr(d.ctf, f)[idx] for f in CtfParams.FIELDS}), st.box, st.apix, device=dev)
    return apply_ctf(img, c)


def _star_tables(cfg: SimulateConfig, d: _Draw, st: _Structure):
    """(recorded, truth) particle tables, as RELION 3.1 would write them."""
    optics = pd.DataFrame({
        "rlnOpticsGroup": [1],
        "rlnOpticsGroupName": ["opticsGroup1"],
        "rlnAmplitudeContrast": [cfg.amp_contrast],
        "rlnSphericalAberration": [cfg.cs_mm],
        "rlnVoltage": [cfg.voltage_kV],
        "rlnImagePixelSize": [st.apix],
        "rlnImageSize": [st.box],
        "rlnImageDimensionality": [2],
    })

    def particles(eul, shift):
        return pd.DataFrame({
            "rlnImageName": [f"{i + 1:06d}@particles.mrcs" for i in range(cfg.n)],
            "rlnMicrographName": [f"sim/mic{i // 100:05d}.mrc" for i in range(cfg.n)],
            "rlnDefocusU": d.du, "rlnDefocusV": d.dv, "rlnDefocusAngle": d.dang,
            "rlnPhaseShift": np.zeros(cfg.n), "rlnCtfBfactor": np.full(cfg.n, cfg.bfactor_A2),
            "rlnCtfScalefactor": np.ones(cfg.n),
            "rlnAngleRot": eul[:, 0], "rlnAngleTilt": eul[:, 1], "rlnAnglePsi": eul[:, 2],
            "rlnOriginXAngst": shift[:, 0], "rlnOriginYAngst": shift[:, 1],
            "rlnOpticsGroup": np.ones(cfg.n, dtype=int),
            "rlnRandomSubset": d.half,
        })

    truth = particles(d.eul_true, d.shift_true)
    if st.n_frames > 1:
        truth["rlnCryogmmTrueFrame"] = d.frame
    return ParticleTable(particles(d.eul_obs, d.shift_obs), optics.copy()), ParticleTable(truth, optics.copy())


def _truth_map(st: _Structure, d: _Draw, dev):
    """The noise-free map (particle-weighted average over frames) and its origin (overlaying the
    model)."""
    if st.vol is not None:
        return st.vol.cpu(), None
    counts = np.bincount(d.frame, minlength=st.n_frames) / len(d.frame)
    truth_map = sum(float(w) * gaussians_to_map(st.gs[k].to(dev), st.box, st.apix).cpu()
                    for k, w in enumerate(counts) if w > 0)
    return truth_map, st.center - (st.box // 2) * st.apix


def simulate(cfg: SimulateConfig, progress=None) -> dict:
    """Make ``cfg.out/{particles.star, particles.mrcs, truth.star, truth_map.mrc, report.json}``
    (and ``truth_models.pdb`` for heterogeneous sets). Returns the report."""
    timer = Timer()
    progress = progress or (lambda *a: None)
    _check_options(cfg)
    dev = pick_device(cfg.device)
    rng = np.random.default_rng(cfg.seed)
    torch.manual_seed(cfg.seed)
    st = _read_structure(cfg, dev)
    hetero = st.n_frames > 1
    d = _draw_particles(cfg, rng, st.n_frames)
    # noise level from the signal variance of a fixed pilot batch
    pilot = np.arange(min(cfg.n, 256))
    signal_var = float(_clean_images(st, d, pilot, dev).var(dim=(-2, -1)).mean())
    noise_sd = 0.0 if np.isinf(cfg.snr) else float(np.sqrt(signal_var / cfg.snr))
    gen = torch.Generator(device="cpu").manual_seed(cfg.seed + 1)

    with OutputDir(cfg.out) as od:
        with mapio.write_stack(od.path("particles.mrcs"), cfg.n, st.box, st.apix) as stack:
            for i in range(0, cfg.n, cfg.batch):
                idx = np.arange(i, min(i + cfg.batch, cfg.n))
                img = _clean_images(st, d, idx, dev).cpu()
                if noise_sd > 0:
                    img = img + noise_sd * torch.randn(img.shape, generator=gen)
                stack[i:i + len(idx)] = img.numpy()
                progress("simulate", int(idx[-1]) + 1, cfg.n)
        recorded, truth = _star_tables(cfg, d, st)
        write_particles(recorded, od.path("particles.star"))
        write_particles(truth, od.path("truth.star"))
        truth_map, origin = _truth_map(st, d, dev)
        mapio.write_map(od.path("truth_map.mrc"), truth_map.numpy(), st.apix, origin_A=origin)
        if hetero:
            write_models(od.path("truth_models.pdb"), st.model, st.frames_coords)
        report = {
            "job": "simulate",
            "n_particles": cfg.n,
            "box": st.box,
            "apix_A": st.apix,
            "snr": None if np.isinf(cfg.snr) else cfg.snr,
            "signal_variance": signal_var,
            "noise_sd": noise_sd,
            "defocus_um": sorted(cfg.defocus_um),
            "voltage_kV": cfg.voltage_kV,
            "cs_mm": cfg.cs_mm,
            "amp_contrast": cfg.amp_contrast,
            "pose_noise_deg": cfg.pose_noise_deg,
            "shift_noise_A": cfg.shift_noise_A,
            "source": {"model": _rel(cfg.model), "map": _rel(cfg.map), "trajectory": _rel(cfg.trajectory),
                       "endpoints": [str(p) for p in cfg.endpoints] if cfg.endpoints else None},
            "gaussians": None if st.vol is not None else {"mode": cfg.gaussians, "n": int(st.amps.numel()),
                                                           "resolution_A": cfg.resolution_A or 2.0 * st.apix},
            "model_center_A": None if st.center is None else st.center.tolist(),
            "n_frames": st.n_frames,
            "seed": cfg.seed,
            "device": str(dev),
            "seconds": timer(),
            "outputs": ["particles.star", "particles.mrcs", "truth.star", "truth_map.mrc"]
                       + (["truth_models.pdb"] if hetero else []),
        }
        write_report(od.path("report.json"), report)
    return report
