"""Gaussians from a map: k-means seeding, then a fit by the FRC of projections.

:func:`gaussians_from_map` turns a cubic map into a :class:`~cryogmm.gmm.Gaussians` mixture
in three steps:

1. **Threshold** (:func:`auto_threshold`, unless given). The background level ``b`` is the
   map's median and its noise ``s = 1.4826 MAD`` (robust: solvent fills most of a box).
   Voxels above ``b + 3 s`` are *significant*; the threshold is the lowest level such that
   the significant voxels above it hold 90% of the significant density (``v - b``). On a
   noise-free map (``s`` = 0) this is the contour that encloses 90% of the mass; on a noisy
   map the noise cut comes first, so noise is never seeded. On a ``molmap``-like map of
   adenylate kinase (23.6 kDa) at 6 Å the 90%-mass contour encloses 28,900 Å^3, the
   protein's volume (1.21 Å^3/Da gives 28,600 Å^3).
2. **Number of Gaussians** (:func:`auto_n`, unless given): one Gaussian per ``(R / 2)^3``
   Å^3 of the volume above the threshold, ``R`` the target resolution, i.e. one per
   Nyquist-sampled voxel of a map at that resolution; clamped to ``[8, 50000]`` and to the
   number of voxels above the threshold.
3. **Seeding**: density-weighted k-means (Lloyd) of the voxels above the threshold
   (positions weighted by ``v - b``), seeded from a weighted draw of the voxels; widths
   ``sigma_from_resolution(R)``, amplitudes the density mass ``sum (v - b) apix^3`` of each
   k-means cell.
4. **Fit**: centres, log-amplitudes and log-widths by Adam, minimising ``1 - mean FRC``
   over rings ``1 .. box apix / R`` between projections of the mixture
   (:func:`cryogmm.project.project`) and projections of the map
   (:func:`cryogmm.project.project_map`) at a pool of random orientations, projected once,
   in mini-batches. The learning rate drops threefold when the loss stops falling (mean
   loss of a window of iterations improves by less than ``tol``); the third plateau stops
   the fit. FRC does not see the overall scale, so the amplitudes are finally scaled by
   least squares against the map.

The mixture's ``centers`` are in Å from the box centre (voxel ``N // 2``), as everywhere
in the engine. :func:`write_gaussians_pdb` / :func:`read_gaussians_pdb` store a mixture as
pseudo-atoms that overlay the map in ChimeraX.
"""

from __future__ import annotations

import math
import time

import numpy as np
import torch

from cryogmm.core.fourier import band_crop, fourier_crop
from cryogmm.core.gaussians import Gaussians, gaussians_to_map, sigma_from_resolution
from cryogmm.core.kmeans import weighted_kmeans
from cryogmm.core.projection import project, project_map
from cryogmm.core.rotations import random_rotations
from cryogmm.core.similarity import frc_loss, fsc, resolution_at
from cryogmm.errors import MapError, OptionError

N_MIN, N_MAX = 8, 50000
NOISE_SD = 3.0  # significance cut, in robust noise SDs above the median
MASS_FRACTION = 0.9  # share of the significant density the threshold keeps


# --------------------------------------------------------------------------- threshold and n


def _background(values: torch.Tensor) -> tuple[float, float]:
    """Median and robust SD (1.4826 x median absolute deviation) of a 1D tensor."""
    v = values.to(torch.float64)
    med = v.median()
    return float(med), float(1.4826 * (v - med).abs().median())


