"""Options and geometry goals of refine-series, and the geometry summary of a frame."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

from cryogmm.model.validate import GOALS  # the geometry goals of refined models (issue #6)


@dataclass
class RefineSeriesConfig:
    model: Path
    maps: tuple
    out: Path
    resolution_A: float
    frames: int = 20
    latent: Path | None = None  # text file, one row per map
    similarity: str = "fsc"  # the same default as refine-model (issue 21: one vocabulary)
    steps: int = 60  # Adam steps per phase (the curriculum gives each new map steps // 3)
    n_patches: int = 24
    patch_width_A: float = 4.0  # Gaussian width of the residue-to-patch blending
    hidden: int = 64
    latent_noise: float = 0.02  # sd of the latent noise, in units of the latent path's extent
    batch_maps: int = 3  # maps per step
    geometry_rounds: int = 1  # random latent points per step scored on geometry only
    geometry_weight: float = 1.0  # multiplies the automatic weight
    lr: float = 3e-3
    polish_iters: int = 40
    capture: bool = True  # per-map refine-model curriculum before the network (see module doc)
    capture_steps: int = 30  # refine-model steps per phase in the capture
    polish_anchor_A: float = 0.3
    references: tuple | None = None  # one model per map: Cα RMSD of each map's frame (benchmarks)
    seed: int = 0
    device: str = "cpu"
    threads: int = 1  # many small tensors: one thread is fastest on a shared CPU
    restraints: tuple = ()  # user monomer dictionaries (CIF paths)
    backbone_library: str = "engh-huber"  # or "cdl": protein backbone targets (cryogmm.model.cdl)
    na_pairs: bool = False  # restrain the start model's base pairs and stacks (cryogmm.model.napairs)
    extra: dict = field(default_factory=dict)




def passes_goals(fig: dict) -> bool:
    return all(fig.get(k, math.inf) <= v + 1e-9 for k, v in GOALS.items())


def geometry_summary(fig: dict) -> dict:
    keys = ("bond_rmsz", "angle_rmsz", "bond_outliers", "angle_outliers", "rama_favoured_pct", "rama_outlier_pct",
            "rotamer_outlier_pct", "clashscore", "cbeta_deviations", "chiral_outliers", "plane_rms_A")
    out = {k: fig[k] for k in keys if k in fig}
    out["passes_goals"] = passes_goals(fig)
    return out
