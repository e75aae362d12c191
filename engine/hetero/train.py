"""Heterogeneity from an atomic model: a VAE whose decoder moves the model.

Per particle, an encoder reads the (Fourier-cropped) image beside the CTF-modulated
projection of the reference model at the particle's pose and gives a Gaussian posterior
over a latent ``z``; a deformer (:mod:`cryogmm.deform`) turns a sample of ``z`` into a moved
copy of the reference's coarse Gaussians (one per residue at its Cα, or backbone and
side-chain centroids), which is projected at the particle's pose (from the STAR), multiplied
by its CTF and compared with the image:

- ``segments`` decoder (cryoSPHERE, Gilles & Singer): soft segments along the chain, each
  moved as a rigid body per image;
- ``displacement`` decoder (atomic VAE, Zhong et al.): an offset per Gaussian, held
  together by restraints: harmonic 3.8 Å bonds between consecutive Cα, a maximum distance
  between a residue's backbone and side-chain centroids, and a clash term.

The forward model is computed in Fourier space on the cropped grid: the 2D transform of a
projected Gaussian is analytic (``a exp(-2 pi^2 s^2 |k|^2) exp(-2 pi i k.x)``) and separable
in ``kx`` and ``ky``, so a batch of projections is one complex batched matrix product, free
of aliasing whatever the crop. The loss is either the Gaussian likelihood (white noise, its
variance measured outside the particle) or cryoSPHERE's correlation, over the frequencies
up to ``lowpass_A``; the KL term is ramped in over ``kl_warmup`` epochs. Before training the
coarse Gaussians' drawn centres are fitted to the reference's own all-atom density
(:func:`cryogmm.hetero.vae.calibrate_base`, ``calibrate``), so that zero deformation draws
the reference and the decoder learns motion, not coarse-graining (particles of the reference
alone decoded 0.7-1.1 Å from it without this, 0.11 Å with it). A checkpoint is
written after every epoch; ``resume`` continues from it.

Precision (issue 18): ``lowpass_start_A`` anneals the loss band from that coarse resolution to
``lowpass_A`` (linear in spatial frequency over ``anneal_epochs``; the particles are cropped
to ``lowpass_A`` and the encoder sees that whole band from the start), so the decoder learns
the large motions first and refines them with the finer data; ``polish_steps`` runs a
per-particle latent polish after training (:func:`cryogmm.hetero.vae.polish_latents`, MAP
``z`` of every particle under the trained decoder) and writes ``latents_polished.npy``. On
targeted-MD frames of HIV protease (benchmarks/hetero_thermal.py, 2,000 particles, SNR 0.1,
segments) annealing 10 -> 6 Å took the median decoded Cα RMSD from 0.78 to 0.64 Å and the
reference-window particles from 0.41 to 0.29 Å of the reference; the polish raised |Spearman|
from 0.88 to 0.90. ``posterior_candidates`` then reads every particle's latent as its posterior
mean over k-means centres of all particles' latents (:func:`posterior_candidates`,
:func:`cryogmm.hetero.vae.posterior_mean_latents`) and writes ``latents_posterior.npy``, which
``analyze`` reads: protease |Spearman| 0.932 -> 0.937 (coarse drawing), 0.950-0.952 -> 0.958
(``draw="atoms"``, two seeds).

Several processes or GPUs (``torch.distributed``; gloo on CPUs, NCCL on GPUs)::

    torchrun --nproc_per_node 2 -m cryogmm.cli hetero train particles.star --model ref.pdb --out run

The training step is wrapped in ``DistributedDataParallel``. Each epoch's permutation and
each batch's latent noise are drawn identically on every rank (same seeds); each rank holds
(or streams) only its contiguous shard of the particles (:func:`cryogmm.distributed.shard`)
and takes, of every global batch of ``batch`` particles, those of its shard
(:func:`cryogmm.hetero.data.shard_share`); each rank's loss is its share of the global batch
mean, and DDP averages the gradients: the optimiser sees the gradient of the one-process
batch, so training follows the one-process run up to float reduction order. Rank 0 alone
writes the checkpoint (every epoch), ``config.json``, ``loss.png`` and ``report.json``;
``resume`` works with any number of processes.

Particles (:mod:`cryogmm.hetero.data`): held in memory, Fourier-cropped, when they fit the
memory budget (``max_memory_gb``; ``load="memory"`` insists and is refused over budget),
otherwise streamed: each batch read from the stacks and cropped when needed, the next one
prepared in a background thread, so memory does not grow with the number of particles. Both
give the same batches (to float32 rounding) in the same seeded order.

Precision: ``matmul_precision`` ``tf32`` lets the encoder's and the projection's float32
matrix products use TF32 tensor cores on GPUs; the loss sums and the Adam state stay float32.

Analysis (:func:`analyze_hetero`): latent means per particle, PCA trajectories as
multi-model PDB files, maps along them from the deformed models and by back-projecting the
particles nearest each trajectory point, k-means clusters as STAR and .cs subsets, plots
and the learned segments. :func:`decode_hetero` writes one model per latent row.
"""

