"""What a heterogeneity run's image model can tell apart: the path order of the thermal case
(``benchmarks/hetero_thermal.py``) read by a Bayes oracle that knows the true structures but
sees them only through the run's own forward model (its crop, loss band, CTFs, noise level
and image scale).

For every path window the mean structure of its frames is drawn three ways, each as
``gaussians_from_coords`` at ``--resolution`` Å: every heavy atom (``atoms``), backbone and
side-chain centroids (``residue2``) and one Gaussian per residue at the Cα (``ca``); and
``atoms_follow_ca``: every atom of the reference moved only by the shift of its residue's Cα
(what a deformation that translates each residue can draw). Each particle's Gaussian
log-likelihood under each window's image (one least-squares scale per drawing) gives a
posterior over windows; |Spearman| of its mean (and of its argmax) against the true frame is
the order that drawing allows. The data's own ceiling is ``hetero_thermal.py``'s path oracle
(``relion_project`` of the window mean maps).

Usage:
  python benchmarks/hetero_image_model.py --work /tmp/hthermal --molecule 1hvr \
      --run /tmp/hthermal/1hvr/train_snr0.1_n2000_e20_displacement_defaults [--json PATH]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

from cryogmm.hetero.run import Run
from cryogmm.hetero.truth import spearman
from cryogmm.io.structures import gaussians_from_coords, read_model


def drawings(frames, X, wof, mode: str, res: float, center):
    """Per window, the Gaussians of its mean structure drawn as ``mode``."""
    wins = np.unique(wof)
    ref = X[0]
    if mode == "atoms_follow_ca":
        ca = np.flatnonzero(frames.atom_name == "CA")
        ca_of_res = {int(frames.res_id[i]): i for i in ca}
        own = np.array([ca_of_res[int(r)] for r in frames.res_id])
        out = []
        for w in wins:
            m = X[wof == w].mean(0)
            out.append(gaussians_from_coords(frames, ref + (m[own] - ref[own]), "atoms", resolution_A=res,
                                             center_A=center))
        return out
    return [gaussians_from_coords(frames, X[wof == w].mean(0), mode, resolution_A=res, center_A=center) for w in wins]


@torch.no_grad()
def oracle(run: Run, gs, frame_of_particle, batch: int = 256) -> dict:
    fw = run.forward_model()
    s2 = float(run.data.noise_var)
    n = run.data.n
    L = np.zeros((n, len(gs)))
    xp = np.zeros(len(gs))
    pp = np.zeros(len(gs))
    proj = []
    for b0 in range(0, n, batch):  # the least-squares scale of each drawing over all particles
        idx = np.arange(b0, min(b0 + batch, n))
        x, R, sh, ctf, _ = fw.batch(idx)
        ps = []
        for w, g in enumerate(gs):
            p = fw.project(g.with_centers(g.centers[None].expand(len(idx), -1, -1).contiguous()), R, sh, ctf)
            xp[w] += float((fw.band * (x.conj() * p).real).sum())
            pp[w] += float((fw.band * p.abs() ** 2).sum())
            ps.append(p)
        proj.append((idx, x, ps))
    scale = xp.sum() / pp.sum()
    for idx, x, ps in proj:
        for w, p in enumerate(ps):
            L[idx, w] = (-(fw.band * (x - scale * p).abs() ** 2).sum((-2, -1)) / (2.0 * s2)).double().cpu().numpy()
    post = np.exp(L - L.max(1, keepdims=True))
    post /= post.sum(1, keepdims=True)
    mean = post @ np.arange(len(gs))
    return {"abs_spearman_posterior_mean_vs_frame": abs(spearman(mean, frame_of_particle)),
            "abs_spearman_argmax_vs_frame": abs(spearman(post.argmax(1), frame_of_particle)),
            "scale": float(scale)}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--work", type=Path, default=Path("/tmp/hetero_thermal"))
    p.add_argument("--molecule", default="1hvr")
    p.add_argument("--n", type=int, default=2000)
    p.add_argument("--run", type=Path, required=True, help="a trained hetero run on that molecule's particles")
    p.add_argument("--resolution", type=float, default=4.0, help="Gaussian resolution of the drawings (Å)")
    p.add_argument("--modes", default="atoms,residue2,ca,atoms_follow_ca")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--json", type=Path)
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    mw = a.work / a.molecule
    frames = read_model(mw / "md" / "frames.pdb")
    wof = np.load(mw / "md" / "window_of_frame.npy")
    fop = np.load(mw / f"particles_n{a.n}" / "frame_of_particle.npy")
    run = Run(a.run)
    X = np.asarray(frames.coords)
    res = {"benchmark": "hetero_image_model", "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
           "command": "python benchmarks/hetero_image_model.py " + " ".join(argv if argv is not None else sys.argv[1:]),
           "molecule": a.molecule, "run": str(a.run), "resolution_A": a.resolution, "oracles": {}}
    for mode in a.modes.split(","):
        t0 = time.perf_counter()
        r = oracle(run, drawings(frames, X, wof, mode, a.resolution, run.ref.center_A), fop)
        r["seconds"] = time.perf_counter() - t0
        res["oracles"][mode] = r
        print(mode, json.dumps(r), flush=True)
    if a.json:
        a.json.parent.mkdir(parents=True, exist_ok=True)
        a.json.write_text(json.dumps(res, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
