"""cryogmm hetero vs cryoDRGN train_vae on simulated adenylate kinase (open -> closed).

Per SNR: CORE-superposed 4AKE/1AKE endpoints, ``cryogmm simulate --endpoints --frames 20``
(box 64, 2 Å, defocus 1-2.5 µm); reference model = the open endpoint. Then, with the same
number of epochs and latent dimensions:

- ``cryogmm hetero train`` with both decoders (segments, displacement) and ``hetero analyze
  --truth``: |Spearman| of latent PC1 vs the true frame, median Cα RMSD of every particle's
  decoded model to its true frame;
- ``cryodrgn train_vae`` (poses/CTF from ``parse_pose_star``/``parse_ctf_star``): the same
  Spearman on its z;
- images/s of training on this CPU (same thread count for both);
- map quality: for 5 true frames along the path, the latent median of that frame's particles is decoded
  (ours: model -> Gaussian map; cryoDRGN: ``eval_vol``), and its FSC against the true
  frame's noise-free map is summarised as the mean FSC over 1/40..1/8 Å^-1 and the 0.5
  crossing (cryoDRGN volumes are tried as written and mirrored, the better one counts).

Usage:
  python benchmarks/hetero_vs_cryodrgn.py --work /tmp/hetero/bench --epochs 20 \
      --json benchmarks/results/hetero_vs_cryodrgn.json
"""

from __future__ import annotations

import argparse
import json
import os
import pickle
import subprocess
import sys
import time
from importlib import resources
from pathlib import Path

import numpy as np


def sh(cmd, log):
    with open(log, "a") as f:
        f.write("$ " + " ".join(map(str, cmd)) + "\n")
        f.flush()
        t0 = time.perf_counter()
        r = subprocess.run([str(c) for c in cmd], stdout=f, stderr=subprocess.STDOUT)
        dt = time.perf_counter() - t0
    if r.returncode:
        raise SystemExit(f"failed ({r.returncode}): {' '.join(map(str, cmd))}; see {log}")
    return dt


def make_dataset(work: Path, snr: float, n: int, box: int, apix: float, frames: int, log):
    from cryogmm.hetero.truth import ADK_CORE, superpose_file

    data = Path(str(resources.files("cryogmm.data")))
    closed = work / "adk_closed_on_open_core.pdb"
    if not closed.exists():
        superpose_file(data / "adk_closed.pdb", data / "adk_open.pdb", closed, ADK_CORE)
    sim = work / f"sim_snr{snr:g}"
    if not (sim / "report.json").exists():
        sh([Path(sys.executable).parent / "cryogmm", "simulate", "--endpoints", data / "adk_open.pdb", closed,
            "--frames", frames, "--n", n, "--box", box, "--apix", apix, "--snr", snr, "--seed", 1,
            "--device", "cpu", "--out", sim], log)
    return sim, data / "adk_open.pdb"


def frame_maps(sim: Path, box: int, apix: float):
    """Noise-free map of every true frame (all atoms, the simulation's Gaussians)."""
    from cryogmm.io.structures import gaussians_from_coords, read_model
    from cryogmm.core.gaussians import gaussians_to_map

    rep = json.loads((sim / "report.json").read_text())
    m = read_model(sim / "truth_models.pdb")
    center = np.array(rep["model_center_A"])
    res = rep["gaussians"]["resolution_A"]
    return [gaussians_to_map(gaussians_from_coords(m, c, "atoms", resolution_A=res, center_A=center), box,
                             apix).numpy() for c in m.coords], m, center


def fsc_summary(a, b, box, apix):
    import torch

    from cryogmm.core.similarity import fsc

    f = fsc(torch.as_tensor(a, dtype=torch.float64), torch.as_tensor(b, dtype=torch.float64)).numpy()
    k = np.arange(len(f)) / (box * apix)
    band = (k >= 1 / 40) & (k <= 1 / 8)
    below = np.flatnonzero((f < 0.5) & (k > 0))
    res05 = float(1 / k[below[0]]) if len(below) and below[0] > 0 else float(2 * apix)
    return float(f[band].mean()), res05