from __future__ import annotations

import json
import math
import shutil
import time
from dataclasses import asdict, replace
from pathlib import Path

import numpy as np
import torch

from cryogmm import distributed
from cryogmm.errors import CryoGMMError, InputError, OptionError
from cryogmm.core.kmeans import weighted_kmeans
from cryogmm.hetero.config import CHECKPOINT, CONFIG, DEFAULT_ANNEAL_START_A, LATENTS, POSTERIOR, HeteroConfig
from cryogmm.hetero.data import load_particles, shard_share
from cryogmm.hetero.reference import load_reference, map_center
from cryogmm.hetero.vae import (
    ForwardModel,
    TrainStep,
    build_vae,
    calibrate_base,
    load_vae_state,
    polish_latents,
    posterior_mean_latents,
    rank_loss,
    restraint_pairs,
)
from cryogmm.io.outputs import atomic_output, write_report
from cryogmm.io.plots import loss_plot
from cryogmm.runtime import Timer, pick_device, set_matmul_precision

DEFAULT_CACHE = "particle_cache"  # the streamed particles' cache in the run folder (removed at the end)


def _check_config(cfg: HeteroConfig):
    if cfg.decoder not in ("segments", "displacement"):
        raise OptionError("--decoder", f"{cfg.decoder!r}; expected segments or displacement")
    if cfg.loss not in ("gaussian", "correlation"):
        raise OptionError("--loss", f"{cfg.loss!r}; expected gaussian or correlation")
    if cfg.gaussians not in ("ca", "residue2"):
        raise OptionError("--gaussians", f"{cfg.gaussians!r}; expected ca or residue2")
    if cfg.draw not in ("coarse", "atoms"):
        raise OptionError("--draw", f"{cfg.draw!r}; expected coarse or atoms")
    for name, v, lo in (("--zdim", cfg.zdim, 1), ("--epochs", cfg.epochs, 1), ("--batch", cfg.batch, 1),
                        ("--segments", cfg.segments, 1)):
        if v < lo:
            raise OptionError(name, f"{v}; expected at least {lo}")
    if cfg.lowpass_A is not None and cfg.lowpass_A <= 0:
        raise OptionError("--lowpass-A", f"{cfg.lowpass_A}; expected a positive resolution in Å")
    if cfg.lowpass_start_A is not None and cfg.lowpass_A is not None and not cfg.lowpass_start_A >= cfg.lowpass_A:
        raise OptionError("--lowpass-start-A", f"{cfg.lowpass_start_A}; expected a resolution at least --lowpass-A "
                          f"({cfg.lowpass_A} Å): annealing goes from coarse to fine")
    if cfg.polish_steps < 0:
        raise OptionError("--polish-steps", f"{cfg.polish_steps}; expected 0 or more")
    if cfg.posterior_candidates < 0:
        raise OptionError("--posterior-candidates", f"{cfg.posterior_candidates}; expected 0 or more")


