"""Latent read-out variants on trained runs of the thermal-trajectory case (issue 18, precision):
no retraining, the same trained decoder and encoder, only how each particle's latent is read.

For each run folder of ``benchmarks/hetero_thermal.py`` (``WORK/MOL/train_*``) and each variant:

- ``encoder_mean``: the encoder's posterior mean (what ``analyze`` reads without a polish);
- ``polish{S}``: the per-particle MAP polish (:func:`cryogmm.hetero.vae.polish_latents`) with
  ``S`` Adam steps from the encoder mean (``hetero train --polish-steps S``);
- ``posterior_avg{K}``: decoded coordinates averaged over ``K`` draws of the encoder's posterior
  ``N(mu, sigma^2)`` (a posterior-mean structure instead of the structure of the mean latent;
  the latent, and so |Spearman|, is the encoder mean).

Figures as in hetero_thermal: |Spearman| of latent PC1 vs the true frame, median / p90 decoded
Cα RMSD to the true frame, and the reference window's median decoded RMSD to the reference.

  python benchmarks/hetero_polish.py --work /tmp/hthermal --runs 1hvr/train_X adk/train_Y \
      --polish 10 40 --posterior 16 --json benchmarks/results/hetero_thermal.json
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--work", type=Path, default=Path("/tmp/hetero_thermal"))
    p.add_argument("--runs", nargs="+", required=True, help="MOL/train_KEY folders under --work")
    p.add_argument("--polish", type=int, nargs="*", default=[10, 40])
    p.add_argument("--lr", type=float, default=0.02, help="polish Adam step (the default of polish_latents)")
    p.add_argument("--posterior", type=int, nargs="*", default=[16], help="posterior draws to average")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", type=Path, default=ROOT / "benchmarks" / "results" / "hetero_thermal.json")
    a = p.parse_args(argv)
    os.environ["OMP_NUM_THREADS"] = str(a.threads)
    import torch

    torch.set_num_threads(a.threads)
    from hetero_thermal import _ca_index, decoded_ca, rmsd

    from cryogmm.hetero import run as hrun
    from cryogmm.hetero.truth import spearman
    from cryogmm.hetero.vae import TrainStep, polish_latents, restraint_pairs
    from cryogmm.io.structures import read_model

    results = json.loads(a.json.read_text()) if a.json.exists() else {"benchmark": "hetero_thermal", "runs": {}}
    for rel in a.runs:
        mol, name = rel.split("/", 1)
        mw = a.work / mol
        frames = read_model(mw / "md" / "frames.pdb")
        frames_ca = frames.coords[:, _ca_index(frames)]
        window_of_frame = np.load(mw / "md" / "window_of_frame.npy")
        run = hrun.Run(mw / name)
        n = run.data.n
        frame = np.load(next(mw.glob("particles_n*/frame_of_particle.npy")))[:n]
        win = window_of_frame[frame]
        at_ref = win == 0
        ca = _ca_index(run.ref.model)
        ref_ca = read_model(mw / "md" / "reference.pdb").coords[0][ca]

        def score(z, dec=None):
            dec = decoded_ca(run, z, ca) if dec is None else dec
            zc = z - z.mean(0)
            pc1 = zc @ np.linalg.svd(zc, full_matrices=False)[2][0]
            r = rmsd(dec, frames_ca[frame])
            return {"abs_spearman_pc1_vs_frame": abs(spearman(pc1, frame)),
                    "median_ca_rmsd_decoded_vs_true_A": float(np.median(r)),
                    "p90_ca_rmsd_decoded_vs_true_A": float(np.percentile(r, 90)),
                    "reference_window_median_ca_rmsd_decoded_vs_reference_A": float(
                        np.median(rmsd(dec[at_ref], ref_ca[None])))}

        fw = run.forward_model()
        mus, sds = [], []
        with torch.no_grad():
            for b0 in range(0, n, 512):
                mu, logvar = fw.encode(fw.batch(np.arange(b0, min(b0 + 512, n)))[4])
                mus.append(mu.cpu())
                sds.append(torch.exp(0.5 * logvar).cpu())
        mu, sd = torch.cat(mus).numpy(), torch.cat(sds).numpy()
        rec = {"encoder_mean": score(mu)}
        rec["encoder_mean"]["median_posterior_sd"] = float(np.median(sd))
        for k in a.posterior:
            rng = np.random.default_rng(a.seed)
            acc = 0.0
            for _ in range(k):
                acc = acc + decoded_ca(run, (mu + sd * rng.standard_normal(mu.shape)).astype(np.float32), ca)
            rec[f"posterior_avg{k}"] = score(mu, acc / k)
        cfg = run.cfg
        ew = cfg.elastic_weight if cfg.elastic_weight is not None else (0.1 if cfg.decoder == "displacement" else 0.0)
        pairs = restraint_pairs(run.ref, elastic_seq=cfg.elastic_seq)
        step = TrainStep(run.vae, fw, pairs, cfg, ew)
        for s in a.polish:
            torch.manual_seed(a.seed)
            t0 = time.perf_counter()
            z = polish_latents(step, np.arange(n), steps=s, lr=a.lr)
            key = f"polish{s}" + (f"_lr{a.lr:g}" if a.lr != 0.02 else "")
            rec[key] = score(z)
            rec[key]["seconds"] = time.perf_counter() - t0
        rec.update({"date": datetime.now(timezone.utc).isoformat(), "loadavg": list(os.getloadavg()),
                    "threads": a.threads, "torch": torch.__version__,
                    "command": "python " + " ".join([Path(sys.argv[0]).name] + sys.argv[1:])})
        print(mol, name, json.dumps(rec), flush=True)
        results = json.loads(a.json.read_text()) if a.json.exists() else results
        results["runs"].setdefault(mol, {}).setdefault("readout_variants", {}).setdefault(
            name.removeprefix("train_"), {}).update(rec)
        a.json.write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
