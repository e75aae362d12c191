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
