"""A model series along a conformational trajectory: one network, many maps (Chen 2023).

One small MLP maps a latent coordinate ``z`` to the coordinates of an atomic model. Each map
``i`` of the series has a latent ``z_i`` (1-D by default: the maps' order spread over [0, 1];
or one row per map of any width, e.g. from ``cryogmm hetero analyze``). Training minimises,
over the network's weights,

    L = mean_i [ -S(model(z_i + eps), map_i) ] + w * mean_f E_geometry(model(z_f))

with ``eps`` a small Gaussian noise on the latent (keeps the series continuous), ``S`` a map
similarity of :class:`cryogmm.model_refine.MapTerm` (the same five as ``refine-model``),
``E_geometry`` the :class:`cryogmm.restraints.Restraints` energy per restraint, and ``w``
Chen's automatic weight (map gain / geometry loss over two unconstrained iterations, set at
the start of every phase). The geometry mean runs over the maps' frames and over extra
frames at random points of the latent path, so frames between the maps stay clean.

Model, coarse to fine: the residues are grouped into k-means patches (``n_patches``); the
network outputs one rigid motion per patch (rotation vector in Å at the patch's RMS radius,
translation in Å), blended per residue with Gaussian weights on the distance of its Cα to
the patch centres (so patch boundaries bend instead of tearing), plus per-atom residual
displacements that are switched on in the later phases.

Capture range (``capture``, on by default): a curriculum along the latent path with free
coordinates first. The map that the starting model fits best comes first, then its
neighbours outward; each map is fitted by :func:`cryogmm.model_refine.refine_model` (its
whole pipeline: coarse-to-fine rigid patches on blurred maps, motion domains, residues, full
atom), warm-started from the model of its nearest map already done. The network is then
fitted to these models (``prefit``: mean squared distance at the maps' latents) and trained
on the maps as above (residuals on, full-resolution maps). Without ``capture`` the network
alone is trained in phases on blurred maps (6 Å, then 3 Å extra Gaussian width, map-only
with the patch motions) and the first phase is the same curriculum in the latent: each new
map starts from the network's output at its latent, i.e. from its neighbour's model.

Finally every output frame (``frames`` evenly along the latent path through the maps, by arc
length, and one frame at each map's latent) gets a geometry polish: L-BFGS on the geometry
with a harmonic tether (``polish_anchor_A``) to the network's frame, then a Ramachandran
repair (``rama_repair``: residues left as outliers get a peptide turn where one removes the
outlier, then the tether is released around them and the Rama weight raised; rotamer
outliers set to a mode without new clashes). On the 20 frames of the stored adenylate kinase
series the tethered polish left 1-7 Rama outliers per frame; the repair left none.
"""

from __future__ import annotations

import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from cryogmm.errors import InputError, MapError, OptionError
from cryogmm.io.maps import read_map_grid
from cryogmm.io.outputs import OutputDir, write_report
from cryogmm.io.structures import write_models
from cryogmm.model.density import check_overlap
from cryogmm.io.checkpoint import (
    CHECKPOINT,
    clear_partial,
    fingerprint,
    load_checkpoint,
    save_checkpoint,
    set_rng_state,
)
from cryogmm.model.refine.config import SIMILARITIES
from cryogmm.model.napairs import summary as na_summary
from cryogmm.model.restraints import Restraints
from cryogmm.model.series.config import GOALS, RefineSeriesConfig, geometry_summary
from cryogmm.model.series.fit import SeriesFit
from cryogmm.model.series.net import latent_path, normalise_latent, read_latent
from cryogmm.model.topology import build_topology, write_model
from cryogmm.model.validate import ca_rmsd, map_figures, validate_coords

# ----------------------------------------------------------------------------- the job


def _check_options(cfg: RefineSeriesConfig):
    if cfg.similarity not in SIMILARITIES:
        raise OptionError("--similarity", f"unknown {cfg.similarity!r}; expected one of {', '.join(SIMILARITIES)}")
    if len(cfg.maps) < 2:
        raise OptionError("--maps", f"needs at least 2 maps for a series, got {len(cfg.maps)}")
    if cfg.resolution_A is None or not cfg.resolution_A > 0:
        raise OptionError("--resolution", f"must be a positive resolution in Å, got {cfg.resolution_A}")
    if cfg.frames < 2:
        raise OptionError("--frames", f"must be >= 2, got {cfg.frames}")
    if cfg.steps < 1:
        raise OptionError("--steps", f"must be >= 1, got {cfg.steps}")
    if cfg.references is not None and len(cfg.references) != len(cfg.maps):
        raise OptionError("--references", f"{len(cfg.references)} models for {len(cfg.maps)} maps; give one per map")


