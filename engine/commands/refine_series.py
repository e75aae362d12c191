"""Build an atomic model series from a series of maps: one network, latent -> model.

A small network maps a latent coordinate to the model's coordinates (rigid motions of
k-means patches blended per residue, plus per-atom residuals). It is trained on all maps at
once: for each map, -similarity(model(z_i + noise), map_i) + w * geometry (the restraints of
refine-model, Chen's automatic weight), plus geometry-only rounds at random latent points so
frames between the maps stay clean. Capture range: a curriculum along the latent first (the
map the starting model fits best, then outward, each map fitted by refine-model warm-started
from its neighbour's model; --capture-steps), to which the network is fitted before its map
training (--no-capture: the network alone, on blurred maps first). Every output frame gets a
short geometry polish tethered to the network's frame, then a Ramachandran repair (peptide
turns, the tether released around residues still outliers) and rotamer outliers rebuilt.

Map similarity (--similarity): fsc by default, as in refine-model (mean FSC of volumes up to
the resolution); frc, relative-entropy, cross-correlation or inner-product.

Latent (--latent): one row per map, any width (e.g. cryogmm hetero analyze's z of each
map's particles). Default: the maps' order spread over [0, 1]. Frames are placed evenly by
arc length along the path through the maps' latents, in --maps order.

Outputs in --out:
  series.pdb        --frames models (MODEL records) evenly along the latent path
  frame_XX.pdb      the same frames, one file each
  map_XX.pdb        the frame at each map's own latent
  network.pt        the network's weights and the latents
  report.json       per frame: geometry (bond/angle RMSZ, Rama, rotamer, clashscore...) and
                    the map CC with its two neighbouring maps; per map: CC, FSC 0.5 and
                    Q-score of its frame and of the start (and Cα RMSD with --references);
                    measured on the frame_XX.pdb and map_XX.pdb files as written
  checkpoint.pt     while it runs: the state after the last captured model, prefit, training
                    phase or polished frame (removed at the end); after a kill, --resume
                    continues from it and ends with the same files as an uninterrupted run

Example:
  cryogmm refine-series open.pdb --maps m01.mrc m02.mrc m03.mrc --resolution 4 --frames 20 --out series
"""

from __future__ import annotations

from pathlib import Path

from cryogmm.commands import add_device, add_force, add_similarity, check_out
from cryogmm.errors import nonnegative_float, nonnegative_int, positive_float, positive_int


def add_args(p):
    p.add_argument("model", type=Path, help="starting PDB or mmCIF model (in the maps' frame)")
    p.add_argument("--maps", type=Path, nargs="+", required=True,
                   help="MRC maps of the series, in trajectory order (same box and sampling)")
    p.add_argument("--latent", type=Path, help="text file: one latent row per map (default: map order on [0, 1])")
    p.add_argument("--resolution", type=positive_float, required=True, help="map resolution in Å")
    p.add_argument("--frames", type=positive_int, default=20, help="models in series.pdb (default 20)")
    p.add_argument("--out", type=Path, required=True, help="output folder")
    add_similarity(p)
    p.add_argument("--steps", type=positive_int, default=60, help="optimiser steps per phase (default 60)")
    p.add_argument("--capture-steps", type=positive_int, default=30,
                   help="refine-model steps per phase in the per-map capture curriculum (default 30)")
    p.add_argument("--no-capture", action="store_true",
                   help="skip the per-map capture: the network alone, blurred maps and a latent curriculum")
    p.add_argument("--patches", type=positive_int, default=24, help="k-means patches of the coarse motion (default 24)")
    p.add_argument("--geometry-weight", type=nonnegative_float, default=1.0,
                   help="multiplies the automatic geometry weight (default 1)")
    p.add_argument("--polish-iters", type=nonnegative_int, default=40,
                   help="geometry polish iterations per output frame (default 40; 0: none)")
    p.add_argument("--references", type=Path, nargs="+",
                   help="one model per map to report the Cα RMSD of each map's frame against (benchmarks)")
    p.add_argument("--na-pairs", action="store_true", help="restrain the nucleic acids' base pairs (Watson-Crick, G-U wobble: H-bond distances, coplanar bases) and base stacks found in the start model; how many is in report.json")
    p.add_argument("--backbone-library", choices=("engh-huber", "cdl"), default="engh-huber", help="protein backbone bond/angle targets: engh-huber (default; fixed Engh & Huber targets, as the MolProbity judge in benchmarks/ scores them) or cdl (the conformation-dependent library, Berkholz et al. 2009, at each residue's phi/psi, as Phenix uses by default)")
    p.add_argument("--restraints", type=Path, action="append", default=[], metavar="FILE.cif", help="monomer dictionary (mmCIF, as Refmac, Phenix and Servalcat read) for residues the shipped library lacks or that you restrain differently; repeatable")
    p.add_argument("--seed", type=nonnegative_int, default=0, help="random seed (default 0)")
    add_force(p)
    add_device(p)
    p.add_argument("--resume", action="store_true",
                   help="continue a killed run from OUT/checkpoint.pt (same settings and inputs)")


def main(args) -> int:
    check_out(args, args.model, args.maps, args.latent, args.references, args.restraints, resumable=True)
    from cryogmm.model.series.config import RefineSeriesConfig
    from cryogmm.model.series.job import refine_series
    from cryogmm.runtime import Progress

    cfg = RefineSeriesConfig(model=args.model, maps=tuple(args.maps), out=args.out, resolution_A=args.resolution,
                             restraints=tuple(args.restraints), backbone_library=args.backbone_library, na_pairs=args.na_pairs,
                             frames=args.frames, latent=args.latent, similarity=args.similarity, steps=args.steps,
                             n_patches=args.patches, geometry_weight=args.geometry_weight,
                             polish_iters=args.polish_iters, capture=not args.no_capture,
                             capture_steps=args.capture_steps,
                             references=None if args.references is None else tuple(args.references),
                             seed=args.seed, device=args.device)
    rep = refine_series(cfg, progress=Progress(bar=True), resume=args.resume)
    print(f"{'frame':>5s} {'bondZ':>6s} {'angZ':>6s} {'Rama%':>6s} {'rot%':>6s} {'clash':>6s}  CC(neighbours)")
    for r in rep["per_frame"]:
        cc = " ".join(f"{c:.3f}" for c in r["map_cc_neighbours"])
        print(f"{r['frame']:5d} {r['bond_rmsz']:6.2f} {r['angle_rmsz']:6.2f} {r['rama_outlier_pct']:6.2f} "
              f"{r['rotamer_outlier_pct']:6.2f} {r['clashscore']:6.2f}  {cc}")
    for i, r in enumerate(rep["per_map"]):
        extra = f"  Cα RMSD {r['ca_rmsd_to_reference_A']:.2f} Å" if "ca_rmsd_to_reference_A" in r else ""
        print(f"map {i + 1}: CC {r['start']['map_cc_mask']:.3f} -> {r['frame']['map_cc_mask']:.3f}{extra}")
    print(f"all frames pass the geometry goals: {rep['all_frames_pass_goals']}; "
          f"{rep['seconds']['total']:.0f} s -> {args.out}/series.pdb")
    return 0
