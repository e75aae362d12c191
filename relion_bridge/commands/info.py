"""Summarise a particle file (.star or .cs): counts, optics groups, pixel sizes, box, columns.

Works on any STAR file: for one that holds no particles (postprocess, optimiser, model,
micrograph lists) it says what it looks like and lists its blocks.

examples:
  cryogmm info Refine3D/job012/run_data.star
  cryogmm info J24/J24_001_particles.cs --project-dir /data/P12 --check-images
"""

from __future__ import annotations

from pathlib import Path


def add_args(parser) -> None:
    parser.add_argument("input", metavar="IN", help=".star or .cs file")
    parser.add_argument("--project-dir", metavar="D", default=None, help="folder that image paths are relative to")
    parser.add_argument(
        "--check-images", action="store_true",
        help="also open every particle stack's header: do the paths resolve, do the stacks hold "
        "enough images of the right size?",
    )


def _fmt(values) -> str:
    import numpy as np

    u = np.unique(np.asarray(values))
    shown = ", ".join(f"{v:g}" if isinstance(v, (float, np.floating)) else str(v) for v in u[:8])
    return shown + (f", ... ({len(u)} distinct)" if len(u) > 8 else "")


def describe(table) -> list[str]:
    """Lines describing a ParticleTable."""
    import numpy as np

    lines = [f"particles:      {table.n}"]
    if table.source is not None:
        kind = "cryoSPARC .cs" if table.source.suffix == ".cs" else f"RELION {table.layout.version} STAR"
        lines.insert(0, f"file:           {table.source} ({kind})")
    lines.append(f"optics groups:  {len(table.optics)}")
    for label, name in (
        ("rlnImagePixelSize", "pixel size (Å)"),
        ("rlnImageSize", "box (px)"),
        ("rlnVoltage", "voltage (kV)"),
        ("rlnSphericalAberration", "Cs (mm)"),
        ("rlnAmplitudeContrast", "amp. contrast"),
    ):
        if label in table.optics.columns:
            lines.append(f"{name + ':':<16}{_fmt(table.optics[label].to_numpy())}")
    lines.append(f"poses:          {'yes' if table.has_poses else 'no'}")
    lines.append(f"CTF:            {'yes' if table.has_ctf else 'no'}")
    h = table.half_set
    if (h > 0).any():
        lines.append(f"half sets:      1: {int((h == 1).sum())}, 2: {int((h == 2).sum())}")
    if "rlnImageName" in table.particles.columns and table.n:
        codes = np.unique(table.particles["rlnImageName"].astype(str).str.partition("@")[2].to_numpy())
        lines.append(f"stacks:         {len(codes)}")
    lines.append(f"columns ({table.particles.shape[1]}): {', '.join(map(str, table.particles.columns))}")
    lines.append(f"optics columns: {', '.join(map(str, table.optics.columns))}")
    if table.cs_fields is not None:
        prefixes = sorted({f.split('/')[0] for f in table.cs_fields})
        lines.append(f"cs fields ({len(table.cs_fields)}): groups {', '.join(prefixes)}")
    return lines


def main(args) -> int:
    import pandas as pd

    from cryogmm.bridge.io import describe_star_blocks, read_particles
    from cryogmm.bridge.star import read_star_blocks
    from cryogmm.errors import StarError

    path = Path(args.input)
    try:
        table = read_particles(path, project_dir=args.project_dir)
    except StarError as e:
        if path.suffix.lower() != ".star" or "no particle table" not in str(e):
            raise
        blocks = read_star_blocks(path)
        print(f"file:           {path} (STAR, {describe_star_blocks(blocks)}; no particles)")
        for name, b in blocks.items():
            if isinstance(b, pd.DataFrame):
                print(f"data_{name}: loop, {len(b)} rows x {b.shape[1]} columns: {', '.join(b.columns[:12])}"
                      + (", ..." if b.shape[1] > 12 else ""))
            else:
                print(f"data_{name}: {len(b)} values: {', '.join(list(b)[:12])}" + (", ..." if len(b) > 12 else ""))
        return 0
    lines = describe(table)
    if args.check_images:
        from cryogmm.bridge.images import ImageSource

        src = ImageSource.from_table(table)
        lines.append(f"images:         OK ({src.n} images of {src.box}x{src.box} px found)")
    print("\n".join(lines))
    return 0
