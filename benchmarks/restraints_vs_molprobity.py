"""Why ``cryogmm validate`` and MolProbity give different bond/angle RMSZ, restraint by restraint.

For each model (the deposited adenylate kinase models, and any refined models given), every
bond and angle restraint is scored twice: by ``cryogmm validate`` (Engh & Huber targets,
shipped in ``cryogmm/data``) and by the MolProbity judge (cctbx ``mmtbx.validation.restraints``
with the CCP4 monomer library 5.60, no CDL: ``../shared/tools/molprobity``). Restraints are
matched by their atoms (chain position and name) and split into classes: the backbone
carbonyl group (bonds C-O and CA-C; angles CA-C-O, O-C-N(+1) and CA-C-N(+1)) and all others.
For each class the RMSZ by both judges and the mean target of both libraries are reported.

Finding (see ``results/restraints_vs_molprobity.json``): outside the carbonyl group both judges
agree; inside it the judge's library gives every residue's C=O the targets of a free
carboxylate (C-O 1.251 Å, CA-C-O ~117.1°, with CA-C-N 115.9° and O-C-N 123.5° from the TRANS
link: the three angles around the planar carbonyl carbon sum to 356.5°, so no planar peptide
can meet them), where Engh & Huber's peptide values are C-O 1.231 Å and CA-C-O 120.1°. A
model refined to ideal peptide geometry therefore keeps a judge RMSZ of about 1 on those
restraints. Ours follow the published peptide geometry and are left as they are.

    MOLP=/tmp/model/molp python benchmarks/restraints_vs_molprobity.py [refined.pdb ...]
        [--out benchmarks/results/restraints_vs_molprobity.json]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from importlib import resources
from pathlib import Path

import numpy as np
import torch

CARBONYL_BONDS = {("C", "O"), ("CA", "C")}
CARBONYL_ANGLES = {("CA", "C", "O"), ("O", "C", "N"), ("CA", "C", "N")}


def _class(kind, names):
    names = tuple(names)
    group = CARBONYL_BONDS if kind == "bond" else CARBONYL_ANGLES
    return "carbonyl" if names in group or names[::-1] in group else "other"


def ours(path: Path, backbone_library: str = "engh-huber") -> dict:
    """Our restraints of ``path``: {(kind, ((chain, resseq, name), ...)): (target, sigma, z)} (the judge's
    library is Engh & Huber without CDL: ``backbone_library`` as the comparison needs)."""
    from cryogmm.model.restraints import Restraints
    from cryogmm.model.topology import build_topology

    t = build_topology(path, backbone_library=backbone_library)
    r = Restraints(t)
    x = r.with_h(torch.as_tensor(t.coords, dtype=torch.float64))
    out = {}
    with torch.no_grad():
        bz, az = r.bond_z(x).numpy(), r.angle_z(x).numpy()
    # the heavy-atom restraints (those our RMSZ is computed on); angles in degrees
    for kind, idx, ideal, sigma, z in (("bond", r.bonds.numpy(), r.bond_ideal.numpy(), r.bond_sigma.numpy(), bz),
                                       ("angle", r.angles.numpy(), np.degrees(r.angle_ideal.numpy()),
                                        np.degrees(r.angle_sigma.numpy()), az)):
        for k, atoms in enumerate(idx):
            key = (kind, tuple((str(t.chain[a]), int(t.seq_id[a]), str(t.atom_name[a])) for a in atoms))
            out[key] = (float(ideal[k]), float(sigma[k]), float(z[k]))
    return out


def judge(path: Path, molp: str, cdl: bool = False) -> dict:
    """The judge's restraints of ``path`` (with cctbx's CDL when ``cdl``), keyed as :func:`ours`."""
    exe = Path(molp) / "venv" / "bin" / "python"
    helper = Path(__file__).with_name("_molprobity_restraints.py")
    res = subprocess.run([str(exe), str(helper), str(path), molp] + (["--cdl"] if cdl else []), capture_output=True,
                         text=True)
    if res.returncode != 0:
        raise RuntimeError(f"MolProbity restraints failed on {path}: {res.stderr.strip().splitlines()[-1:]}")
    out = {}
    for line in res.stdout.splitlines():
        d = json.loads(line)
        key = (d["kind"], tuple(zip(d["chain"], d["resseq"], d["atoms"])))
        out[key] = (d["target"], d["sigma"], (d["model"] - d["target"]) / d["sigma"])
    return out


def _lookup(table, key):
    if key in table:
        return table[key]
    rev = (key[0], key[1][::-1])
    return table.get(rev)


def compare(path: Path, molp: str) -> dict:
    a, b = ours(path), judge(path, molp)
    rows = {}
    for key, (t_j, s_j, z_j) in b.items():
        o = _lookup(a, key)
        if o is None:
            continue
        cls = _class(key[0], [k[-1] for k in key[1]])
        rows.setdefault((key[0], cls), []).append((o[0], o[1], o[2], t_j, s_j, z_j, [k[-1] for k in key[1]]))
    summary = {}
    for kind in ("bond", "angle"):
        z_o_all, z_j_all = [], []
        for cls in ("carbonyl", "other"):
            rr = rows.get((kind, cls), [])
            if not rr:
                continue
            zo = np.array([r[2] for r in rr]); zj = np.array([r[5] for r in rr])
            z_o_all += zo.tolist(); z_j_all += zj.tolist()
            ent = {"n": len(rr), "rmsz_cryogmm": float(np.sqrt((zo ** 2).mean())), "rmsz_molprobity": float(np.sqrt((zj ** 2).mean()))}
            if cls == "carbonyl":
                by = {}
                for r in rr:
                    by.setdefault("-".join(r[6]), []).append(r)
                ent["targets"] = {k: {"cryogmm": round(float(np.mean([r[0] for r in v])), 3),
                                      "molprobity": round(float(np.mean([r[3] for r in v])), 3), "n": len(v)}
                                  for k, v in sorted(by.items())}
            summary[f"{kind}_{cls}"] = ent
        summary[f"{kind}_all"] = {"n": len(z_o_all), "rmsz_cryogmm": float(np.sqrt(np.mean(np.square(z_o_all)))),
                                  "rmsz_molprobity": float(np.sqrt(np.mean(np.square(z_j_all))))}
    summary["matched_restraints"] = sum(len(v) for v in rows.values())
    summary["judge_restraints"] = len(b)
    return summary


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("models", nargs="*", type=Path, help="more models (e.g. refined.pdb) besides 1AKE and 4AKE")
    ap.add_argument("--molp", default=os.environ.get("MOLP"))
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "restraints_vs_molprobity.json")
    a = ap.parse_args(argv)
    if not a.molp or not (Path(a.molp) / "venv" / "bin" / "python").exists():
        print("MolProbity judge not set up: MOLP=/path (../shared/tools/molprobity/setup.sh)", file=sys.stderr)
        return 2
    data = resources.files("cryogmm.data")
    models = {"1AKE (deposited closed)": Path(str(data.joinpath("adk_closed.pdb"))),
              "4AKE (deposited open)": Path(str(data.joinpath("adk_open.pdb")))}
    for m in a.models:
        models[str(m)] = m
    out = {}
    for name, path in models.items():
        out[name] = s = compare(path, a.molp)
        print(f"{name}: bond RMSZ ours {s['bond_all']['rmsz_cryogmm']:.2f} judge {s['bond_all']['rmsz_molprobity']:.2f} "
              f"(carbonyl {s['bond_carbonyl']['rmsz_cryogmm']:.2f}/{s['bond_carbonyl']['rmsz_molprobity']:.2f}, "
              f"other {s['bond_other']['rmsz_cryogmm']:.2f}/{s['bond_other']['rmsz_molprobity']:.2f}); "
              f"angle RMSZ ours {s['angle_all']['rmsz_cryogmm']:.2f} judge {s['angle_all']['rmsz_molprobity']:.2f} "
              f"(carbonyl {s['angle_carbonyl']['rmsz_cryogmm']:.2f}/{s['angle_carbonyl']['rmsz_molprobity']:.2f}, "
              f"other {s['angle_other']['rmsz_cryogmm']:.2f}/{s['angle_other']['rmsz_molprobity']:.2f})", flush=True)
    a.out.parent.mkdir(parents=True, exist_ok=True)
    tmp = a.out.with_name(a.out.name + ".part")
    tmp.write_text(json.dumps(out, indent=2) + "\n")
    tmp.replace(a.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
