"""Heterogeneity from an atomic model: per-particle conformations as moved models (VAE).

Subcommands:
  train STAR --model ref.pdb --out RUN   learn a latent space and a decoder that moves the model
  analyze RUN                            latents, PCA trajectories, maps, clusters, segments
  decode RUN --z Z.txt --out DIR          one model per latent row (DIR/models.pdb)

Decoders (--decoder):
  segments       learned segments of the chain, each moved as a rigid body per particle
                 (cryoSPHERE); the segment table comes out of `analyze`
  displacement   an offset per residue Gaussian, held together by 3.8 Å Cα bonds, a
                 side-chain distance limit and a clash term (atomic VAE, Zhong et al.),
                 plus a weak elastic network on neighbour pairs close along the chain
                 (--elastic-weight, --elastic-seq)

The STAR must hold poses (a consensus refinement) and CTF. The model must overlay the
particles: its electron-weighted centre is put at the box centre, or give --map (the
consensus map the model was fitted in) to take the frame from that map's header origin.
Images are Fourier-cropped to --lowpass-A; projections are computed analytically in
Fourier space on the cropped grid, so training runs on a CPU. By default the loss band is
annealed from 8 Å to 4 Å (or the data's Nyquist) over the first half of the epochs and each
particle's latent is polished (10 steps) after training, then read as its posterior mean
over 32 k-means centres of all particles' latents (what the image supports among the states
the data hold, not one of them at random): --lowpass-A 8 --lowpass-start-A 8 --polish-steps 0
--posterior-candidates 0 gives the earlier fixed 8 Å band without either.

train writes RUN/checkpoint.pt after every epoch (continue with --resume), config.json,
loss.png and report.json. analyze writes RUN/analyze/: z.npy, particles_latent.star/.cs
(rlnCryogmmLatent0.. columns), pcN_trajectory.pdb (multi-model), pcN_model_XX.mrc (maps of
the decoded models), pcN_backproj_XX.mrc (back-projection of the particles nearest each
trajectory point), cluster_K.star/.cs, cluster_centers.pdb, latent.png, segments.csv and
segments.pdb (B-factor = segment), report.json; with --truth (a simulation's truth.star)
also the Spearman correlation of PC1 with the true frame and the Cα RMSD of every
particle's decoded model to its true frame.

Several processes or GPUs (torch.distributed; gloo on CPUs, NCCL on GPUs): the training step
is wrapped in DistributedDataParallel, every batch is split among the ranks, gradients are
averaged, and rank 0 writes checkpoints and reports (--resume works with any number):
  torchrun --nproc_per_node 2 -m cryogmm.cli hetero train particles.star --model ref.pdb --out run
(--device auto gives each rank its own GPU, cuda:LOCAL_RANK, when CUDA is there;
--matmul-precision tf32 lets the float32 matrix products use TF32 tensor cores on GPUs.)

Examples:
  cryogmm hetero train particles.star --model ref.pdb --map consensus.mrc --out run --epochs 30
  cryogmm hetero train particles.star --model ref.pdb --decoder displacement --out run2
  cryogmm hetero train particles.star --model ref.pdb --out run --epochs 40 --resume
  cryogmm hetero analyze run --pcs 2 --frames 10 --clusters 4
  cryogmm hetero decode run --z run/analyze/pc1_z.txt --out pc1
"""

from __future__ import annotations

import argparse
from pathlib import Path

from cryogmm.commands import DEVICE_HELP, add_dist_args, add_force, check_out
from cryogmm.errors import (
    device_name,
    nonnegative_float,
    nonnegative_int,
    positive_float,
    positive_int,
)

MODEL_SUFFIXES = (".pdb", ".cif", ".mmcif", ".ent")

