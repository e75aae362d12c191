"""Atomic model refinement into a map with differentiable stereochemistry.

The model's heavy atoms are moved by a chain of optional stages, each minimising

    L = -S_map(model map, map) + w * E_geometry            (Adam)

- ``rigid``: k-means patches of whole residues (``n_patches``, 64 by default) moved as rigid
  bodies, coarse to fine (one body, then 8, then ``n_patches``), with the map and the model
  map both blurred by extra Gaussian widths (8, 5, 3 Å) for capture range. The patches'
  motions are then clustered into motion domains (DynDom's idea: patches whose rigid
  motions differ by less than 1.5 Å RMS belong together) and, when there are several, the
  fit is redone from the start with the domains as the coarse bodies; the result that fits
  the map better is kept (``motion="local"`` skips this);
- ``residue``: every residue a rigid body;
- ``rotamers``: with a map at 3.5 Å or better, first a peptide-flip scan (each trans
  peptide's C, O, N turned 140-220° about its CA-CA axis, kept when the density at them rises
  clearly, with no new clash or Ramachandran outlier: ``model_rotamers.fit_peptides``), then every side chain
  tried at each mode of its rotamer mixture (chi1/chi2 +-15°), scored by the map density at
  its atoms; the best fit without new clashes kept (``model_rotamers.fit_side_chains``;
  without a map, rotamer outliers only);
- ``full``: every heavy atom free, the full geometry (Adam), then an L-BFGS polish at the
  weakest geometry weight whose model meets the geometry targets (bond and angle RMSZ <=
  0.7, no Ramachandran outlier, rotamer outliers <= 1 %, clashscore <= 1; ``polish_rounds``).

The default chain is rigid, residue, then rotamers + full three times. After the first full
stage, residue-stage moves that left new Ramachandran outliers are undone
(``rama_guard``) and the next round repairs them.

Map similarities (``similarity``): ``fsc`` (the default: mean FSC of volumes up to the
resolution, Chen; a non-cubic map is padded to a cube), ``frc`` (mean FRC of projections at
24 fixed orientations up to the resolution, Chen), ``relative-entropy``,
``cross-correlation``, ``inner-product`` (Blau & Lindahl / GROMACS, model map spread with
sigma = res / (2 sqrt(ln 4))). The Blau & Lindahl spreading is wide (1.7 Å at 4 Å): on
adenylate kinase (4 Å) relative entropy placed the Cα to 0.59 Å, fsc to 0.30 Å. The geometry weight
``w`` is set at the start of each stage by Chen's rule: the ratio of the map-score gain to
the geometry loss over two unconstrained iterations (floored at 1e-3 in the rigid and
residue stages, where bonds between bodies may stretch, and 0.05 in the full-atom stage).
Blau & Lindahl's adaptive scaling (the map force constant divided by 1+alpha when the
smoothed similarity rises, multiplied by 1+2 alpha when it falls) is available for the
full-atom stage (``extra={"adaptive_scaling": True}``) and off by default: on the
adenylate kinase benchmark it drove the map force to its floor and stalled the stage.

Riding hydrogens are rebuilt from the heavy atoms at every step for the clash term.
Residues outside the monomer library are restrained to their own geometry and move with
their neighbours; waters stay fixed; both are reported (``self_restrained``, ``fixed_residues``).
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch

from cryogmm.errors import OptionError
from cryogmm.io.maps import MapGrid, read_map_grid
from cryogmm.io.outputs import write_report
from cryogmm.io.structures import pdb_format_problem
from cryogmm.model.density import check_overlap
from cryogmm.model.refine.config import (
    AUTO_LOCAL_MIN_CC,
    MOTION_PRESETS,
    MOTIONS,
    SIMILARITIES,
    STAGES,
    RefineModelConfig,
)
from cryogmm.io.checkpoint import (
    CHECKPOINT,
    clear_partial,
    fingerprint,
    load_checkpoint,
    save_checkpoint,
    set_rng_state,
)
from cryogmm.model.refine.domains import rigid_stage
from cryogmm.model.refine.mapterm import MapTerm
from cryogmm.model.refine.polish import polish_rounds, rama_guard, rama_repair
from cryogmm.model.refine.refiner import Refiner
from cryogmm.model.napairs import summary as na_summary
from cryogmm.model.restraints import Restraints
from cryogmm.model.rotamers import fit_bases, fit_peptides, fit_side_chains, rebuild_rotamers
from cryogmm.model.topology import Topology, build_topology, write_model
from cryogmm.model.validate import ca_rmsd, map_figures, validate_coords


class RefinementStopped(Exception):
    """Raised inside a refinement when its ``stop`` event is set (``cryogmm stop`` in ChimeraX)."""


@dataclass
class RefineResult:
    """What :func:`refine_coords` made, in memory."""

    coords: np.ndarray  # [M, 3] Å, every atom of the topology (riding H included), the refined model
    before: dict  # validation (and map) figures of the start
    after: dict  # the same of the result (of the last coordinates when stopped)
    stages: list
    log: list
    trajectory: list  # frames ([M, 3]) along the run
    stage_seconds: dict
    rms_moved_A: float  # heavy movable atoms
    stopped: bool = False
    motion: str = ""  # the motion preset used (what "auto" chose)
    resumed_from_stage: int | None = None  # the first stage run after a resume (None: not resumed)

    def summary(self) -> dict:
        """The figures of report.json that describe the refinement itself (no files)."""
        return {"before": self.before, "after": self.after, "rms_moved_A": self.rms_moved_A, "stages": self.stages,
                "motion": self.motion,
                "log": self.log, "stage_seconds": self.stage_seconds, "stopped": self.stopped}


def checked_config(cfg: RefineModelConfig) -> RefineModelConfig:
    """``cfg`` with its options checked (one line naming the option, exit 2 on the command line)
    and its motion preset merged into ``extra``."""
    if cfg.similarity not in SIMILARITIES:
        raise OptionError("--similarity", f"unknown {cfg.similarity!r}; expected one of {', '.join(SIMILARITIES)}")
    bad = [s for s in cfg.stages if s not in STAGES]
    if bad:
        raise OptionError("--stages", f"unknown stage(s) {', '.join(bad)}; expected some of {', '.join(STAGES)}")
    if not cfg.geometry_only and (cfg.resolution_A is None or not cfg.resolution_A > 0):
        raise OptionError("--resolution", f"must be a positive resolution in Å with --map, got {cfg.resolution_A}")
    if cfg.steps < 1:
        raise OptionError("--steps", f"must be >= 1, got {cfg.steps}")
    if cfg.motion not in MOTIONS:
        raise OptionError("--motion", f"unknown {cfg.motion!r}; expected one of {', '.join(MOTIONS)}")
    if cfg.motion == "auto":  # decided by refine_coords from the start's fit to the map
        return cfg
    return replace(cfg, extra={**MOTION_PRESETS[cfg.motion], **cfg.extra})


def read_inputs(cfg: RefineModelConfig):
    """The topology of ``cfg.model`` and the grid of ``cfg.map`` (None with ``geometry_only``),
    checked against each other."""
    if not cfg.geometry_only and cfg.map is None:
        raise OptionError("--map", "is required unless --geometry-only")
    topo = build_topology(cfg.model, dictionaries=cfg.restraints, backbone_library=cfg.backbone_library,
                          na_pairs=cfg.na_pairs)
    grid = None
    if not cfg.geometry_only:
        grid = read_map_grid(cfg.map)
        check_overlap(topo, grid, cfg.map)
    return topo, grid


def refine_coords(topo: Topology, grid: MapGrid | None, cfg: RefineModelConfig, *, progress=None, on_coords=None,
                  stop=None, checkpoint: Path | None = None, resume: bool = False,
                  measure_after: bool = True) -> RefineResult:
    """Refine the coordinates of ``topo`` into ``grid`` (None: geometry only), in memory: the
    engine API the doors call (ChimeraX passes its open model as a gemmi structure and its map
    as a :class:`~cryogmm.io.maps.MapGrid`, no files). ``cfg`` as :func:`checked_config` returns
    it (its ``model``/``map``/``out`` paths are not read). ``progress(phase, step, n)`` reports
    steps; ``on_coords(xyz)`` receives every trajectory frame (all atoms in topology order,
    riding H included, ``[M, 3]`` Å); ``stop`` (a ``threading.Event``) ends the run at its next
    step with the current coordinates (``stopped`` in the result). ``checkpoint``: a path where
    the state is saved after every stage (:mod:`cryogmm.io.checkpoint`); ``resume``:
    continue from the checkpoint there (its stages are not run again).
    ``measure_after``: validate the result in memory (``after``; the job measures the written
    files instead)."""
    fp = fingerprint(cfg) if checkpoint is not None else None
    state = load_checkpoint(checkpoint, fp) if resume else None
    torch.manual_seed(cfg.seed)
    if cfg.threads:
        torch.set_num_threads(int(cfg.threads))
    if grid is not None and cfg.resolution_A < 2 * grid.apix - 1e-6:
        raise OptionError("--resolution", f"{cfg.resolution_A:g} Å is finer than Nyquist of {grid.path or 'the map'} "
                                          f"({2 * grid.apix:g} Å)")
    if stop is not None:
        outer = progress

        def progress(phase, step, n):
            if stop.is_set():
                raise RefinementStopped()
            if outer is not None:
                outer(phase, step, n)
    ref = Restraints(topo)
    before = measure(topo, topo.coords, grid, cfg, ref)
    if cfg.motion == "auto":
        fits = grid is None or before.get("map_cc_mask", 0.0) >= AUTO_LOCAL_MIN_CC
        cfg = checked_config(replace(cfg, motion="local" if fits else "domains"))
    rf = Refiner(topo, cfg, grid, progress, on_coords)
    stages = list(cfg.stages)
    if cfg.rebuild_rotamers and "rotamers" not in stages:
        stages.insert(stages.index("full") if "full" in stages else len(stages), "rotamers")
    stage_times = {}
    stopped = False
    first, guard_ref = 0, None
    if state is not None:
        rf.load_state(state)
        set_rng_state(state)
        first = int(state["next_stage"])
        stage_times = json.loads(state["stage_seconds"])
        guard_ref = None if state.get("guard_ref") is None else state["guard_ref"].to(rf.dev, rf.dt)

    def save(next_stage, guard):
        if checkpoint is not None:
            save_checkpoint(checkpoint, {**rf.state(), "next_stage": next_stage,
                                         "guard_ref": None if guard is None else guard.detach().cpu(),
                                         "stage_seconds": json.dumps(stage_times)}, fp)

    try:
        _run_stages(rf, cfg, grid, stages, stage_times, first=first, guard_ref=guard_ref, after_stage=save)
    except RefinementStopped:
        stopped = True
    final = rf.x_all.detach().cpu().numpy()
    after = measure(topo, final, grid, cfg, ref) if measure_after else {}
    mv = topo.movable & ~topo.is_h
    rms_move = float(np.sqrt(((final[mv] - topo.coords[mv]) ** 2).sum(1).mean()))
    return RefineResult(coords=final, before=before, after=after, stages=stages, log=rf.log, trajectory=rf.trajectory,
                        stage_seconds=stage_times, rms_moved_A=rms_move, stopped=stopped, motion=cfg.motion,
                        resumed_from_stage=first if state is not None else None)


def measure(topo: Topology, coords: np.ndarray, grid, cfg: RefineModelConfig, restraints=None) -> dict:
    """The validation figures of ``coords`` (and, with ``grid``, the map figures; with
    ``cfg.reference``, the Cα RMSD to it)."""
    fig = validate_coords(topo, coords, restraints)
    if grid is not None:
        mf = map_figures(topo, coords, grid, cfg.resolution_A)
        fig.update({k: v for k, v in mf.items() if k != "qscore_per_residue"})
        fsc_a = fig.get("map_model_fsc_0.5_A")
        if fsc_a is not None and abs(fsc_a - 2.0 * grid.apix) <= 1e-6 * fsc_a:
            # the model map and the map agree (FSC >= 0.5) up to the sampling's limit
            fig["resolution_limited_by"] = {"map_model_fsc_0.5_A": "nyquist"}
    if cfg.reference is not None:
        fig["ca_rmsd_to_reference_A"] = ca_rmsd(topo, coords, cfg.reference)
    return fig


def _run_stages(rf: Refiner, cfg: RefineModelConfig, grid, stages: list, stage_times: dict, first: int = 0,
                guard_ref=None, after_stage=None):
    """The stages in order from ``first`` (see the module docstring), timing each into
    ``stage_times``; ``after_stage(next_stage, guard_ref)`` after each (the checkpoint)."""
    n = cfg.steps
    # guard_ref: the model before the residue stage, for rama_guard
    for si, st in enumerate(stages):
        if si < first:
            continue
        ts = time.time()
        if cfg.geometry_only and st in ("rigid", "residue"):
            if after_stage is not None:
                after_stage(si + 1, guard_ref)
            continue
        if st == "rigid":
            rigid_stage(rf, cfg, grid)
        elif st == "residue":
            mt = MapTerm(grid, cfg.resolution_A, cfg.similarity, rf.amp, blur_A=1.5, dtype=rf.dt, device=rf.dev)
            rf.map_k = 1.0
            guard_ref = rf.x_all.detach().clone()
            rf.rigid_bodies(rf.residue_labels(), "residue_blur1.5", n, mt, lr_t=cfg.extra.get("residue_lr", 0.2),
                            floor=cfg.extra.get("residue_min_weight", cfg.extra.get("rigid_min_weight", 1e-3)))
        elif st == "rotamers":
            _rotamer_stage(rf, cfg, grid)
        elif st == "full":
            if grid is None:
                _geometry_full_stage(rf, cfg, last="full" not in stages[si + 1:])
            else:
                mt = MapTerm(grid, cfg.resolution_A, cfg.similarity, rf.amp, dtype=rf.dt, device=rf.dev)
                rf.map_k = 1.0
                w = rf.full_atom("full", cfg.extra.get("full_steps", n), mt, lr=0.02)
                polish_rounds(rf, cfg, mt, w, n)
                if guard_ref is not None and "full" in stages[si + 1:] and cfg.extra.get("rama_guard", True):
                    rama_guard(rf, guard_ref)
                    guard_ref = None
        stage_times[st] = stage_times.get(st, 0.0) + time.time() - ts
        if after_stage is not None:
            after_stage(si + 1, guard_ref)


def _rotamer_stage(rf: Refiner, cfg: RefineModelConfig, grid):
    if grid is None:
        x_prev = rf.x_all.detach().clone()
        rebuild_rotamers(rf)
        if rf.anchor:
            # the anchor holds atoms near the start: a rebuilt side chain is anchored where it
            # now is (else the anchor drags it back and strains its Cβ: 1AKE Gln160 χ1 55° ->
            # 300° left a 0.38 Å Cβ deviation)
            moved = ((rf.x_all - x_prev).norm(dim=1) > 1e-6)[:, None]
            rf.start = torch.where(moved, rf.x_all.detach(), rf.start)
        return
    # the carbonyl O shows beyond ~3.5 Å; at 4 Å the scan turned two peptides of the open model
    # in its own map (Thr31, Leu45), at 3 Å none
    if cfg.extra.get("peptide_flips", True) and cfg.resolution_A <= cfg.extra.get("peptide_max_res", 3.5):
        fit_peptides(rf, grid, min_gain=cfg.extra.get("peptide_min_gain", 0.25))
    if cfg.extra.get("base_flips", True):
        fit_bases(rf, grid, min_gain=cfg.extra.get("base_min_gain", 0.25))
    fit_side_chains(rf, grid, outliers_only=cfg.extra.get("rotamers_outliers_only", False))


def _geometry_full_stage(rf: Refiner, cfg: RefineModelConfig, last: bool):
    n = cfg.steps
    rf.lbfgs_phase("geometry", None, 1.0, max(2 * n, 100))
    if last and cfg.extra.get("rama_repair", True):
        x_prev = rf.x_all
        rf.x_all = rama_repair(rf.rs, rf.assemble, rf.x_all, rf.move_t, rf.n_geo, anchor_A=rf.anchor or 0.15,
                               iters=max(2 * n, 100))
        rf.log.append(dict(phase="rama_repair", rms_moved_A=float(
            (rf.x_all - x_prev)[rf.move_t].norm(dim=1).pow(2).mean().sqrt())))


def write_outputs(topo: Topology, res: RefineResult, cfg: RefineModelConfig, seconds: float | None = None,
                  grid: MapGrid | None = None) -> dict:
    """refined.pdb, refined.cif, trajectory.pdb and report.json into ``cfg.out``; returns the report.
    A model whose chain names the PDB format cannot hold (``pdb_format_problem``) is written as
    refined.cif and trajectory.cif only, with a warning (report.json's ``outputs`` lists the files).

    The figures after refinement (``after``, ``rms_moved_A``) are measured on refined.pdb (else
    refined.cif) as written (coordinates rounded to the file's 0.001 Å, the model re-read as ``cryogmm
    validate`` reads it), so that validating the file gives the report's numbers. ``grid``:
    the map in memory (default: ``cfg.map`` is read again)."""
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    # both files hold the coordinates at the PDB format's 0.001 Å (mmCIF would keep more digits),
    # so that they are one model and the report's figures describe either
    xyz = np.round(res.coords, 3)
    # a model the PDB format cannot hold (chain names over 2 characters) is written as mmCIF
    # only: refined.cif, trajectory.cif (a stale refined.pdb / trajectory.pdb of an earlier run
    # in this folder is removed, so the folder holds one model)
    no_pdb = pdb_format_problem(topo.structure)
    warnings = list(topo.warnings)
    if no_pdb is None:
        write_model(topo, xyz, out / "refined.pdb")
        outputs = ["refined.pdb", "refined.cif", "trajectory.pdb"]
    else:
        for stale in ("refined.pdb", "trajectory.pdb"):
            (out / stale).unlink(missing_ok=True)
        outputs = ["refined.cif", "trajectory.cif"]
        warnings.append(f"refined.pdb and trajectory.pdb not written: {no_pdb}; refined.cif and trajectory.cif "
                        "hold the model")
    write_model(topo, xyz, out / "refined.cif")
    _write_trajectory(topo, res.trajectory, out / outputs[2 if no_pdb is None else 1])
    after, rms_moved = measure_written(out / outputs[0], topo, cfg, grid)
    missing = {k: v for k, v in res.after.items() if k not in after}
    if missing:  # no map to re-read (a door's map in memory only): its figures of the coordinates in memory
        after.update(missing)
        after["measured_in_memory"] = sorted(missing)
    rep = {
        "model": str(cfg.model), "map": None if cfg.map is None else str(cfg.map), "resolution_A": cfg.resolution_A,
        "similarity": None if cfg.geometry_only else cfg.similarity, "stages": res.stages,
        "geometry_only": cfg.geometry_only, "steps_per_phase": cfg.steps, "n_patches": cfg.n_patches,
        "motion": res.motion, "before": res.before, "after": after, "after_measured_on": outputs[0], "outputs": outputs + ["report.json"],
        "rms_moved_A": rms_moved,
        "fixed_residues": topo.fixed_residues, "restrained_residues": topo.dictionary_counts,
        "self_restrained": topo.self_restrained, "restraints": [str(p) for p in cfg.restraints],
        "backbone_library": topo.backbone_library,
        "na_pairs": None if topo.na_pairs is None else na_summary(topo.na_pairs),
        "missing_atoms": topo.missing_atoms, "warnings": warnings,
        "log": res.log, "trajectory_frames": len(res.trajectory), "stage_seconds": res.stage_seconds,
        "seconds": seconds, "seed": cfg.seed, "resumed_from_stage": res.resumed_from_stage,
    }
    if cfg.motion == "auto":
        rep["motion_auto"] = {"chose": res.motion, "start_map_cc_mask": res.before.get("map_cc_mask"),
                              "local_from_cc": AUTO_LOCAL_MIN_CC}
    if res.stopped:
        rep["stopped"] = True
    write_report(out / "report.json", rep)
    return rep


def measure_written(path: Path, topo: Topology, cfg: RefineModelConfig, grid: MapGrid | None = None):
    """The validation (and map) figures of the model file ``path`` as ``cryogmm validate``
    computes them, and the RMS move of its movable heavy atoms from ``topo``'s coordinates."""
    wt = build_topology(path, dictionaries=cfg.restraints)
    if grid is None and not cfg.geometry_only and cfg.map is not None and Path(cfg.map).is_file():
        grid = read_map_grid(cfg.map)
    fig = measure(wt, wt.coords, None if cfg.geometry_only else grid, cfg)
    rms = None
    if wt.coords.shape == topo.coords.shape:
        mv = topo.movable & ~topo.is_h
        rms = float(np.sqrt(((wt.coords[mv] - topo.coords[mv]) ** 2).sum(1).mean()))
    return fig, rms


def refine_model(cfg: RefineModelConfig, progress=None, on_coords=None, resume: bool = False) -> dict:
    """The ``refine-model`` job: refine ``cfg.model`` (into ``cfg.map`` unless ``geometry_only``);
    writes refined.pdb, refined.cif, trajectory.pdb and report.json into ``cfg.out``. Returns
    the report. ``on_coords`` as in :func:`refine_coords`. The state is saved in
    ``cfg.out/checkpoint.pt`` after every stage (removed when the outputs are written);
    ``resume`` continues from it."""
    t0 = time.time()
    cfg = checked_config(cfg)
    topo, grid = read_inputs(cfg)
    ckpt = Path(cfg.out) / CHECKPOINT
    if resume:
        clear_partial(cfg.out)
    res = refine_coords(topo, grid, cfg, progress=progress, on_coords=on_coords, checkpoint=ckpt, resume=resume,
                        measure_after=False)
    rep = write_outputs(topo, res, cfg, seconds=time.time() - t0, grid=grid)
    ckpt.unlink(missing_ok=True)
    return rep


def _write_trajectory(topo, frames, path):
    import gemmi

    st = topo.structure.clone()
    st.remove_hydrogens()
    keep = ~topo.is_h
    base = st[0]
    new = gemmi.Structure()
    new.cell = st.cell
    for f, xyz in enumerate(frames):
        m = base.clone() if hasattr(base, "clone") else gemmi.Model(str(f + 1))
        m.num = f + 1 if hasattr(m, "num") else None
        xs = xyz[keep]
        i = 0
        for ch in m:
            for r in ch:
                for a in r:
                    a.pos = gemmi.Position(*map(float, xs[i]))
                    i += 1
        new.add_model(m)
    tmp = Path(str(path) + ".part")
    if Path(path).suffix == ".cif":
        new.setup_entities()
        new.make_mmcif_document().write_file(str(tmp))
    else:
        new.write_pdb(str(tmp))
    tmp.replace(path)
