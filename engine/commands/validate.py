"""Validate an atomic model: geometry, Ramachandran, rotamers, clashes, and fit to a map.

Figures (all in report.json; the main ones printed):
  bond/angle RMSZ and |z| > 4 outliers   against the CCP4 monomer library (Engh & Huber),
                                          the protein backbone against the CDL at the
                                          model's phi/psi (--backbone-library)
  planarity, chirality, cis non-Pro       least-squares planes, signed chiral volumes
  Ramachandran favoured/allowed/outlier % Top8000 contours (2% favoured; MolProbity's
                                          class-specific allowed levels), plot in
                                          ramachandran.png
  rotamer outliers %                      below the Top8000 0.3% contour
  clashscore                              overlaps >= 0.4 Å per 1000 atoms, riding H added,
                                          probe contact radii, H-bond relief
  Cβ deviations                           > 0.25 Å from the ideal Cβ
  with --map: map CC (voxels within 3 Å of atoms), map-model FSC (0.5), Q-score (mean
  and per residue; Pintilie et al. 2020)

Residues outside the library (ligands, waters) are listed as fixed and left out of the
statistics; alternate conformations keep the first altloc (reported).

Example:
  cryogmm validate refined.pdb --map map.mrc --resolution 3.5 --out val
"""

from __future__ import annotations

from pathlib import Path

from cryogmm.commands import add_device, add_force, check_out
from cryogmm.errors import positive_float


def add_args(p):
    p.add_argument("model", type=Path, help="PDB or mmCIF model")
    p.add_argument("--map", type=Path, help="MRC map in the model's frame (origin in the header)")
    p.add_argument("--restraints", type=Path, action="append", default=[], metavar="FILE.cif", help="monomer dictionary (mmCIF, as Refmac, Phenix and Servalcat read) for residues the shipped library lacks or that you restrain differently; repeatable")
    p.add_argument("--backbone-library", choices=("engh-huber", "cdl"), default="engh-huber", help="protein backbone bond/angle targets: engh-huber (default; fixed Engh & Huber targets, as the MolProbity judge in benchmarks/ scores them) or cdl (the conformation-dependent library, Berkholz et al. 2009, at each residue's phi/psi, as Phenix uses by default)")
    p.add_argument("--resolution", type=positive_float, help="map resolution in Å (needed with --map)")
    p.add_argument("--out", type=Path, required=True, help="output folder: report.json and ramachandran.png")
    add_device(p)
    add_force(p)


def main(args) -> int:
    check_out(args, args.model, args.map, args.restraints)
    from cryogmm.model.validate import ValidateConfig, summary_table, validate

    rep = validate(ValidateConfig(model=args.model, out=args.out, map=args.map, resolution_A=args.resolution,
                                  restraints=tuple(args.restraints), backbone_library=args.backbone_library, device=args.device))
    print(f"{args.model}: {rep['n_residues']} residues, {rep['n_atoms']} heavy atoms")
    print(summary_table(rep))
    if rep["fixed_residues"]:
        print(f"  not validated (fixed: waters, residues without restraints): {', '.join(rep['fixed_residues'][:10])}"
              + (" ..." if len(rep["fixed_residues"]) > 10 else ""))
    for w in rep.get("warnings", []):
        print(f"  note: {w}")
    print(f"-> {args.out}/report.json, {args.out}/ramachandran.png")
    return 0
