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


def nyquist_limited(curve, box: int, threshold: float) -> bool:
    """True when an FSC curve never drops below ``threshold`` up to Nyquist (shell 1 on): its
    :func:`resolution_at` is then the Nyquist limit ``2 * apix``, a bound, not a measurement."""
    c = torch.as_tensor(curve).detach().to("cpu", torch.float64).reshape(-1)[: n_shells(box)]
    return len(c) >= 2 and bool((c[1:] >= threshold).all())


def fsc_plot(curves: dict, box: int, apix: float, path, thresholds=(0.143, 0.5), title: str | None = None,
             mask: str | None = None) -> Path:
    """Write a PNG of FSC curves against spatial frequency (1/Å).

    Each curve (``name -> [n_shells(box)]`` tensor/array) is drawn with its resolution at
    every threshold in the legend (see :func:`resolution_at`); a curve that stays above a
    threshold up to Nyquist is labelled "Nyquist-limited" (its figure is the Nyquist limit
    ``2 * apix``, a bound) and a note says so. ``mask``: the mask the curves were computed
    with (e.g. "soft spherical mask"; "none" for unmasked curves), said in the title; curves
    whose names say it themselves (``unmasked``, ``... mask``) may leave it None. The
    thresholds are drawn as dashed lines. The file is written through
    :func:`cryogmm.io.outputs.atomic_output`, so it appears only when complete. Uses
    matplotlib's Agg canvas, no pyplot state.

    Returns:
        ``Path(path)``.
    """
    fig, ax = new_figure(1, (6.5, 4.3))
    limited = False
    nyq = 2.0 * float(apix)
    for name, curve in curves.items():
        y = torch.as_tensor(curve).detach().to("cpu", torch.float64).reshape(-1).numpy()[: n_shells(box)]
        x = np.arange(len(y)) / (float(box) * float(apix))
        parts = []
        for t in thresholds:
            if nyquist_limited(y, box, t):
                limited = True
                parts.append(f"≤ {nyq:.2f} Å @ {t:g}, Nyquist-limited")
            else:
                parts.append(f"{resolution_at(y, box, apix, t):.2f} Å @ {t:g}")
        ax.plot(x, y, lw=1.5, label=f"{name} ({'; '.join(parts)})")
    for t in thresholds:
        ax.axhline(t, ls="--", lw=0.8, color="0.4")
    ax.axhline(0.0, lw=0.5, color="0.7")
    ax.set_xlim(0.0, 1.0 / nyq)
    ax.set_ylim(-0.1, 1.05)
    ax.set_xlabel(f"spatial frequency (1/Å); Nyquist {nyq:.2f} Å at the right edge")
    ax.set_ylabel("FSC")
    head = title or "FSC between half maps"
    if mask is not None:
        head += " (unmasked)" if mask == "none" else f" (mask: {mask})"
    ax.set_title(head, fontsize=10)
    if limited:
        ax.text(0.02, 0.04, f"Nyquist-limited: the FSC stays above the threshold up to {nyq:.2f} Å,\n"
                "the finest the pixel size can show; the resolution may be better",
                transform=ax.transAxes, fontsize=7, color="0.25")
    ax.legend(fontsize=7, loc="upper right")
    return save_figure(fig, path, dpi=120)


def new_figure(ncols: int = 1, figsize=(6.0, 4.0), nrows: int = 1):
    """A matplotlib Figure on the Agg canvas (no pyplot, thread-safe) and its ``nrows x ncols`` axes."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=figsize)
    FigureCanvasAgg(fig)
    return fig, fig.subplots(nrows, ncols)


def save_figure(fig, path, dpi: int = 100) -> Path:
    """Lay out and write ``fig`` as PNG through an atomic write (labels never clipped: the
    bounding box is fitted to everything drawn); returns ``Path(path)``."""
    fig.tight_layout()
    with atomic_output(path) as tmp:
        fig.savefig(tmp, dpi=dpi, format="png", bbox_inches="tight")
    return Path(path)


RAMA_TITLES = {"general": "General case", "gly": "Glycine", "transpro": "trans-Proline", "cispro": "cis-Proline",
               "prepro": "pre-Proline", "ileval": "Ile/Val"}
"""MolProbity's panel titles of the six Top8000 Ramachandran classes."""

_VERDICT_STYLE = {"favoured": ("#08519c", 7), "allowed": ("#f28e2b", 18), "outlier": ("#d62728", 24)}


