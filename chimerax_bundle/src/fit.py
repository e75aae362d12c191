"""``cryogmm fit``: the engine's model refinement run in memory on a worker thread
(``cryogmm.model.refine.job.refine_coords``: the open model as a gemmi structure, the open map
as a grid, no files), its coordinates applied to the ChimeraX atoms from the main thread.

With a GUI the atoms are updated from the ``new frame`` trigger (the display never waits on
torch); headless (``--nogui``) the command waits for the refinement and applies coordinates as
they arrive. ``cryogmm stop`` ends the run at its next step and keeps the current coordinates.
The whole change is one undo step. With ``out DIR`` the engine also writes refine-model's files
(refined.pdb/.cif, trajectory.pdb, report.json) there.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path

import numpy as np
from chimerax.core.errors import UserError

from . import bridge

_ATTR = "_cryogmm_fit_job"

SUMMARY_KEYS = (("map CC (mask)", "map_cc_mask", "{:.3f}"), ("map-model FSC 0.5 (Å)", "map_model_fsc_0.5_A", "{:.2f}"),
                ("Q-score", "qscore_mean", "{:.3f}"), ("bond RMSZ", "bond_rmsz", "{:.2f}"),
                ("angle RMSZ", "angle_rmsz", "{:.2f}"), ("Rama favoured %", "rama_favoured_pct", "{:.1f}"),
                ("Rama outliers %", "rama_outlier_pct", "{:.2f}"),
                ("rotamer outliers %", "rotamer_outlier_pct", "{:.2f}"), ("clashscore", "clashscore", "{:.2f}"))


def current_job(session):
    return getattr(session, _ATTR, None)


class FitJob:
    """One ``cryogmm fit``: the structure in the map's frame, refined by the engine in memory.
    ``motion``: the engine's ``auto`` by default (its ``local`` preset for a model that already
    fits the map, motion domains otherwise), or ``domains`` / ``local``."""

    def __init__(self, session, structure, volume, resolution, similarity="fsc", stages=None,
                 steps=100, update_every=5, out=None, threads=2, seed=0, geometry_weight=1.0, motion="auto"):
        bridge.engine()
        from cryogmm.errors import CryoGMMError
        from cryogmm.model.density import check_overlap
        from cryogmm.model.refine.config import MOTIONS, SIMILARITIES, STAGES, RefineModelConfig
        from cryogmm.model.refine.job import checked_config
        from cryogmm.model.topology import build_topology

        self.session, self.structure, self.volume = session, structure, volume
        if resolution is None or not resolution > 0:
            raise UserError(f"cryogmm fit: resolution must be a positive number of Å, got {resolution}")
        if similarity not in SIMILARITIES:
            raise UserError(f"cryogmm fit: unknown similarity {similarity!r}; expected one of {', '.join(SIMILARITIES)}")
        stages = tuple(stages) if stages else RefineModelConfig.stages
        bad = [s for s in stages if s not in STAGES]
        if bad:
            raise UserError(f"cryogmm fit: unknown stage(s) {', '.join(bad)}; expected some of {', '.join(STAGES)}")
        if steps < 1:
            raise UserError(f"cryogmm fit: steps must be >= 1, got {steps}")
        if motion not in MOTIONS:
            raise UserError(f"cryogmm fit: unknown motion {motion!r}; expected one of {', '.join(MOTIONS)}")
        self.grid = bridge.volume_to_grid(volume)
        if resolution < 2 * self.grid.apix - 1e-6:
            raise UserError(f"cryogmm fit: resolution {resolution:g} Å is finer than the Nyquist limit of {volume} "
                            f"({2 * self.grid.apix:g} Å)")
        self.out = Path(out) if out else None
        # the engine works in the map's frame: the model goes there, coordinates come back from it
        self.frame = volume.scene_position
        st, self.atoms = bridge.structure_to_gemmi(structure, frame_position=self.frame)
        try:
            self.topo = build_topology(st)
            check_overlap(self.topo, self.grid, f"map {volume}")
            self.cfg = checked_config(RefineModelConfig(
                model=Path(str(structure)), map=None, out=self.out, resolution_A=float(resolution),
                similarity=similarity, stages=stages, steps=int(steps), trajectory_every=max(1, int(update_every)),
                seed=int(seed), threads=int(threads), geometry_weight=float(geometry_weight), motion=motion))
        except CryoGMMError as e:
            raise bridge.engine_error(e) from None
        self.topo_i, self.atom_i = bridge.topology_index(self.topo, self.atoms)
        if len(self.topo_i) == 0:
            raise UserError(f"cryogmm fit: none of the atoms of {structure} is a residue the engine refines")
        self.moved_atoms = self.atoms[self.atom_i]
        self.start_coords = self.moved_atoms.coords.copy()
        self._lock = threading.Lock()
        self._latest, self._version, self._applied = None, 0, 0
        self.updates = 0  # coordinate updates applied to the atoms
        self.phase = ("starting", 0, 0)
        self.result, self.report, self.error, self.stopped, self.finished = None, None, None, False, False
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="cryogmm-fit", daemon=True)
        self._handler = None
        self.t0 = None

    # ---------------------------------------------------------------- worker thread
    def _coords(self, xyz):
        with self._lock:
            self._latest = np.array(xyz, dtype=np.float64, copy=True)
            self._version += 1

    def _progress(self, phase, step, n):
        self.phase = (phase, step, n)

    def _run(self):
        from cryogmm.model.refine.job import refine_coords, write_outputs

        try:
            self.result = refine_coords(self.topo, self.grid, self.cfg, progress=self._progress,
                                        on_coords=self._coords, stop=self._stop)
            self.stopped = self.result.stopped
            if not self.stopped:
                self.report = (write_outputs(self.topo, self.result, self.cfg) if self.out is not None
                               else self.result.summary())
        except Exception as e:  # reported on the main thread
            self.error = e

    # ---------------------------------------------------------------- main thread
    def start(self, wait):
        setattr(self.session, _ATTR, self)
        self.t0 = time.time()
        self._thread.start()
        if wait:
            while self._thread.is_alive():
                self._thread.join(0.2)
                self.apply_latest()
            self.finish()
        else:
            self._handler = self.session.triggers.add_handler("new frame", self._new_frame)

    def apply_latest(self):
        with self._lock:
            if self._latest is None or self._version == self._applied:
                return False
            xyz, self._applied = self._latest, self._version
        if self.structure.deleted:
            return False
        new = bridge.to_frame(xyz[self.topo_i], self.frame, self.structure.scene_position)
        self.moved_atoms.coords = new
        self.updates += 1
        return True

    def _new_frame(self, *_):
        from chimerax.core.triggerset import DEREGISTER

        self.apply_latest()
        if not self._thread.is_alive():
            self.finish(from_trigger=True)
            return DEREGISTER
        ph, i, n = self.phase
        self.session.logger.status(f"cryogmm fit: {ph} {i}/{n}")

    def request_stop(self):
        self._stop.set()
        self._thread.join()
        self.finish()

    @property
    def running(self):
        return self._thread.is_alive()

    def finish(self, from_trigger=False):
        if self.finished:
            return
        self.finished = True
        if self._handler is not None and not from_trigger:
            self.session.triggers.remove_handler(self._handler)
        self._handler = None
        if getattr(self.session, _ATTR, None) is self:
            setattr(self.session, _ATTR, None)
        log = self.session.logger
        if self.structure.deleted:
            log.warning("cryogmm fit: the model was closed before the refinement ended")
            return
        if self.report is not None:
            self.moved_atoms.coords = bridge.to_frame(self.result.coords[self.topo_i], self.frame,
                                                      self.structure.scene_position)
        else:
            self.apply_latest()
        self._register_undo()
        secs = time.time() - self.t0
        if self.error is not None:
            from cryogmm.errors import CryoGMMError

            msg = str(self.error) if isinstance(self.error, CryoGMMError) else repr(self.error)
            log.error(f"cryogmm fit failed after {secs:.1f} s: {msg}")
            return
        if self.stopped:
            ph, i, n = self.phase
            log.info(f"cryogmm fit stopped by `cryogmm stop` in {ph} at step {i}/{n} after {secs:.1f} s; "
                     f"the current coordinates were kept ({self.updates} updates)")
            return
        log.info(summary_html(self.report, f"cryogmm fit of {self.structure} into {self.volume}"), is_html=True)
        where = f"; outputs in {self.out}" if self.out is not None else ""
        log.info(f"cryogmm fit: {secs:.1f} s, {self.updates} coordinate updates, RMS move "
                 f"{self.report['rms_moved_A']:.2f} Å{where}")

    def _register_undo(self):
        from chimerax.core.undo import UndoState

        u = UndoState("cryogmm fit")
        u.add(self.moved_atoms, "coords", self.start_coords, self.moved_atoms.coords.copy())
        self.session.undo.register(u)


def summary_html(rep, title):
    rows = ["<tr><th>figure</th><th>before</th><th>after</th></tr>"]
    for label, k, fmt in SUMMARY_KEYS:
        b, a = rep["before"].get(k), rep["after"].get(k)
        if b is None and a is None:
            continue
        f = (lambda v: fmt.format(v) if isinstance(v, (int, float)) else "-")
        rows.append(f"<tr><td>{label}</td><td>{f(b)}</td><td>{f(a)}</td></tr>")
    return f"<b>{title}</b><table border=1 cellpadding=2>{''.join(rows)}</table>"
