"""Viewers: the FSC curve of a cryogmm run and, for refinements, how it converged.

Scipion's own FSC viewer already opens the protocols' ``outputFSC``; this one shows the
engine's figures from report.json side by side (headless: ``createPlot(prot).savefig``).
"""

import numpy as np

from pwem.viewers.plotter import EmPlotter
from pyworkflow.viewer import DESKTOP_TKINTER, Viewer

from .convert import readReport
from .protocols import CryoGmmProtReconstruct, CryoGmmProtRefinePoses


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


__all__ = ["CryoGmmRunViewer"]
