"""Refine particle orientations and origins against Gaussian mixtures (gold-standard).

The method of Chen, Schmid & Chiu (EMAN2 e2gmm_refine): each half-set of particles is
aligned only against a Gaussian mixture fitted to its own half map. Each iteration fits
the mixtures, refines every particle's pose locally (Adam on a rotation increment and the
origin) to maximise the FRC between the particle and the CTF-modulated projection of its
half's mixture over a band of shells (from --low-res-A up to the last FSC resolution),
reconstructs both halves and computes the FSC. Starting half maps are --half-maps, or
reconstructed from the particles' own poses. --model seeds the mixtures on the model's
heavy atoms (randomised at the resolution, independently per half).

--map starts from a consensus map instead (low-passed to --start-res-A, so the two halves
share nothing beyond it).

--mask (MRC, 0..1) focuses the alignment: each Gaussian's width is scaled by
1/(0.25 + 0.75 M) at its centre, so high resolution counts inside the mask only; the band
then follows the FSC inside the mask.

--hetero RUN --mask M (conformation to orientation): with a trained heterogeneity run on
the same particles, each particle's conformation (its latent decoded as Gaussians) is
compared with the neutral model inside the mask; the rigid motion minimising the masked
RMSD (weighted Kabsch) becomes a change of pose, so the region of every particle projects
where the neutral region does; focused iterations then refine from these poses.

--patches K (patch-by-patch): after the global iterations the mixture is split into K
patches by k-means, each patch gets a soft spherical mask and its own focused refinement
(--patch-iterations), and the maps are combined into composite.mrc, the mask-weighted
average (the global map fills what no patch covers).

--sym Cn|Dn imposes point-group symmetry in every reconstruction. With --mask or --patches
the particles are symmetry-expanded first (one row per copy, pose A*R_k, as
relion_particle_symmetry_expand), so every copy of the masked region is aligned, and the
final/composite map is re-symmetrised.

Outputs in --out:
  refined.star   the input STAR with poses replaced (all columns kept; the input poses in
                 rlnCryogmmOrig* columns, the final band FRC in rlnCryogmmFrc)
  half1.mrc, half2.mrc, map.mrc, fsc.png (every iteration), report.json (per iteration:
  resolution, median and 90th-percentile pose change, timing, particles/s)
  checkpoint.pt  the run's state after its last complete iteration (--resume continues from it)
  composite.mrc, composite_half1/2.mrc, patches/patch_NN/ (refined.star, mask, maps) with --patches

Several processes or GPUs (torch.distributed; gloo on CPUs, NCCL on GPUs): each rank aligns
its shard of the particles, the mixtures are fitted on rank 0 and broadcast, poses are
gathered and the reconstructions summed across ranks; rank 0 writes the outputs:
  torchrun --nproc_per_node 2 -m cryogmm.cli refine-poses sim/particles.star --out refined
(--device auto gives each rank its own GPU, cuda:LOCAL_RANK, when CUDA is there.)

Precision: --matmul-precision tf32|bf16 lets the projection's matrix products use tensor
cores on GPUs (TF32, or bf16 autocast); FRC, FSC and reconstruction stay float32/float64.

Example:
  cryogmm refine-poses sim/particles.star --iterations 3 --out refined
"""

from __future__ import annotations

from pathlib import Path

from cryogmm.commands import add_force, add_stream_args, check_out
from cryogmm.errors import nonnegative_int, positive_float, positive_int


