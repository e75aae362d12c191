"""Reconstruct a map from particles with poses and CTF (direct Fourier inversion).

Gold-standard halves from rlnRandomSubset (assigned at random, seeded, when absent), FSC
between them (unmasked and with a soft spherical mask), and the final map from all
particles, Wiener-filtered by the SNR the FSC implies. Images are read lazily batch by
batch (the next batch in a background thread, --prefetch), so memory stays bounded whatever
the number of particles; --max-memory-gb lowers the batch until the host memory estimate fits.

Several processes or GPUs (torch.distributed; gloo on CPUs, NCCL on GPUs): each rank
reconstructs its shard of the particles, the Fourier sums are added across ranks (float64)
and rank 0 writes the outputs:
  torchrun --nproc_per_node 2 -m cryogmm.cli reconstruct sim/particles.star --out rec
(python -m torch.distributed.run is the same launcher; --device auto gives each rank its
own GPU, cuda:LOCAL_RANK, when CUDA is there.)

Outputs in --out: map.mrc, half1.mrc, half2.mrc, fsc.png, report.json (resolution_A is
the masked FSC = 0.143 resolution).

Example:
  cryogmm reconstruct sim/particles.star --out rec
"""

from __future__ import annotations

from pathlib import Path

from cryogmm.commands import add_force, add_stream_args, check_out
from cryogmm.errors import nonnegative_int, positive_float, positive_int


def add_args(p):
    p.add_argument("star", type=Path, help="particles STAR (RELION 3.0/3.1+) or cryoSPARC .cs")
    p.add_argument("--out", type=Path, required=True, help="output folder")
    p.add_argument("--project-dir", type=Path, help="folder the image paths are relative to (default: the STAR's)")
    p.add_argument("--no-ctf", action="store_true", help="images are not CTF-modulated: do not correct")
    p.add_argument("--no-wiener", action="store_true", help="final map without the FSC-based Wiener filter")
    p.add_argument("--reg", type=positive_float, default=1e-3,
                   help="regularisation: fraction of each shell's mean CTF^2 weight added to it (default 1e-3)")
    p.add_argument("--mask-radius-A", type=positive_float, help="radius of the soft spherical FSC mask (default: box/2 - 4 px)")
    p.add_argument("--batch", type=positive_int, default=256, help="particles per batch (default 256)")
    p.add_argument("--seed", type=nonnegative_int, default=0, help="seed for half-set assignment when the STAR has none")
    p.add_argument("--max-memory-gb", type=positive_float,
                   help="host memory budget in GB: the batch is lowered until the job's estimate fits")
    add_stream_args(p)
    add_force(p)


def main(args) -> int:
    check_out(args, args.star)
    from cryogmm import distributed
    from cryogmm.recon.job import ReconstructConfig, reconstruct
    from cryogmm.runtime import Progress

    cfg = ReconstructConfig(star=args.star, out=args.out, project_dir=args.project_dir, batch=args.batch,
                            reg=args.reg, wiener=not args.no_wiener, ctf=not args.no_ctf,
                            mask_radius_A=args.mask_radius_A, seed=args.seed, device=args.device,
                            max_memory_gb=args.max_memory_gb, prefetch=args.prefetch,
                            accumulate=args.accumulate)
    rep = reconstruct(cfg, progress=Progress(bar=distributed.is_main()))
    if not distributed.is_main():
        return 0
    print(f"{rep['n_particles']} particles -> {args.out}/map.mrc; FSC 0.143: {rep['resolution_A']:.2f} Å "
          f"(0.5: {rep['resolution_0.5_A']:.2f} Å)")
    return 0
