"""Reconstruction job: particles with poses and CTF -> half maps, FSC, final map.

Gold-standard: particles are split by ``rlnRandomSubset`` (assigned at random, seeded,
when the STAR has none), each half reconstructed on its own; the FSC between the halves
(with and without a soft spherical mask) gives the resolution, and the final map from
all particles is Wiener-filtered with the SNR the FSC implies.

Several processes (``torch.distributed``)::

    torchrun --nproc_per_node 2 -m cryogmm.cli reconstruct particles.star --out rec

Each rank reads and inserts its contiguous shard of the particles; the Fourier accumulators
are summed across ranks in float64; every rank then computes the same maps and rank 0 writes
them. The result equals one process's up to the order of the float sums.

Streaming: images are read batch by batch with positioned reads, the next batch in a
background thread (``prefetch``); ``max_memory_gb`` caps the batch so that the job's host
memory (grids, tables and the batches in flight) stays under it. Precision: Fourier sums in
float32 on one process and float64 under ``torchrun`` (``accumulate``; float64 sums make the
maps the same however the particles are sharded), float64 across processes; the map is
computed in float32 from the sums.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from cryogmm import distributed
from cryogmm.bridge.images import ImageSource
from cryogmm.bridge.io import read_particles
from cryogmm.core.ctf import CtfParams
from cryogmm.core.masks import soft_sphere_mask
from cryogmm.core.similarity import fsc as fsc_fn
from cryogmm.core.similarity import resolution_at
from cryogmm.errors import OptionError, StarError
from cryogmm.io import maps as mapio
from cryogmm.io.outputs import OutputDir, write_report
from cryogmm.io.plots import fsc_plot
from cryogmm.recon.accumulator import FourierAccumulator
from cryogmm.runtime import Timer, pick_device


@dataclass
class ReconstructConfig:
    star: Path
    out: Path
    project_dir: Path | None = None
    batch: int = 256
    reg: float = 1e-3
    wiener: bool = True
    ctf: bool = True
    mask_radius_A: float | None = None
    seed: int = 0
    device: str | None = None
    max_memory_gb: float | None = None
    prefetch: int = 1
    accumulate: str = "auto"


#: resident memory of a job besides its batches and grids (interpreter, torch, tables), in bytes
BASELINE_BYTES = 450e6


def reconstruct_table(table, source, *, batch=256, reg=1e-3, wiener=True, ctf=True, device=None, progress=None,
                      prefetch: int = 1, max_memory_gb: float | None = None, accumulate: str = "auto"):
    """Reconstruct half maps and the final map from a ``ParticleTable`` and its ``ImageSource``.

    Returns ``(half1, half2, final, fsc_unmasked)`` as CPU tensors ``[N, N, N]`` / ``[N//2+1]``.
    All particles must share one box and pixel size. Under ``torch.distributed`` each rank
    inserts its shard (:func:`cryogmm.distributed.shard`) and the accumulators are summed, so
    every rank returns the same maps. ``prefetch``: batches read ahead in a background
    thread; ``max_memory_gb``: the batch is lowered until the estimated host memory fits.
    ``accumulate``: ``float32``, ``float64`` or ``auto`` (float64 under ``torchrun``, where it
    makes the maps independent of the sharding; float32 otherwise).
    """

    progress = progress or (lambda *a: None)
    box = np.unique(table.box)
    apix = np.unique(np.round(table.apix, 6))
    if len(box) != 1 or len(apix) != 1:
        raise StarError(table.source, f"particles of several box sizes {box.tolist()} or pixel sizes "
                        f"{apix.tolist()}; reconstruct one optics setting at a time")
    box, apix = int(box[0]), float(apix[0])
    acc = new_accumulator(box, apix, accumulate, device)
    if max_memory_gb is not None:
        fit = FourierAccumulator.batch_for_memory(box, max_memory_gb * 1e9, BASELINE_BYTES + acc.grid_bytes()
                                                  + table.n * 200, prefetch=prefetch)
        if fit < 1:
            raise OptionError("--max-memory-gb", f"{max_memory_gb:g} GB cannot hold the box-{box} grids "
                              f"({(BASELINE_BYTES + acc.grid_bytes()) / 1e9:.2f} GB) and one particle")
        batch = min(int(batch), fit)
    R_all = torch.as_tensor(table.rotmat, dtype=torch.float32)
    sh_all = torch.as_tensor(table.shift_A, dtype=torch.float32)
    sets_all = torch.as_tensor(table.half_set - 1, dtype=torch.long)
    mine = distributed.shard(table.n) if distributed.world() > 1 else None
    total = table.n if mine is None else len(mine)
    done = 0
    for idx, imgs in source.chunks(batch, indices=mine, prefetch=prefetch):
        idx = np.asarray(idx)
        c = CtfParams.from_table(table, idx) if ctf else None
        acc.insert(torch.as_tensor(imgs), R_all[idx], sh_all[idx], c, sets_all[idx])
        done += len(idx)
        progress("reconstruct", done, total)
    return maps_from_accumulator(acc, reg=reg, wiener=wiener)


def new_accumulator(box: int, apix: float, accumulate: str = "auto", device=None) -> FourierAccumulator:
    """The two half sets' accumulator of a job: float64 sums for ``accumulate="float64"`` or
    (``auto``) under ``torchrun``, float32 otherwise."""
    if accumulate not in ("auto", "float32", "float64"):
        raise OptionError("--accumulate", f"{accumulate!r}; expected auto, float32 or float64")
    wide = accumulate == "float64" or (accumulate == "auto" and distributed.world() > 1)
    return FourierAccumulator(box, apix, n_sets=2, device=device, grid_dtype=torch.float64 if wide else None)


def maps_from_accumulator(acc: FourierAccumulator, reg=1e-3, wiener=True):
    """Sum the accumulator over processes, then ``(half1, half2, final, fsc_unmasked)`` as CPU
    tensors (the final map Wiener-filtered by the halves' FSC when ``wiener``)."""
    acc.all_reduce()
    h1 = acc.reconstruct([0], reg=reg)
    h2 = acc.reconstruct([1], reg=reg)
    curve = fsc_fn(h1, h2).cpu()
    if wiener:
        f = curve.clamp(1e-3, 0.999)
        final = acc.reconstruct(ssnr=2 * f / (1 - f))
    else:
        final = acc.reconstruct(reg=reg)
    return h1.cpu(), h2.cpu(), final.cpu(), curve


def reconstruct(cfg: ReconstructConfig, progress=None) -> dict:
    """Write ``map.mrc``, ``half1.mrc``, ``half2.mrc``, ``fsc.png``, ``report.json`` into ``cfg.out``
    (rank 0 only under ``torch.distributed``; every rank returns the report)."""

    timer = Timer()
    if cfg.batch < 1:
        raise OptionError("--batch", f"{cfg.batch}; expected a positive number of particles per batch")
    if cfg.max_memory_gb is not None and not cfg.max_memory_gb > 0:
        raise OptionError("--max-memory-gb", f"{cfg.max_memory_gb}; expected a positive number of GB")
    if cfg.prefetch < 0:
        raise OptionError("--prefetch", f"{cfg.prefetch}; expected 0 (off) or a number of batches")
    dev = distributed.setup(pick_device(cfg.device))
    table = read_particles(cfg.star, project_dir=cfg.project_dir)
    table.require(poses=True, ctf=cfg.ctf)
    had_halves = bool(np.all(table.half_set > 0))
    table = table.with_half_sets(seed=cfg.seed)
    source = ImageSource.from_table(table)
    h1, h2, final, curve = reconstruct_table(table, source, batch=cfg.batch, reg=cfg.reg, wiener=cfg.wiener,
                                             ctf=cfg.ctf, device=dev, progress=progress,
                                             prefetch=cfg.prefetch, max_memory_gb=cfg.max_memory_gb,
                                             accumulate=cfg.accumulate)
    source.close()
    box, apix = h1.shape[-1], float(table.apix[0])
    radius_px = (cfg.mask_radius_A / apix) if cfg.mask_radius_A else box // 2 - 4
    if radius_px <= 0 or radius_px > box // 2:
        raise OptionError("--mask-radius-A", f"{cfg.mask_radius_A} Å; expected 0 < r <= {box // 2 * apix:g} Å")
    mask = soft_sphere_mask(box, radius_px - 3, edge_px=3)
    curve_m = fsc_fn(h1, h2, mask=mask).cpu()
    res = {t: resolution_at(curve, box, apix, threshold=t) for t in (0.143, 0.5)}
    res_m = {t: resolution_at(curve_m, box, apix, threshold=t) for t in (0.143, 0.5)}
    report = {
        "job": "reconstruct",
        "star": str(cfg.star),
        "n_particles": int(table.n),
        "n_half1": int((table.half_set == 1).sum()),
        "n_half2": int((table.half_set == 2).sum()),
        "halves_from_star": had_halves,
        "box": box,
        "apix_A": apix,
        "ctf_corrected": cfg.ctf,
        "resolution_A": res_m[0.143],
        "resolution_0.5_A": res_m[0.5],
        "resolution_unmasked_A": res[0.143],
        "resolution_unmasked_0.5_A": res[0.5],
        "mask_radius_A": float(radius_px * apix),
        "fsc": {"resolution_A": (box * apix / np.maximum(np.arange(len(curve)), 1e-9)).tolist(),
                "unmasked": curve.numpy(), "masked": curve_m.numpy()},
        "device": str(dev),
    }
    if distributed.world() > 1:
        report["processes"] = distributed.world()
    if cfg.accumulate != "auto" or distributed.world() > 1:
        report["accumulate"] = "float64" if cfg.accumulate == "auto" else cfg.accumulate
    if cfg.max_memory_gb is not None:
        report["max_memory_gb"] = cfg.max_memory_gb
    if not distributed.is_main():
        distributed.barrier()
        report["seconds"] = timer()
        return report
    with OutputDir(cfg.out) as od:
        mapio.write_map(od.path("map.mrc"), final.numpy(), apix)
        mapio.write_map(od.path("half1.mrc"), h1.numpy(), apix)
        mapio.write_map(od.path("half2.mrc"), h2.numpy(), apix)
        fsc_plot({"unmasked": curve.numpy(), "soft spherical mask": curve_m.numpy()}, box, apix, od.path("fsc.png"))
        report["seconds"] = timer()
        write_report(od.path("report.json"), report)
    distributed.barrier()
    return report
