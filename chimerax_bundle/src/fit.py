"""``cryogmm fit``: the engine's model refinement (``cryogmm.model_refine.refine_model``) run on a
worker thread, its coordinates applied to the ChimeraX atoms from the main thread.

With a GUI the atoms are updated from the ``new frame`` trigger (the display never waits on
torch); headless (``--nogui``) the command waits for the refinement and applies coordinates as
they arrive. ``cryogmm stop`` ends the run at its next step and keeps the current coordinates.
The whole change is one undo step.
"""

from __future__ import annotations

import inspect
import sys
import tempfile
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


# An interactive fit starts from a model already placed in its map: the engine's "local" motion
# preset (small, careful steps with the geometry weight kept up, no motion-domain regrouping).
# Engines before the preset existed get the same settings as extra options.
LOCAL_FIT = {"rigid_lr": 0.2, "residue_lr": 0.05, "rigid_min_weight": 0.05, "adaptive_scaling": True,
             "motion_domains": False}


def _local_motion(mr):
    """The engine's local-fit preset, by name when it has one."""
    if "local" in getattr(mr, "MOTION_PRESETS", {}):
        return {"motion": "local"}
    return {"extra": dict(LOCAL_FIT)}


class _Stopped(Exception):
    """Raised inside the engine's progress callback to end the run (``cryogmm stop``)."""


def current_job(session):
    return getattr(session, _ATTR, None)


class FitJob:
    def __init__(self, session, structure, volume, resolution, similarity="fsc", stages=None,
                 steps=100, update_every=5, out=None, threads=2, seed=0, geometry_weight=1.0):
        cg = bridge.engine()
        from cryogmm import model_refine as mr
        from cryogmm.errors import CryoGMMError
        from cryogmm.topology import build_topology

        self.session, self.structure, self.volume = session, structure, volume
        if resolution is None or not resolution > 0:
            raise UserError(f"cryogmm fit: resolution must be a positive number of Å, got {resolution}")
        if similarity not in mr.SIMILARITIES:
            raise UserError(f"cryogmm fit: unknown similarity {similarity!r}; expected one of {', '.join(mr.SIMILARITIES)}")
        stages = tuple(stages) if stages else mr.RefineModelConfig.stages
        bad = [s for s in stages if s not in mr.STAGES]
        if bad:
            raise UserError(f"cryogmm fit: unknown stage(s) {', '.join(bad)}; expected some of {', '.join(mr.STAGES)}")
        if steps < 1:
            raise UserError(f"cryogmm fit: steps must be >= 1, got {steps}")
        bridge.check_overlap(structure, volume)
        m, apix, _ = bridge.volume_grid(volume)
        if resolution < 2 * apix - 1e-6:
            raise UserError(f"cryogmm fit: resolution {resolution:g} Å is finer than the Nyquist limit of {volume} "
                            f"({2 * apix:g} Å)")
        self.out = Path(out) if out else Path(tempfile.mkdtemp(prefix="cryogmm_fit_"))
        self.out.mkdir(parents=True, exist_ok=True)
        inp = Path(tempfile.mkdtemp(prefix="cryogmm_fit_in_"))
        self.model_path, self.map_path = inp / "model.pdb", inp / "map.mrc"
        # the engine works in the map's frame: the model is written there, coordinates come back from it
        self.frame = volume.scene_position
        self.atoms = bridge.write_structure_pdb(structure, self.model_path, frame_position=self.frame)
        bridge.write_volume_mrc(volume, self.map_path)
        try:
            topo = build_topology(self.model_path)
        except CryoGMMError as e:
            raise bridge.engine_error(e) from None
        self.topo_i, self.atom_i = bridge.topology_index(topo, self.atoms)
        if len(self.topo_i) == 0:
            raise UserError(f"cryogmm fit: none of the atoms of {structure} is a residue the engine refines")
        self.moved_atoms = self.atoms[self.atom_i]
        self.start_coords = self.moved_atoms.coords.copy()
        self.cfg = mr.RefineModelConfig(model=self.model_path, map=self.map_path, out=self.out,
                                        resolution_A=float(resolution), similarity=similarity, stages=stages,
                                        steps=int(steps), trajectory_every=max(1, int(update_every)), seed=int(seed),
                                        threads=int(threads), geometry_weight=float(geometry_weight),
                                        **_local_motion(mr))
        self._refine = mr.refine_model
        self._engine_streams = "on_coords" in inspect.signature(mr.refine_model).parameters
        self._lock = threading.Lock()
        self._latest, self._version, self._applied = None, 0, 0
        self.updates = 0  # coordinate updates applied to the atoms
        self.phase = ("starting", 0, 0)
        self.report, self.error, self.stopped, self.finished = None, None, False, False
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
        if self._stop.is_set():
            raise _Stopped()
        if not self._engine_streams:
            # Engine without ``on_coords``: read the refiner's latest trajectory frame (the
            # progress callback is called from the refiner's phase loop).
            caller = sys._getframe(1).f_locals.get("self")
            traj = getattr(caller, "trajectory", None)
            if traj and len(traj) != getattr(self, "_seen_frames", 0):
                self._seen_frames = len(traj)
                self._coords(traj[-1])

    def _run(self):
        try:
            kw = {"on_coords": self._coords} if self._engine_streams else {}
            self.report = self._refine(self.cfg, progress=self._progress, **kw)
        except _Stopped:
            self.stopped = True
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
        import shutil

        shutil.rmtree(self.model_path.parent, ignore_errors=True)  # the inputs written for the engine
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
            final = bridge.read_pdb_coords(self.out / "refined.pdb")
            keys = bridge.atom_keys(self.moved_atoms)
            have = np.array([k in final for k in keys])
            xyz = np.array([final[k] for k, h in zip(keys, have) if h], dtype=np.float64).reshape(-1, 3)
            cur = self.moved_atoms.coords.copy()
            cur[have] = bridge.to_frame(xyz, self.frame, self.structure.scene_position)
            self.moved_atoms.coords = cur
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
        log.info(f"cryogmm fit: {secs:.1f} s, {self.updates} coordinate updates, RMS move "
                 f"{self.report['rms_moved_A']:.2f} Å; outputs in {self.out}")

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
