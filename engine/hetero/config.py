"""Options of ``cryogmm hetero train`` and the names of a run folder's files."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

CHECKPOINT = "checkpoint.pt"
CONFIG = "config.json"
LATENTS = "latents_polished.npy"  # per-particle polished latents (polish_steps > 0), particle order
POSTERIOR = "latents_posterior.npy"  # per-particle posterior-mean latents (posterior_candidates > 0)
# default loss band: annealed from 8 Å to 4 Å (or the data's Nyquist) over the first half of the
# epochs. Measured on targeted-MD frames of HIV protease and adenylate kinase (relion_project, SNR
# 0.1; benchmarks/results/hetero_thermal.json) against the earlier fixed 8 Å band
DEFAULT_LOWPASS_A = 4.0
DEFAULT_ANNEAL_START_A = 8.0


# --------------------------------------------------------------------------- configs
@dataclass
class HeteroConfig:
    star: Path
    model: Path
    out: Path
    decoder: str = "segments"
    segments: int = 20
    per_chain: bool = False
    zdim: int = 8
    epochs: int = 20
    batch: int = 64
    # highest resolution used (Å); None: DEFAULT_LOWPASS_A, or the data's Nyquist (2 x pixel) if coarser
    lowpass_A: float | None = None
    # resolution annealing: the loss band starts at this resolution (Å, coarser than
    # lowpass_A) and reaches lowpass_A linearly in spatial frequency by anneal_epochs; None:
    # DEFAULT_ANNEAL_START_A when that is coarser than lowpass_A; equal to lowpass_A: no annealing
    lowpass_start_A: float | None = None
    anneal_epochs: int | None = None  # default: half of the epochs
    gaussians: str = "ca"
    resolution_A: float | None = None
    loss: str = "gaussian"
    kl_warmup: int = 5
    beta: float = 1.0
    lr: float = 1e-3
    hidden: int = 256
    temperature: float = 0.1
    bond_weight: float = 1.0
    clash_weight: float = 1.0
    sidechain_weight: float = 1.0
    elastic_weight: float | None = None
    elastic_seq: int = 4
    map: Path | None = None
    project_dir: Path | None = None
    resume: bool = False
    seed: int = 0
    device: str | None = None
    max_particles: int | None = None
    matmul_precision: str = "highest"
    load: str = "auto"  # particles held in memory, streamed from disk, or auto (hetero.data.memory_plan)
    max_memory_gb: float | None = None
    # streamed particles go through an on-disk cache (hetero.cache): in cache_dir (kept), or by
    # default in RUN/particle_cache (removed when training ends); cache=False streams without one
    cache: bool = True
    cache_dir: Path | None = None
    polish_steps: int = 10  # per-particle latent polish (MAP z under the trained decoder) after training
    # latents read as the posterior mean over this many k-means centres of the particles' own
    # latents (vae.posterior_mean_latents); 0: the polished (MAP) or encoder-mean latents
    posterior_candidates: int = 32
    calibrate: bool = True  # coarse Gaussians drawn where the reference's atoms put density (vae.calibrate_base)
    # what the forward model draws: the coarse Gaussians ("coarse") or every atom of the reference
    # moved by the deformation of its coarse Gaussian ("atoms": the images' own detail, more work)
    draw: str = "coarse"
