"""refine-poses' checkpoint (``--resume``): the state of a run after each complete iteration,
in its output folder, and its reading back checked against the resumed run's options."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from cryogmm import distributed
from cryogmm.core.gaussians import Gaussians
from cryogmm.errors import OptionError
from cryogmm.io.outputs import atomic_output

#: the checkpoint of a run, in its output folder (written after every iteration)
CHECKPOINT = "checkpoint.pt"
#: options a resumed run must share with the checkpoint's (``iterations`` may grow; ``batch``,
#: ``prefetch`` and ``device`` change only the order of float sums)
_RESUME_SAME = ("star", "half_maps", "model", "map", "mask", "hetero", "patches", "patch_iterations", "sym",
                "project_dir", "low_res_A", "start_res_A", "steps", "lr_deg", "lr_A", "n_gaussians",
                "max_gaussians", "fit_iterations", "seed", "matmul_precision", "accumulate")



def save_checkpoint(cfg, run: dict, done: bool, extra: dict):
    """``checkpoint.pt`` in the output folder (rank 0; a temporary name, then renamed)."""
    if not distributed.is_main():
        return
    state = {
        "config": json.dumps({k: _json_value(getattr(cfg, k)) for k in _RESUME_SAME}),
        "done": done,
        "R": run["R"].cpu(), "S": run["S"].cpu(), "frc": run["frc"].cpu(),
        "halves": [h.cpu() for h in run["halves"]], "final": run["final"].cpu(),
        "gmms": [[g.centers.cpu(), g.amplitudes.cpu(), g.sigmas.cpu()] for g in run["gmms"]],
        "res": float(run["res"]),
        "history": json.dumps(run["history"]),
        "curves": {k: torch.as_tensor(np.asarray(v)) for k, v in run["curves"].items()},
        "extra": json.dumps(extra),
        "torch_rng": torch.get_rng_state(),
    }
    with atomic_output(Path(cfg.out) / CHECKPOINT) as tmp:
        torch.save(state, tmp)


def _json_value(v):
    if isinstance(v, (list, tuple)):
        return [_json_value(x) for x in v]
    return str(v) if isinstance(v, Path) else v


def load_checkpoint(cfg, dev):
    """The state to continue from (``--resume``), checked against the run's options."""
    path = Path(cfg.out) / CHECKPOINT
    if not path.is_file():
        raise OptionError("--resume", f"no {CHECKPOINT} in {cfg.out}: nothing to continue (start without --resume)")
    try:
        st = torch.load(path, map_location="cpu", weights_only=True)
        old = json.loads(st["config"])
    except Exception as e:
        raise OptionError("--resume", f"{path} is not a readable refine-poses checkpoint "
                          f"({str(e).splitlines()[0] if str(e) else type(e).__name__})") from None
    for k in _RESUME_SAME:
        if old.get(k) != _json_value(getattr(cfg, k)):
            raise OptionError(f"--{k.replace('_', '-')}", f"{getattr(cfg, k)} differs from the checkpoint's "
                              f"{old.get(k)} in {path}: resume with the same settings")
    torch.set_rng_state(st["torch_rng"])
    return {
        "done": bool(st["done"]),
        "R": st["R"].to(dev), "S": st["S"].to(dev), "frc": st["frc"].to(dev),
        "halves": list(st["halves"]), "final": st["final"],
        "gmms": [Gaussians(*(t.to(dev) for t in g)) for g in st["gmms"]],
        "res": st["res"], "history": json.loads(st["history"]),
        "curves": {k: v.numpy() for k, v in st["curves"].items()},
        "extra": json.loads(st["extra"]),
    }