def run_ours(sim, ref_pdb, out, decoder, epochs, zdim, frames_true, log):
    from cryogmm.hetero import run as hetero_run
    from cryogmm.hetero import train as hetero_train
    from cryogmm.hetero import analyze as hetero_analyze
    from cryogmm.hetero import config as hetero_config
    from cryogmm.io.structures import gaussians_from_coords
    from cryogmm.core.gaussians import gaussians_to_map

    if not (out / "report.json").exists():
        import shutil

        shutil.rmtree(out, ignore_errors=True)
        cfg = hetero_config.HeteroConfig(star=sim / "particles.star", model=ref_pdb, out=out, map=sim / "truth_map.mrc",
                                  decoder=decoder, zdim=zdim, epochs=epochs, device="cpu")
        hetero_train.train_hetero(cfg)
    if not (out / "analyze" / "report.json").exists():
        hetero_analyze.analyze_hetero(hetero_analyze.AnalyzeConfig(run=out, pcs=1, frames=10, clusters=4, backproject=True,
                                                   truth=sim / "truth.star", device="cpu"))
    tr = json.loads((out / "report.json").read_text())
    an = json.loads((out / "analyze" / "report.json").read_text())
    z = np.load(out / "analyze" / "z.npy")
    run = hetero_run.Run(out, need_data=False)
    box, apix = tr["box"], tr["apix_A"]
    fscs = []
    for f in frames_true["eval"]:
        truth_map = frames_true["maps"][f]
        sel = frames_true["frame"] == f
        atoms = run.decode_atoms(np.median(z[sel], 0)[None])[0]
        g = gaussians_from_coords(run.ref.model, atoms, "atoms", resolution_A=2 * apix, center_A=frames_true["center"])
        fscs.append(fsc_summary(gaussians_to_map(g, box, apix).numpy(), truth_map, box, apix))
    return {
        "decoder": decoder,
        "epochs": tr["epochs"],
        "images_per_s": tr["images_per_s"],
        "seconds_per_epoch": tr["seconds_training"] / tr["epochs"],
        **{k: v for k, v in an["truth"].items() if k not in ("truth_star", "truth_models")},
        "fsc_frames": frames_true["eval"],
        "mean_fsc_40_8A_per_frame_map": float(np.mean([a for a, _ in fscs])),
        "median_fsc05_A_per_frame_map": float(np.median([b for _, b in fscs])),
    }


def cryodrgn_throughput(sim, out, n, dim, threads, log):
    """images/s of one ``train_vae`` epoch on the first ``n`` particles with ``dim``-wide networks."""
    cd = [Path(sys.executable).parent / "cryodrgn"]
    out.mkdir(parents=True, exist_ok=True)
    ind = out / f"first{n}.pkl"
    with open(ind, "wb") as f:
        pickle.dump(np.arange(n), f)
    secs = out / f"throughput_n{n}_dim{dim}.txt"
    if not secs.exists():
        train = out / f"throughput_n{n}_dim{dim}"
        sh(cd + ["train_vae", sim / "particles.star", "--datadir", sim, "--poses", out / "pose.pkl", "--ctf",
                 out / "ctf.pkl", "--zdim", 8, "-n", 1, "-o", train, "--no-analysis", "--seed", 0, "--ind", ind,
                 "--enc-dim", dim, "--dec-dim", dim, "--max-threads", threads], log)
        import re

        txt = (train / "run.log").read_text()
        h, m, sec = re.search(r"Epoch: 1 .*Finished in (\d+):(\d+):([\d.]+)", txt).groups()
        secs.write_text(f"{int(h) * 3600 + int(m) * 60 + float(sec)}\n")
    return n / float(secs.read_text())


