"""Fit a Gaussian mixture to a map (k-means seeding, then FRC of projections).

The map's voxels above a threshold are clustered by density-weighted k-means into N
Gaussians of the width the target resolution implies; centres, amplitudes and widths are
then fitted so that projections of the mixture match projections of the map, by the
Fourier ring correlation up to the target resolution, until the fit stops improving.

Defaults, chosen from the map:
  --threshold  the lowest level keeping 90% of the density above background among voxels
               significantly above it (median + 3 robust SD); on a noise-free map the
               contour enclosing 90% of the mass
  --n-gaussians  one Gaussian per (resolution/2)^3 Å^3 of the volume above the threshold,
                 clamped to [8, 50000]

Outputs in --out:
  gaussians.pdb  one pseudo-atom per Gaussian (HETATM, residue GMM, element C) in the
                 map's frame, so it overlays the map in ChimeraX; occupancy = amplitude
                 relative to the largest, B-factor = 8 pi^2 sigma^2; exact values in REMARKs
  gmm_map.mrc    the mixture as a map (same box, pixel size and origin)
  report.json    n, threshold and the rules behind them, iterations, final FRC loss, FSC
                 between gmm_map.mrc and the map (and for the k-means seeding alone), the
                 resolution where it crosses 0.5, seconds

Example:
  cryogmm fit-gmm emd_1234.mrc --resolution 8 --out gmm
"""

from __future__ import annotations

from pathlib import Path

from cryogmm.commands import add_count, add_seed_device_out, check_out
from cryogmm.errors import finite_float, nonnegative_int, positive_float, positive_int


def add_args(p):
    p.add_argument("map", type=Path, help="cubic MRC map")
    p.add_argument("--resolution", type=positive_float, required=True,
                   help="target resolution in Å (>= 2 x pixel size): Gaussian widths, default N, FRC rings fitted")
    add_count(p, "--n-gaussians", "n", type=positive_int,
              help="number of Gaussians (default: from the resolution and the volume)")
    p.add_argument("--threshold", type=finite_float, help="density level for seeding, map units (default: automatic)")
    p.add_argument("--iterations", type=nonnegative_int, default=1000,
                   help="most optimisation steps; the fit stops earlier when it plateaus (default 1000; 0: k-means only)")
    p.add_argument("--batch", type=positive_int, default=16, help="orientations per step (default 16)")
    add_seed_device_out(p)


def main(args) -> int:
    check_out(args, args.map)
    from cryogmm.gmmfit.job import FitGmmConfig, fit_gmm
    from cryogmm.runtime import Progress

    cfg = FitGmmConfig(map=args.map, out=args.out, resolution_A=args.resolution, n=args.n, threshold=args.threshold,
                       iterations=args.iterations, batch=args.batch, seed=args.seed, device=args.device)
    rep = fit_gmm(cfg, progress=Progress(bar=True))
    print(f"{rep['n']} Gaussians -> {args.out}/gaussians.pdb; FSC with the map >= "
          f"{rep['fsc_min_to_resolution']:.3f} to {args.resolution:g} Å, 0.5 at {rep['fsc_0.5_A']:.2f} Å "
          f"({rep['iterations']} iterations, {rep['seconds']:.1f} s)")
    return 0
