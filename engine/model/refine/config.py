"""Options of model refinement: the map similarities, the stages, the defaults, the quick preset
and the motion presets."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

SIMILARITIES = ("relative-entropy", "cross-correlation", "inner-product", "fsc", "frc")
STAGES = ("rigid", "residue", "rotamers", "full")
DEFAULT_STAGES = ("rigid", "residue", "rotamers", "full", "rotamers", "full", "rotamers", "full")
# ``refine-model --quick``: one side-chain and full-atom round, 50 steps per phase, and the
# full-atom stage straight to its L-BFGS polish (no Adam phase: ``full_steps`` 0). AdK closed
# -> open at 4 Å, fsc: Cα 0.37 Å, every goal, in ~19 s on 2 CPU cores
QUICK_STAGES = ("rigid", "residue", "rotamers", "full")
QUICK_STEPS = 50
QUICK_EXTRA = {"full_steps": 0}


@dataclass
class RefineModelConfig:
    model: Path
    out: Path
    map: Path | None = None
    resolution_A: float | None = None
    similarity: str = "fsc"
    stages: tuple = DEFAULT_STAGES
    geometry_only: bool = False
    rebuild_rotamers: bool = False
    n_patches: int = 64
    steps: int = 100  # Adam steps per phase
    geometry_weight: float = 1.0  # multiplies the automatic weight
    anchor_sigma_A: float | None = None  # harmonic restraint to the start (default: 0.15 Å geometry-only)
    reference: Path | None = None  # a model to report Cα RMSD against (benchmarks)
    trajectory_every: int = 10
    seed: int = 0
    device: str = "cpu"
    threads: int = 2
    quiet: bool = True
    motion: str = "domains"  # or "local", or "auto": see MOTION_PRESETS
    restraints: tuple = ()  # user monomer dictionaries (CIF paths)
    backbone_library: str = "engh-huber"  # or "cdl": protein backbone targets (cryogmm.model.cdl)
    na_pairs: bool = False  # restrain the start model's base pairs and stacks (cryogmm.model.napairs)
    extra: dict = field(default_factory=dict)


# Step sizes and options by the kind of motion expected (``extra`` overrides any of them):
# "domains" lets patches swing far (large rigid steps, weak geometry between patches) and
# regroups them into motion domains; "local" is for a model already placed in its map
# (smaller steps, geometry kept firmer, adaptive map force, no domain regrouping).
MOTION_PRESETS = {
    "domains": {},
    "local": {"rigid_lr": 0.2, "residue_lr": 0.05, "rigid_min_weight": 0.05, "adaptive_scaling": True,
              "motion_domains": False},
}
MOTIONS = (*MOTION_PRESETS, "auto")
# "auto" chooses "local" for a model that already fits its map (masked map-model correlation at
# the map's resolution at least this) and "domains" otherwise. Measured starts: parts moved
# 10-12° (an HIV protease monomer with its inhibitor, an RNA stem) 0.68-0.69, deposited models in
# their own maps 0.90-0.99.
AUTO_LOCAL_MIN_CC = 0.8