def posterior_candidates(z: np.ndarray, k: int, seed: int = 0) -> np.ndarray:
    """``min(k, n)`` candidate latents for :func:`cryogmm.hetero.vae.posterior_mean_latents`:
    k-means centres of the particles' latents ``z [n, D]`` (seeded), the population's own
    distribution as the prior."""
    pts = torch.as_tensor(np.asarray(z), dtype=torch.float64)
    k = max(1, min(int(k), len(pts)))
    gen = torch.Generator().manual_seed(int(seed))
    centres, _ = weighted_kmeans(pts, torch.ones(len(pts), dtype=torch.float64), k, iterations=20, generator=gen)
    return centres.float().numpy()


def _all_rows(mine: np.ndarray, rows, n: int) -> np.ndarray:
    """Per-row values of this process's ``rows`` -> all ``n`` rows on every process."""
    full = torch.zeros((n,) + tuple(mine.shape[1:]), dtype=torch.float32)
    full[torch.as_tensor(np.asarray(rows))] = torch.as_tensor(mine, dtype=torch.float32)
    return distributed.gather_rows(full, rows).numpy()


def _save_latents(path: Path, z: np.ndarray) -> None:
    with atomic_output(path) as tmp:
        with open(tmp, "wb") as fh:
            np.save(fh, z)


