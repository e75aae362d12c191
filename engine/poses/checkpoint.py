"""refine-poses' checkpoint (``--resume``): the state of a run after each complete iteration,
in its output folder, and its reading back checked against the resumed run's options (the
shared mechanism: :mod:`cryogmm.io.checkpoint`)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from cryogmm import distributed
from cryogmm.bridge.io import write_particles
from cryogmm.core.gaussians import Gaussians
from cryogmm.io.checkpoint import CHECKPOINT, fingerprint, load_checkpoint as _load, save_checkpoint as _save, \
    set_rng_state

#: options a resumed run must share with the checkpoint's (``iterations`` may grow; ``batch``,
#: ``prefetch`` and ``device`` change only the order of float sums)
_RESUME_SAME = ("star", "half_maps", "model", "map", "mask", "hetero", "patches", "patch_iterations", "sym",
                "project_dir", "low_res_A", "start_res_A", "steps", "lr_deg", "lr_A", "n_gaussians",
                "max_gaussians", "fit_iterations", "seed", "matmul_precision", "accumulate")


def resume_fingerprint(cfg) -> str:
    """The options (and input files' SHA-256) a resumed run must share with its checkpoint."""
    return fingerprint(cfg, only=_RESUME_SAME)


def save_checkpoint(cfg, fp: str, run: dict, done: bool, extra: dict):
    """``checkpoint.pt`` in the output folder (rank 0; a temporary name, then renamed)."""
    if not distributed.is_main():
        return
    state = {
        "done": done,
        "R": run["R"].cpu(), "S": run["S"].cpu(), "frc": run["frc"].cpu(),
        "halves": [h.cpu() for h in run["halves"]], "final": run["final"].cpu(),
        "gmms": [[g.centers.cpu(), g.amplitudes.cpu(), g.sigmas.cpu()] for g in run["gmms"]],
        "res": float(run["res"]),
        "history": json.dumps(run["history"]),
        "curves": {k: torch.as_tensor(np.asarray(v)) for k, v in run["curves"].items()},
        "extra": json.dumps(extra),
    }
    _save(Path(cfg.out) / CHECKPOINT, state, fp)


def load_checkpoint(cfg, fp: str, dev):
    """The state to continue from (``--resume``), checked against the run's options; the RNG
    states are restored."""
    st = _load(Path(cfg.out) / CHECKPOINT, fp)
    set_rng_state(st)
    return {
        "done": bool(st["done"]),
        "R": st["R"].to(dev), "S": st["S"].to(dev), "frc": st["frc"].to(dev),
        "halves": list(st["halves"]), "final": st["final"],
        "gmms": [Gaussians(*(t.to(dev) for t in g)) for g in st["gmms"]],
        "res": st["res"], "history": json.loads(st["history"]),
        "curves": {k: v.numpy() for k, v in st["curves"].items()},
        "extra": json.loads(st["extra"]),
    }


def after_iteration(cfg, fp: str, run: dict, done: bool, extra: dict, table):
    """What a run keeps after each complete iteration: its checkpoint and, with
    ``--keep-iterations``, that iteration's poses."""
    save_checkpoint(cfg, fp, run, done, extra)
    if cfg.keep_iterations:
        write_iteration_poses(cfg, table, run)


def write_iteration_poses(cfg, table, run: dict):
    """``--keep-iterations``: the poses after the run's last complete iteration as
    ``iterations/refined_itNNN.star`` in the output folder (rank 0; a temporary name, then
    renamed), written as each iteration ends, as RELION keeps ``run_itNNN_data.star``."""
    if not distributed.is_main():
        return
    folder = Path(cfg.out) / "iterations"
    t = table.relocated(folder).with_poses(rotmat=run["R"].cpu().double().numpy(),
                                           shift_A=run["S"].cpu().double().numpy())
    t = t.with_columns(rlnCryogmmFrc=run["frc"].cpu().double().numpy())
    write_particles(t, folder / f"refined_it{len(run['history']):03d}.star")  # atomic: a temporary name, then renamed
