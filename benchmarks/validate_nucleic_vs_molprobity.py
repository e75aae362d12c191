"""Sugar puckers of RNA/DNA models: ours (`cryogmm validate`) against MolProbity's
(`molprobity.rna_validate_puckers` of cctbx/mmtbx, the judge in ../shared/tools/molprobity),
residue by residue.

  MOLP=/path/to/molp python benchmarks/validate_nucleic_vs_molprobity.py model.pdb [...]

Default models: the 1K5I hairpin in tests/data, plus any given. Writes
benchmarks/results/validate_nucleic_vs_molprobity.json.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent


def molprobity_puckers(molp: Path, model: Path) -> list:
    out = subprocess.run([str(molp / "venv" / "bin" / "molprobity.rna_validate_puckers"), str(model)],
                         capture_output=True, text=True, check=True).stdout
    bad = []
    for line in out.splitlines():
        m = re.match(r"\s+(\S+)\s+(-?\d+)\s+(\S+)\s+([\d.]+)\s+(yes|no)\s+(\S+)\s+(yes|no)", line)
        if m and "yes" in (m.group(5), m.group(7)):
            bad.append(f"{m.group(1)}/{m.group(3)}{m.group(2)}")
    n = len([ln for ln in out.splitlines() if re.match(r"\s+\S+\s+-?\d+\s+\S+\s+[\d.]+\s+(yes|no)", ln)])
    return bad, n


def ours(model: Path) -> tuple[list, int]:
    from cryogmm.model.topology import build_topology
    from cryogmm.model.validate import validate_coords

    t = build_topology(model)
    v = validate_coords(t, t.coords)
    return [o["residue"] for o in v.get("pucker_outliers", [])], v.get("n_puckers", 0)


def main(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    molp = Path(os.environ.get("MOLP", "/tmp/model/molp"))
    models = [HERE.parent / "tests" / "data" / "rna_1k5i.pdb"] + [Path(a) for a in argv]
    rows = []
    for m in models:
        ob, on = ours(m)
        mb, mn = molprobity_puckers(molp, m)
        rows.append({"model": m.name, "ours_outliers": ob, "ours_checked": on, "molprobity_outliers": mb,
                     "molprobity_checked": mn, "agree": sorted(ob) == sorted(mb)})
        print(json.dumps(rows[-1]), flush=True)
    (HERE / "results" / "validate_nucleic_vs_molprobity.json").write_text(json.dumps(rows, indent=1) + "\n")


if __name__ == "__main__":
    main()
