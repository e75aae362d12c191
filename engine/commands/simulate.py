"""Simulate a particle dataset with known ground truth (poses, CTF, noise, conformations).

From an atomic model (every heavy atom becomes a Gaussian, amplitude = electrons) or a map,
project at random (or given) poses, apply RELION's CTF with per-particle defocus, add
Gaussian noise at the requested SNR (signal variance / noise variance over the box).

Outputs in --out:
  particles.star   RELION 3.1 STAR (optics + particles), the poses a refinement starts from
                   (perturbed when --pose-noise-deg / --shift-noise-A are given)
  particles.mrcs   the images
  truth.star       the true poses (and rlnCryogmmTrueFrame for heterogeneous sets)
  truth_map.mrc    the noise-free map, same box and pixel (overlays the model)
  truth_models.pdb every frame's model (heterogeneous sets)
  report.json      what was made

Examples:
  cryogmm simulate --model adk_open.pdb --n-particles 2000 --box 64 --apix 2 --snr 0.1 --seed 1 --out sim
  cryogmm simulate --endpoints adk_open.pdb adk_closed.pdb --frames 10 --n-particles 5000 --out hetero
  cryogmm simulate --model m.pdb --pose-noise-deg 5 --shift-noise-A 2 --out refine_task
"""

from __future__ import annotations

import math
from pathlib import Path

from cryogmm.commands import add_count, add_seed_device_out, check_out
from cryogmm.errors import (
    OptionError,
    finite_float,
    fraction,
    nonnegative_float,
    positive_float,
    positive_float_or_inf,
    positive_int,
)


def add_args(p):
    src = p.add_argument_group("structure (exactly one)")
    src.add_argument("--model", type=Path, help="atomic model (PDB/mmCIF); heavy atoms become Gaussians")
    src.add_argument("--map", type=Path, help="cubic MRC map, projected along rays")
    src.add_argument("--trajectory", type=Path, help="multi-model PDB: each MODEL is a frame")
    src.add_argument("--endpoints", type=Path, nargs=2, metavar=("A.pdb", "B.pdb"),
                     help="two conformations; --frames models linearly interpolated between them")
    src.add_argument("--frames", type=positive_int, default=10, help="frames between --endpoints, ends included (default 10)")
    add_count(p, "--n-particles", "n", type=positive_int, default=1000, help="number of particles (default 1000)")
    p.add_argument("--box", type=positive_int, help="box size in pixels (default: the map's, or 64)")
    p.add_argument("--apix", type=positive_float, help="pixel size in Å (default: the map's, or 2.0)")
    p.add_argument("--snr", type=positive_float_or_inf, default=0.1, help="signal-to-noise ratio (default 0.1; 'inf' for none)")
    p.add_argument("--defocus", type=positive_float, nargs=2, default=(1.0, 2.5), metavar=("MIN", "MAX"),
                   help="defocus range in µm, uniform per particle (default 1.0 2.5)")
    p.add_argument("--astigmatism", type=nonnegative_float, default=300.0, help="max |DefocusU - DefocusV| in Å (default 300)")
    p.add_argument("--voltage", type=positive_float, default=300.0, help="kV (default 300)")
    p.add_argument("--cs", type=nonnegative_float, default=2.7, help="spherical aberration, mm (default 2.7)")
    p.add_argument("--amp-contrast", type=fraction, default=0.1, help="amplitude contrast (default 0.1)")
    p.add_argument("--bfactor", type=finite_float, default=0.0, help="CTF B-factor, Å² (default 0)")
    p.add_argument("--shift-sd", type=nonnegative_float, default=2.0, help="true origin shifts ~ N(0, sd) Å per axis (default 2)")
    p.add_argument("--pose-noise-deg", type=nonnegative_float, default=0.0, help="perturb the written rotations by ~N(0, D) degrees")
    p.add_argument("--shift-noise-A", type=nonnegative_float, default=0.0, help="perturb the written shifts by ~N(0, T) Å")
    p.add_argument("--poses", type=Path, help="take poses from this STAR instead of random ones")
    p.add_argument("--resolution", type=positive_float, help="resolution of the model's Gaussians in Å (default 2 x apix)")
    p.add_argument("--gaussians", choices=("atoms", "ca", "residue2"), default="atoms",
                   help="atoms: every heavy atom; ca: one per residue; residue2: backbone + side chain")
    p.add_argument("--batch", type=positive_int, default=128, help="particles per batch (default 128)")
    add_seed_device_out(p)


def main(args) -> int:
    from cryogmm.runtime import Progress
    from cryogmm.simulate.particles import SimulateConfig, simulate

    if args.defocus[0] > args.defocus[1]:
        raise OptionError("--defocus", f"MIN {args.defocus[0]:g} is above MAX {args.defocus[1]:g}")
    check_out(args, args.model, args.map, args.trajectory, args.endpoints, args.poses)
    cfg = SimulateConfig(
        out=args.out, model=args.model, map=args.map, trajectory=args.trajectory,
        endpoints=tuple(args.endpoints) if args.endpoints else None, frames=args.frames, n=args.n,
        box=args.box, apix=args.apix, snr=math.inf if args.snr == math.inf else args.snr,
        defocus_um=tuple(args.defocus), astigmatism_A=args.astigmatism, voltage_kV=args.voltage, cs_mm=args.cs,
        amp_contrast=args.amp_contrast, bfactor_A2=args.bfactor, shift_sd_A=args.shift_sd,
        pose_noise_deg=args.pose_noise_deg, shift_noise_A=args.shift_noise_A, resolution_A=args.resolution,
        gaussians=args.gaussians, poses=args.poses, seed=args.seed, batch=args.batch, device=args.device,
    )
    rep = simulate(cfg, progress=Progress(bar=True))
    print(f"simulated {rep['n_particles']} particles ({rep['box']} px, {rep['apix_A']:g} Å/px) in {args.out}")
    return 0
