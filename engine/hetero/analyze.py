"""``cryogmm hetero analyze``: PCA of the latents, trajectories along the PCs as models and
maps, clusters as particle subsets with their occupancies, the free-energy landscape,
per-particle fit scores and junk rejection, learned segments, figures against a known truth."""

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
from cryogmm.core.similarity import resolution_at
from cryogmm.hetero.crossval import cross_validate, halves_latent, is_halves_run, load_halves
from cryogmm.hetero.landscape import fit_z as junk_z
from cryogmm.hetero.landscape import free_energy, landscape_plot, mahalanobis, occupancies
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
    junk: float | None = None  # reject particles whose fit score lies this many robust SDs below the median
    crossval_resolution_A: float | None = None  # --halves runs: the cross-validation's FSC band (default: low-pass)


def analyze_hetero(cfg: AnalyzeConfig, progress=None) -> dict:
    """Write into ``cfg.out`` (default ``RUN/analyze``): ``z.npy``, ``pca.npz`` (mean, components,
    projection of every particle, explained variance), ``particles_latent.star``
    (and ``.cs``), ``pcN_trajectory.pdb``, ``pcN_model_XX.mrc`` and ``pcN_backproj_XX.mrc``,
    ``cluster_K.star``/``.cs``, ``latent.png``, ``landscape.png``/``.npz`` (free energy over
    PC1/PC2), ``segments.csv`` and ``segments.pdb`` (segments decoder), with ``junk``
    ``kept.star``/``.cs``, ``rejected.star``/``.cs`` and their maps, ``report.json`` (cluster
    occupancies with errors, junk figures, truth figures when ``truth`` is given).

    Every particle gets its fit scores under its decoded model (:meth:`Run.fit_scores`: the
    log-likelihood gain in nats, the residual's component along the model in noise SDs, the
    residual's energy), the junk score ``fit_z`` combining the last two (:func:`junk_z`, in
    robust SDs) and a latent outlier distance (:func:`mahalanobis`), as
    ``rlnCryogmmFitScore``, ``rlnCryogmmFitT``, ``rlnCryogmmFitResidual``, ``rlnCryogmmFitZ``
    and ``rlnCryogmmLatentOutlier`` in ``particles_latent.star``. ``junk``: particles with
    ``fit_z > junk`` are rejected.

    A run trained with ``--halves`` (:mod:`cryogmm.hetero.crossval`): every particle is encoded
    and scored by its own half's network, half 2's latents mapped onto half 1's axes; the
    trajectories decode with half 1's network; per cluster the half-set cross-validation
    (``report.json`` ``crossval``, ``crossval.png``, ``crossval_stateK_{model,map}{1,2}.mrc``,
    ``crossval_models_half{1,2}.pdb``)."""

    timer = Timer()
    progress = progress or (lambda *a: None)
    if cfg.pcs < 1 or cfg.frames < 2 or cfg.clusters < 1:
        raise OptionError("--pcs/--frames/--clusters", f"{cfg.pcs}/{cfg.frames}/{cfg.clusters}; expected >= 1, >= 2, >= 1")
    if cfg.junk is not None and not (np.isfinite(cfg.junk) and cfg.junk > 0):
        raise OptionError("--junk", f"{cfg.junk}; expected a positive number of robust standard deviations")
    if cfg.crossval_resolution_A is not None and not (np.isfinite(cfg.crossval_resolution_A)
                                                      and cfg.crossval_resolution_A > 0):
        raise OptionError("--crossval-resolution-A",
                          f"{cfg.crossval_resolution_A}; expected a positive resolution in Å")
    dev = pick_device(cfg.device)
    runs = lat = None
    if is_halves_run(cfg.run):
        # a --halves run: every particle encoded by its own half's network (crossval.halves_latent)
        runs = load_halves(cfg.run, device=dev, star=cfg.star, project_dir=cfg.project_dir)
        run = runs[0]
        lat = halves_latent(runs)
        z = lat["z"]
    else:
        run = Run(cfg.run, device=dev, star=cfg.star, project_dir=cfg.project_dir)
        z = run.encode_all()
    out = Path(cfg.out) if cfg.out else Path(cfg.run) / "analyze"
    data, ref = run.data, run.ref
    box, apix = data.box, data.apix
    mean, comps, proj, ratio = pca(z, cfg.pcs)
    rep = {"job": "hetero analyze", "run": str(cfg.run), "epoch": run.epoch, "decoder": run.cfg.decoder,
           "n_particles": data.n, "zdim": run.cfg.zdim, "latents": getattr(run, "latent_source", "encoder mean"),
           "pca_explained_variance": ratio.tolist(), "outputs": []}
    origin = ref.center_A - (box // 2) * apix
    with OutputDir(out) as od:
        np.save(od.path("z.npy"), z)
        # the one PCA of the run: Scipion and ChimeraX read it rather than recomputing (signs and axes agree)
        np.savez(od.path("pca.npz"), mean=mean, components=comps, projection=proj, explained_variance=ratio)
        if runs is None:
            fit = run.fit_scores(z)
        else:  # each particle scored by its own half's decoder, at its own latent
            f1, f2 = runs[0].fit_scores(lat["z1"]), runs[1].fit_scores(lat["z2"])
            fit = {k: np.where(lat["half"] == 1, f1[k], f2[k]) for k in f1}
        fz = junk_z(fit["t"], fit["residual"])
        outlier = mahalanobis(z)
        scores = {"rlnCryogmmFitScore": fit["gain"], "rlnCryogmmFitT": fit["t"],
                  "rlnCryogmmFitResidual": fit["residual"], "rlnCryogmmFitZ": fz, "rlnCryogmmLatentOutlier": outlier}
        rep["fit_score"] = {"median_nats": float(np.median(fit["gain"])),
                            "median_t": float(np.median(fit["t"])), "median_residual": float(np.median(fit["residual"])),
                            "definition": "FitScore: log-likelihood gain of each image under its decoded model over "
                            "an empty image (nats); FitT: the residual's component along the model in noise SDs; "
                            "FitResidual: the residual's energy in noise units; fit_z = (robust z of FitT below "
                            "its median + robust z of FitResidual above its median) / sqrt(2), robust z = "
                            "distance from the median / (1.4826 MAD)", "n_fit_z_above_3": int((fz > 3).sum())}
        table = with_results(data.table, latent=z, columns=scores)
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
        occ = occupancies(labels, k, data.table.half_set, seed=cfg.seed)
        for c in clusters:
            i = c["cluster"]
            c.update(occupancy=float(occ["occupancy"][i]), occupancy_error=float(occ["error"][i]))
            if occ["method"] == "halves":
                c.update(occupancy_half1=float(occ["half1"][i]), occupancy_half2=float(occ["half2"][i]))
        rep["clusters"] = clusters
        rep["occupancy_error_method"] = occ["method"]
        latent_plot(od.path("latent.png"), proj, labels, ratio)
        rep["landscape"] = _write_landscape(od, z, proj, ratio, mean, comps, traj, centers)
        rep["outputs"] += ["cluster_centers.pdb", "latent.png", "landscape.png", "landscape.npz"]
        # ---- half-set cross-validation per state (--halves runs)
        if runs is not None:
            rep["halves"] = True
            rep["crossval"] = cross_validate(od, runs, lat, labels, resolution_A=cfg.crossval_resolution_A,
                                             seed=cfg.seed, dev=dev, progress=progress)
            rep["outputs"] += rep["crossval"]["files"]
        # ---- junk
        if cfg.junk is not None:
            rep["junk"] = _write_junk(od, data, z, scores, cfg, dev, origin)
            rep["outputs"] += [f"{n}.{e}" for n in ("kept", "rejected") for e in ("star", "cs")]
            rep["outputs"] += [f"{n}_map.mrc" for n in ("kept", "rejected") if rep["junk"][n]["map"]]
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


def _write_landscape(od, z, proj, ratio, mean, comps, traj, centers) -> dict:
    """``landscape.npz`` and ``landscape.png``: free energy over PC1/PC2 (PC1 alone for a 1-D
    latent), with the PC trajectories and the cluster centres in PC coordinates."""
    if z.shape[1] >= 2 and proj.shape[1] < 2:
        mean, comps, proj, ratio = pca(z, 2)
    dims = min(2, proj.shape[1])
    comps2 = comps[:dims]
    bins = int(np.clip(round(np.sqrt(len(z)) / (2 if dims == 2 else 1)), 8, 40 if dims == 2 else 80))
    land = free_energy(proj[:, :dims], bins)
    lines = []
    for k in range(min(len(traj), dims)):
        t = np.asarray(traj[f"pc{k + 1}"]["t"])
        pts = np.zeros((len(t), dims))
        pts[:, k] = t
        lines.append(pts)
    cc = (np.asarray(centers) - mean) @ comps2.T
    arrays = {"free_energy": land["free_energy"], "occupancy": land["occupancy"], "centers_pc": cc,
              "explained_variance": np.asarray(ratio[:dims])}
    for d, (e, c) in enumerate(zip(land["edges"], land["centers"])):
        arrays[f"edges_pc{d + 1}"] = e
        arrays[f"grid_pc{d + 1}"] = c
    for k, pts in enumerate(lines):
        arrays[f"trajectory_pc{k + 1}"] = pts
    with atomic_output(od.path("landscape.npz")) as tmp:
        with open(tmp, "wb") as fh:
            np.savez(fh, **arrays)
    landscape_plot(od.path("landscape.png"), land, ratio, lines, cc)
    f = land["free_energy"]
    return {"dims": dims, "bins": bins, "units": "kT", "occupied_bins": int((land["occupancy"] > 0).sum()),
            "max_free_energy_kT": float(np.nanmax(f)), "files": ["landscape.png", "landscape.npz"]}


def _write_junk(od, data, z, scores, cfg, dev, origin) -> dict:
    """``kept``/``rejected`` STAR and .cs subsets (``fit_z > cfg.junk`` rejected) and the map of
    each (``kept_map.mrc``, ``rejected_map.mrc``) with its half-set FSC resolution."""
    rejected = scores["rlnCryogmmFitZ"] > cfg.junk
    out = {"threshold": cfg.junk, "definition": "rejected when fit_z (rlnCryogmmFitZ) > threshold: the image's "
           "residual under its decoded model lies that many robust SDs outside the bulk (too little of the "
           "model along it, too much energy left in it, or both)"}
    for name, sel in (("kept", np.flatnonzero(~rejected)), ("rejected", np.flatnonzero(rejected))):
        sub = with_results(data.table.subset(sel), latent=z[sel], columns={k: v[sel] for k, v in scores.items()})
        write_particles(sub, od.path(f"{name}.star"))
        write_particles(sub, od.path(f"{name}.cs"))
        entry = {"n": int(len(sel)), "star": f"{name}.star", "cs": f"{name}.cs", "map": None, "resolution_A": None}
        if len(sel) >= 2:
            sub = sub.with_half_sets(seed=cfg.seed)
            src = ImageSource.from_table(sub)
            _, _, vol, fsc = reconstruct_table(sub, src, device=dev)
            src.close()
            mapio.write_map(od.path(f"{name}_map.mrc"), vol.numpy(), data.apix, origin_A=origin)
            entry.update(map=f"{name}_map.mrc", resolution_A=float(resolution_at(fsc, data.box, data.apix)))
        out[name] = entry
    out["fraction_rejected"] = float(rejected.mean())
    return out


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
