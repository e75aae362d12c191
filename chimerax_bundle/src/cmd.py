"""The ``cryogmm`` command word and its subcommands (registered together, ISOLDE's pattern).

    cryogmm fit #model #map resolution R    (or  cryogmm fit #model map #map resolution R) [similarity S] [stages rigid,residue,full] [steps N]
                [updateEvery K] [wait true|false] [out DIR] [threads T] [seed N] [motion auto|domains|local]
    cryogmm stop
    cryogmm validate #model [map #map resolution R] [color true|false] [select true|false] [out DIR]
    cryogmm series #model maps #maps resolution R [steps N] [out DIR] [seed N]
    cryogmm series crossval ANALYSIS      (the cross-validated state models of a hetero --halves run)
    cryogmm open RUN [pcs K]
    cryogmm gmm #map [resolution R] [n N] [iterations N] [threshold T]
    cryogmm simulate #model [resolution R] [spacing S] [noise F] [seed N] [particles N out DIR]
"""

from __future__ import annotations

from chimerax.core.commands import (BoolArg, CmdDesc, EnumOf, FloatArg, IntArg, ListOf, ModelsArg, OpenFolderNameArg,
                                    SaveFolderNameArg, StringArg, register)
from chimerax.core.errors import UserError

_REGISTERED = False


def _structure_arg():
    from chimerax.atomic import AtomicStructureArg

    return AtomicStructureArg


def _stages(text):
    return tuple(s.strip() for s in text.replace(" ", ",").split(",") if s.strip()) if text else None


# ----------------------------------------------------------------------------- fit / stop

def _model_and_map(models, map=None, what="cryogmm fit"):
    """One atomic structure and one map from ``#model #map`` (one spec) or ``#model map #map``."""
    from chimerax.atomic import AtomicStructure
    from chimerax.map import Volume

    structures = [m for m in models if isinstance(m, AtomicStructure)]
    maps = [m for m in models if isinstance(m, Volume)]
    if map is not None:
        maps = [map]
    if len(structures) != 1:
        raise UserError(f"{what}: give exactly one atomic model (got {len(structures)}), e.g. `{what} #1 #2 resolution 4`")
    if len(maps) != 1:
        raise UserError(f"{what}: give exactly one map (got {len(maps)}), e.g. `{what} #1 #2 resolution 4`")
    return structures[0], maps[0]


def cryogmm_fit(session, models, map=None, resolution=None, similarity="fsc", stages=None, steps=100,
                update_every=5, wait=None, out=None, threads=2, seed=0, geometry_weight=1.0, motion="auto"):
    """Refine ``structure`` into ``volume``; returns the FitJob (its ``report`` when finished)."""
    from .fit import FitJob, current_job

    structure, volume = _model_and_map(models, map)
    job = current_job(session)
    if job is not None and job.running:
        raise UserError("cryogmm fit: a refinement is already running; `cryogmm stop` ends it")
    if resolution is None:
        raise UserError("cryogmm fit: give the map's resolution, e.g. `cryogmm fit #1 #2 resolution 4`")
    if wait is None:
        wait = not session.ui.is_gui
    job = FitJob(session, structure, volume, resolution, similarity=similarity, stages=_stages(stages), steps=steps,
                 update_every=update_every, out=out, threads=threads, seed=seed, geometry_weight=geometry_weight,
                 motion=motion)
    session.logger.info(f"cryogmm fit: refining {structure} ({len(job.moved_atoms)} atoms) into {volume} at "
                        f"{resolution:g} Å, stages {', '.join(job.cfg.stages)}, {steps} steps per phase"
                        + ("" if wait else "; `cryogmm stop` ends it"))
    job.start(wait=wait)
    return job


def cryogmm_stop(session):
    from .fit import current_job

    job = current_job(session)
    if job is None or not job.running:
        raise UserError("cryogmm stop: no cryogmm fit is running")
    job.request_stop()
    return job


# ----------------------------------------------------------------------------- validate

def cryogmm_validate(session, structure, map=None, resolution=None, color=True, select=True, out=None):
    from .checks import validate_structure

    return validate_structure(session, structure, volume=map, resolution=resolution, color=color, select=select,
                              out=out)


# ----------------------------------------------------------------------------- series / open

