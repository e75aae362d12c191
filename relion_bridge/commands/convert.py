"""Convert particle metadata between RELION STAR (3.0, 3.1+) and cryoSPARC .cs.

The output format follows OUT's suffix (.star or .cs). Every column of the input is kept
where the output format can hold it; poses, shifts and CTF are converted exactly
(conventions: see `cryogmm.bridge.conventions`).

examples:
  cryogmm convert J24/J24_001_particles.cs particles.star          # cryoSPARC -> RELION 3.1
  cryogmm convert run_data.star run_data_30.star --star-version 3.0
  cryogmm convert particles.star particles.cs                       # RELION -> cryoSPARC

Image paths are written as they are in the input; relative paths are relative to the
project folder (--project-dir; default: the STAR file's folder, or for a .cs inside a
J<n>/ job folder, that folder's parent). Nothing is written if anything goes wrong; an
existing OUT is replaced only with --force, and OUT may never be IN.
"""

from __future__ import annotations

from pathlib import Path


def add_args(parser) -> None:
    parser.add_argument("input", metavar="IN", help="particles: .star (RELION 3.0/3.1/4/5) or .cs (cryoSPARC)")
    parser.add_argument("output", metavar="OUT", help="output file: .star or .cs")
    parser.add_argument(
        "--star-version",
        choices=["3.0", "3.1"],
        default="3.1",
        help="STAR flavour to write: 3.1 (optics table, origins in Å; read by RELION 3.1, 4, 5) "
        "or 3.0 (one table, origins in pixels) (default: 3.1)",
    )
    parser.add_argument("--project-dir", metavar="D", default=None, help="folder that image paths are relative to")
    parser.add_argument("--force", action="store_true", help="replace OUT if it exists (refused without it)")


def main(args) -> int:
    from cryogmm.bridge.io import read_particles, write_particles
    from cryogmm.errors import OptionError
    from cryogmm.io.outputs import check_output

    out = Path(args.output)
    if out.suffix.lower() not in (".star", ".cs"):
        raise OptionError("OUT", f"{out}: expected a .star or .cs file name")
    check_output(out, inputs=[args.input], force=args.force, folder=False, option="OUT")
    table = read_particles(args.input, project_dir=args.project_dir)
    write_particles(table, out, star_version=args.star_version)
    kind = f"RELION {args.star_version} STAR" if out.suffix.lower() == ".star" else "cryoSPARC .cs"
    print(f"wrote {table.n} particles ({len(table.optics)} optics group(s)) to {out} ({kind})")
    return 0
