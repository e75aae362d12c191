"""Viewers: the FSC curve of a cryogmm run and, for refinements, how it converged; the
latent space of a heterogeneity run; the validation table (before/after) of a model
refinement.

Scipion's own FSC viewer already opens the protocols' ``outputFSC``; these show the
engine's figures from report.json. Each has a headless entry point the tests use:
``CryoGmmRunViewer.createPlot(prot)``, ``CryoGmmLatentViewer.createPlot(prot)`` (EmPlotter,
``.savefig``) and ``CryoGmmValidationViewer.createTable(prot)`` (header, rows).
"""

import os

import numpy as np

from pwem.viewers.plotter import EmPlotter
from pyworkflow.viewer import DESKTOP_TKINTER, Viewer


from .constants import ATTR_CLUSTER
from .convert import readReport
from .protocols import (CryoGmmProtHetero, CryoGmmProtReconstruct, CryoGmmProtRefineModel,
                        CryoGmmProtRefinePoses)
from .protocols.protocol_refine_model import figureRows


class CryoGmmRunViewer(Viewer):
    """FSC (masked, FSC = 0.143 marked) and, for refine orientations, per-iteration
    resolution and median pose change."""
    _label = "cryogmm FSC and convergence"
    _targets = [CryoGmmProtRefinePoses, CryoGmmProtReconstruct]
    _environments = [DESKTOP_TKINTER]

    def _visualize(self, obj, **kwargs):
        return [self.createPlot(obj)]

    @staticmethod
    def createPlot(prot):
        refine = isinstance(prot, CryoGmmProtRefinePoses)
        plotter = EmPlotter(x=1, y=2 if refine else 1, windowTitle="cryogmm",
                            figsize=(10, 4) if refine else (6, 4))
        freq, curve = prot.outputFSC.getData()
        ax = plotter.createSubPlot("FSC between half maps", "resolution (1/Å)", "FSC")
        ax.plot(freq, curve, color="tab:blue", label="masked FSC")
        ax.axhline(0.143, color="gray", linestyle="--", label="0.143")
        ax.set_ylim(-0.1, 1.05)
        ax.legend(loc="best")
        if refine:
            its = readReport(prot._getRefineDir()).get("iterations", [])
            x = np.arange(1, len(its) + 1)
            ax2 = plotter.createSubPlot("Convergence", "iteration", "resolution (Å)")
            ax2.plot(x, [it["resolution_A"] for it in its], "o-", color="tab:blue",
                     label="FSC 0.143 (Å)")
            ax3 = ax2.twinx()
            ax3.plot(x, [it["pose_change_deg"]["median"] for it in its], "s--",
                     color="tab:orange", label="median pose change (°)")
            ax3.set_ylabel("median pose change (°)")
            ax2.legend(loc="upper left")
            ax3.legend(loc="upper right")
        return plotter


class CryoGmmLatentViewer(Viewer):
    """The latent space of a heterogeneity run: every particle on the first two principal
    components of z (one component: against the particle index), coloured by its k-means
    cluster, with the trajectory frames marked along PC1."""
    _label = "cryogmm latent space"
    _targets = [CryoGmmProtHetero]
    _environments = [DESKTOP_TKINTER]

    def _visualize(self, obj, **kwargs):
        return [self.createPlot(obj)]

    @staticmethod
    def latentData(prot):
        """(z [n, d], cluster labels [n]) of the output particles."""
        z, labels = [], []
        for p in prot.outputParticles.iterItems():
            z.append(p.getZFlex())
            labels.append(int(p.getAttributeValue(ATTR_CLUSTER, -1)))
        return np.array(z), np.array(labels)

    @classmethod
    def createPlot(cls, prot):
        from .protocols.protocol_hetero import enginePcs, projectOnPcs

        z, labels = cls.latentData(prot)
        frames = os.path.join(prot._getAnalyzeDir(), "pc1_z.txt")
        traj = np.loadtxt(frames, ndmin=2) if os.path.exists(frames) else z[:0]
        mean, comps, _, _ = enginePcs(prot._getAnalyzeDir())
        k = min(2, len(comps))
        proj, tproj = projectOnPcs(z, mean, comps[:k]), projectOnPcs(traj, mean, comps[:k])
        plotter = EmPlotter(x=1, y=1, windowTitle="cryogmm latent space", figsize=(6, 5))
        title = "Latent space (%d particles, z in %d dimensions)" % z.shape
        if k == 2:
            ax = plotter.createSubPlot(title, "PC1 of z", "PC2 of z")
            x, y, tx, ty = proj[:, 0], proj[:, 1], tproj[:, 0], tproj[:, 1]
        else:
            ax = plotter.createSubPlot(title, "particle", "z")
            x, y = np.arange(len(z)), proj[:, 0]
            tx, ty = np.full(len(tproj), -0.03 * len(z)), tproj[:, 0]
        for c in sorted(set(labels)):
            sel = labels == c
            ax.scatter(x[sel], y[sel], s=6, alpha=0.7, label="cluster %d (%d)" % (c, sel.sum()))
        if len(traj):
            ax.plot(tx, ty, "k^-", ms=6, label="PC1 trajectory frames")
        ax.legend(loc="best", fontsize=8)
        return plotter