def auto_threshold(volume, mask=None, *, noise_sd: float = NOISE_SD, mass_fraction: float = MASS_FRACTION):
    """The default density threshold of :func:`gaussians_from_map` (module docstring, step 1).

    Args:
        volume: ``[N, N, N]`` map.
        mask: optional ``[N, N, N]``; only voxels where ``mask > 0.5`` count.
        noise_sd: significance cut in robust SDs above the median.
        mass_fraction: share of the significant density (above the median) kept.

    Returns:
        ``(threshold, details)``: the level (map units) and a dict with ``background``,
        ``noise_sd`` (robust SD), ``significance_level`` and ``mass_fraction``.
    """
    v = torch.as_tensor(volume)
    vals = v[torch.as_tensor(mask, device=v.device) > 0.5] if mask is not None else v.reshape(-1)
    vals = vals.to(torch.float64)
    if vals.numel() == 0:
        raise OptionError("mask", "selects no voxels; expected a mask with values > 0.5 somewhere")
    bg, sd = _background(vals)
    cut = bg + noise_sd * sd
    excess = torch.sort(vals[vals > cut] - bg, descending=True).values
    if excess.numel() == 0:
        raise OptionError("--threshold", f"cannot be chosen automatically: no voxel is above the background "
                          f"{bg:.6g} + {noise_sd:g} x noise SD {sd:.6g}; pass --threshold")
    cum = torch.cumsum(excess, 0)
    k = int(torch.searchsorted(cum, mass_fraction * cum[-1]).clamp(max=excess.numel() - 1))
    t = float(excess[k]) + bg
    return t, {"background": bg, "noise_sd": sd, "significance_level": cut, "mass_fraction": mass_fraction}


def auto_n(volume_A3: float, resolution_A: float) -> int:
    """Default number of Gaussians: one per ``(resolution_A / 2)^3`` Å^3 of ``volume_A3``,
    clamped to ``[8, 50000]``."""
    return int(min(max(round(float(volume_A3) / (0.5 * float(resolution_A)) ** 3), N_MIN), N_MAX))


