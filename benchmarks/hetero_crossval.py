"""Half-set cross-validation per state (``hetero train --halves`` + ``analyze``), the bias test
on two molecules.

Molecules: adenylate kinase open -> closed (4AKE -> 1AKE superposed on the CORE, 10 frames;
reference = the open model) and HIV protease (the test data's 1HVR dimer without its
inhibitor, one conformation). Particles by ``cryogmm simulate`` (box 40 at 2.5 Å, random poses,
defocus 1-2.5 µm, rlnRandomSubset from the simulator), segments decoder (8 segments, zdim 2,
10 Å). Per molecule two runs of the same halves:

- ``clean``: both halves trained from the right reference; nothing should be flagged;
- ``wrong``: half 1 trained from a reference with a region rigidly displaced by ``--shift``
  Å (AdK residues 30-59, the NMP domain; protease residues 40-60 of chain A, the flap), half 2
  as in ``clean``; every state should be flagged for half 1 and none for half 2.

Per state the four mean masked map-model FSCs (shells to 10 Å), the tolerance and the flags,
and the Cα RMSD of the displaced region of half 1's state models to the right reference.

Usage: python benchmarks/hetero_crossval.py [--n 600] [--epochs 8] [--clusters 3] [--shift 6]
Writes ``benchmarks/results/hetero_crossval.json``.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from importlib import resources
from pathlib import Path

import numpy as np
import torch

from cryogmm.hetero.analyze import AnalyzeConfig, analyze_hetero
from cryogmm.hetero.config import HeteroConfig
from cryogmm.hetero.crossval import train_halves
from cryogmm.hetero.train import train_hetero
from cryogmm.hetero.truth import ADK_CORE, superpose_file
from cryogmm.io.structures import read_model
from cryogmm.simulate.particles import SimulateConfig, simulate

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
from test_hetero_crossval import displaced  # noqa: E402
from test_hetero_null import protein_only  # noqa: E402

BOX, APIX, LOWPASS = 40, 2.5, 10.0
DATA = Path(str(resources.files("cryogmm.data")))


def molecule(name: str, work: Path, n: int):
    """(reference model, simulate config, displaced region (first, last))."""
    if name == "adk":
        closed = work / "closed_on_open.pdb"
        superpose_file(DATA / "adk_closed.pdb", DATA / "adk_open.pdb", closed, ADK_CORE)
        model = DATA / "adk_open.pdb"
        sim = SimulateConfig(out=work / "sim", endpoints=(model, closed), frames=10, n=n, box=BOX, apix=APIX, snr=1.0,
                             seed=3, device="cpu")
        return model, sim, (30, 59)
    model = protein_only(work / "hivp.pdb")
    sim = SimulateConfig(out=work / "sim", model=model, n=n, box=BOX, apix=APIX, snr=1.0, seed=3, device="cpu")
    return model, sim, (40, 60)


def states_summary(rep, models_pdb, ref_model, moved) -> list:
    ref = read_model(ref_model).coords[0]
    m = read_model(models_pdb).coords
    rows = []
    scored = [s for s in rep["crossval"]["states"] if "skipped" not in s]
    for i, s in enumerate(scored):
        r = {k: s[k] for k in ("state", "n_half1", "n_half2", "model1_vs_map1", "model1_vs_map2", "model2_vs_map2",
                               "model2_vs_map1", "map1_vs_map2", "tolerance", "flags")}
        r["fsc05_A"] = {k[8:]: s[k] for k in s if k.startswith("fsc05_A_")}
        r["half1_region_rmsd_to_reference_A"] = float(np.sqrt(((m[i][moved] - ref[moved]) ** 2).sum(-1).mean()))
        rows.append(r)
    return rows


def case(name: str, work: Path, a) -> dict:
    model, simcfg, (first, last) = molecule(name, work, a.n)
    simulate(simcfg)
    sim = work / "sim"
    base = dict(map=sim / "truth_map.mrc", decoder="segments", segments=8, zdim=2, epochs=a.epochs, batch=32,
                lowpass_A=LOWPASS, kl_warmup=2, seed=0, device="cpu")
    t0 = time.perf_counter()
    train_halves(HeteroConfig(star=sim / "particles.star", model=model, out=work / "clean", **base))
    t_train = time.perf_counter() - t0
    ancfg = dict(pcs=1, frames=2, clusters=a.clusters, backproject=False, device="cpu")
    t0 = time.perf_counter()
    clean = analyze_hetero(AnalyzeConfig(run=work / "clean", out=work / "an_clean", **ancfg))
    t_an = time.perf_counter() - t0
    # half 1 from a reference with a displaced region, half 2 unchanged
    wrong = work / "wrong"
    wrong.mkdir()
    for f in ("halves.json", "particles.star"):
        shutil.copy(work / "clean" / f, wrong / f)
    shutil.copytree(work / "clean" / "half2", wrong / "half2")
    bad, moved = displaced(model, work / "displaced.pdb", first, last, a.shift)
    train_hetero(HeteroConfig(star=work / "clean" / "half1" / "particles.star", model=bad, out=wrong / "half1", **base))
    wr = analyze_hetero(AnalyzeConfig(run=wrong, out=work / "an_wrong", **ancfg))
    out = {"molecule": name, "n": a.n, "box": BOX, "apix_A": APIX, "snr": 1.0, "epochs": a.epochs,
           "clusters": a.clusters, "displaced_region": [first, last], "shift_A": a.shift,
           "n_displaced_atoms": int(moved.sum()), "seconds_train_halves": t_train, "seconds_analyze": t_an}
    for tag, rep, d in (("clean", clean, "an_clean"), ("wrong", wr, "an_wrong")):
        scored = [s for s in rep["crossval"]["states"] if "skipped" not in s]
        out[tag] = {"flagged_states": rep["crossval"]["flagged_states"], "n_states_scored": len(scored),
                    "alignment_r2": rep["crossval"]["alignment_r2"],
                    "states": states_summary(rep, work / d / "crossval_models_half1.pdb", model, moved)}
    c, w = out["clean"], out["wrong"]
    out["passed"] = {"clean_flags_nothing": not c["flagged_states"],
                     "wrong_flags_every_state_for_half1": w["n_states_scored"] > 0 and all(
                         any(f.startswith("half1") for f in s["flags"]) for s in w["states"]),
                     "wrong_never_flags_half2": not any(f.startswith("half2") for s in w["states"] for f in s["flags"])}
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=600)
    p.add_argument("--epochs", type=int, default=8)
    p.add_argument("--clusters", type=int, default=3)
    p.add_argument("--shift", type=float, default=6.0, help="displacement of the wrong region, Å")
    p.add_argument("--molecules", default="adk,hivp")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "hetero_crossval.json")
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    load0 = os.getloadavg()
    rows = []
    for name in a.molecules.split(","):
        with tempfile.TemporaryDirectory() as tmp:
            r = case(name, Path(tmp), a)
        print(json.dumps({k: r[k] for k in ("molecule", "passed")}), json.dumps(r["clean"]["flagged_states"]),
              json.dumps(r["wrong"]["flagged_states"]))
        rows.append(r)
    a.out.parent.mkdir(parents=True, exist_ok=True)
    res = {"benchmark": "hetero_crossval", "date": datetime.datetime.now(datetime.timezone.utc).isoformat(),
           "host": platform.node(), "loadavg_start": load0, "loadavg_end": os.getloadavg(),
           "command": "python benchmarks/hetero_crossval.py " + " ".join(argv if argv is not None else sys.argv[1:]),
           "torch_threads": a.threads, "cases": rows}
    a.out.write_text(json.dumps(res, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