def cryodrgn_train(star, datadir, out, epochs, zdim, box, apix, threads, log, dim=1024):
    """``cryodrgn train_vae`` on a RELION STAR (poses and CTF parsed from it) in ``out``:
    ``(z [n, zdim], seconds of training summed over its epochs, training folder)``; a finished
    run (its z.pkl) is reused."""
    import re

    cd = [Path(sys.executable).parent / "cryodrgn"]
    out.mkdir(parents=True, exist_ok=True)
    if not (out / "pose.pkl").exists():
        sh(cd + ["parse_pose_star", star, "-o", out / "pose.pkl", "-D", box, "--Apix", apix], log)
        sh(cd + ["parse_ctf_star", star, "-o", out / "ctf.pkl", "-D", box, "--Apix", apix], log)
    train = out / f"train_e{epochs}_dim{dim}"
    z_path = train / "z.pkl"
    if not z_path.exists():
        sh(cd + ["train_vae", star, "--datadir", datadir, "--poses", out / "pose.pkl", "--ctf", out / "ctf.pkl",
                 "--zdim", zdim, "-n", epochs, "-o", train, "--no-analysis", "--seed", 0, "--enc-dim", dim,
                 "--dec-dim", dim, "--max-threads", threads], log)
    secs = sum(int(h) * 3600 + int(m) * 60 + float(x) for h, m, x in
               re.findall(r"Epoch: \d+ .*Finished in (\d+):(\d+):([\d.]+)", (train / "run.log").read_text()))
    with open(z_path, "rb") as f:
        z = pickle.load(f)
    return np.asarray(z, dtype=np.float64), secs, train