def _check_inputs(cfg: RefineSeriesConfig):
    _check_options(cfg)
    for p in cfg.maps:
        if not Path(p).is_file():
            raise MapError(p, "does not exist")


def check_grids(topo, grids, cfg: RefineSeriesConfig):
    """The maps of a series share box and sampling, overlap the model and allow the resolution."""
    g0 = grids[0]
    for p, g in zip(cfg.maps, grids):
        if g.shape != g0.shape or abs(g.apix - g0.apix) > 1e-4 or np.abs(g.origin_A - g0.origin_A).max() > 1e-3:
            raise MapError(p, f"has box {tuple(g.shape)} at {g.apix:g} Å/px, origin {np.round(g.origin_A, 2).tolist()} Å, "
                              f"but {cfg.maps[0]} has {tuple(g0.shape)} at {g0.apix:g} Å/px, origin "
                              f"{np.round(g0.origin_A, 2).tolist()} Å; the maps of a series must share box and sampling")
        check_overlap(topo, g, p)
    if cfg.resolution_A < 2 * g0.apix - 1e-6:
        raise OptionError("--resolution", f"{cfg.resolution_A:g} Å is finer than Nyquist of the maps ({2 * g0.apix:g} Å)")


def _map_fit(topo, coords, grid, res) -> dict:
    mf = map_figures(topo, coords, grid, res)
    return {k: v for k, v in mf.items() if k != "qscore_per_residue"}


class _HeavyView:
    """The heavy atoms of a topology as :func:`cryogmm.gmm.write_models` reads a model."""

    def __init__(self, topo):
        h = ~topo.is_h
        self.atom_name, self.res_name, self.chain = topo.atom_name[h], topo.res_name[h], topo.chain[h]
        self.seq_id, self.element = topo.seq_id[h], topo.element[h]


@dataclass
class SeriesResult:
    """What :func:`fit_series` made, in memory."""

    fit: SeriesFit
    z_raw: np.ndarray  # the maps' latents as given [m, d]
    z: np.ndarray  # normalised
    map_frames: list  # polished model at each map's latent, [M, 3] each (all topology atoms)
    frames: list  # polished models evenly along the latent path
    per_map: list | None  # figures of the frames in memory (None: not measured, see write_series)
    per_frame: list | None
    steps_between: list | None
    seconds: dict
    raw_maps: list | None = None  # the network's models at the maps' latents, before the polish
    raw_frames: list | None = None  # and along the path
    path: tuple | None = None  # latent_path(z, frames): (points, seg, frac)
    resumed_from_unit: int | None = None  # checkpoint units done before a resume (None: not resumed)


def fit_series(topo, grids: list, cfg: RefineSeriesConfig, z_raw: np.ndarray | None = None,
               progress=None, checkpoint: Path | None = None, resume: bool = False,
               measure: bool = True) -> SeriesResult:
    """The model series of ``topo`` over ``grids`` (one :class:`~cryogmm.io.maps.MapGrid` per map,
    all on one box; ``cfg.maps`` names them), in memory: the engine API the ChimeraX door calls.
    ``z_raw``: one latent row per map (default: the maps' order spread over [0, 1]).
    ``checkpoint``: a path where the state is saved after every captured model, the prefit,
    every training phase and every polished frame; ``resume``: continue from it. ``measure``:
    the figures of the frames in memory (``per_map``, ``per_frame``; the job measures the
    written files instead)."""
    _check_options(cfg)
    check_grids(topo, grids, cfg)
    fp = fingerprint(cfg) if checkpoint is not None else None
    state = load_checkpoint(checkpoint, fp) if resume else None
    m = len(grids)
    if z_raw is None:
        z_raw = np.linspace(0.0, 1.0, m)[:, None]
    z = normalise_latent(z_raw)
    torch.manual_seed(cfg.seed)
    if cfg.threads:
        torch.set_num_threads(int(cfg.threads))

    fit = SeriesFit(topo, cfg, grids, z, progress)
    if state is not None:
        fit.load_state(state, int(state["units_done"]))
        set_rng_state(state)
    if checkpoint is not None:
        fit.save = lambda k: save_checkpoint(checkpoint, {**fit.state(), "units_done": k}, fp)
    t_train = time.time()
    with tempfile.TemporaryDirectory(prefix="cryogmm-series-") as work:
        fit.train(Path(work))
    t_train = time.time() - t_train

    t_pol = time.time()
    # frames at the maps' latents and evenly along the path
    pts, seg, frac = latent_path(z, cfg.frames)
    raw_maps = [fit.frame(z[i]) for i in range(m)]
    raw_frames = [fit.frame(p) for p in pts]
    polished = [x.cpu().numpy() for x in fit.polish_all(raw_maps + raw_frames)]
    map_frames, frames = polished[:m], polished[m:]
    t_pol = time.time() - t_pol
    res = SeriesResult(fit=fit, z_raw=z_raw, z=z, map_frames=map_frames, frames=frames, per_map=None,
                       per_frame=None, steps_between=None, seconds={"train": t_train, "polish": t_pol},
                       raw_maps=[x.cpu().numpy() for x in raw_maps], raw_frames=[x.cpu().numpy() for x in raw_frames],
                       path=(pts, seg, frac), resumed_from_unit=None if state is None else int(state["units_done"]))
    if measure:
        measure_series(topo, res, cfg, map_frames, frames)
    return res


