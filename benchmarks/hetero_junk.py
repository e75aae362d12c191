"""Junk rejection of ``hetero analyze --junk``: HIV protease particles (the test data's
1HVR dimer without its inhibitor, simulated by ``cryogmm simulate``, box 36 at 2.5 Å, random
poses and defocus 1-2.5 µm) with 10 % of the images replaced by junk, a segments run (zdim 2,
8 segments, 10 Å, 8 epochs) on all of them, then ``analyze --junk 3``.

Particles of either molecule (``--molecules``: ``hivp``, ``adk`` the bundled 4AKE). Junk kinds:
``noise`` (pure Gaussian noise of the particles' noise SD) and ``other`` (images of the other
protein, simulated at the same SNR with their own poses and CTF).
Per case: precision and recall of the rejected set, the lowest junk and highest particle
fit z, and the mean FSC (shells to 10 Å) to the true map of the maps of the clean set, the
kept set and all particles.

Usage: python benchmarks/hetero_junk.py [--n 400] [--snr 1,0.1] [--molecules hivp,adk] [--kinds noise,other]
       [--threshold 3] [--out PATH]
Writes ``benchmarks/results/hetero_junk.json``.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from importlib import resources
from pathlib import Path

import mrcfile
import numpy as np
import torch

from cryogmm.bridge.images import ImageSource
from cryogmm.bridge.io import read_particles
from cryogmm.core.similarity import fsc
from cryogmm.hetero.analyze import AnalyzeConfig, analyze_hetero
from cryogmm.hetero.config import HeteroConfig
from cryogmm.hetero.train import train_hetero
from cryogmm.io import maps as mapio
from cryogmm.recon.job import reconstruct_table
from cryogmm.simulate.particles import SimulateConfig, simulate

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
from test_hetero_null import protein_only  # noqa: E402

BOX, APIX = 36, 2.5


def mean_fsc(table, sel, truth) -> float:
    sub = table.subset(sel).with_half_sets()
    src = ImageSource.from_table(sub)
    _, _, vol, _ = reconstruct_table(sub, src, device="cpu")
    src.close()
    return float(fsc(vol, truth)[1:int(BOX * APIX / 10) + 1].mean())


def molecule(name: str, work: Path) -> Path:
    """``hivp``: the test data's 1HVR dimer without its inhibitor; ``adk``: the bundled 4AKE."""
    if name == "hivp":
        return protein_only(work / "hivp.pdb")
    return Path(str(resources.files("cryogmm.data"))) / "adk_open.pdb"


def case(work: Path, n: int, snr: float, kind: str, epochs: int, base: str = "hivp", threshold: float = 3.0) -> dict:
    model = molecule(base, work)
    sim = work / "sim"
    rep = simulate(SimulateConfig(out=sim, model=model, n=n, box=BOX, apix=APIX, snr=snr, seed=3, device="cpu"))
    rng = np.random.default_rng(7)
    nj = n // 10
    junk = np.sort(rng.choice(n, nj, replace=False))
    if kind == "noise":
        imgs = rng.standard_normal((nj, BOX, BOX)) * rep["noise_sd"]
    else:
        other = molecule(kind, work)
        simulate(SimulateConfig(out=work / "other", model=other, n=nj, box=BOX, apix=APIX, snr=snr, seed=11, device="cpu"))
        with mrcfile.open(work / "other" / "particles.mrcs") as m:
            imgs = np.array(m.data)
    with mrcfile.mmap(sim / "particles.mrcs", mode="r+") as m:
        m.data[junk] = imgs.astype(np.float32)
    t0 = time.perf_counter()
    train_hetero(HeteroConfig(star=sim / "particles.star", model=model, out=work / "run", map=sim / "truth_map.mrc",
                              decoder="segments", segments=8, zdim=2, epochs=epochs, batch=32, lowpass_A=10.0,
                              kl_warmup=2, seed=0, device="cpu"))
    an = analyze_hetero(AnalyzeConfig(run=work / "run", out=work / "an", pcs=1, frames=2, clusters=2,
                                      backproject=False, junk=threshold, device="cpu"))
    seconds = time.perf_counter() - t0
    table = read_particles(sim / "particles.star")
    names = table.particles["rlnImageName"].to_numpy()
    rejected = set(read_particles(work / "an" / "rejected.star").particles["rlnImageName"]) if an["junk"]["rejected"]["n"] else set()
    tp = len(rejected & set(names[junk]))
    fz = read_particles(work / "an" / "particles_latent.star").particles["rlnCryogmmFitZ"].to_numpy()
    truth = torch.as_tensor(mapio.read_map(sim / "truth_map.mrc")[0])
    kept = np.flatnonzero(~np.isin(names, list(rejected)))
    return {"molecule": base, "snr": snr, "junk": kind, "n": n, "n_junk": int(nj), "threshold": threshold, "n_rejected": len(rejected),
            "precision": tp / max(1, len(rejected)), "recall": tp / nj,
            "lowest_junk_fit_z": float(fz[junk].min()), "highest_particle_fit_z": float(np.delete(fz, junk).max()),
            "mean_fsc_to_truth_10A": {"clean": mean_fsc(table, np.setdiff1d(np.arange(n), junk), truth),
                                      "kept": mean_fsc(table, kept, truth), "all": mean_fsc(table, np.arange(n), truth)},
            "half_set_resolution_A": {"kept": an["junk"]["kept"]["resolution_A"],
                                      "rejected": an["junk"]["rejected"]["resolution_A"]},
            "seconds_train_analyze": seconds}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=400)
    p.add_argument("--snr", default="1,0.1")
    p.add_argument("--molecules", default="hivp,adk", help="the particles' molecules (hivp, adk)")
    p.add_argument("--kinds", default="noise,other", help="junk kinds: noise, other (the other molecule)")
    p.add_argument("--epochs", type=int, default=8)
    p.add_argument("--threshold", type=float, default=3.0, help="analyze --junk")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "hetero_junk.json")
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    rows = []
    for base in a.molecules.split(","):
        other = "adk" if base == "hivp" else "hivp"
        for snr in [float(s) for s in a.snr.split(",")]:
            for kind in a.kinds.split(","):
                with tempfile.TemporaryDirectory() as tmp:
                    r = case(Path(tmp), a.n, snr, other if kind == "other" else kind, a.epochs, base, a.threshold)
                print(json.dumps(r), flush=True)
                rows.append(r)
    earlier = []
    if a.out.is_file():
        old = json.loads(a.out.read_text())
        earlier = old.pop("earlier_runs", []) + [old]
    a.out.parent.mkdir(parents=True, exist_ok=True)
    res = {"benchmark": "hetero_junk", "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
           "command": "python benchmarks/hetero_junk.py " + " ".join(argv if argv is not None else sys.argv[1:]),
           "torch_threads": a.threads, "goal": {"precision": 0.9, "recall": 0.9, "kept_fsc": ">= clean set's"},
           "cases": rows, "earlier_runs": earlier}
    a.out.write_text(json.dumps(res, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
