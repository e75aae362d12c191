"""``cryogmm hetero analyze``: PCA of the latents, trajectories along the PCs as models and
maps, clusters as particle subsets, learned segments, figures against a known truth."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from cryogmm.bridge.images import ImageSource
from cryogmm.bridge.io import read_particles, write_particles
from cryogmm.bridge.results import with_results
from cryogmm.core.gaussians import gaussians_to_map
from cryogmm.core.pca import pca
from cryogmm.errors import OptionError, StarError
from cryogmm.hetero.run import Run
from cryogmm.hetero.truth import atom_keys, match_atoms, truth_figures
from cryogmm.io import maps as mapio
from cryogmm.io.outputs import OutputDir, atomic_output, write_report
from cryogmm.io.plots import latent_plot
from cryogmm.io.structures import gaussians_from_coords, read_model, write_models
from cryogmm.recon.job import reconstruct_table
from cryogmm.runtime import Timer, pick_device


# --------------------------------------------------------------------------- analysis
@dataclass
class AnalyzeConfig:
    run: Path
    out: Path | None = None
    pcs: int = 2
    frames: int = 10
    clusters: int = 4
    backproject: bool = True
    truth: Path | None = None
    truth_models: Path | None = None
    star: Path | None = None
    project_dir: Path | None = None
    seed: int = 0
    device: str | None = None


def analyze_hetero(cfg: AnalyzeConfig, progress=None) -> dict:
    """Write into ``cfg.out`` (default ``RUN/analyze``): ``z.npy``, ``pca.npz`` (mean, components,
    projection of every particle, explained variance), ``particles_latent.star``
    (and ``.cs``), ``pcN_trajectory.pdb``, ``pcN_model_XX.mrc`` and ``pcN_backproj_XX.mrc``,
    ``cluster_K.star``/``.cs``, ``latent.png``, ``segments.csv`` and ``segments.pdb``
    (segments decoder), ``report.json`` (with truth figures when ``truth`` is given)."""

    timer = Timer()
    progress = progress or (lambda *a: None)
    if cfg.pcs < 1 or cfg.frames < 2 or cfg.clusters < 1:
        raise OptionError("--pcs/--frames/--clusters", f"{cfg.pcs}/{cfg.frames}/{cfg.clusters}; expected >= 1, >= 2, >= 1")
    dev = pick_device(cfg.device)
    run = Run(cfg.run, device=dev, star=cfg.star, project_dir=cfg.project_dir)
    out = Path(cfg.out) if cfg.out else Path(cfg.run) / "analyze"
    data, ref = run.data, run.ref
    box, apix = data.box, data.apix
    z = run.encode_all()
    mean, comps, proj, ratio = pca(z, cfg.pcs)
    rep = {"job": "hetero analyze", "run": str(cfg.run), "epoch": run.epoch, "decoder": run.cfg.decoder,
           "n_particles": data.n, "zdim": run.cfg.zdim, "pca_explained_variance": ratio.tolist(), "outputs": []}
    origin = ref.center_A - (box // 2) * apix
    with OutputDir(out) as od:
        np.save(od.path("z.npy"), z)
        # the one PCA of the run: Scipion and ChimeraX read it rather than recomputing (signs and axes agree)
        np.savez(od.path("pca.npz"), mean=mean, components=comps, projection=proj, explained_variance=ratio)
        table = with_results(data.table, latent=z)
        write_particles(table, od.path("particles_latent.star"))
        write_particles(table, od.path("particles_latent.cs"))
        rep["outputs"] += ["z.npy", "pca.npz", "particles_latent.star", "particles_latent.cs"]
        # ---- trajectories along the principal components
        traj = {}
        for k in range(comps.shape[0]):
            lo, hi = np.percentile(proj[:, k], [5, 95])
            ts = np.linspace(lo, hi, cfg.frames)
            zk = mean[None] + ts[:, None] * comps[k][None]
            models = run.decode_atoms(zk)
            write_models(od.path(f"pc{k + 1}_trajectory.pdb"), ref.model, models)
            np.savetxt(od.path(f"pc{k + 1}_z.txt"), zk, fmt="%.6f")
            rep["outputs"] += [f"pc{k + 1}_trajectory.pdb", f"pc{k + 1}_z.txt"]
            # nearest trajectory point of every particle along this PC
            nearest = np.abs(proj[:, k][:, None] - ts[None]).argmin(1)
            counts = []
            for f, m in enumerate(models):
                g = gaussians_from_coords(ref.model, m, "atoms", resolution_A=2.0 * apix, center_A=ref.center_A)
                mapio.write_map(od.path(f"pc{k + 1}_model_{f:02d}.mrc"), gaussians_to_map(g, box, apix).numpy(),
                                apix, origin_A=origin)
                sel = np.flatnonzero(nearest == f)
                counts.append(int(len(sel)))
                if cfg.backproject and len(sel) >= 2:
                    sub = data.table.subset(sel).with_half_sets(seed=cfg.seed)
                    src = ImageSource.from_table(sub)
                    _, _, vol, _ = reconstruct_table(sub, src, device=dev)
                    src.close()
                    mapio.write_map(od.path(f"pc{k + 1}_backproj_{f:02d}.mrc"), vol.numpy(), apix, origin_A=origin)
                progress(f"maps along PC{k + 1}", f + 1, cfg.frames)
            traj[f"pc{k + 1}"] = {"t": ts.tolist(), "particles_per_frame": counts}
        rep["trajectories"] = traj
        # ---- clusters
        from scipy.cluster.vq import kmeans2

        k = min(cfg.clusters, data.n)
        centers, labels = kmeans2(z, k, seed=cfg.seed, minit="++")
        clusters = []
        for c in range(k):
            sel = np.flatnonzero(labels == c)
            if not len(sel):
                continue
            sub = with_results(data.table.subset(sel), latent=z[sel], labels=np.full(len(sel), c))
            write_particles(sub, od.path(f"cluster_{c}.star"))
            write_particles(sub, od.path(f"cluster_{c}.cs"))
            clusters.append({"cluster": c, "n": int(len(sel)), "star": f"cluster_{c}.star", "cs": f"cluster_{c}.cs"})
        write_models(od.path("cluster_centers.pdb"), ref.model, run.decode_atoms(centers))
        np.savetxt(od.path("cluster_centers_z.txt"), centers, fmt="%.6f")
        rep["clusters"] = clusters
        latent_plot(od.path("latent.png"), proj, labels, ratio)
        rep["outputs"] += ["cluster_centers.pdb", "latent.png"]
        # ---- segments
        if run.cfg.decoder == "segments":
            rep["segments"] = _write_segments(od, run)
            rep["outputs"] += ["segments.csv", "segments.pdb"]
        # ---- truth
        if cfg.truth:
            rep["truth"] = _truth_report(run, z, proj[:, 0], cfg.truth, cfg.truth_models)
        rep["seconds"] = timer()
        write_report(od.path("report.json"), rep)
    return rep


def _write_segments(od, run) -> list:
    ref = run.ref
    with torch.no_grad():
        hard = run.vae.deformer.hard_segments().cpu().numpy()
    m = ref.model
    first_atom = {}
    for i, r in enumerate(m.res_id):
        first_atom.setdefault(int(r), i)
    rows = []
    r0 = 0
    R = len(hard)
    for r in range(1, R + 1):
        if r == R or hard[r] != hard[r0] or ref.chain_of_residue[r] != ref.chain_of_residue[r0]:
            a, b = first_atom[r0], first_atom[r - 1]
            rows.append({"segment": int(hard[r0]), "chain": str(m.chain[a]), "first": int(m.seq_id[a]),
                         "last": int(m.seq_id[b]), "residues": r - r0})
            r0 = r
    lines = ["segment,chain,first,last,residues"] + [f"{x['segment']},{x['chain']},{x['first']},{x['last']},"
                                                      f"{x['residues']}" for x in rows]
    with atomic_output(od.path("segments.csv")) as tmp:
        tmp.write_text("\n".join(lines) + "\n")
    write_models(od.path("segments.pdb"), m, m.coords[:1], bfactors=hard[m.res_id].astype(float))
    return rows


def _truth_report(run, z, pc1, truth_star, truth_models=None) -> dict:
    truth_star = Path(truth_star)
    t = read_particles(truth_star)
    if "rlnCryogmmTrueFrame" not in t.particles.columns:
        raise StarError(truth_star, "has no rlnCryogmmTrueFrame column (a truth.star from cryogmm simulate)")
    data = run.data
    names = data.table.particles["rlnImageName"].to_numpy()
    tnames = t.particles["rlnImageName"].to_numpy()
    pos = {n: i for i, n in enumerate(tnames)}
    if not all(n in pos for n in names):
        raise StarError(truth_star, "does not list every particle of the run (matched by rlnImageName)")
    frames = t.particles["rlnCryogmmTrueFrame"].to_numpy()[[pos[n] for n in names]].astype(int)
    tm = Path(truth_models) if truth_models else truth_star.parent / "truth_models.pdb"
    kw = {}
    if tm.is_file():
        truth = read_model(tm)
        ref = run.ref
        ia, ib = match_atoms(atom_keys(ref.model), atom_keys(truth))
        ca = ref.model.atom_name[ia] == "CA"
        ia, ib = ia[ca], ib[ca]
        decoded = np.concatenate([run.decode_atoms(z[i:i + 512])[:, ia] for i in range(0, len(z), 512)])
        kw = {"decoded_ca": decoded, "truth_ca": truth.coords[:, ib], "reference_ca": ref.model.coords[0][ia]}
    fig = truth_figures(z, frames, pc1=pc1, **kw)
    if kw:
        # which residues move: decoded (median model of the first vs the last true frame's
        # particles) against the truth (first vs last frame), per Cα
        lo, hi = frames.min(), frames.max()
        ends = run.decode_atoms(np.stack([np.median(z[frames == lo], 0), np.median(z[frames == hi], 0)]))[:, ia]
        moved = np.linalg.norm(ends[1] - ends[0], axis=1)
        true_moved = np.linalg.norm(truth.coords[hi][ib] - truth.coords[lo][ib], axis=1)
        fig["per_residue_motion_pearson"] = float(np.corrcoef(moved, true_moved)[0, 1])
        fig["end_to_end_ca_rmsd_decoded_A"] = float(np.sqrt((moved**2).mean()))
        fig["end_to_end_ca_rmsd_true_A"] = float(np.sqrt((true_moved**2).mean()))
    fig["truth_star"] = str(truth_star)
    fig["truth_models"] = str(tm) if kw else None
    return fig
