"""Plots written beside the numbers: FSC curves (and the heterogeneity and refinement plots
built on matplotlib by their jobs use the same non-interactive backend)."""

from __future__ import annotations

from pathlib import Path
import torch
import numpy as np
from cryogmm.io.outputs import atomic_output
from cryogmm.core.fourier import n_shells
from cryogmm.core.similarity import resolution_at



# --------------------------------------------------------------------------- plots


def fsc_plot(curves: dict, box: int, apix: float, path, thresholds=(0.143, 0.5), title: str | None = None) -> Path:
    """Write a PNG of FSC curves against spatial frequency (1/Å).

    Each curve (``name -> [n_shells(box)]`` tensor/array) is drawn with its resolution at
    every threshold in the legend (see :func:`resolution_at`); the thresholds are drawn as
    dashed lines. The file is written through :func:`cryogmm.bridge.fileio.atomic_output`,
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