TRAIN_HELP = """Train the VAE on particles with poses and CTF: an encoder maps each image to a latent
coordinate, a decoder moves the reference model (rigid segments or per-Gaussian offsets),
and the moved model's CTF-modulated projection is compared with the image.

Writes RUN/checkpoint.pt after every epoch (continue with --resume), config.json, loss.png
and report.json. An existing non-empty RUN is refused unless --resume or --force.

Examples:
  cryogmm hetero train particles.star --model ref.pdb --map consensus.mrc --out run --epochs 30
  cryogmm hetero train particles.star --model ref.pdb --decoder displacement --out run2
  cryogmm hetero train particles.star --model ref.pdb --out run --epochs 40 --resume
"""

ANALYZE_HELP = """Analyze a trained run: every particle's latent, PCA trajectories as multi-model PDBs and
maps, k-means clusters as STAR/.cs subsets, the segment table, and with --truth (a
simulation's truth.star) the figures against the true conformations.

Writes RUN/analyze/ (or --out): z.npy, particles_latent.star/.cs (with per-particle fit
scores: rlnCryogmmFitScore, rlnCryogmmFitT, rlnCryogmmFitResidual, the junk score
rlnCryogmmFitZ, rlnCryogmmLatentOutlier),
pcN_trajectory.pdb, pcN_model_XX.mrc, pcN_backproj_XX.mrc, cluster_K.star/.cs,
cluster_centers.pdb, latent.png, landscape.png/.npz (free energy in kT over PC1/PC2, a
profile for a 1-D latent; cluster occupancies with errors from the half sets in
report.json), segments.csv, segments.pdb, report.json; with --junk Z kept.star/.cs,
rejected.star/.cs, kept_map.mrc and rejected_map.mrc.

Examples:
  cryogmm hetero analyze run --pcs 2 --frames 10 --clusters 4
  cryogmm hetero analyze run --truth sim/truth.star --out run_vs_truth
  cryogmm hetero analyze run --junk 3
"""

DECODE_HELP = """Decode latent coordinates of a trained run into models: one MODEL of the multi-model PDB
per latent row (text, whitespace separated, or .npy of shape [K, zdim]).

Writes OUT/models.pdb and OUT/report.json. (An --out ending in .pdb or .cif, the old form,
still writes that one file; it is deprecated.)

Example:
  cryogmm hetero decode run --z run/analyze/pc1_z.txt --out pc1
"""


