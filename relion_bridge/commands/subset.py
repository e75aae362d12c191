"""Write a subset of particles (by index list, label, or latent region) as STAR or .cs.

Pick particles from IN by exactly one of:
  --indices F           a text file of 0-based particle indices (or a .npy array);
                        particles are written in the file's order
  --label L             particles whose label column equals L (repeat for several labels)
  --latent-box D:LO:HI  particles with LO <= latent coordinate D <= HI (repeat for a box
                        in several dimensions); latent coordinates are the columns
                        rlnCryogmmLatent0, 1, ... that cryogmm writes

The subset keeps every column of IN. OUT's suffix picks the format (.star or .cs).

examples:
  cryogmm subset particles_with_z.star --latent-box 0:-1:0.5 --latent-box 1:0:2 --out state_A.star
  cryogmm subset particles_with_labels.cs --label 3 --out cluster3.cs
  cryogmm subset run_data.star --label 2 --label-column rlnClassNumber --out class2.star
  cryogmm subset run_data.star --indices keep.txt --out kept.star --star-version 3.0
"""

from __future__ import annotations

from pathlib import Path


def _latent_box(text: str):
    import argparse
    import math

    parts = text.split(":")
    try:
        d, lo, hi = int(parts[0]), float(parts[1]), float(parts[2])
        if len(parts) != 3:
            raise ValueError
    except (ValueError, IndexError):
        raise argparse.ArgumentTypeError(f"expected DIM:LO:HI (e.g. 0:-1.5:2), got {text!r}") from None
    if d < 0 or math.isnan(lo) or math.isnan(hi) or lo > hi:
        raise argparse.ArgumentTypeError(f"expected DIM >= 0 and LO <= HI (numbers), got {text!r}")
    return d, lo, hi


def add_args(parser) -> None:
    parser.add_argument("input", metavar="IN", help="particles: .star or .cs")
    how = parser.add_mutually_exclusive_group(required=True)
    how.add_argument("--indices", metavar="F", help="file of 0-based particle indices (text or .npy)")
    how.add_argument("--label", metavar="L", action="append", help="label value to keep (repeatable)")
    how.add_argument(
        "--latent-box", metavar="D:LO:HI", action="append", type=_latent_box,
        help="keep LO <= latent dimension D <= HI (repeatable, one per dimension)",
    )
    parser.add_argument(
        "--label-column", metavar="C", default="rlnCryogmmLabel",
        help="column holding the labels (default: rlnCryogmmLabel; e.g. rlnClassNumber)",
    )
    parser.add_argument("--out", required=True, metavar="OUT", help="output file: .star or .cs")
    parser.add_argument(
        "--star-version", choices=["3.0", "3.1"], default=None,
        help="STAR flavour to write (default: the input's; 3.1 for a .cs input)",
    )
    parser.add_argument("--project-dir", metavar="D", default=None, help="folder that image paths are relative to")
    parser.add_argument("--force", action="store_true", help="replace OUT if it exists (refused without it)")


def main(args) -> int:
    from cryogmm.bridge.io import read_particles, write_particles
    from cryogmm.bridge.results import read_index_file, select_indices, select_label, select_latent_box
    from cryogmm.errors import OptionError
    from cryogmm.io.outputs import check_output

    out = Path(args.out)
    if out.suffix.lower() not in (".star", ".cs"):
        raise OptionError("--out", f"{out}: expected a .star or .cs file name")
    check_output(out, inputs=[args.input, args.indices], force=args.force, folder=False)
    table = read_particles(args.input, project_dir=args.project_dir)
    if args.indices is not None:
        sub = select_indices(table, read_index_file(args.indices, table.n))
    elif args.label is not None:
        sub = select_label(table, args.label, column=args.label_column)
    else:
        box = {}
        for d, lo, hi in args.latent_box:
            if d in box:
                raise OptionError("--latent-box", f"dimension {d} given twice")
            box[d] = (lo, hi)
        sub = select_latent_box(table, box)
    if sub.n == 0:
        raise OptionError("subset", f"no particle of {args.input} matches: nothing written")
    write_particles(sub, out, star_version=args.star_version or table.layout.version)
    print(f"wrote {sub.n} of {table.n} particles to {out}")
    return 0
