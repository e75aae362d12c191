"""Plots written beside the numbers (matplotlib's Agg canvas, no pyplot state, written atomically):
FSC curves, the heterogeneity latent space and training curves, and the two helpers every plot
of the engine uses (:func:`new_figure`, :func:`save_figure`)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from cryogmm.core.fourier import n_shells
from cryogmm.core.similarity import resolution_at
from cryogmm.io.outputs import atomic_output

# --------------------------------------------------------------------------- plots


def fsc_plot(curves: dict, box: int, apix: float, path, thresholds=(0.143, 0.5), title: str | None = None) -> Path:
    """Write a PNG of FSC curves against spatial frequency (1/Å).

    Each curve (``name -> [n_shells(box)]`` tensor/array) is drawn with its resolution at
    every threshold in the legend (see :func:`resolution_at`); the thresholds are drawn as
    dashed lines. The file is written through :func:`cryogmm.io.outputs.atomic_output`,
    so it appears only when complete. Uses matplotlib's Agg canvas, no pyplot state.

    Returns:
        ``Path(path)``.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6.0, 4.0), dpi=120)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    for name, curve in curves.items():
        y = torch.as_tensor(curve).detach().to("cpu", torch.float64).reshape(-1).numpy()[: n_shells(box)]
        x = np.arange(len(y)) / (float(box) * float(apix))
        res = ", ".join(f"{resolution_at(y, box, apix, t):.2f} Å @ {t:g}" for t in thresholds)
        ax.plot(x, y, lw=1.5, label=f"{name} ({res})")
    for t in thresholds:
        ax.axhline(t, ls="--", lw=0.8, color="0.4")
    ax.axhline(0.0, lw=0.5, color="0.7")
    ax.set_xlim(0.0, 1.0 / (2.0 * float(apix)))
    ax.set_ylim(-0.1, 1.05)
    ax.set_xlabel("spatial frequency (1/Å)")
    ax.set_ylabel("FSC")
    if title:
        ax.set_title(title)
    ax.legend(fontsize=8, loc="upper right")
    fig.tight_layout()
    with atomic_output(path) as tmp:
        fig.savefig(tmp, format=Path(path).suffix.lstrip(".") or "png")
    return Path(path)


def new_figure(ncols: int = 1, figsize=(6.0, 4.0)):
    """A matplotlib Figure on the Agg canvas (no pyplot, thread-safe) and its ``ncols`` axes."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=figsize)
    FigureCanvasAgg(fig)
    return fig, fig.subplots(1, ncols)


def save_figure(fig, path, dpi: int = 100) -> Path:
    """Lay out and write ``fig`` as PNG through an atomic write; returns ``Path(path)``."""
    fig.tight_layout()
    with atomic_output(path) as tmp:
        fig.savefig(tmp, dpi=dpi)
    return Path(path)


def latent_plot(path, proj, labels, ratio) -> Path:
    """Particles on the first two principal components of the latent (coloured by cluster) and
    the histogram of PC1."""
    fig, ax = new_figure(2, (9, 4))
    y = proj[:, 1] if proj.shape[1] > 1 else np.zeros(len(proj))
    ax[0].scatter(proj[:, 0], y, c=labels, s=3, cmap="tab10")
    ax[0].set_xlabel(f"PC1 ({100 * ratio[0]:.0f}%)")
    ax[0].set_ylabel(f"PC2 ({100 * ratio[1]:.0f}%)" if len(ratio) > 1 else "")
    ax[1].hist(proj[:, 0], bins=50)
    ax[1].set_xlabel("PC1")
    ax[1].set_ylabel("particles")
    return save_figure(fig, path)


def loss_plot(path, history) -> Path:
    """Data term and KL per epoch of a heterogeneity training."""
    ep = [h["epoch"] for h in history]
    fig, ax = new_figure(2, (8, 3))
    ax[0].plot(ep, [h["data"] for h in history])
    ax[0].set_xlabel("epoch")
    ax[0].set_ylabel("data term (per image)")
    ax[1].plot(ep, [h["kl"] for h in history])
    ax[1].set_xlabel("epoch")
    ax[1].set_ylabel("KL (nats per image)")
    return save_figure(fig, path)
