"""Checkpoints of the long jobs (refine-poses after every iteration, refine-model between
stages, refine-series between the models and phases of a series), saved in the output folder
so that ``--resume`` after a kill continues from the last one and ends with the same files as an
uninterrupted run.

A checkpoint is one ``torch.save`` file of tensors and JSON strings (read back with
``weights_only=True``), written under a temporary name and renamed into place, so a kill
during the write leaves the previous checkpoint whole. It records the job's settings and the
SHA-256 of its input files: resuming with other settings or changed inputs is refused. The RNG
states (torch's CPU generator, CUDA's when in use, numpy's global one) are saved with it.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path

import numpy as np
import torch

from cryogmm.errors import InputError, OptionError
from cryogmm.io.outputs import atomic_output

CHECKPOINT = "checkpoint.pt"
FORMAT = 1


def file_sha256(path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def fingerprint(cfg, skip=("out", "device", "threads", "quiet", "resume"), only=None) -> str:
    """The settings of a job's config (a dataclass) that decide its results, with the SHA-256 of
    every input file among them (JSON): every field but ``skip``, or the fields ``only``."""
    names = only if only is not None else [f.name for f in dataclasses.fields(cfg) if f.name not in skip]
    return json.dumps({k: _describe(getattr(cfg, k)) for k in names}, sort_keys=True)


def _describe(v):
    if isinstance(v, Path):
        return {"path": str(v), "sha256": file_sha256(v) if v.is_file() else None}
    if isinstance(v, (list, tuple)):
        return [_describe(x) for x in v]
    if isinstance(v, dict):
        return {str(k): _describe(x) for k, x in sorted(v.items(), key=lambda kv: str(kv[0]))}
    return v if isinstance(v, (int, float, str, bool, type(None))) else repr(v)


def rng_state() -> dict:
    """torch's (CPU and, when initialised, CUDA) and numpy's global RNG states."""
    st = {"torch_rng": torch.get_rng_state(), "numpy_rng": json.dumps(_np_state())}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        st["cuda_rng"] = torch.stack(torch.cuda.get_rng_state_all())
    return st


def set_rng_state(st: dict):
    torch.set_rng_state(st["torch_rng"])
    kind, keys, pos, has_gauss, cached = json.loads(st["numpy_rng"])
    np.random.set_state((kind, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
    if "cuda_rng" in st and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(list(st["cuda_rng"]))


def _np_state():
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    return [kind, keys.tolist(), int(pos), int(has_gauss), float(cached)]


def save_checkpoint(path, state: dict, fp: str):
    """``state`` (tensors, numbers, strings) with the settings ``fp`` and the RNG states,
    atomically into ``path``."""
    full = {"format": FORMAT, "fingerprint": fp, **rng_state(), **state}
    with atomic_output(path) as tmp:
        torch.save(full, tmp)


def load_checkpoint(path, fp: str, option: str = "--resume") -> dict:
    """The checkpoint at ``path`` for a run with settings ``fp``; its RNG states are restored by
    :func:`set_rng_state`. One-line errors: no checkpoint, unreadable, other settings."""
    path = Path(path)
    if not path.is_file():
        raise OptionError(option, f"{path.parent} holds no {CHECKPOINT} to continue from (none was written yet, "
                                  "or the run finished); run without --resume")
    try:
        st = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise InputError(path, f"is not a readable cryogmm checkpoint ({str(e).splitlines()[0]})") from None
    if st.get("format") != FORMAT:
        raise InputError(path, f"is a checkpoint of format {st.get('format')}, expected {FORMAT}")
    if st["fingerprint"] != fp:
        old, new = json.loads(st["fingerprint"]), json.loads(fp)
        diff = sorted("--" + k.replace("_", "-") for k in set(old) | set(new) if old.get(k) != new.get(k))
        raise OptionError(option, f"the settings or inputs differ from those {path} was made with "
                                  f"({', '.join(diff)}); resume with the same ones")
    return st


def clear_partial(out):
    """Remove temporary checkpoint files a kill left behind in ``out``."""
    for p in Path(out).glob(f".{CHECKPOINT}.*"):
        p.unlink(missing_ok=True)