def run_cryodrgn(sim, out, epochs, zdim, frames_true, box, apix, threads, log, dim=1024):
    from cryogmm.io import maps as mapio
    from cryogmm.hetero.truth import spearman

    cd = [Path(sys.executable).parent / "cryodrgn"]
    z, secs, train = cryodrgn_train(sim / "particles.star", sim, out, epochs, zdim, box, apix, threads, log, dim)
    zc = z - z.mean(0)
    _, _, vt = np.linalg.svd(zc, full_matrices=False)
    pc1 = zc @ vt[0]
    frame = frames_true["frame"]
    res = {"epochs": epochs, "enc_dec_dim": dim, "seconds_training": secs, "images_per_s": len(z) * epochs / secs,
           "spearman_pc1_vs_frame": spearman(pc1, frame), "abs_spearman_pc1_vs_frame": abs(spearman(pc1, frame)),
           "best_abs_spearman_any_latent_dim": max(abs(spearman(z[:, d], frame)) for d in range(z.shape[1]))}
    # maps at each frame's latent median
    zf = [np.median(z[frame == f], 0) for f in frames_true["eval"]]
    np.savetxt(train / "z_frames.txt", np.array(zf))
    vols = train / "vols"
    if not (vols / f"vol_{len(zf):03d}.mrc").exists():  # eval_vol numbers volumes from 1
        weights = train / f"weights.{epochs}.pkl"
        if not weights.exists():
            weights = train / "weights.pkl"
        sh(cd + ["eval_vol", weights, "-c", train / "config.yaml", "--zfile", train / "z_frames.txt", "-o", vols], log)
    fscs = []
    for i, f in enumerate(frames_true["eval"]):
        truth_map = frames_true["maps"][f]
        v, _ = mapio.read_map(vols / f"vol_{i + 1:03d}.mrc")
        best = max([fsc_summary(v, truth_map, box, apix), fsc_summary(v[::-1].copy(), truth_map, box, apix)],
                   key=lambda t: t[0])
        fscs.append(best)
    res["fsc_frames"] = frames_true["eval"]
    res["mean_fsc_40_8A_per_frame_map"] = float(np.mean([a for a, _ in fscs]))
    res["median_fsc05_A_per_frame_map"] = float(np.median([b for _, b in fscs]))
    return res


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--work", type=Path, default=Path("/tmp/hetero/bench"))
    p.add_argument("--snr", type=float, nargs="+", default=[0.1, 0.01])
    p.add_argument("--n", type=int, default=3000)
    p.add_argument("--box", type=int, default=64)
    p.add_argument("--apix", type=float, default=2.0)
    p.add_argument("--frames", type=int, default=20)
    p.add_argument("--epochs", type=int, default=20)
    p.add_argument("--zdim", type=int, default=8)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--skip-cryodrgn", action="store_true")
    p.add_argument("--cryodrgn-dim", type=int, default=256,
                   help="cryoDRGN encoder/decoder width (its default 1024 runs ~1 image/s on a 2-core CPU)")
    p.add_argument("--throughput-n", type=int, default=100,
                   help="also time one epoch of cryoDRGN's default 1024-wide networks on this many particles")
    p.add_argument("--decoders", nargs="+", default=["segments", "displacement"])
    p.add_argument("--json", type=Path, default=Path(__file__).parent / "results" / "hetero_vs_cryodrgn.json")
    a = p.parse_args(argv)
    os.environ["OMP_NUM_THREADS"] = str(a.threads)
    import torch

    torch.set_num_threads(a.threads)
    from cryogmm.bridge.io import read_particles

    a.work.mkdir(parents=True, exist_ok=True)
    log = a.work / "bench.log"
    results = {"benchmark": "hetero_vs_cryodrgn", "n_particles": a.n, "box": a.box, "apix_A": a.apix,
               "frames": a.frames, "epochs": a.epochs, "zdim": a.zdim, "threads": a.threads,
               "reference_model": "adk_open.pdb (4AKE)", "endpoints": "4AKE, 1AKE superposed on the CORE domain",
               "runs": {}}
    if a.json.exists():
        old = json.loads(a.json.read_text())
        results["runs"] = old.get("runs", {})
    for snr in a.snr:
        sim, ref = make_dataset(a.work, snr, a.n, a.box, a.apix, a.frames, log)
        maps, _, center = frame_maps(sim, a.box, a.apix)
        truth = read_particles(sim / "truth.star")
        frame = truth.particles["rlnCryogmmTrueFrame"].to_numpy().astype(int)
        # maps at 5 frames along the path (cryoDRGN's eval_vol takes ~25 s a volume on this CPU)
        present = np.unique(frame)
        evalf = present[np.round(np.linspace(0, len(present) - 1, 5)).astype(int)]
        frames_true = {"maps": maps, "frame": frame, "center": center, "eval": [int(f) for f in evalf]}
        key = f"snr{snr:g}_epochs{a.epochs}"
        entry = results["runs"].setdefault(key, {})
        entry["note"] = ("images/s measured on a shared 2-core CPU with other jobs running: timings are noisy; "
                         "ours: decoded-model maps; cryoDRGN: eval_vol maps")
        for dec in a.decoders:
            entry[f"cryogmm_{dec}"] = run_ours(sim, ref, a.work / f"ours_{dec}_{key}", dec, a.epochs, a.zdim,
                                               frames_true, log)
            print(key, dec, json.dumps(entry[f"cryogmm_{dec}"]), flush=True)
        if not a.skip_cryodrgn:
            cdir = a.work / f"cryodrgn_snr{snr:g}"
            entry["cryodrgn"] = run_cryodrgn(sim, cdir, a.epochs, a.zdim, frames_true, a.box, a.apix, a.threads, log,
                                             dim=a.cryodrgn_dim)
            if a.throughput_n:
                entry["cryodrgn"]["images_per_s_default_1024_networks"] = cryodrgn_throughput(
                    sim, cdir, a.throughput_n, 1024, a.threads, log)
            print(key, "cryodrgn", json.dumps(entry["cryodrgn"]), flush=True)
            c = entry["cryodrgn"]
            for dec in a.decoders:
                o = entry[f"cryogmm_{dec}"]
                entry[f"ratio_images_per_s_{dec}_vs_cryodrgn"] = o["images_per_s"] / c["images_per_s"]
                if "images_per_s_default_1024_networks" in c:
                    entry[f"ratio_images_per_s_{dec}_vs_cryodrgn_default_networks"] = (
                        o["images_per_s"] / c["images_per_s_default_1024_networks"])
                print(f"{key} {dec}: |Spearman| {o['abs_spearman_pc1_vs_frame']:.3f} vs cryoDRGN "
                      f"{c['abs_spearman_pc1_vs_frame']:.3f}; mean FSC(40-8 Å) {o['mean_fsc_40_8A_per_frame_map']:.3f}"
                      f" vs {c['mean_fsc_40_8A_per_frame_map']:.3f}; images/s x"
                      f"{entry[f'ratio_images_per_s_{dec}_vs_cryodrgn']:.1f}", flush=True)
        a.json.parent.mkdir(parents=True, exist_ok=True)
        a.json.write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
