"""Half-set cross-validation of heterogeneity (``hetero train --halves``, ``hetero analyze``).

Training (:func:`train_halves`): the particles are split by RELION's ``rlnRandomSubset``; each
half trains its own network with the ordinary training (:func:`cryogmm.hetero.train.train_hetero`)
into ``RUN/half1`` and ``RUN/half2``; ``RUN/halves.json`` marks the folder as a halves run and
``RUN/particles.star`` holds every particle of the two halves.

Analysis (:func:`halves_latent`, :func:`cross_validate`): every particle is encoded by the
network of its own half. Half 2's latent coordinates are expressed in half 1's axes by a linear
map fitted over all particles (both encoders applied to every particle; an alignment of
coordinates only, ``zdim x (zdim + 1)`` numbers), so that one clustering defines the states of
both halves. Per state, each half's model is its own decoder at the mean latent of its own
particles of the state, and each half's map the back-projection of its own particles of the
state: nothing of half 1's model or map comes from half 2's images (the cluster centres, shared
as RELION's classes are, excepted). The map-model FSC, under one soft mask around both halves'
models, is computed for the four pairs: model 1 against map 1 (own half) and map 2 (other
half), model 2 against map 2 and map 1.

A map's FSC against any model scales with the map's own noise level, which differs between the
halves (a state rarely holds the same number of particles in both), so every model-map FSC is
also divided, shell by shell, by the map's C_ref (``sqrt(2F / (1 + F))`` of the FSC between the
maps of a random split of the map's particles; Rosenthal & Henderson): ``N(X, Y)``, the
correlation of model X with the truth as map Y can judge it. Flags per state and half X (other
half Y), with ``tol`` the larger of ``min_tol`` and three standard errors of a difference of two
such values (shell sizes, mask fraction and the FSC values give the standard error of each
shell, ``(1 - F^2) / sqrt(f N / 2)``, divided by C_ref):

- ``own_half_bias``: model X fits its own half's map better than the other half's map,
  ``N(X, X) - N(X, Y) > tol`` (model bias: the model carries its own half's noise);
- ``other_model_better``: half Y's own model fits half Y's map better than model X does,
  ``N(Y, Y) - N(X, Y) > tol`` (model X is not supported by the independent half: a wrong
  reference region, a local minimum).
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from cryogmm import distributed
from cryogmm.bridge.images import ImageSource
from cryogmm.bridge.io import read_particles, write_particles
from cryogmm.bridge.results import with_results
from cryogmm.core.fourier import shell_voxel_counts
from cryogmm.core.gaussians import gaussians_to_map
from cryogmm.core.masks import soft_mask_from_map
from cryogmm.core.similarity import fsc as fsc_fn
from cryogmm.core.similarity import resolution_at
from cryogmm.errors import StarError
from cryogmm.hetero.run import Run
from cryogmm.hetero.train import train_hetero
from cryogmm.io import maps as mapio
from cryogmm.io.outputs import atomic_output, write_report
from cryogmm.io.plots import new_figure, save_figure
from cryogmm.io.structures import gaussians_from_coords, write_models
from cryogmm.recon.job import reconstruct_table
from cryogmm.runtime import Timer, pick_device

HALVES = "halves.json"
HALF_DIRS = ("half1", "half2")
#: the smaller half must hold at least this fraction of the larger one
MIN_HALF_RATIO = 0.8
MIN_TOL = 0.02


# --------------------------------------------------------------------------- training
def split_halves(table, path) -> tuple[np.ndarray, np.ndarray]:
    """Row indices of half 1 and half 2 (``rlnRandomSubset``); a :class:`StarError` naming
    ``path`` when a particle has no half or the halves are of very unequal size."""
    h = table.half_set
    bad = int(np.sum((h != 1) & (h != 2)))
    if "rlnRandomSubset" not in table.particles.columns or bad:
        raise StarError(path, f"--halves needs rlnRandomSubset (1 or 2) on every particle; "
                        f"{bad if 'rlnRandomSubset' in table.particles.columns else table.n} of {table.n} have none "
                        "(a RELION Refine3D run_data.star has it)")
    i1, i2 = np.flatnonzero(h == 1), np.flatnonzero(h == 2)
    lo, hi = sorted((len(i1), len(i2)))
    if hi == 0 or lo < MIN_HALF_RATIO * hi:
        raise StarError(path, f"--halves: half sets of very unequal size ({len(i1)} and {len(i2)} particles; "
                        f"the smaller must hold at least {MIN_HALF_RATIO:.0%} of the larger)")
    return i1, i2


def is_halves_run(path) -> bool:
    return (Path(path) / HALVES).is_file()


def train_halves(cfg, progress=None) -> dict:
    """``hetero train --halves``: one ordinary training per half set into ``cfg.out/half1`` and
    ``cfg.out/half2`` (each a complete run, analysable on its own), ``cfg.out/particles.star``
    (both halves), ``halves.json`` and ``report.json`` (both trainings' figures)."""
    timer = Timer()
    star = Path(cfg.star)
    if not star.is_file():
        raise StarError(star, "no such file")
    table = read_particles(star, project_dir=cfg.project_dir)
    if cfg.max_particles:
        table = table.subset(np.arange(min(cfg.max_particles, table.n)))
    halves = split_halves(table, star)
    out = Path(cfg.out)
    distributed.setup(pick_device(cfg.device))
    stars = [out / d / "particles.star" for d in HALF_DIRS]
    if distributed.is_main() and not cfg.resume:
        for d, idx in zip(HALF_DIRS, halves):
            (out / d).mkdir(parents=True, exist_ok=True)
            write_particles(table.subset(idx).relocated(out / d), out / d / "particles.star")
        write_particles(table.relocated(out), out / "particles.star")
    distributed.barrier()
    reps = []
    for k, (d, s) in enumerate(zip(HALF_DIRS, stars)):
        hp = (lambda name, i, n, k=k: progress(f"half {k + 1}: {name}", i, n)) if progress else None
        reps.append(train_hetero(replace(cfg, star=s, out=out / d, max_particles=None), progress=hp))
    rep = {"job": "hetero train --halves", "star": str(star.absolute()), "halves": list(HALF_DIRS),
           "n_particles": int(sum(len(i) for i in halves)), "n_half": [int(len(i)) for i in halves],
           "epochs": reps[0]["epochs"], "history": reps[0]["history"], "history_half2": reps[1]["history"],
           "images_per_s": float(np.mean([r["images_per_s"] or 0.0 for r in reps])),
           "half_reports": [f"{d}/report.json" for d in HALF_DIRS], "seconds": timer(),
           "outputs": [HALVES, "particles.star", "report.json"] + [f"{d}/" for d in HALF_DIRS]}
    if distributed.is_main():
        with atomic_output(out / HALVES) as tmp:
            tmp.write_text(json.dumps({"halves": list(HALF_DIRS), "particles": "particles.star",
                                       "n_half": rep["n_half"], "source": rep["star"]}, indent=2) + "\n")
        write_report(out / "report.json", rep)
    distributed.barrier()
    return rep


# --------------------------------------------------------------------------- latents
def load_halves(run_dir, device=None, star=None, project_dir=None):
    """The two half runs of a ``--halves`` folder, each over every particle (``particles.star``,
    or ``star``: the same particles moved)."""
    run_dir = Path(run_dir)
    meta = json.loads((run_dir / HALVES).read_text())
    star = Path(star) if star is not None else run_dir / meta.get("particles", "particles.star")
    runs = [Run(run_dir / d, device=device, star=star, project_dir=project_dir) for d in meta["halves"]]
    split_halves(runs[0].data.table, star)
    return runs


def halves_latent(runs) -> dict:
    """Every particle encoded by its own half's network, half 2's coordinates mapped onto half
    1's axes (least squares over all particles, both encoders applied to every particle).

    Returns ``z`` (the combined latent in half 1's axes), ``own`` (each particle's latent in its
    own half's axes), ``half`` (1/2), ``z1``/``z2`` (each encoder on every particle) and
    ``alignment_r2`` (per dimension of half 1, how much of it half 2's mapped latent explains)."""
    z1, z2 = runs[0].encode_all(), runs[1].encode_all()
    half = runs[0].data.table.half_set
    a = np.c_[z2, np.ones(len(z2))]
    m, *_ = np.linalg.lstsq(a, z1, rcond=None)
    z2in1 = a @ m
    var = z1.var(0)
    r2 = 1.0 - ((z1 - z2in1) ** 2).mean(0) / np.where(var > 0, var, 1.0)
    own = np.where((half == 1)[:, None], z1, z2)
    z = np.where((half == 1)[:, None], z1, z2in1)
    return {"z": z, "own": own, "half": half, "z1": z1, "z2": z2, "map_2_to_1": m, "alignment_r2": r2}


# --------------------------------------------------------------------------- cross-validation
def _reconstruct(table, idx, seed, dev):
    """Back-projection (Wiener-filtered with the FSC of a random split of these particles), and
    the maps of the two random halves of the split."""
    rng = np.random.default_rng(seed)
    split = np.ones(len(idx), dtype=np.int64)
    split[rng.permutation(len(idx))[: len(idx) // 2]] = 2
    sub = with_results(table.subset(idx), columns={"rlnRandomSubset": split})
    src = ImageSource.from_table(sub)
    try:
        h1, h2, vol, _ = reconstruct_table(sub, src, device=dev)
    finally:
        src.close()
    return vol.double(), h1.double(), h2.double()


def map_quality(h1, h2, mask) -> np.ndarray:
    """Expected FSC of the map of all particles against a perfect model, per shell:
    ``sqrt(2 F / (1 + F))`` of the masked FSC ``F`` between the maps of two random halves of the
    particles (Rosenthal & Henderson's C_ref), 0 where ``F <= 0``."""
    f = fsc_fn(h1, h2, mask=mask).cpu().double().numpy().clip(0.0, 1.0)
    return np.sqrt(2.0 * f / (1.0 + f))


def normalised_fsc(curve, cref, weights, shells: int) -> float:
    """Weighted mean over shells ``1..shells`` of a model-map FSC divided by the map's C_ref: the
    model's correlation with the truth as the map can judge it, free of the map's own noise level
    (the particle count of the state in that half)."""
    c, q, w = (np.asarray(x, dtype=np.float64)[1: shells + 1] for x in (curve, cref, weights))
    ok = q > 1e-3
    return float((w[ok] * np.clip(c[ok] / q[ok], -1.5, 1.5)).sum() / max(w[ok].sum(), 1e-12))


def fsc_tolerance(curves, crefs, weights, mask, box: int, shells: int, min_tol: float = MIN_TOL) -> float:
    """Three standard errors of the difference of two normalised mean FSCs
    (:func:`normalised_fsc`; the larger pair's), floored at ``min_tol``. Per shell the standard
    error of an FSC value ``F`` over ``N`` Fourier voxels under a mask of volume fraction ``f``
    is taken as ``(1 - F^2) / sqrt(f N / 2)`` (Friedel pairs; the mask cuts the independent
    samples), divided by the map's C_ref like the value."""
    f = float(mask.mean())
    counts = shell_voxel_counts(box).double().cpu().numpy()[1: shells + 1]
    w = np.asarray(weights, dtype=np.float64)[1: shells + 1]
    se = []
    for cv, q in zip(curves, crefs):
        F = np.asarray(cv, dtype=np.float64)[1: shells + 1]
        qq = np.maximum(np.asarray(q, dtype=np.float64)[1: shells + 1], 1e-3)
        sd = (1.0 - F**2) / np.sqrt(np.maximum(1.0, f * counts / 2.0)) / qq
        se.append(np.sqrt(((w * sd) ** 2).sum()) / max(w.sum(), 1e-12))
    a, b = sorted(se)[-2:]
    return float(max(min_tol, 3.0 * np.sqrt(a**2 + b**2)))


def cross_validate(od, runs, lat: dict, labels: np.ndarray, *, resolution_A: float | None = None, seed: int = 0,
                   dev=None, min_particles: int = 10, progress=None) -> dict:
    """Per state (``labels``), each half's model against both halves' maps; writes
    ``crossval_stateK_{model,map}{1,2}.mrc``, ``crossval_models_half{1,2}.pdb`` (one MODEL per
    state scored), ``crossval.png`` and returns the report entry (``states`` table, flags)."""
    progress = progress or (lambda *a: None)
    r1, r2 = runs
    data = r1.data
    table, box, apix = data.table, data.box, data.apix
    half = lat["half"]
    res = float(resolution_A or r1.cfg.lowpass_A)
    shells = max(1, min(box // 2, int(np.floor(box * apix / res))))
    origin = r1.ref.center_A - (box // 2) * apix
    states, models = [], ([], [])
    ks = [int(k) for k in np.unique(labels)]
    for n_done, k in enumerate(ks):
        idx = [np.flatnonzero((labels == k) & (half == h)) for h in (1, 2)]
        entry = {"state": k, "n_half1": int(len(idx[0])), "n_half2": int(len(idx[1]))}
        if min(len(i) for i in idx) < min_particles:
            entry["skipped"] = f"fewer than {min_particles} particles in a half"
            states.append(entry)
            continue
        mod_maps, maps, splits = [], [], []
        for h, (run, i) in enumerate(zip(runs, idx)):
            zmean = lat["own"][i].mean(0)
            atoms = run.decode_atoms(zmean[None])[0]
            models[h].append(atoms)
            g = gaussians_from_coords(run.ref.model, atoms, "atoms", resolution_A=2.0 * apix,
                                      center_A=run.ref.center_A)
            mm = gaussians_to_map(g, box, apix).double()
            mod_maps.append(mm)
            vol, s1, s2 = _reconstruct(table, i, seed + 17 * k + h, dev)
            maps.append(vol)
            splits.append((s1, s2))
            mapio.write_map(od.path(f"crossval_state{k}_model{h + 1}.mrc"), mm.float().numpy(), apix, origin_A=origin)
            mapio.write_map(od.path(f"crossval_state{k}_map{h + 1}.mrc"), maps[h].float().numpy(), apix,
                            origin_A=origin)
        # one mask for all four comparisons: around both models (density above 5 % of the peak)
        masks = [soft_mask_from_map(m, 0.05 * float(m.max()), extend_px=2, edge_px=3) for m in mod_maps]
        mask = torch.maximum(*masks)
        curves = {}
        for a in (0, 1):
            for b in (0, 1):
                curves[(a, b)] = fsc_fn(mod_maps[a], maps[b], mask=mask).cpu().numpy()
        mean = {ab: float(c[1: shells + 1].mean()) for ab, c in curves.items()}
        r05 = {ab: float(resolution_at(c, box, apix, threshold=0.5)) for ab, c in curves.items()}
        # each map's own noise level (C_ref from a random split of its particles) divided out, so
        # that a half with more particles of the state does not look like a better fit
        cref = [map_quality(a, b, mask) for a, b in splits]
        weights = cref[0] * cref[1]
        norm = {ab: normalised_fsc(c, cref[ab[1]], weights, shells) for ab, c in curves.items()}
        tol = fsc_tolerance([curves[(0, 0)], curves[(0, 1)], curves[(1, 1)], curves[(1, 0)]],
                            [cref[0], cref[1], cref[1], cref[0]], weights, mask, box, shells)
        halfmap = fsc_fn(maps[0], maps[1], mask=mask).cpu().numpy()
        entry.update({
            "mean_fsc_band_A": [float(box * apix), res],
            "model1_vs_map1": mean[(0, 0)], "model1_vs_map2": mean[(0, 1)],
            "model2_vs_map2": mean[(1, 1)], "model2_vs_map1": mean[(1, 0)],
            "normalised": {"model1_vs_map1": norm[(0, 0)], "model1_vs_map2": norm[(0, 1)],
                           "model2_vs_map2": norm[(1, 1)], "model2_vs_map1": norm[(1, 0)]},
            "map_cref_mean": [float(q[1: shells + 1].mean()) for q in cref],
            "fsc05_A_model1_vs_map1": r05[(0, 0)], "fsc05_A_model1_vs_map2": r05[(0, 1)],
            "fsc05_A_model2_vs_map2": r05[(1, 1)], "fsc05_A_model2_vs_map1": r05[(1, 0)],
            "map1_vs_map2": float(halfmap[1: shells + 1].mean()),
            "tolerance": tol, "mask_fraction": float(mask.mean()),
        })
        flags = []
        for x, y in ((0, 1), (1, 0)):
            own_gap = norm[(x, x)] - norm[(x, y)]
            other_gap = norm[(y, y)] - norm[(x, y)]
            entry[f"half{x + 1}_own_minus_other"] = own_gap
            entry[f"half{x + 1}_other_model_gap"] = other_gap
            if own_gap > tol:
                flags.append(f"half{x + 1}_own_half_bias")
            if other_gap > tol:
                flags.append(f"half{x + 1}_other_model_better")
        entry["flags"] = flags
        entry["flagged"] = bool(flags)
        entry["curves"] = {f"model{a + 1}_vs_map{b + 1}": [float(v) for v in c] for (a, b), c in curves.items()}
        entry["files"] = [f"crossval_state{k}_{w}{h}.mrc" for w in ("model", "map") for h in (1, 2)]
        states.append(entry)
        progress("cross-validation", n_done + 1, len(ks))
    scored = [s for s in states if "skipped" not in s]
    files = []
    for h in (0, 1):
        if models[h]:
            write_models(od.path(f"crossval_models_half{h + 1}.pdb"), runs[h].ref.model, np.stack(models[h]))
            files.append(f"crossval_models_half{h + 1}.pdb")
    if scored:
        _plot(od.path("crossval.png"), scored)
        files.append("crossval.png")
    return {"resolution_A": res, "shells": shells, "states": states,
            "flagged_states": [s["state"] for s in scored if s["flagged"]],
            "alignment_r2": [float(v) for v in lat["alignment_r2"]],
            "definition": "per state: each half's model (its own decoder at the mean latent of its own particles) "
                          "against each half's back-projected map, mean masked FSC over shells to resolution_A "
                          "(model1_vs_map1 ...) and normalised by each map's C_ref from a random split of its "
                          "particles (normalised: the model's correlation with the truth as that map judges it); "
                          "flags from the normalised values: own_half_bias when N(X,X) - N(X,Y) > tolerance, "
                          "other_model_better when N(Y,Y) - N(X,Y) > tolerance (tolerance: 3 standard errors, at "
                          "least 0.02)",
            "files": files + [f for s in scored for f in s["files"]]}


def _plot(path, states):
    fig, ax = new_figure(1, (max(5.0, 1.3 * len(states) + 2), 3.8))
    x = np.arange(len(states))
    w = 0.2
    keys = [("model1_vs_map1", "model 1 / map 1 (own)", "tab:blue"),
            ("model1_vs_map2", "model 1 / map 2", "lightsteelblue"),
            ("model2_vs_map2", "model 2 / map 2 (own)", "tab:orange"),
            ("model2_vs_map1", "model 2 / map 1", "navajowhite")]
    for j, (key, lab, col) in enumerate(keys):
        ax.bar(x + (j - 1.5) * w, [s["normalised"][key] for s in states], w, label=lab, color=col)
    for i, s in enumerate(states):
        if s["flagged"]:
            top = max(s["normalised"][k] for k, _, _ in keys)
            ax.text(i, top + 0.01, "!", ha="center", color="tab:red", fontsize=14)
    ax.set_xticks(x)
    ax.set_xticklabels([f"state {s['state']}" for s in states])
    ax.set_ylabel(f"masked FSC / map C_ref, to {states[0]['mean_fsc_band_A'][1]:.1f} Å")
    vals = [s["normalised"][k] for s in states for k, _, _ in keys]
    ax.set_ylim(max(0.0, min(vals) - 0.1), max(vals) + 0.05)  # the differences that matter are small: zoomed
    ax.legend(fontsize=7, loc="lower right")
    ax.set_title("half-set cross-validation per state (! flagged)")
    return save_figure(fig, path)