def add_args(p):
    sub = p.add_subparsers(dest="action", metavar="<train|analyze|decode>", required=True)
    raw = argparse.RawDescriptionHelpFormatter
    t = sub.add_parser("train", help="train the VAE on particles with poses and CTF", description=TRAIN_HELP,
                       formatter_class=raw)
    t.add_argument("star", type=Path, help="particles (STAR or .cs) with poses and CTF")
    t.add_argument("--model", type=Path, required=True, help="reference atomic model (PDB/mmCIF)")
    t.add_argument("--out", type=Path, required=True, help="run folder")
    t.add_argument("--map", type=Path, help="consensus map (MRC) whose header origin places the model in the box")
    t.add_argument("--decoder", choices=("segments", "displacement"), default="segments",
                   help="segments (rigid bodies) or displacement (per-Gaussian offsets); default segments")
    t.add_argument("--segments", type=positive_int, default=20, help="number of segments (default 20)")
    t.add_argument("--per-chain", action="store_true", help="segments never span two chains")
    t.add_argument("--zdim", type=positive_int, default=8, help="latent dimensions (default 8)")
    t.add_argument("--epochs", type=positive_int, default=20, help="epochs (default 20)")
    t.add_argument("--batch", type=positive_int, default=64, help="particles per batch (default 64)")
    t.add_argument("--lowpass-A", type=positive_float, metavar="A",
                   help="highest resolution used, Å (default 4, or the data's Nyquist, 2 x pixel size, if coarser)")
    t.add_argument("--lowpass-start-A", type=positive_float, metavar="A",
                   help="resolution annealing: the loss band starts at this resolution and reaches --lowpass-A "
                        "over --anneal-epochs (default 8 when coarser than --lowpass-A; equal to --lowpass-A: "
                        "no annealing)")
    t.add_argument("--anneal-epochs", type=positive_int, help="epochs of the annealing (default half of --epochs)")
    t.add_argument("--polish-steps", type=nonnegative_int, default=10,
                   help="per-particle latent polish after training (MAP z, writes latents_polished.npy; "
                        "default 10, 0: none)")
    t.add_argument("--posterior-candidates", type=nonnegative_int, default=32, metavar="K",
                   help="read each particle's latent as its posterior mean over K k-means centres of all "
                        "particles' latents (writes latents_posterior.npy; K projections per particle; default "
                        "32, 0: the polished latents)")
    t.add_argument("--gaussians", choices=("ca", "residue2"), default="ca",
                   help="coarse model: one Gaussian per residue (ca) or backbone + side chain (residue2)")
    t.add_argument("--draw", choices=("coarse", "atoms"), default="coarse",
                   help="what the images are compared with: the coarse model (default) or every atom of the "
                        "reference moved by the deformation of its coarse Gaussian (the images' own detail: finer "
                        "conformational order, several times the work)")
    t.add_argument("--loss", choices=("gaussian", "correlation"), default="gaussian",
                   help="Gaussian likelihood (atomic VAE) or correlation (cryoSPHERE); default gaussian")
    t.add_argument("--kl-warmup", type=nonnegative_int, default=5, help="epochs over which the KL weight ramps to --beta")
    t.add_argument("--beta", type=nonnegative_float, default=1.0, help="final KL weight (default 1)")
    t.add_argument("--lr", type=positive_float, default=1e-3, help="Adam learning rate (default 1e-3)")
    t.add_argument("--hidden", type=positive_int, default=256, help="width of the networks (default 256)")
    t.add_argument("--temperature", type=positive_float, default=0.1, help="segment softmax temperature (default 0.1)")
    t.add_argument("--bond-weight", type=nonnegative_float, default=1.0, help="weight of the 3.8 Å Cα bond restraint")
    t.add_argument("--clash-weight", type=nonnegative_float, default=1.0, help="weight of the clash restraint")
    t.add_argument("--sidechain-weight", type=nonnegative_float, default=1.0, help="weight of the side-chain distance restraint")
    t.add_argument("--elastic-weight", type=nonnegative_float,
                   help="weight of the elastic network on neighbour pairs (default 0.1 displacement, 0 segments)")
    t.add_argument("--elastic-seq", type=nonnegative_int, default=4,
                   help="elastic pairs at most this many residues apart along the chain (0: all neighbours; "
                        "default 4: local geometry held, hinges free)")
    t.add_argument("--project-dir", type=Path, help="folder that image paths in STAR are relative to")
    t.add_argument("--max-particles", type=positive_int, help="use only the first N particles")
    t.add_argument("--max-memory-gb", type=positive_float,
                   help="host memory budget per process: particles are held in memory when they fit it, streamed "
                        "from disk batch by batch otherwise (default: a quarter of the machine's memory)")
    held = t.add_mutually_exclusive_group()
    held.add_argument("--in-memory", dest="load", action="store_const", const="memory", default="auto",
                      help="hold every cropped particle in memory (refused when --max-memory-gb cannot hold them)")
    held.add_argument("--stream", dest="load", action="store_const", const="stream",
                      help="always stream the particles from disk (memory independent of their number)")
    t.add_argument("--cache-dir", type=Path, metavar="DIR",
                   help="streamed particles: keep their on-disk cache (cropped transforms, CTFs, encoder inputs, "
                        "written once, read per batch) in DIR and reuse it in later runs on the same particles and "
                        "crop (default: RUN/particle_cache, removed when training ends)")
    t.add_argument("--no-cache", dest="cache", action="store_false",
                   help="stream without a cache: read and crop every batch's images from the stacks every epoch")
    t.add_argument("--resume", action="store_true", help="continue from RUN/checkpoint.pt up to --epochs")
    t.add_argument("--halves", action="store_true",
                   help="one network per half set (rlnRandomSubset) into RUN/half1 and RUN/half2, for the per-state "
                        "half-set cross-validation of `analyze`")
    t.add_argument("--seed", type=nonnegative_int, default=0, help="random seed (default 0)")
    add_force(t)
    t.add_argument("--matmul-precision", choices=("highest", "tf32"), default="highest",
                   help="float32 matrix products on GPUs: float32 (highest, default) or TF32 tensor cores")
    add_dist_args(t)

    a = sub.add_parser("analyze", help="latents, trajectories, maps, clusters, segments", description=ANALYZE_HELP,
                       formatter_class=raw)
    a.add_argument("run", type=Path, help="run folder of `hetero train`")
    a.add_argument("--out", type=Path, help="output folder (default RUN/analyze)")
    a.add_argument("--pcs", type=positive_int, default=2, help="principal components to traverse (default 2)")
    a.add_argument("--frames", type=positive_int, default=10, help="points along each trajectory (default 10)")
    a.add_argument("--clusters", type=positive_int, default=4, help="k-means clusters in latent space (default 4)")
    a.add_argument("--no-backproject", action="store_true", help="skip the back-projected maps")
    a.add_argument("--truth", type=Path, help="truth.star of a simulation: figures against the true frames")
    a.add_argument("--truth-models", type=Path, help="the simulation's frames (default truth_models.pdb beside --truth)")
    a.add_argument("--star", type=Path, help="particles, when they moved since training")
    a.add_argument("--project-dir", type=Path, help="folder that image paths in STAR are relative to")
    a.add_argument("--junk", type=positive_float, metavar="Z",
                   help="reject particles whose image fits its decoded model worse than the bulk by more than Z "
                        "robust SDs (e.g. 3; the junk score rlnCryogmmFitZ: too little of the model in the image, "
                        "too much signal the model leaves unexplained, or both): kept.star/.cs, rejected.star/.cs "
                        "and a map of each")
    a.add_argument("--crossval-resolution-A", type=positive_float, metavar="A",
                   help="runs trained with --halves: mean map-model FSC of the per-state cross-validation over shells "
                        "to this resolution (default the run's --lowpass-A)")
    a.add_argument("--seed", type=nonnegative_int, default=0, help="random seed (default 0)")
    a.add_argument("--device", type=device_name, default="auto", help=DEVICE_HELP)
    add_force(a)

    d = sub.add_parser("decode", help="one model per latent row", description=DECODE_HELP, formatter_class=raw)
    d.add_argument("run", type=Path, help="run folder of `hetero train`")
    d.add_argument("--z", type=Path, required=True, help="latent rows: text (whitespace separated) or .npy [K, zdim]")
    d.add_argument("--out", type=Path, required=True, help="output folder: models.pdb (one MODEL per latent row), report.json")
    d.add_argument("--device", type=device_name, default="auto", help=DEVICE_HELP)
    add_force(d)


