"""``cryogmm series`` (a model refined into each map of a series, one model with a coordinate set
per map) and ``cryogmm open RUN`` (a heterogeneity run's PC trajectories as coordinate sets).
Both play with ChimeraX's ``coordset`` command and slider."""

from __future__ import annotations

from .fit import _local_motion

import re
import tempfile
import time
from pathlib import Path

import numpy as np
from chimerax.core.errors import UserError

from . import bridge


def refine_series(session, structure, volumes, resolution, stages=None, steps=60, out=None, seed=0):
    """Refine ``structure`` into every map of ``volumes`` in turn (each from the previous result,
    so the series stays continuous), the engine's ``refine_model`` in each; returns the new
    structure with one coordinate set per map."""
    bridge.engine()
    from cryogmm import model_refine as mr
    from cryogmm.errors import CryoGMMError
    from cryogmm.topology import build_topology

    if resolution is None or not resolution > 0:
        raise UserError(f"cryogmm series: resolution must be a positive number of Å, got {resolution}")
    stages = tuple(stages) if stages else ("residue", "full")
    bad = [s for s in stages if s not in mr.STAGES]
    if bad:
        raise UserError(f"cryogmm series: unknown stage(s) {', '.join(bad)}; expected some of {', '.join(mr.STAGES)}")
    for v in volumes:
        bridge.check_overlap(structure, v)
    root = Path(out) if out else Path(tempfile.mkdtemp(prefix="cryogmm_series_"))
    root.mkdir(parents=True, exist_ok=True)
    all_atoms = structure.atoms
    frames = []
    cur = all_atoms.coords.copy()
    t0 = time.time()
    figures = []
    for k, v in enumerate(volumes):
        d = root / f"frame_{k + 1:03d}"
        d.mkdir(parents=True, exist_ok=True)
        # the current frame's coordinates, in this map's frame
        saved = all_atoms.coords.copy()
        all_atoms.coords = cur
        try:
            atoms = bridge.write_structure_pdb(structure, d / "start.pdb", frame_position=v.scene_position)
        finally:
            all_atoms.coords = saved
        bridge.write_volume_mrc(v, d / "map.mrc")
        cfg = mr.RefineModelConfig(model=d / "start.pdb", map=d / "map.mrc", out=d, resolution_A=float(resolution),
                                   similarity="relative-entropy", stages=stages, steps=int(steps), seed=int(seed),
                                   **_local_motion(mr))
        try:
            rep = mr.refine_model(cfg)
        except CryoGMMError as e:
            raise bridge.engine_error(e) from None
        final = bridge.read_pdb_coords(d / "refined.pdb")
        keys = bridge.atom_keys(atoms)
        idx = np.array([all_atoms.index(a) for a in atoms])
        have = np.array([kk in final for kk in keys])
        xyz = np.array([final[kk] for kk, h in zip(keys, have) if h], dtype=np.float64).reshape(-1, 3)
        cur = cur.copy()
        cur[idx[have]] = bridge.to_frame(xyz, v.scene_position, structure.scene_position)
        frames.append(cur.copy())
        figures.append((v, rep["before"].get("map_cc_mask"), rep["after"].get("map_cc_mask")))
        session.logger.status(f"cryogmm series: {k + 1}/{len(volumes)} maps")
    s2 = structure.copy(f"{structure.name} series ({len(frames)} maps)")
    s2.add_coordsets(np.array(frames), replace=True)
    s2.active_coordset_id = 1
    session.models.add([s2])
    lines = "".join(f"<tr><td>{i + 1}</td><td>{v}</td><td>{b:.3f}</td><td>{a:.3f}</td></tr>"
                    for i, (v, b, a) in enumerate(figures))
    session.logger.info(f"<b>cryogmm series</b>: {s2} holds {len(frames)} coordinate sets (`coordset {s2.atomspec}` "
                        f"plays them); {time.time() - t0:.1f} s, outputs in {root}<table border=1 cellpadding=2>"
                        f"<tr><th>set</th><th>map</th><th>map CC before</th><th>after</th></tr>{lines}</table>",
                        is_html=True)
    return s2


def _trajectories(run: Path):
    found = []
    for d in (run, run / "analyze"):
        found += sorted(d.glob("pc*_trajectory.pdb"))
    return found


def open_run(session, run, pcs=None, frames=10):
    """Open ``RUN``'s ``pcN_trajectory.pdb`` files (a ``cryogmm hetero analyze`` output folder, or a
    training run with its ``analyze/`` folder) as structures with coordinate sets. A training run
    that was never analysed is analysed first (into a temporary folder: the run is not modified)."""
    from chimerax.core.commands import run as cxrun

    run = Path(run)
    if not run.is_dir():
        raise UserError(f"cryogmm open: {run} is not a folder")
    trajs = _trajectories(run)
    if not trajs:
        if not (run / "checkpoint.pt").is_file():
            raise UserError(f"cryogmm open: {run} is neither a cryogmm hetero run (no checkpoint.pt) nor an analysis "
                            "folder (no pc*_trajectory.pdb)")
        tmp = Path(tempfile.mkdtemp(prefix="cryogmm_analyze_"))
        k = max(pcs) if pcs else 2
        if bridge.star_in_process():
            bridge.engine()
            from cryogmm.errors import CryoGMMError
            from cryogmm.hetero import AnalyzeConfig, analyze_hetero

            try:
                analyze_hetero(AnalyzeConfig(run=run, out=tmp, pcs=k, frames=frames, backproject=False, device="cpu"))
            except CryoGMMError as e:
                raise bridge.engine_error(e) from None
        else:
            bridge.run_engine_cli(["hetero", "analyze", run, "--out", tmp / "analyze", "--pcs", k, "--frames", frames,
                                   "--no-backproject", "--device", "cpu"], "cryogmm open")
            tmp = tmp / "analyze"
        session.logger.info(f"cryogmm open: analysed {run} into {tmp}")
        trajs = _trajectories(tmp)
    if pcs:
        want = set(pcs)
        trajs = [t for t in trajs if int(re.match(r"pc(\d+)_", t.name).group(1)) in want]
        if not trajs:
            raise UserError(f"cryogmm open: {run} has no trajectory for PC {', '.join(map(str, sorted(want)))}")
    opened = []
    for t in trajs:
        models = cxrun(session, f'open "{t}" format pdb coordsets true', log=False)
        for m in models:
            m.name = f"{run.name} {t.stem}"
            opened.append(m)
            session.logger.info(f"cryogmm open: {m} = {t.name}, {m.num_coordsets} coordinate sets "
                                f"(`coordset {m.atomspec}` plays them)")
    return opened