def cryogmm_series(session, structure=None, maps=None, resolution=None, steps=60, out=None, seed=0, crossval=None):
    from .series import open_crossval, refine_series

    if crossval is not None:
        if structure is not None or maps:
            raise UserError("cryogmm series crossval FOLDER takes no model or maps: it opens the folder's state models")
        return open_crossval(session, crossval)
    if structure is None:
        raise UserError("cryogmm series: give a model and maps (`cryogmm series #1 maps #2-6 resolution 4`) or "
                        "`crossval FOLDER` (a hetero analysis of a --halves run)")
    if resolution is None:
        raise UserError("cryogmm series: give the resolution, e.g. `cryogmm series #1 maps #2-6 resolution 4`")
    if not maps:
        raise UserError("cryogmm series: give the maps, e.g. `cryogmm series #1 maps #2-6 resolution 4`")
    return refine_series(session, structure, maps, resolution, steps=steps, out=out, seed=seed)


def cryogmm_open(session, run, pcs=None):
    from .series import open_run

    return open_run(session, run, pcs=pcs)


# ----------------------------------------------------------------------------- gmm / simulate

def cryogmm_gmm(session, volume, resolution=None, n=None, iterations=200, threshold=None, seed=0):
    from .maps import map_gmm

    return map_gmm(session, volume, resolution=resolution, n=n, iterations=iterations, threshold=threshold, seed=seed)


def cryogmm_simulate(session, structure, resolution=4.0, spacing=None, noise=0.1, seed=0, particles=None, out=None,
                     snr=0.1):
    from .maps import simulate_map

    return simulate_map(session, structure, resolution=resolution, spacing=spacing, noise=noise, seed=seed,
                        particles=particles, out=out, snr=snr)


def cryogmm_usage(session):
    session.logger.info(__doc__.split("\n\n", 1)[1].strip().replace("\n", "<br>"), is_html=True)


# ----------------------------------------------------------------------------- registration

def register_all(logger):
    global _REGISTERED
    if _REGISTERED:
        return
    from chimerax.map import MapArg, MapsArg

    S = _structure_arg()
    register("cryogmm", CmdDesc(synopsis="cryogmm subcommands: fit, stop, validate, series, open, gmm, simulate"),
             cryogmm_usage, logger=logger)
    register("cryogmm fit", CmdDesc(
        required=[("models", ModelsArg)],
        keyword=[("map", MapArg), ("resolution", FloatArg), ("similarity", StringArg), ("stages", StringArg), ("steps", IntArg),
                 ("update_every", IntArg), ("wait", BoolArg), ("out", SaveFolderNameArg), ("threads", IntArg),
                 ("seed", IntArg), ("geometry_weight", FloatArg), ("motion", EnumOf(("auto", "domains", "local")))],
        synopsis="refine a model into a map (atoms move as it runs)"), cryogmm_fit, logger=logger)
    register("cryogmm stop", CmdDesc(synopsis="stop a running cryogmm fit, keeping the current coordinates"),
             cryogmm_stop, logger=logger)
    register("cryogmm validate", CmdDesc(
        required=[("structure", S)],
        keyword=[("map", MapArg), ("resolution", FloatArg), ("color", BoolArg), ("select", BoolArg),
                 ("out", SaveFolderNameArg)],
        synopsis="validation table; colour and select outliers"), cryogmm_validate, logger=logger)
    register("cryogmm series", CmdDesc(
        optional=[("structure", S)],
        keyword=[("maps", MapsArg), ("resolution", FloatArg), ("steps", IntArg), ("out", SaveFolderNameArg),
                 ("seed", IntArg), ("crossval", OpenFolderNameArg)],
        synopsis="the engine's model series over a set of maps (one model with a coordinate set per map), or the "
                 "cross-validated state models of a heterogeneity analysis (crossval FOLDER)"),
        cryogmm_series, logger=logger)
    register("cryogmm open", CmdDesc(
        required=[("run", OpenFolderNameArg)], keyword=[("pcs", ListOf(IntArg))],
        synopsis="open a heterogeneity run's trajectories as coordinate sets"), cryogmm_open, logger=logger)
    register("cryogmm gmm", CmdDesc(
        required=[("volume", MapArg)],
        keyword=[("resolution", FloatArg), ("n", IntArg), ("iterations", IntArg), ("threshold", FloatArg),
                 ("seed", IntArg)],
        synopsis="Gaussian mixture of a map as markers"), cryogmm_gmm, logger=logger)
    register("cryogmm simulate", CmdDesc(
        required=[("structure", S)],
        keyword=[("resolution", FloatArg), ("spacing", FloatArg), ("noise", FloatArg), ("seed", IntArg),
                 ("particles", IntArg), ("out", SaveFolderNameArg), ("snr", FloatArg)],
        synopsis="a simulated map of a model (optionally a particle set with known truth)"),
        cryogmm_simulate, logger=logger)
    _REGISTERED = True
