"""``cryogmm series`` (the engine's model series over a set of maps, in memory: one network maps a
latent coordinate to the model; one coordinate set per map) and ``cryogmm open RUN`` (a
heterogeneity run's PC trajectories as coordinate sets). Both play with ChimeraX's ``coordset``
command and slider."""

from __future__ import annotations

import re
import tempfile
import time
from pathlib import Path

import numpy as np
from chimerax.core.errors import UserError

from . import bridge


def refine_series(session, structure, volumes, resolution, steps=60, out=None, seed=0):
    """The engine's ``refine-series`` (``cryogmm.model.series.job.fit_series``) of ``structure``
    into ``volumes`` (in their order along the latent); returns a copy of the structure with one
    coordinate set per map: the series' frame at that map's latent."""
    bridge.engine()
    from cryogmm.errors import CryoGMMError
    from cryogmm.model.series.config import RefineSeriesConfig
    from cryogmm.model.series.job import fit_series, write_series
    from cryogmm.model.topology import build_topology

    if resolution is None or not resolution > 0:
        raise UserError(f"cryogmm series: resolution must be a positive number of Å, got {resolution}")
    if len(volumes) < 2:
        raise UserError(f"cryogmm series: give at least 2 maps, got {len(volumes)}")
    if steps < 1:
        raise UserError(f"cryogmm series: steps must be >= 1, got {steps}")
    t0 = time.time()
    grids = bridge.volumes_to_grids(volumes)
    frame = volumes[0].scene_position
    st, atoms = bridge.structure_to_gemmi(structure, frame_position=frame)
    cfg = RefineSeriesConfig(model=Path(str(structure)), maps=tuple(str(v) for v in volumes),
                             out=Path(out) if out else None, resolution_A=float(resolution), frames=len(volumes),
                             steps=int(steps), capture_steps=int(steps), seed=int(seed))
    try:
        topo = build_topology(st)
        res = fit_series(topo, grids, cfg, progress=lambda phase, i, n: session.logger.status(
            f"cryogmm series: {phase} {i}/{n}"))
        if out:
            write_series(topo, res, cfg)
    except CryoGMMError as e:
        raise bridge.engine_error(e) from None
    topo_i, atom_i = bridge.topology_index(topo, atoms)
    all_atoms = structure.atoms
    idx = np.array([all_atoms.index(a) for a in atoms[atom_i]])
    frames = []
    for x in res.map_frames:
        cur = all_atoms.coords.copy()
        cur[idx] = bridge.to_frame(x[topo_i], frame, structure.scene_position)
        frames.append(cur)
    s2 = structure.copy(f"{structure.name} series ({len(frames)} maps)")
    s2.add_coordsets(np.array(frames), replace=True)
    s2.active_coordset_id = 1
    session.models.add([s2])
    lines = "".join(f"<tr><td>{i + 1}</td><td>{v}</td><td>{r['start']['map_cc_mask']:.3f}</td>"
                    f"<td>{r['frame']['map_cc_mask']:.3f}</td></tr>" for i, (v, r) in enumerate(zip(volumes, res.per_map)))
    where = f", outputs in {out}" if out else ""
    session.logger.info(f"<b>cryogmm series</b>: {s2} holds {len(frames)} coordinate sets (`coordset {s2.atomspec}` "
                        f"plays them); {time.time() - t0:.1f} s{where}<table border=1 cellpadding=2>"
                        f"<tr><th>set</th><th>map</th><th>map CC start</th><th>frame</th></tr>{lines}</table>",
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
            from cryogmm.hetero.analyze import AnalyzeConfig, analyze_hetero

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


def _crossval_folder(path: Path) -> Path:
    for d in (path, path / "analyze"):
        if (d / "report.json").is_file() and (d / "crossval_models_half1.pdb").is_file():
            return d
    raise UserError(f"cryogmm series: {path} holds no half-set cross-validation (an analysis of a run trained with "
                    "`cryogmm hetero train --halves`: report.json and crossval_models_half1.pdb)")


def open_crossval(session, folder):
    """The cross-validated state models of ``cryogmm hetero analyze`` on a ``--halves`` run: each
    half's models (one coordinate set per scored state, ``crossval_models_half{1,2}.pdb``) as one
    structure each, and the per-state table (mean masked map-model FSC of each half's model
    against its own and the other half's map; flags) in the log. Flagged states are named."""
    import json

    from chimerax.core.commands import run as cxrun

    d = _crossval_folder(Path(folder))
    cv = json.loads((d / "report.json").read_text()).get("crossval")
    if not cv:
        raise UserError(f"cryogmm series: {d / 'report.json'} has no crossval section")
    states = [s for s in cv["states"] if "skipped" not in s]
    opened = []
    for h in (1, 2):
        models = cxrun(session, f'open "{d / f"crossval_models_half{h}.pdb"}" format pdb coordsets true', log=False)
        for m in models:
            m.name = f"{d.parent.name if d.name == 'analyze' else d.name} half {h} states"
            m.cryogmm_states = [s["state"] for s in states]
            opened.append(m)
    rows = "".join(
        f"<tr><td>{i + 1}</td><td>{s['state']}</td><td>{s['n_half1']}/{s['n_half2']}</td>"
        f"<td>{s['model1_vs_map1']:.3f}</td><td>{s['model1_vs_map2']:.3f}</td>"
        f"<td>{s['model2_vs_map2']:.3f}</td><td>{s['model2_vs_map1']:.3f}</td>"
        f"<td>{', '.join(s['flags']) or '-'}</td></tr>" for i, s in enumerate(states))
    flagged = cv.get("flagged_states") or []
    session.logger.info(
        f"<b>cryogmm series</b>: cross-validated state models of {d}: "
        f"{', '.join(str(m) for m in opened)}, one coordinate set per state (`coordset {opened[0].atomspec}` plays "
        f"them); flagged states: {', '.join(map(str, flagged)) or 'none'}. Mean masked map-model FSC to "
        f"{cv['resolution_A']:.1f} Å:<table border=1 cellpadding=2><tr><th>set</th><th>state</th><th>particles "
        f"1/2</th><th>model 1 / map 1</th><th>model 1 / map 2</th><th>model 2 / map 2</th><th>model 2 / map 1</th>"
        f"<th>flags</th></tr>{rows}</table>", is_html=True)
    return opened
