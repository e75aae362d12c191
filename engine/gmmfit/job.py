"""The ``fit-gmm`` job: read a map, fit a Gaussian mixture, write it as PDB pseudo-atoms with
its FSC against the map in report.json."""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

from cryogmm.core.gaussians import gaussians_to_map
from cryogmm.errors import MapError, OptionError
from cryogmm.gmmfit.fit import gaussians_from_map
from cryogmm.io import maps as mapio
from cryogmm.io.maps import map_origin_A
from cryogmm.io.outputs import OutputDir, write_report
from cryogmm.io.structures import write_gaussians_pdb
from cryogmm.runtime import pick_device

# --------------------------------------------------------------------------- the CLI job


@dataclass
class FitGmmConfig:
    map: Path
    out: Path
    resolution_A: float
    n: int | None = None
    threshold: float | None = None
    iterations: int = 1000
    batch: int = 16
    seed: int = 0
    device: str | None = None


def fit_gmm(cfg: FitGmmConfig, progress=None) -> dict:
    """Fit Gaussians to ``cfg.map`` and write ``gaussians.pdb``, ``gmm_map.mrc`` (the mixture
    as a map: same box, pixel and origin) and ``report.json`` into ``cfg.out``.

    Inputs are checked before anything is written: on a bad map or option nothing appears
    in ``cfg.out``. Returns the report.
    """

    t0 = time.perf_counter()
    if cfg.iterations < 0:
        raise OptionError("--iterations", f"{cfg.iterations}; expected 0 (k-means only) or more")
    if cfg.batch < 1:
        raise OptionError("--batch", f"{cfg.batch}; expected a positive number of orientations per step")
    dev = pick_device(cfg.device)
    data, apix = mapio.read_map(cfg.map)
    if not apix > 0:
        raise MapError(cfg.map, f"pixel size {apix:g} Å in the header; expected a positive pixel size")
    origin = map_origin_A(cfg.map)
    g, info = gaussians_from_map(data, apix, resolution_A=cfg.resolution_A, n=cfg.n, threshold=cfg.threshold,
                                 iterations=cfg.iterations, batch=cfg.batch, seed=cfg.seed, device=dev,
                                 progress=progress)
    box = data.shape[-1]
    gmm_map = gaussians_to_map(g, box, apix).cpu().numpy()
    with OutputDir(cfg.out) as od:
        write_gaussians_pdb(od.path("gaussians.pdb"), g, origin_A=origin + (box // 2) * apix)
        mapio.write_map(od.path("gmm_map.mrc"), gmm_map, apix, origin_A=origin)
        report = {"job": "fit-gmm", "map": str(cfg.map), "map_origin_A": origin, **info,
                  "seconds": time.perf_counter() - t0,
                  "outputs": ["gaussians.pdb", "gmm_map.mrc", "report.json"]}
        write_report(od.path("report.json"), report)
    return report