def main(args) -> int:
    from cryogmm.hetero import analyze as hetero_analyze
    from cryogmm.hetero import config as hetero_config
    from cryogmm.hetero import run as hetero_run
    from cryogmm.hetero import train as hetero_train
    from cryogmm.runtime import Progress, pick_device

    if args.action == "train":
        check_out(args, args.star, args.model, args.map, resumable=True)
        cfg = hetero_config.HeteroConfig(
            star=args.star, model=args.model, out=args.out, map=args.map, decoder=args.decoder,
            segments=args.segments, per_chain=args.per_chain, zdim=args.zdim, epochs=args.epochs, batch=args.batch,
            lowpass_A=args.lowpass_A, lowpass_start_A=args.lowpass_start_A, anneal_epochs=args.anneal_epochs,
            polish_steps=args.polish_steps, posterior_candidates=args.posterior_candidates, gaussians=args.gaussians,
            draw=args.draw, loss=args.loss, kl_warmup=args.kl_warmup,
            beta=args.beta, lr=args.lr, hidden=args.hidden, temperature=args.temperature,
            bond_weight=args.bond_weight, clash_weight=args.clash_weight, sidechain_weight=args.sidechain_weight,
            elastic_weight=args.elastic_weight, elastic_seq=args.elastic_seq,
            project_dir=args.project_dir, max_particles=args.max_particles, resume=args.resume, seed=args.seed,
            device=args.device, matmul_precision=args.matmul_precision, load=args.load,
            max_memory_gb=args.max_memory_gb, cache=args.cache, cache_dir=args.cache_dir,
        )
        from cryogmm import distributed

        if args.halves:
            from cryogmm.hetero import crossval

            rep = crossval.train_halves(cfg, progress=Progress(bar=distributed.is_main()))
        else:
            rep = hetero_train.train_hetero(cfg, progress=Progress(bar=distributed.is_main()))
        if not distributed.is_main():
            return 0
        if args.halves:
            print(f"trained one network per half set ({rep['n_half'][0]} and {rep['n_half'][1]} particles, "
                  f"{rep['epochs']} epochs); runs in {args.out}/half1 and {args.out}/half2")
            return 0
        last = rep["history"][-1]
        print(f"trained {rep['epochs']} epochs on {rep['n_particles']} particles ({rep['images_per_s']:.0f} images/s); "
              f"data term {last['data']:.1f}, KL {last['kl']:.2f}; run in {args.out}")
    elif args.action == "analyze":
        if args.out is None:
            args.out = args.run / "analyze"
        check_out(args, args.star, args.truth, args.truth_models, others=[args.run])
        cfg = hetero_analyze.AnalyzeConfig(run=args.run, out=args.out, pcs=args.pcs, frames=args.frames,
                                   clusters=args.clusters, backproject=not args.no_backproject, truth=args.truth,
                                   truth_models=args.truth_models, star=args.star, project_dir=args.project_dir,
                                   seed=args.seed, device=args.device, junk=args.junk,
                                   crossval_resolution_A=args.crossval_resolution_A)
        rep = hetero_analyze.analyze_hetero(cfg, progress=Progress(bar=True))
        msg = f"analyzed {rep['n_particles']} particles into {args.out}"
        if "crossval" in rep:
            cv = rep["crossval"]
            msg += (f"; half-set cross-validation of {sum('skipped' not in s for s in cv['states'])} states, "
                    f"flagged: {cv['flagged_states'] or 'none'}")
        if "junk" in rep:
            msg += f"; rejected {rep['junk']['rejected']['n']} as junk (fit z > {args.junk:g})"
        t = rep.get("truth")
        if t:
            msg += f"; |Spearman(PC1, true frame)| = {t['abs_spearman_pc1_vs_frame']:.3f}"
            if "median_ca_rmsd_decoded_vs_true_A" in t:
                msg += f", median Cα RMSD to truth {t['median_ca_rmsd_decoded_vs_true_A']:.2f} Å"
        print(msg)
    else:
        legacy = args.out.suffix.lower() in MODEL_SUFFIXES  # deprecated: --out FILE.pdb
        check_out(args, args.z, folder=not legacy, others=[args.run])
        dev = pick_device(args.device)
        if legacy:
            rep = hetero_run.decode_hetero(args.run, args.z, args.out, device=dev)
            print(f"wrote {rep['models']} models to {args.out}")
            return 0
        from cryogmm.io.outputs import OutputDir, write_report

        with OutputDir(args.out) as od:
            rep = hetero_run.decode_hetero(args.run, args.z, od.path("models.pdb"), device=dev)
            write_report(od.path("report.json"), {"job": "hetero decode", "run": str(args.run), "z": str(args.z),
                                                  "models": rep["models"], "outputs": ["models.pdb", "report.json"]})
        print(f"wrote {rep['models']} models to {args.out}/models.pdb")
    return 0