def measure_series(topo, res: SeriesResult, cfg: RefineSeriesConfig, map_frames: list, frames: list,
                   map_topos: list | None = None, frame_topos: list | None = None):
    """Fill ``res.per_map``, ``res.per_frame`` and ``res.steps_between`` with the figures of the
    models ``map_frames`` and ``frames`` (``[M, 3]`` each, ``topo``'s atoms). ``map_topos``,
    ``frame_topos``: each model's own topology (a written file re-read: its riding H placed
    from its own coordinates, as ``cryogmm validate`` places them); default ``topo``."""
    t_val = time.time()
    fit, z_raw, z, grids = res.fit, res.z_raw, res.z, res.fit.grids
    pts, seg, frac = res.path
    val = Restraints(topo)
    map_topos = map_topos or [topo] * len(map_frames)
    frame_topos = frame_topos or [topo] * len(frames)

    def restraints(t):
        return val if t is topo else None

    per_map = []
    for i in range(len(grids)):
        row = {"map": str(cfg.maps[i]), "latent": z_raw[i].tolist(), "latent_normalised": z[i].tolist(),
               "curriculum_rank": int(np.nonzero(fit.order == i)[0][0])}
        row["start"] = _map_fit(topo, topo.coords, grids[i], cfg.resolution_A)
        mt = map_topos[i]
        row["frame"] = _map_fit(mt, map_frames[i], grids[i], cfg.resolution_A)
        row["frame_geometry"] = geometry_summary(validate_coords(mt, map_frames[i], restraints(mt)))
        row["network_geometry"] = geometry_summary(validate_coords(topo, res.raw_maps[i], val))
        if cfg.references is not None:
            row["start_ca_rmsd_to_reference_A"] = ca_rmsd(topo, topo.coords, cfg.references[i])
            row["ca_rmsd_to_reference_A"] = ca_rmsd(mt, map_frames[i], cfg.references[i])
            row["network_ca_rmsd_to_reference_A"] = ca_rmsd(topo, res.raw_maps[i], cfg.references[i])
        per_map.append(row)
    per_frame = []
    for f in range(cfg.frames):
        j = int(seg[f])
        row = {"frame": f + 1, "latent_normalised": pts[f].tolist(), "between_maps": [j, j + 1],
               "fraction": float(frac[f])}
        ft = frame_topos[f]
        row.update(geometry_summary(validate_coords(ft, frames[f], restraints(ft))))
        row["network_geometry"] = geometry_summary(validate_coords(topo, res.raw_frames[f], val))
        row["map_cc_neighbours"] = [_map_fit(ft, frames[f], grids[k], cfg.resolution_A)["map_cc_mask"]
                                    for k in (j, j + 1)]
        per_frame.append(row)
    mv = topo.movable & ~topo.is_h
    res.steps_between = [float(np.sqrt(((frames[f + 1][mv] - frames[f][mv]) ** 2).sum(1).mean()))
                         for f in range(cfg.frames - 1)]
    res.per_map, res.per_frame = per_map, per_frame
    res.seconds["validate"] = time.time() - t_val