def _voxel_coords_A(flat_index: torch.Tensor, box: int, apix: float, dtype) -> torch.Tensor:
    """(x, y, z) in Å from the box centre of voxels given by their index into the flattened
    ``[z, y, x]`` map: ``[M, 3]``."""
    z = torch.div(flat_index, box * box, rounding_mode="floor")
    y = torch.div(flat_index, box, rounding_mode="floor") % box
    x = flat_index % box
    return (torch.stack([x, y, z], -1) - box // 2).to(dtype) * apix


def kmeans_gaussians(volume: torch.Tensor, apix: float, n: int, threshold: float, resolution_A: float, *,
                     background: float = 0.0, mask=None, iterations: int = 10, seed: int = 0) -> Gaussians:
    """Seed ``n`` Gaussians by density-weighted k-means of the voxels above ``threshold``.

    Widths are ``sigma_from_resolution(resolution_A)``; amplitudes the mass
    ``sum (v - background) apix^3`` of each cell (electrons when the map is in
    electrons/Å^3). ``volume [N, N, N]`` on the device the result should live on.
    """
    box = volume.shape[-1]
    sel = volume.reshape(-1) > threshold
    if mask is not None:
        sel &= torch.as_tensor(mask, device=volume.device).reshape(-1) > 0.5
    pts = _voxel_coords_A(sel.nonzero()[:, 0], box, apix, volume.dtype)
    w = (volume.reshape(-1)[sel] - background)
    w = w.clamp_min(1e-6 * float(w.max().clamp_min(torch.finfo(w.dtype).tiny)))
    gen = torch.Generator().manual_seed(int(seed))
    centres, labels = weighted_kmeans(pts, w, n, iterations=iterations, generator=gen)
    amps = torch.zeros(n, dtype=volume.dtype, device=volume.device).index_add_(0, labels, w) * apix**3
    amps = amps.clamp_min(1e-3 * float(amps.mean()))  # a cell left with no voxel keeps a small Gaussian
    sig = torch.full((n,), sigma_from_resolution(resolution_A), dtype=volume.dtype, device=volume.device)
    return Gaussians(centres, amps, sig)


# --------------------------------------------------------------------------- FRC fit


def scale_to_map(g: Gaussians, volume: torch.Tensor, apix: float) -> Gaussians:
    """The mixture with its amplitudes scaled by the least-squares factor that best matches
    ``volume`` (the fit by FRC leaves the overall scale free)."""
    with torch.no_grad():
        m = gaussians_to_map(g, volume.shape[-1], apix)
        s = (m * volume).sum() / (m * m).sum().clamp_min(torch.finfo(m.dtype).tiny)
        s = s.clamp_min(torch.finfo(m.dtype).tiny)
    return Gaussians(g.centers, g.amplitudes * s, g.sigmas)


def _last_shell(box: int, apix: float, resolution_A: float) -> int:
    """The last Fourier shell at or below the resolution (1 .. box // 2)."""
    return max(1, min(box // 2, int(math.floor(box * apix / resolution_A + 1e-6))))


def fit_gaussians_frc(g: Gaussians, volume: torch.Tensor, apix: float, resolution_A: float, *,
                      iterations: int = 1000, batch: int = 16, views: int = 256, lr_A: float | None = None,
                      window: int = 20, tol: float = 0.01, max_plateaus: int = 3, seed: int = 0, progress=None):
    """Fit ``g`` to ``volume [N, N, N]`` by the FRC of projections (module docstring, step 4).

    ``views`` random orientations (seeded) are projected through the map once; each Adam
    step takes ``batch`` of them. Learning rates: ``lr_A`` Å per step for centres (default
    ``resolution_A / 50``), 0.05 for log-amplitudes, 0.02 for log-widths, all divided by 3
    at each plateau; the fit stops at the ``max_plateaus``-th plateau or after
    ``iterations`` steps.

    Returns ``(fitted Gaussians (detached, scaled to the map), {"iterations", "loss",
    "loss_start", "history"})``; ``loss`` is the mean loss of the last window.
    """

    box = volume.shape[-1]
    dev, dt = volume.device, volume.dtype
    hi = _last_shell(box, apix, resolution_A)
    # the loss sees shells 1..hi only: map and mixture are projected on the Fourier-cropped
    # grid that holds them (shell k there is shell k of the full box), not on the full box
    crop = band_crop(box, hi)
    apix_c = apix * box / crop
    rng = np.random.default_rng(seed)
    R = torch.as_tensor(random_rotations(views, rng), dtype=dt, device=dev)
    with torch.no_grad():
        target = project_map(volume if crop == box else fourier_crop(volume, crop), R, None, apix_c)
    gen = torch.Generator().manual_seed(int(seed) + 1)

    c = g.centers.detach().clone().requires_grad_(True)
    la = torch.log(g.amplitudes.detach()).clone().requires_grad_(True)
    ls = torch.log(g.sigmas.detach()).clone().requires_grad_(True)
    lr_A = resolution_A / 50.0 if lr_A is None else float(lr_A)
    opt = torch.optim.Adam([{"params": [c], "lr": lr_A}, {"params": [la], "lr": 0.05},
                            {"params": [ls], "lr": 0.02}])
    half = (box // 2) * apix
    batch = max(1, min(int(batch), views))
    history, window_losses = [], []  # losses stay on the device until a window is complete
    order, pos = torch.randperm(views, generator=gen), 0
    best, plateaus, it = math.inf, 0, 0
    for it in range(1, int(iterations) + 1):
        if pos + batch > views:
            order, pos = torch.randperm(views, generator=gen), 0
        idx = order[pos:pos + batch].to(dev)
        pos += batch
        pred = project(Gaussians(c, la.exp(), ls.exp()), R[idx], None, crop, apix_c)
        loss = frc_loss(pred, target[idx], shell_range=(1, hi)).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        with torch.no_grad():
            c.clamp_(-half, half)  # a Gaussian that leaves the box has no gradient to come back
        window_losses.append(loss.detach())
        if progress is not None:
            progress("fit-gmm FRC", it, iterations)
        if it % window == 0 or it == iterations:
            history += torch.stack(window_losses).tolist()
            window_losses = []
        if it % window == 0:
            m = float(np.mean(history[-window:]))
            if m > best * (1.0 - tol):
                plateaus += 1
                if plateaus >= max_plateaus:
                    break
                for grp in opt.param_groups:
                    grp["lr"] /= 3.0
            best = min(best, m)
    if progress is not None and it < iterations:
        progress("fit-gmm FRC", iterations, iterations)  # stopped at a plateau: the stage is done
    fitted = Gaussians(c.detach(), la.detach().exp(), ls.detach().exp())
    info = {"iterations": it, "loss": float(np.mean(history[-window:])) if history else None,
            "loss_start": history[0] if history else None, "shells": [1, hi], "grid": crop, "views": views, "batch": batch,
            "plateaus": plateaus, "history": history}
    return scale_to_map(fitted, volume, apix), info


# --------------------------------------------------------------------------- the job


def _fsc_figures(g: Gaussians, volume: torch.Tensor, apix: float, resolution_A: float) -> dict:
    box = volume.shape[-1]
    with torch.no_grad():
        curve = fsc(gaussians_to_map(g, box, apix), volume).cpu()
    hi = _last_shell(box, apix, resolution_A)
    return {"fsc_0.5_A": resolution_at(curve, box, apix, 0.5),
            "fsc_min_to_resolution": float(curve[1:hi + 1].min()),
            "fsc_mean_to_resolution": float(curve[1:hi + 1].mean()),
            "fsc": curve.numpy()}


def _check_volume(volume) -> torch.Tensor:
    v = torch.as_tensor(volume)
    if v.ndim != 3 or not (v.shape[0] == v.shape[1] == v.shape[2]):
        raise MapError(None, f"map of shape {tuple(v.shape)}: expected a cubic map [N, N, N]")
    if not v.is_floating_point():
        v = v.float()
    if not bool(torch.isfinite(v).all()):
        raise MapError(None, f"map holds {int((~torch.isfinite(v)).sum())} NaN or infinite values")
    return v


def gaussians_from_map(volume, apix: float, *, resolution_A: float, n: int | None = None,
                       threshold: float | None = None, mask=None, iterations: int = 1000, batch: int = 16,
                       views: int = 256, kmeans_iterations: int = 10, seed: int = 0, device=None, progress=None):
    """A Gaussian mixture fitted to a map (steps in the module docstring).

    Args:
        volume: ``[N, N, N]`` map ``[z, y, x]`` (tensor or array), pixel ``apix`` Å.
        resolution_A: target resolution (>= 2 apix): sets the widths, the automatic ``n``
            and the FRC rings fitted (1 .. ``N apix / resolution_A``).
        n: number of Gaussians (default :func:`auto_n` of the volume above the threshold).
        threshold: density level for seeding (default :func:`auto_threshold`).
        mask: optional ``[N, N, N]`` in [0, 1]; the map is multiplied by it and only voxels
            with ``mask > 0.5`` are seeded or count for the threshold.
        iterations: most Adam steps of the FRC fit (0: k-means seeding only).
        batch: orientations per step; views: orientations in the pool.
        seed: seeds k-means and orientations; on CPU equal seeds give identical results
            (on CUDA, scatter-adds may differ in the last bits unless
            ``torch.use_deterministic_algorithms(True)``).
        device: torch device (default: the volume's, or CPU for arrays).
        progress: ``progress(stage, done, total)``.

    Returns:
        ``(Gaussians, info)``, the mixture on ``device`` (float32, centres in Å from the box
        centre) and a dict: ``n``, ``n_rule``, ``threshold``, ``threshold_rule``,
        ``threshold_details``, ``voxels_above_threshold``, ``volume_above_threshold_A3``,
        ``iterations``, ``frc_loss`` (mean of the last window of steps), ``frc_loss_start``,
        ``frc_loss_history`` (every step), ``frc_shells`` (first and last ring), ``fsc`` (curve between
        ``gaussians_to_map`` of the result and the map), ``fsc_0.5_A``,
        ``fsc_min_to_resolution``, ``fsc_mean_to_resolution``, ``kmeans`` (the same FSC
        figures for the seeding alone), ``seconds``.

    Raises:
        MapError for a map that is not cubic or holds NaN; OptionError for a resolution
        below 2 apix, a threshold that selects no voxel, or ``n`` out of range.
    """
    t0 = time.perf_counter()
    v = _check_volume(volume)
    dev = torch.device(device) if device is not None else v.device
    v = v.to(dev, torch.float32)
    box, apix = v.shape[-1], float(apix)
    if not apix > 0:
        raise OptionError("apix", f"{apix}; expected a positive pixel size in Å")
    if not resolution_A >= 2.0 * apix * (1 - 1e-6):
        raise OptionError("--resolution", f"{resolution_A:g} Å is finer than Nyquist; expected >= 2 x pixel "
                          f"size = {2 * apix:g} Å")
    m = None
    if mask is not None:
        m = torch.as_tensor(mask, device=dev, dtype=torch.float32)
        if m.shape != v.shape:
            raise OptionError("mask", f"of shape {tuple(m.shape)}; expected the map's {tuple(v.shape)}")
        v = v * m
    sel_vals = v[m > 0.5] if m is not None else v.reshape(-1)
    background, noise = _background(sel_vals)
    if threshold is None:
        threshold, details = auto_threshold(v, m)
        rule = (f"auto: lowest level keeping {MASS_FRACTION:.0%} of the density above the median among voxels "
                f"above median + {NOISE_SD:g} x robust SD")
    else:
        threshold, details = float(threshold), {"background": background, "noise_sd": noise}
        rule = "given"
    n_above = int((sel_vals > threshold).sum())
    if n_above == 0:
        raise OptionError("--threshold", f"{threshold:.6g} selects no voxel (map maximum {float(sel_vals.max()):.6g}); "
                          "expected a level below the density")
    vol_A3 = n_above * apix**3
    if n is None:
        n = min(auto_n(vol_A3, resolution_A), n_above)
        n_rule = (f"auto: one per (resolution/2)^3 = {(resolution_A / 2) ** 3:.4g} Å^3 of the "
                  f"{vol_A3:.6g} Å^3 above threshold, clamped to [{N_MIN}, {N_MAX}] and to the voxel count")
    else:
        n, n_rule = int(n), "given"
        if not 1 <= n <= n_above:
            raise OptionError("--n-gaussians", f"{n}; expected 1 <= n <= {n_above} (the voxels above the threshold)")

    g0 = kmeans_gaussians(v, apix, n, threshold, resolution_A, background=background, mask=m,
                          iterations=kmeans_iterations, seed=seed)
    g0 = scale_to_map(g0, v, apix)
    if progress is not None:
        progress("fit-gmm k-means", 1, 1)
    if iterations > 0:
        g, fit = fit_gaussians_frc(g0, v, apix, resolution_A, iterations=iterations, batch=batch, views=views,
                                   seed=seed, progress=progress)
    else:
        g, fit = g0, {"iterations": 0, "loss": None, "loss_start": None}
    info = {
        "n": n,
        "n_rule": n_rule,
        "threshold": threshold,
        "threshold_rule": rule,
        "threshold_details": details,
        "voxels_above_threshold": n_above,
        "volume_above_threshold_A3": vol_A3,
        "resolution_A": float(resolution_A),
        "box": box,
        "apix_A": apix,
        "iterations": fit["iterations"],
        "frc_loss": fit["loss"],
        "frc_loss_start": fit["loss_start"],
        "frc_shells": fit.get("shells"),
        "frc_loss_history": fit.get("history", []),
        **_fsc_figures(g, v, apix, resolution_A),
        "kmeans": _fsc_figures(g0, v, apix, resolution_A),
        "seed": seed,
        "device": str(dev),
        "seconds": time.perf_counter() - t0,
    }
    return g.detach(), info
