"""Our conformation-dependent backbone restraints (``cryogmm.model.cdl``) against cctbx's, restraint
by restraint.

For each model, every bond and angle restraint is taken twice: from ``cryogmm`` with
``backbone_library="cdl"`` (the default) and from the MolProbity judge's cctbx with its CDL switched
on (``pdb_interpretation.restraints_library.cdl = True``, Phenix's default; the judge's own figures
run without it). Restraints are matched by atoms. Reported per model: for the twelve CDL backbone
restraints (C(-1)-N-CA, N-CA-CB, N-CA-C, CB-CA-C, CA-C-O, CA-C-N(+1), O-C-N(+1); C(-1)-N, N-CA,
CA-CB, CA-C, C-O) how many have the same target (within 0.005 Å / 0.05°) and sigma, the largest
target difference, and both bond/angle RMSZ over all matched restraints (ours with CDL, cctbx
with CDL), and cctbx's without CDL beside them.

    MOLP=/tmp/model/molp python benchmarks/cdl_vs_molprobity.py MODEL.pdb ...
        [--out benchmarks/results/cdl_vs_molprobity.json]
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from restraints_vs_molprobity import _lookup, judge, ours  # noqa: E402

BACKBONE = {("bond", n) for n in (("C", "N"), ("N", "CA"), ("CA", "CB"), ("CA", "C"), ("C", "O"))} | \
    {("angle", n) for n in (("C", "N", "CA"), ("N", "CA", "CB"), ("N", "CA", "C"), ("CB", "CA", "C"),
                            ("CA", "C", "O"), ("CA", "C", "N"), ("O", "C", "N"))}


def _is_backbone(kind, names):
    return (kind, names) in BACKBONE or (kind, names[::-1]) in BACKBONE


def compare(path: Path, molp: str) -> dict:
    a = ours(path, backbone_library="cdl")
    j_cdl, j_eh = judge(path, molp, cdl=True), judge(path, molp, cdl=False)
    out = {}
    for kind, tol in (("bond", 0.005), ("angle", 0.05)):
        same, n_bb, worst, zo, zj, zeh, diffs = 0, 0, 0.0, [], [], [], []
        for key, (t_j, s_j, z_j) in j_cdl.items():
            if key[0] != kind:
                continue
            o = _lookup(a, key)
            if o is None:
                continue
            zo.append(o[2]); zj.append(z_j)
            e = j_eh.get(key) or _lookup(j_eh, key)
            if e is not None:
                zeh.append(e[2])
            names = tuple(k[-1] for k in key[1])
            if _is_backbone(kind, names):
                n_bb += 1
                d = abs(o[0] - t_j)
                worst = max(worst, d)
                ok = d <= tol and abs(o[1] - s_j) <= tol
                same += ok
                if not ok and len(diffs) < 5:
                    diffs.append({"atoms": [list(k) for k in key[1]], "cryogmm": [round(o[0], 4), round(o[1], 4)],
                                  "cctbx": [round(t_j, 4), round(s_j, 4)]})
        rms = lambda z: float(np.sqrt(np.mean(np.square(z)))) if z else None  # noqa: E731
        out[kind] = {"matched": len(zo), "backbone_restraints": n_bb, "backbone_same_target_and_sigma": int(same),
                     "backbone_max_target_difference": round(worst, 4), "rmsz_cryogmm_cdl": rms(zo),
                     "rmsz_cctbx_cdl": rms(zj), "rmsz_cctbx_no_cdl": rms(zeh), "first_differences": diffs}
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("models", nargs="+", type=Path)
    ap.add_argument("--molp", default=os.environ.get("MOLP"))
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "cdl_vs_molprobity.json")
    a = ap.parse_args(argv)
    if not a.molp or not (Path(a.molp) / "venv" / "bin" / "python").exists():
        print("MolProbity judge not set up: MOLP=/path (../shared/tools/molprobity/setup.sh)", file=sys.stderr)
        return 2
    res = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
           "host": platform.node(), "load": os.getloadavg(), "command": " ".join(["python"] + sys.argv),
           "models": {}}
    for m in a.models:
        res["models"][str(m)] = s = compare(m, a.molp)
        print(m, json.dumps(s), flush=True)
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(res, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