def rama_plot(path, phi_psi, classes, verdict, contours: dict, title: str = "") -> dict:
    """Ramachandran plot as MolProbity draws it: one panel per residue class (general, Gly,
    trans-Pro, cis-Pro, pre-Pro, Ile/Val), each residue over its own class's contours.

    ``phi_psi [n, 2]`` degrees, ``classes [n]`` class names, ``verdict [n]``
    favoured/allowed/outlier as judged against that class; ``contours``: class (in panel
    order, at most six; titles from :data:`RAMA_TITLES`) -> ``(grid [n_phi, n_psi] of
    percentiles at the bin centres of -180..180, allowed level, favoured level)``.
    Favoured regions are dark, allowed light, the rest white. Returns the counts drawn per
    panel ``{class: {"n", "favoured", "allowed", "outlier"}}``.
    """
    from matplotlib.lines import Line2D
    from matplotlib.patches import Patch

    pp = np.asarray(phi_psi, dtype=np.float64).reshape(-1, 2)
    classes, verdict = np.asarray(classes, dtype=object), np.asarray(verdict, dtype=object)
    fig, axes = new_figure(3, (12.5, 8.6), nrows=2)
    counts = {}
    for ax, cname in zip(axes.ravel(), contours):
        label = RAMA_TITLES.get(cname, cname)
        grid, allowed, favoured = contours[cname]
        grid = np.pad(np.asarray(grid, dtype=np.float64), 1, mode="wrap")  # periodic: contours reach ±180
        nb = grid.shape[0] - 2
        axis = -180.0 + (np.arange(-1, nb + 1) + 0.5) * 360.0 / nb
        ax.contourf(axis, axis, grid.T, levels=[allowed, favoured, max(1.01, float(grid.max()) + 0.01)],
                    colors=["#dbe9f6", "#9ecae1"])
        ax.contour(axis, axis, grid.T, levels=[allowed, favoured], colors=["#6baed6", "#2171b5"], linewidths=0.6)
        sel = classes == cname
        c = {"n": int(sel.sum())}
        for v, (colour, size) in _VERDICT_STYLE.items():
            m = sel & (verdict == v)
            c[v] = int(m.sum())
            if m.any():
                ax.scatter(pp[m, 0], pp[m, 1], s=size, c=colour, edgecolors="k" if v == "outlier" else "none",
                           linewidths=0.5, zorder=3)
        counts[cname] = c
        ax.set_xlim(-180, 180)
        ax.set_ylim(-180, 180)
        ax.set_xticks(range(-180, 181, 60))
        ax.set_yticks(range(-180, 181, 60))
        ax.set_aspect("equal")
        ax.set_xlabel("φ (°)")
        ax.set_ylabel("ψ (°)")
        ax.set_title(f"{label}: {c['n']} residues, {c['outlier']} outlier{'s' if c['outlier'] != 1 else ''}",
                     fontsize=10)
        ax.text(0.02, 0.02, f"allowed: inside the {100 * (1 - allowed):g}% contour", transform=ax.transAxes,
                fontsize=7, color="0.3")
    favoured = next(iter(contours.values()))[2]
    handles = [Patch(facecolor="#9ecae1", label=f"favoured region (inside the {100 * (1 - favoured):g}% contour)"),
               Patch(facecolor="#dbe9f6", label="allowed region (class-specific contour, in each panel)"),
               *[Line2D([], [], ls="", marker="o", color=colour, label=v) for v, (colour, _) in _VERDICT_STYLE.items()]]
    fig.legend(handles=handles, loc="lower center", ncol=5, fontsize=8, frameon=False)
    fig.suptitle(title or "Ramachandran plot", fontsize=11)
    fig.tight_layout(rect=(0, 0.04, 1, 1))
    with atomic_output(path) as tmp:
        fig.savefig(tmp, dpi=90, format="png", bbox_inches="tight")
    return counts


def latent_plot(path, proj, labels, ratio) -> Path:
    """The latent space, drawn to fit its dimension. ``proj [n, k]``: every particle's latent on
    its principal components (k = the latent's dimension, or fewer), ``labels [n]`` its k-means
    cluster, ``ratio [k]`` the fraction of the latent's variance each component explains.

    1-D latent: the distribution of the latent coordinate, stacked by cluster. 2-D and more:
    particles on PC1/PC2 coloured by cluster, and the distribution along PC1. The colours are
    the k-means clusters of ``analyze`` (``cluster_K.star``), named with their particle counts
    in the legend."""
    proj = np.asarray(proj, dtype=np.float64)
    labels = np.asarray(labels)
    ratio = np.asarray(ratio, dtype=np.float64).reshape(-1)
    ks = sorted(set(labels.tolist()))
    from matplotlib import colormaps

    cmap = colormaps["tab10"] if len(ks) <= 10 else colormaps["tab20"]
    colour = {k: cmap(i % cmap.N) for i, k in enumerate(ks)}
    names = {k: f"cluster {k} ({int((labels == k).sum())})" for k in ks}
    one_d = proj.ndim == 1 or proj.shape[1] == 1
    x = proj.reshape(len(proj), -1)[:, 0]
    bins = np.histogram_bin_edges(x, bins=min(50, max(10, len(x) // 20)))

    def stacked(ax, xlabel):
        ax.hist([x[labels == k] for k in ks], bins=bins, stacked=True, color=[colour[k] for k in ks],
                label=[names[k] for k in ks])
        ax.set_xlabel(xlabel)
        ax.set_ylabel("particles")

    if one_d:
        fig, ax = new_figure(1, (6.5, 4.2))
        stacked(ax, "latent coordinate z (1-D latent, centred)")
        ax.set_title("1-D latent: particles along z, coloured by k-means cluster", fontsize=10)
        ax.legend(fontsize=8, title="k-means cluster (particles)", title_fontsize=8)
        return save_figure(fig, path)
    fig, ax = new_figure(2, (11, 4.6))
    for k in ks:
        m = labels == k
        ax[0].scatter(proj[m, 0], proj[m, 1], s=3, color=colour[k], label=names[k])
    pc = [f"PC{i + 1} ({100 * ratio[i]:.0f}% of the latent variance)" if i < len(ratio) else f"PC{i + 1}" for i in (0, 1)]
    ax[0].set_xlabel(pc[0])
    ax[0].set_ylabel(pc[1])
    ax[0].set_title(f"{proj.shape[1]}-D latent on its first two principal components", fontsize=10)
    ax[0].legend(fontsize=7, markerscale=3, title="k-means cluster (particles)", title_fontsize=7)
    stacked(ax[1], pc[0])
    ax[1].set_title("distribution along PC1, by cluster", fontsize=10)
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
