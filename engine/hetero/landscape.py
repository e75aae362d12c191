"""What ``hetero analyze`` reads off the latents beyond PCA: the free-energy landscape, state
occupancies with their errors, and per-particle junk scores.

- :func:`free_energy`: ``-ln`` of the particle density on a histogram grid over the first
  two principal components (one for a 1-D latent), in kT, zero at the most populated bin,
  empty bins NaN (masked); :func:`landscape_plot` draws it with the PC trajectories and the
  cluster centres.
- :func:`occupancies`: the fraction of particles in each state (cluster) and its error, from
  the two half sets (``rlnRandomSubset``: half the difference of the two halves' fractions,
  the standard error of their mean) or, without halves, from a bootstrap over particles.
- :func:`robust_low_z` and :func:`mahalanobis`: a one-sided robust z-score of a per-particle
  fit score (how far below the median, in MAD-estimated standard deviations) and the latent
  outlier distance; :func:`fit_z`: the junk score, the robust z-scores of the two parts of
  each image's residual under its decoded model combined.
"""

from __future__ import annotations

import numpy as np

from cryogmm.io.plots import new_figure, save_figure

MAD_TO_SD = 1.4826  # MAD of a normal distribution times this is its standard deviation


def _edges(x: np.ndarray, bins: int) -> np.ndarray:
    lo, hi = np.percentile(x, [0.5, 99.5])
    pad = 0.05 * (hi - lo) if hi > lo else 1.0
    return np.linspace(lo - pad, hi + pad, bins + 1)


def free_energy(proj: np.ndarray, bins: int = 40) -> dict:
    """Free energy over the first two columns of ``proj [n, k]`` (the first only when ``k == 1``).

    Returns ``edges`` (a list of one or two bin-edge arrays), ``centers`` (bin centres, same
    shape), ``occupancy`` (particles per bin, ``[bins]`` or ``[bins, bins]``, PC1 along the
    first axis) and ``free_energy`` (kT, ``-ln(occupancy / max)``, NaN where empty)."""
    proj = np.asarray(proj, dtype=np.float64)
    dims = 1 if proj.shape[1] == 1 else 2
    edges = [_edges(proj[:, d], bins) for d in range(dims)]
    if dims == 1:
        occ, _ = np.histogram(np.clip(proj[:, 0], edges[0][0], edges[0][-1]), bins=edges[0])
    else:
        x = np.clip(proj[:, 0], edges[0][0], edges[0][-1])
        y = np.clip(proj[:, 1], edges[1][0], edges[1][-1])
        occ, _, _ = np.histogram2d(x, y, bins=edges)
    occ = occ.astype(np.int64)
    with np.errstate(divide="ignore"):
        f = -np.log(occ / max(1, occ.max()))
    f[occ == 0] = np.nan
    return {"edges": edges, "centers": [0.5 * (e[1:] + e[:-1]) for e in edges], "occupancy": occ,
            "free_energy": f}


def occupancies(labels: np.ndarray, k: int, half: np.ndarray | None = None, boot: int = 200,
                seed: int = 0) -> dict:
    """Fraction of particles per state ``0..k-1`` and its error.

    With ``half`` (1/2 per particle, both present) the error is ``|f_A - f_B| / 2``, the
    standard error of the mean of the two halves' fractions (``method: halves``, with the
    halves' fractions); otherwise the standard deviation over ``boot`` bootstrap resamples
    of the particles (``method: bootstrap``)."""
    labels = np.asarray(labels)
    frac = np.bincount(labels, minlength=k)[:k] / max(1, len(labels))
    out = {"occupancy": frac}
    if half is not None and np.isin([1, 2], half).all():
        fa = np.bincount(labels[half == 1], minlength=k)[:k] / max(1, int((half == 1).sum()))
        fb = np.bincount(labels[half == 2], minlength=k)[:k] / max(1, int((half == 2).sum()))
        out.update(error=np.abs(fa - fb) / 2.0, method="halves", half1=fa, half2=fb)
    else:
        rng = np.random.default_rng(seed)
        n = len(labels)
        fr = np.stack([np.bincount(labels[rng.integers(0, n, n)], minlength=k)[:k] / n for _ in range(boot)])
        out.update(error=fr.std(0, ddof=1), method="bootstrap")
    return out