class CryoGmmLandscapeViewer(Viewer):
    """The free-energy landscape of a heterogeneity run (``landscape.npz`` of the engine's
    analysis): -ln of the particle density over PC1/PC2 in kT, with the PC trajectories and the
    cluster centres; a 1-D latent: the energy profile along PC1."""
    _label = "cryogmm free-energy landscape"
    _targets = [CryoGmmProtHetero]
    _environments = [DESKTOP_TKINTER]

    def _visualize(self, obj, **kwargs):
        return [self.createPlot(obj)]

    @staticmethod
    def createPlot(prot):
        d = np.load(os.path.join(prot._getAnalyzeDir(), "landscape.npz"))
        f = np.ma.masked_invalid(d["free_energy"])
        ev = d["explained_variance"]
        plotter = EmPlotter(x=1, y=1, windowTitle="cryogmm free-energy landscape", figsize=(6, 5))
        if f.ndim == 1:
            ax = plotter.createSubPlot("Free energy along PC1", "PC1 (%.0f %%)" % (100 * ev[0]),
                                       "free energy (kT)")
            ax.plot(d["grid_pc1"], f, "k.-")
            for i, c in enumerate(d["centers_pc"][:, 0]):
                ax.axvline(c, color="tab:red", lw=0.8)
            return plotter
        ax = plotter.createSubPlot("Free-energy landscape (kT)", "PC1 (%.0f %%)" % (100 * ev[0]),
                                   "PC2 (%.0f %%)" % (100 * ev[1]))
        m = ax.pcolormesh(d["edges_pc1"], d["edges_pc2"], f.T, cmap="viridis", shading="flat")
        ax.figure.colorbar(m, ax=ax, label="free energy (kT)")
        for k, col in ((1, "white"), (2, "orange")):
            if "trajectory_pc%d" % k in d:
                t = d["trajectory_pc%d" % k]
                ax.plot(t[:, 0], t[:, 1], "o-", color=col, ms=3, label="PC%d trajectory" % k)
        c = d["centers_pc"]
        ax.scatter(c[:, 0], c[:, 1], marker="x", c="tab:red", label="cluster centres")
        ax.legend(loc="upper right", fontsize=7)
        return plotter


class CryoGmmCrossvalViewer(Viewer):
    """The per-state half-set cross-validation of a heterogeneity run trained on half sets:
    for every state, each half's model against its own half's map and the other half's map
    (mean masked map-model FSC divided by each map's C_ref, what the flags compare), flagged
    states marked; and the raw mean FSCs as a table."""
    _label = "cryogmm per-state cross-validation"
    _targets = [CryoGmmProtHetero]
    _environments = [DESKTOP_TKINTER]

    KEYS = (("model1_vs_map1", "model 1 / map 1 (own)"), ("model1_vs_map2", "model 1 / map 2"),
            ("model2_vs_map2", "model 2 / map 2 (own)"), ("model2_vs_map1", "model 2 / map 1"))

    def _visualize(self, obj, **kwargs):
        if not readReport(obj._getAnalyzeDir()).get("crossval"):
            self.showInfo("This run was not trained on half sets: no cross-validation.")
            return []
        return [self.createPlot(obj)]

    @classmethod
    def createTable(cls, prot):
        """(header, rows): one row per scored state: state, particles per half, the four mean
        FSCs, flags."""
        cv = readReport(prot._getAnalyzeDir()).get("crossval") or {"states": []}
        header = ("state", "particles 1/2") + tuple(label for _, label in cls.KEYS) + ("flags",)
        rows = [(str(s["state"]), "%d/%d" % (s["n_half1"], s["n_half2"]))
                + tuple("%.3f" % s[k] for k, _ in cls.KEYS) + (", ".join(s["flags"]) or "-",)
                for s in cv["states"] if "skipped" not in s]
        return header, rows

    @classmethod
    def createPlot(cls, prot):
        cv = readReport(prot._getAnalyzeDir())["crossval"]
        states = [s for s in cv["states"] if "skipped" not in s]
        plotter = EmPlotter(x=1, y=1, windowTitle="cryogmm cross-validation", figsize=(7, 4))
        ax = plotter.createSubPlot("Half-set cross-validation per state (* flagged)", "state",
                                   "masked FSC / map C_ref, to %.1f Å" % cv["resolution_A"])
        x = np.arange(len(states))
        for j, (k, label) in enumerate(cls.KEYS):
            ax.bar(x + (j - 1.5) * 0.2, [s["normalised"][k] for s in states], 0.2, label=label)
        ax.set_xticks(x)
        ax.set_xticklabels(["%d%s" % (s["state"], "*" if s["flagged"] else "") for s in states])
        vals = [s["normalised"][k] for s in states for k, _ in cls.KEYS]
        ax.set_ylim(max(0.0, min(vals) - 0.1), max(vals) + 0.05)
        ax.legend(loc="lower right", fontsize=7)
        return plotter


class CryoGmmValidationViewer(Viewer):
    """The validation figures of a model refinement, before and after, as a table."""
    _label = "cryogmm validation table"
    _targets = [CryoGmmProtRefineModel]
    _environments = [DESKTOP_TKINTER]

    HEADER = ("figure", "before", "after")

    def _visualize(self, obj, **kwargs):
        from pyworkflow.gui.text import showTextFileViewer

        path = obj._getExtraPath("validation.txt")
        with open(path, "w") as f:
            f.write(self.formatTable(obj))
        showTextFileViewer("cryogmm validation", [path], self.getParent())
        return []

    @staticmethod
    def createTable(prot):
        """(header, rows): one row per figure, values formatted as strings."""
        fmt = lambda v, spec: "n/a" if v is None else format(v, spec)
        rows = [(label, fmt(b, f), fmt(a, f)) for label, b, a, f in figureRows(prot.getReport())]
        return CryoGmmValidationViewer.HEADER, rows

    @classmethod
    def formatTable(cls, prot):
        header, rows = cls.createTable(prot)
        w = max(len(r[0]) for r in rows + [header])
        lines = ["%-*s %10s %10s" % (w, *header)]
        lines += ["%-*s %10s %10s" % (w, *r) for r in rows]
        return "\n".join(lines) + "\n"


__all__ = ["CryoGmmRunViewer", "CryoGmmLatentViewer", "CryoGmmValidationViewer"]