def write_series(topo, res: SeriesResult, cfg: RefineSeriesConfig, t0: float | None = None) -> dict:
    """series.pdb, frame_XX.pdb, map_XX.pdb, network.pt and report.json into ``cfg.out``;
    returns the report. The figures of the frames (``per_map``, ``per_frame``,
    ``rms_step_between_frames_A``) are measured on map_XX.pdb and frame_XX.pdb as written
    (coordinates rounded to the file's 0.001 Å, re-read as ``cryogmm validate`` reads them)."""
    fit = res.fit
    heavy = ~topo.is_h
    with OutputDir(cfg.out) as d:
        write_models(d.path("series.pdb"), _HeavyView(topo), np.stack([f[heavy] for f in res.frames]))
        for f, x in enumerate(res.frames):
            write_model(topo, x, d.path(f"frame_{f + 1:02d}.pdb"))
        for i, x in enumerate(res.map_frames):
            write_model(topo, x, d.path(f"map_{i + 1:02d}.pdb"))
        torch.save({"state_dict": fit.model.net.state_dict(), "latent": res.z_raw, "latent_normalised": res.z,
                    "n_patches": fit.model.n_patches, "hidden": cfg.hidden}, d.path("network.pt"))
        # the written files' coordinates, in this topology's atom order (the files hold its heavy atoms)
        wm = [_reread(topo, d.path(f"map_{i + 1:02d}.pdb"), cfg) for i in range(len(res.map_frames))]
        wf = [_reread(topo, d.path(f"frame_{f + 1:02d}.pdb"), cfg) for f in range(len(res.frames))]
        measure_series(topo, res, cfg, [t.coords for t in wm], [t.coords for t in wf], wm, wf)
        per_map, per_frame = res.per_map, res.per_frame
        rep = {
            "model": str(cfg.model), "maps": [str(p) for p in cfg.maps], "resolution_A": cfg.resolution_A,
            "similarity": cfg.similarity, "latent": None if cfg.latent is None else str(cfg.latent),
            "latent_dim": int(res.z.shape[1]), "frames": cfg.frames, "steps_per_phase": cfg.steps,
            "n_patches": fit.model.n_patches, "latent_noise": cfg.latent_noise, "geometry_rounds": cfg.geometry_rounds,
            "goals": GOALS, "curriculum_order": [int(i) for i in fit.order],
            "all_frames_pass_goals": all(r["passes_goals"] for r in per_frame),
            "all_map_frames_pass_goals": all(r["frame_geometry"]["passes_goals"] for r in per_map),
            "figures_measured_on": "map_XX.pdb and frame_XX.pdb as written (network_geometry: the network's "
                                   "models in memory, not written)",
            "capture": getattr(fit, "capture_log", None), "per_map": per_map, "per_frame": per_frame,
            "rms_step_between_frames_A": res.steps_between,
            "fixed_residues": topo.fixed_residues, "warnings": topo.warnings, "log": fit.log,
            "backbone_library": topo.backbone_library,
            "na_pairs": None if topo.na_pairs is None else na_summary(topo.na_pairs),
            "seconds": {**res.seconds, "total": None if t0 is None else time.time() - t0},
            "seed": cfg.seed, "resumed_from_unit": res.resumed_from_unit,
        }
        rep = write_report(d.path("report.json"), rep)
    return rep


def _reread(topo, path, cfg):
    """The topology of a model file written from ``topo`` (its atoms in ``topo``'s order, riding
    H placed from the file's coordinates as ``cryogmm validate`` places them)."""
    wt = build_topology(path, dictionaries=cfg.restraints)
    if wt.coords.shape != topo.coords.shape:
        raise RuntimeError(f"{path}: {len(wt.coords)} atoms re-read, {len(topo.coords)} written")
    return wt


def refine_series(cfg: RefineSeriesConfig, progress=None, resume: bool = False) -> dict:
    """The ``refine-series`` job: fit one latent-to-model network to the maps ``cfg.maps``; write
    ``series.pdb`` (``cfg.frames`` models evenly along the latent path), ``frame_XX.pdb``,
    ``map_XX.pdb`` (the frame at each map's latent), ``network.pt`` and ``report.json`` into
    ``cfg.out``. Returns the report. The state is saved in ``cfg.out/checkpoint.pt`` after every
    captured model, the prefit, every training phase and every polished frame (removed when the
    outputs are written); ``resume`` continues from it."""
    t0 = time.time()
    _check_inputs(cfg)
    topo = build_topology(cfg.model, dictionaries=cfg.restraints, backbone_library=cfg.backbone_library,
                          na_pairs=cfg.na_pairs)
    grids = [read_map_grid(p) for p in cfg.maps]  # checked against each other by fit_series
    z_raw = read_latent(cfg.latent, len(grids)) if cfg.latent is not None else None
    if cfg.references is not None:
        for p in cfg.references:
            if not Path(p).is_file():
                raise InputError(p, "does not exist")
    ckpt = Path(cfg.out) / CHECKPOINT
    if resume:
        clear_partial(cfg.out)
    res = fit_series(topo, grids, cfg, z_raw, progress, checkpoint=ckpt, resume=resume, measure=False)
    rep = write_series(topo, res, cfg, t0)
    ckpt.unlink(missing_ok=True)
    return rep