def robust_low_z(score: np.ndarray) -> np.ndarray:
    """One-sided robust z-score: ``(median - score) / (1.4826 MAD)``; large for particles that
    fit worse than the bulk, negative for those that fit better."""
    s = np.asarray(score, dtype=np.float64)
    med = np.median(s)
    mad = MAD_TO_SD * np.median(np.abs(s - med))
    return (med - s) / max(mad, 1e-12 * max(1.0, abs(med)))


def fit_z(t: np.ndarray, residual: np.ndarray) -> np.ndarray:
    """The junk score of every particle: ``(robust_low_z(t) + robust_low_z(-residual)) / sqrt(2)``
    for ``t`` the residual's component along the decoded model in noise SDs and ``residual``
    its energy in noise units (:meth:`cryogmm.hetero.run.Run.fit_scores`). The two parts are
    independent for a particle of the molecule, so the sum of their z-scores over ``sqrt(2)``
    is again in SDs (about N(0, 1) for the bulk); junk lies far above on either part: noise
    holds none of the model (``t`` low), another molecule also signal the model does not
    explain (``residual`` high)."""
    return (robust_low_z(t) + robust_low_z(-np.asarray(residual, dtype=np.float64))) / np.sqrt(2.0)


def mahalanobis(z: np.ndarray) -> np.ndarray:
    """Distance of every latent row from the latents' median, in the metric of their robust
    covariance (the covariance of the 90 % of rows closest to the median, by Euclidean
    distance, so that outliers do not set their own yardstick)."""
    z = np.asarray(z, dtype=np.float64)
    c = np.median(z, 0)
    d = np.linalg.norm(z - c, axis=1)
    core = z[d <= np.percentile(d, 90)]
    cov = np.atleast_2d(np.cov(core, rowvar=False)) if len(core) > 1 else np.eye(z.shape[1])
    inv = np.linalg.pinv(cov + 1e-12 * np.trace(cov) * np.eye(len(cov)))
    r = z - c
    return np.sqrt(np.einsum("ni,ij,nj->n", r, inv, r).clip(min=0))


def landscape_plot(path, land: dict, ratio, trajectories=(), centers=None):
    """Free energy (kT) over PC1/PC2 with the PC trajectories (lines of points, in PC
    coordinates) and the cluster centres (numbered); a 1-D latent gets the occupancy histogram
    and the free-energy profile."""
    ratio = list(ratio)
    if len(land["edges"]) == 1:
        fig, ax = new_figure(2, (9, 3.5))
        e, c = land["edges"][0], land["centers"][0]
        ax[0].bar(c, land["occupancy"], width=np.diff(e), color="0.6")
        ax[0].set_ylabel("particles")
        ax[1].plot(c, land["free_energy"], "k.-")
        ax[1].set_ylabel("free energy (kT)")
        if centers is not None:
            for i, x in enumerate(np.asarray(centers)[:, 0]):
                ax[1].axvline(x, color="tab:red", lw=0.8)
                ax[1].text(x, 0, str(i), color="tab:red")
        for a in ax:
            a.set_xlabel(f"PC1 ({100 * ratio[0]:.0f}%)")
        return save_figure(fig, path)
    fig, ax = new_figure(1, (6, 5))
    f = np.ma.masked_invalid(land["free_energy"])
    ex, ey = land["edges"]
    m = ax.pcolormesh(ex, ey, f.T, cmap="viridis", shading="flat")
    fig.colorbar(m, ax=ax, label="free energy (kT)")
    for k, pts in enumerate(trajectories):
        pts = np.asarray(pts)
        ax.plot(pts[:, 0], pts[:, 1], "o-", color="white" if k == 0 else "orange", ms=3, lw=1,
                label=f"PC{k + 1} trajectory")
    if centers is not None:
        cc = np.asarray(centers)
        ax.scatter(cc[:, 0], cc[:, 1], marker="x", c="tab:red", s=40, label="cluster centres")
        for i, (x, y) in enumerate(cc[:, :2]):
            ax.annotate(str(i), (x, y), color="tab:red", xytext=(3, 3), textcoords="offset points")
    ax.set_xlabel(f"PC1 ({100 * ratio[0]:.0f}%)")
    ax.set_ylabel(f"PC2 ({100 * ratio[1]:.0f}%)" if len(ratio) > 1 else "PC2")
    ax.legend(loc="upper right", fontsize=7)
    return save_figure(fig, path)