def band_resolution(cfg: HeteroConfig, epoch: int) -> float | None:
    """The loss band's resolution (Å) in ``epoch`` (0-based) under resolution annealing: from
    ``lowpass_start_A`` (default ``DEFAULT_ANNEAL_START_A``) to ``lowpass_A`` (resolved: see
    :func:`cryogmm.hetero.data.load_particles`) linearly in spatial frequency over
    ``anneal_epochs`` (default half the epochs), then ``lowpass_A``; None without annealing (the
    whole band: a start not coarser than ``lowpass_A``)."""
    start = cfg.lowpass_start_A if cfg.lowpass_start_A is not None else DEFAULT_ANNEAL_START_A
    if not start > cfg.lowpass_A:
        return None
    n = cfg.anneal_epochs if cfg.anneal_epochs is not None else max(1, cfg.epochs // 2)
    f = min(1.0, epoch / max(1, n))
    return 1.0 / ((1 - f) / start + f / cfg.lowpass_A)


def cache_location(cfg: HeteroConfig) -> tuple[Path | None, str]:
    """Where streamed particles are cached, and the option that set it: ``cache_dir``, or the
    run folder's ``particle_cache`` (None with ``cache`` off)."""
    if not cfg.cache:
        return None, "--no-cache"
    if cfg.cache_dir is not None:
        return Path(cfg.cache_dir), "--cache-dir"
    return Path(cfg.out) / DEFAULT_CACHE, "--out"


def setup(cfg: HeteroConfig, progress=None):
    cache_dir, option = cache_location(cfg)
    data = load_particles(cfg.star, lowpass_A=cfg.lowpass_A, project_dir=cfg.project_dir,
                          max_particles=cfg.max_particles, progress=progress, load=cfg.load,
                          max_memory_gb=cfg.max_memory_gb, train_batch=cfg.batch, sharded=True,
                          cache_dir=cache_dir, cache_option=option)
    center = map_center(cfg.map, data.box, data.apix) if cfg.map else None
    ref = load_reference(cfg.model, box=data.box, apix=data.apix, mode=cfg.gaussians,
                         resolution_A=cfg.resolution_A, center_A=center)
    return data, ref


def _config_json(cfg) -> dict:
    """The config with absolute paths, so a run can be analyzed from any folder."""
    d = asdict(cfg)
    return {k: (str(Path(v).absolute()) if isinstance(v, (Path, str)) and k in _PATHS and v else v)
            for k, v in d.items()}


_PATHS = ("star", "model", "out", "map", "project_dir", "cache_dir")


def _save_checkpoint(path, vae, opt, epoch, history, cfg, data, ref, rng):
    state = {
        "epoch": epoch,
        "model": vae.state_dict(),
        "optimizer": opt.state_dict(),
        "history": json.dumps(history),
        "config": json.dumps(_config_json(cfg)),
        "meta": json.dumps({"crop": data.crop, "box": data.box, "apix": data.apix, "noise_var": data.noise_var,
                            "center_A": ref.center_A.tolist(), "n_gaussians": ref.gaussians.n}),
        "torch_rng": torch.get_rng_state(),
        "numpy_rng": json.dumps(rng.bit_generator.state),
    }
    with atomic_output(path) as tmp:
        torch.save(state, tmp)


def load_checkpoint(path):
    path = Path(path)
    if not path.is_file():
        if (path.parent / "half1" / path.name).is_file():
            raise InputError(path.parent, "is a --halves run (one network per half): give RUN/half1 or RUN/half2 "
                             "(hetero analyze takes RUN itself)")
        raise InputError(path, "no checkpoint here: train first (cryogmm hetero train)")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise InputError(path, f"is not a readable cryogmm hetero checkpoint ({str(e).splitlines()[0]})") from None


def _resume_state(cfg: HeteroConfig):
    """The checkpoint to continue from (``--resume``, with the settings it was trained with), or
    None for a new run in an empty folder."""
    out = Path(cfg.out)
    ckpt_path = out / CHECKPOINT
    if not cfg.resume:
        if ckpt_path.exists():
            raise OptionError("--out", f"{out} already holds a training run ({CHECKPOINT}); use --resume or a new --out")
        return None
    state = load_checkpoint(ckpt_path)
    old = json.loads(state["config"])
    for k in ("decoder", "zdim", "segments", "gaussians", "lowpass_A", "hidden", "per_chain"):
        if k == "lowpass_A" and cfg.lowpass_A is None:  # not given: the checkpoint's (see _train)
            continue
        if str(old[k]) != str(getattr(cfg, k)):
            raise OptionError(f"--{k.replace('_', '-')}", f"{getattr(cfg, k)} differs from the checkpoint's "
                              f"{old[k]} in {ckpt_path}: resume with the same settings")
    return state


def _train_epoch(epoch: int, cfg: HeteroConfig, step, opt, rng, n: int, dev, progress, fw) -> dict:
    """One pass over the particles (each rank its share of every batch, the particles of its own
    shard; streamed batches prepared one ahead); the epoch's record."""
    w = distributed.world()
    t0 = time.perf_counter()
    beta = cfg.beta * min(1.0, (epoch + 1) / max(1, cfg.kl_warmup))
    order = rng.permutation(n)
    sums = {"loss": 0.0, "data": 0.0, "kl": 0.0}
    batches = [np.sort(order[b0:b0 + cfg.batch]) for b0 in range(0, n, cfg.batch)]
    shares = [shard_share(b, fw.data.rows) for b in batches]
    done = 0
    for _, idx_all, (idx, pick, weight) in zip(fw.prefetch([s[0] for s in shares]), batches, shares):
        # the batch's latent noise, drawn whole on every rank (the one-process stream), then split
        eps_all = torch.randn(len(idx_all), cfg.zdim, device=dev)
        eps = eps_all[torch.as_tensor(pick, device=dev)]
        per, dterm, kl, terms = step(idx, eps, beta)
        loss = rank_loss(per, weight, len(idx_all), w)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        k = len(idx) if weight else 0
        sums["loss"] += float(per.detach().mean()) * k
        sums["data"] += float(dterm.detach().mean()) * k
        sums["kl"] += float(kl.detach().mean()) * k
        for name, v in terms.items():
            sums[name] = sums.get(name, 0.0) + float(v.detach().mean()) * k
        done += len(idx_all)
        progress(f"epoch {epoch + 1}/{cfg.epochs}", done, n)
    if w > 1:
        keys = sorted(sums)
        tot = distributed.all_reduce_sum(torch.tensor([sums[k] for k in keys], dtype=torch.float64))
        sums = dict(zip(keys, tot.tolist()))
    sec = time.perf_counter() - t0
    rec = {"epoch": epoch + 1, "beta": beta, "seconds": sec, "images_per_s": n / sec}
    rec.update({k: v / n for k, v in sums.items()})
    return rec


def train_hetero(cfg: HeteroConfig, progress=None) -> dict:
    """Train; write ``checkpoint.pt`` (every epoch), ``config.json``, ``loss.png`` and
    ``report.json`` into ``cfg.out``. Returns the report.

    Streamed particles go through their on-disk cache (:mod:`cryogmm.hetero.cache`): by default
    ``RUN/particle_cache``, removed when training ends and when the job stops on bad input
    (kept after an interruption, for ``resume``); in ``cache_dir`` kept. ``report["particles"]
    ["cache"]`` gives its path, size and whether it was written or reused."""
    out = Path(cfg.out)
    had = {p: p.exists() for p in (out, out / DEFAULT_CACHE)}
    try:
        return _train(cfg, progress)
    except CryoGMMError:
        # bad input: nothing written (the run folder's cache, and the run folder it made)
        if cfg.cache and cfg.cache_dir is None and not had[out / DEFAULT_CACHE]:
            shutil.rmtree(out / DEFAULT_CACHE, ignore_errors=True)
        if not had[out] and out.is_dir() and not any(out.iterdir()):
            out.rmdir()
        raise


def _train(cfg: HeteroConfig, progress=None) -> dict:
    timer = Timer()
    progress = progress or (lambda *a: None)
    _check_config(cfg)
    out = Path(cfg.out)
    state = _resume_state(cfg)
    if state is not None and cfg.lowpass_A is None:  # a resume keeps the band it was trained with
        cfg = replace(cfg, lowpass_A=float(json.loads(state["config"])["lowpass_A"]))
    dev = pick_device(cfg.device)
    set_matmul_precision(dev, cfg.matmul_precision)
    dev = distributed.setup(dev)
    torch.manual_seed(cfg.seed)
    rng = np.random.default_rng(cfg.seed)
    data, ref = setup(cfg, progress)
    if cfg.lowpass_A is None:  # the default band, resolved on the data (recorded in config.json)
        cfg = replace(cfg, lowpass_A=data.lowpass_A)
        _check_config(cfg)  # an explicit --lowpass-start-A finer than the default band
    vae = build_vae(cfg, ref, data)
    if state is not None:
        load_vae_state(vae, state["model"])
    elif cfg.calibrate and cfg.draw == "coarse":
        offsets = calibrate_base(ref, data, resolution_A=cfg.resolution_A, seed=cfg.seed)
        with torch.no_grad():
            vae.draw_offsets.copy_(offsets)
    vae = vae.to(dev)
    fw = ForwardModel(vae, ref, data, dev)
    pairs = {k: v.to(dev) for k, v in restraint_pairs(ref, elastic_seq=cfg.elastic_seq).items()}
    opt = torch.optim.Adam(vae.parameters(), lr=cfg.lr)
    # the elastic network holds the displacement decoder's local geometry; segments are rigid already
    elastic_weight = cfg.elastic_weight if cfg.elastic_weight is not None else (
        0.1 if cfg.decoder == "displacement" else 0.0)
    history = []
    first = 0
    if state is not None:
        opt.load_state_dict(state["optimizer"])
        history = json.loads(state["history"])
        first = int(state["epoch"]) + 1
        torch.set_rng_state(state["torch_rng"])
        rng.bit_generator.state = json.loads(state["numpy_rng"])
    else:
        with torch.no_grad():
            vae.log_scale.fill_(math.log(fw.ref_scale))
    step = distributed.ddp(TrainStep(vae, fw, pairs, cfg, elastic_weight), dev)
    w = distributed.world()
    main = distributed.is_main()
    if main:
        out.mkdir(parents=True, exist_ok=True)
        with atomic_output(out / CONFIG) as tmp:
            tmp.write_text(json.dumps(_config_json(cfg), indent=2) + "\n")
    n = data.n
    seconds_train = sum(h["seconds"] for h in history)
    for epoch in range(first, cfg.epochs):
        vae.train()
        fw.set_band(band_resolution(cfg, epoch))
        rec = _train_epoch(epoch, cfg, step, opt, rng, n, dev, progress, fw)
        rec["band_A"] = band_resolution(cfg, epoch) or cfg.lowpass_A
        seconds_train += rec["seconds"]
        history.append(rec)
        if main:
            _save_checkpoint(out / CHECKPOINT, vae, opt, epoch, history, cfg, data, ref, rng)
    fw.set_band(None)
    outputs = [CHECKPOINT, CONFIG, "loss.png", "report.json"]
    polish = posterior = None
    one = step.module if hasattr(step, "module") else step
    vae.eval()
    z = None
    if cfg.polish_steps > 0:  # every rank polishes its own rows; rank 0 writes them all
        t0 = time.perf_counter()
        z = _all_rows(polish_latents(one, data.rows, steps=cfg.polish_steps), data.rows, n)
        if main:
            _save_latents(out / LATENTS, z)
        outputs.append(LATENTS)
        polish = {"steps": cfg.polish_steps, "seconds": time.perf_counter() - t0, "latents": LATENTS,
                  "rows": int(len(z)), "zdim": int(z.shape[1])}
    if cfg.posterior_candidates > 0:
        t0 = time.perf_counter()
        if z is None:  # the candidates come from the encoder means
            z = _all_rows(fw.encoder_means(data.rows), data.rows, n)
        cand = posterior_candidates(z, cfg.posterior_candidates, cfg.seed)
        z_mine, eff_mine = posterior_mean_latents(one, data.rows, cand)
        zp = _all_rows(z_mine, data.rows, n)
        eff = _all_rows(eff_mine[:, None], data.rows, n)[:, 0]
        if main:
            _save_latents(out / POSTERIOR, zp)
        outputs.append(POSTERIOR)
        posterior = {"candidates": int(len(cand)), "of": "polished latents" if polish else "encoder means",
                     "seconds": time.perf_counter() - t0, "latents": POSTERIOR,
                     "median_effective_candidates": float(np.median(eff)),
                     "median_shift_from_latents": float(np.median(np.linalg.norm(zp - z, axis=1)))}
    report = {
        "job": "hetero train",
        "decoder": cfg.decoder,
        "n_particles": n,
        "n_gaussians": ref.gaussians.n,
        "box": data.box,
        "crop": data.crop,
        "apix_A": data.apix,
        "lowpass_A": cfg.lowpass_A,
        "noise_sd": math.sqrt(data.noise_var),
        "zdim": cfg.zdim,
        "epochs": len(history),
        "resumed_from_epoch": first if cfg.resume else None,
        "history": history,
        "seconds_training": seconds_train,
        "images_per_s": n * len(history) / seconds_train if seconds_train > 0 else None,
        "device": str(dev),
        "seconds": timer(),
        "config": _config_json(cfg),
        "outputs": outputs,
        "latent_polish": polish,
        "latent_posterior": posterior,
    }
    if w > 1:
        report["processes"] = w
    report["particles"] = {"held": "memory" if data.resident else "streamed", "per_process": len(data.rows),
                           **{k: v for k, v in data.plan.items() if k != "resident"}}
    if data.cache is not None:
        c = data.cache.report()
        c["kept"] = cfg.cache_dir is not None
        report["particles"]["cache"] = c
        if not c["kept"]:
            data.cache.remove()
    elif not data.resident:
        report["particles"]["cache"] = data.plan.get("cache", "none (--no-cache)" if not cfg.cache else None)
    if cfg.max_memory_gb is not None:
        report["max_memory_gb"] = cfg.max_memory_gb
    data.close()
    if main:
        loss_plot(out / "loss.png", history)
        write_report(out / "report.json", report)
    distributed.barrier()
    return report