def add_args(p):
    p.add_argument("star", type=Path, help="particles with starting poses and CTF (STAR or cryoSPARC .cs)")
    p.add_argument("--out", type=Path, required=True, help="output folder")
    p.add_argument("--half-maps", type=Path, nargs=2, metavar=("HALF1", "HALF2"),
                   help="starting half maps (default: reconstructed from the input poses)")
    p.add_argument("--model", type=Path, help="atomic model to seed the mixtures (heavy atoms)")
    p.add_argument("--map", type=Path, help="consensus map to start from (low-passed to --start-res-A, which it needs)")
    p.add_argument("--mask", type=Path, help="focus mask (MRC, 0..1, same box and pixel as the particles)")
    p.add_argument("--hetero", type=Path, metavar="RUN",
                   help="conformation to orientation: a `cryogmm hetero train` run on these particles; with --mask, "
                        "each particle's pose is first changed so its own conformation of the masked region lines "
                        "up with the neutral model, then focused iterations refine from there")
    p.add_argument("--patches", type=nonnegative_int, default=0,
                   help="patch-by-patch: after the global iterations, split the mixture into K patches (k-means), "
                        "refine focused on each patch, and write the mask-weighted composite map (default 0: off)")
    p.add_argument("--patch-iterations", type=positive_int, default=2, help="focused iterations per patch (default 2)")
    p.add_argument("--sym", default="C1", help="point group Cn or Dn (RELION's axes: n-fold along z, D's two-fold "
                   "along x); imposed in reconstruction; with --mask or --patches the particles are "
                   "symmetry-expanded and the composite is re-symmetrised (default C1)")
    p.add_argument("--project-dir", type=Path, help="folder the image paths are relative to")
    p.add_argument("--iterations", type=positive_int, default=5, help="most iterations (default 5; stops early when the FSC stops improving)")
    p.add_argument("--low-res-A", type=positive_float, default=30.0, help="lower bound of the FRC band, Å (default 30)")
    p.add_argument("--start-res-A", type=positive_float, help="upper bound of the first band, Å (default: FSC of the starting halves)")
    p.add_argument("--steps", type=positive_int, default=40, help="Adam steps per particle and iteration (default 40)")
    p.add_argument("--lr-deg", type=positive_float, default=1.0, help="initial rotation step, degrees (default 1.0, cosine decay)")
    p.add_argument("--lr-A", type=positive_float, default=0.3, help="initial shift step, Å (default 0.3)")
    p.add_argument("--n-gaussians", type=positive_int, help="Gaussians per half (default: from volume and resolution, at most --max-gaussians)")
    p.add_argument("--max-gaussians", type=positive_int, default=1000, help="cap on the automatic number (default 1000)")
    p.add_argument("--fit-iterations", type=positive_int, default=300, help="Adam steps fitting each mixture (default 300)")
    p.add_argument("--batch", type=positive_int, default=128, help="particles per batch; memory scales with it (default 128)")
    p.add_argument("--seed", type=nonnegative_int, default=0, help="random seed (default 0)")
    p.add_argument("--matmul-precision", choices=("highest", "tf32", "bf16"), default="highest",
                   help="projection matrix products on GPUs: float32 (highest, default), TF32 or bf16 autocast")
    p.add_argument("--compile", action="store_true",
                   help="build the projection's profile windows with torch.compile (off by default; compiling "
                        "takes up to a minute, then each projection is faster; also CRYOGMM_COMPILE=1)")
    add_stream_args(p)
    add_force(p)
    p.add_argument("--keep-iterations", action="store_true",
                   help="also write the poses after every iteration, iterations/refined_itNNN.star (as RELION's "
                        "run_itNNN_data.star)")
    p.add_argument("--resume", action="store_true",
                   help="continue the run in --out from its checkpoint.pt (written after every iteration)")


def main(args) -> int:
    check_out(args, args.star, args.half_maps, args.model, args.map, args.mask, args.hetero, resumable=True)
    from cryogmm import distributed
    from cryogmm.poses.job import RefineConfig, refine_poses
    from cryogmm.runtime import Progress

    cfg = RefineConfig(star=args.star, out=args.out, half_maps=tuple(args.half_maps) if args.half_maps else None,
                       model=args.model, map=args.map, mask=args.mask, hetero=args.hetero, patches=args.patches,
                       patch_iterations=args.patch_iterations, sym=args.sym, project_dir=args.project_dir, iterations=args.iterations,
                       low_res_A=args.low_res_A, start_res_A=args.start_res_A, steps=args.steps, lr_deg=args.lr_deg,
                       lr_A=args.lr_A, n_gaussians=args.n_gaussians, max_gaussians=args.max_gaussians,
                       fit_iterations=args.fit_iterations, batch=args.batch, seed=args.seed, device=args.device,
                       matmul_precision=args.matmul_precision, compile=args.compile, prefetch=args.prefetch,
                       accumulate=args.accumulate, resume=args.resume,
                       keep_iterations=args.keep_iterations)
    rep = refine_poses(cfg, progress=Progress(bar=distributed.is_main()))
    if not distributed.is_main():
        return 0
    it = rep["iterations"][-1]
    print(f"{rep['n_particles']} particles, {len(rep['iterations'])} iterations -> {args.out}/refined.star; "
          f"FSC 0.143: {rep['resolution_A']:.2f} Å; last pose change median {it['pose_change_deg']['median']:.2f}°")
    return 0
