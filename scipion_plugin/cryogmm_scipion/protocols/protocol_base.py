"""What every cryogmm protocol shares: compute options, running the engine, input checks."""

import os

import numpy as np

import pyworkflow.protocol.params as params
from pwem.objects import Volume
from pyworkflow.protocol.constants import GPU_LIST, USE_GPU

from .. import Plugin
from ..convert import isMrc, mapFile


class CryoGmmBase:
    """Mixin for cryogmm protocols (not a protocol itself, so it never shows in the tree)."""

    # ------------------------------------------------------------------ params
    def _defineComputeParams(self, form, threads=2):
        form.addHidden(USE_GPU, params.BooleanParam, default=True,
                       label="Use GPU?",
                       help="Run the engine on a GPU when one is visible (it falls back "
                            "to the CPU otherwise; the device used is in the summary). "
                            "No: always the CPU.")
        form.addHidden(GPU_LIST, params.StringParam, default="0",
                       label="GPU ID",
                       help="GPU to use (CUDA_VISIBLE_DEVICES). The engine runs one "
                            "process on the first GPU listed.")
        form.addParallelSection(threads=threads, mpi=0)

    # ------------------------------------------------------------------ running
    def _engineEnviron(self):
        env = Plugin.getEnviron()
        threads = str(max(1, int(self.numberOfThreads.get() or 1)))
        for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
            env[var] = threads
        if self.getAttributeValue(USE_GPU, False):
            gpus = str(self.getAttributeValue(GPU_LIST, "0")).replace(" ", ",")
            env["CUDA_VISIBLE_DEVICES"] = gpus
        return env

    def _deviceArgs(self):
        return ["--device", "auto" if self.getAttributeValue(USE_GPU, False) else "cpu"]

    def _runEngine(self, job, args):
        """``cryogmm JOB ARGS`` in the engine's environment (args: list of str, quoted;
        ``job`` may hold a subcommand, e.g. "hetero train")."""
        args = job.split() + [str(a) for a in args] + self._deviceArgs()
        self.runJob(Plugin.getProgram(), args, env=self._engineEnviron(),
                    numberOfMpi=1, numberOfThreads=1)

    def _projectDir(self):
        """Image paths in the STAR files are relative to the project folder (the cwd of runs)."""
        return os.path.abspath(os.getcwd())

    # ------------------------------------------------------------------ checks
    @staticmethod
    def _samePixel(a, b):
        return abs(a - b) <= 1e-3 * max(a, b)

    def _validateParticles(self, parts, needAlignment=True):
        errors = []
        if parts is None:
            return ["No input particles."]
        if not parts.hasCTF():
            errors.append("The input particles have no CTF parameters: cryogmm compares "
                          "CTF-modulated projections, so estimate or assign the CTF first.")
        if needAlignment and not parts.hasAlignmentProj():
            errors.append("The input particles have no 3D alignment (projection angles and "
                          "shifts): this is a local refinement that starts from existing "
                          "poses, e.g. from a RELION, cryoSPARC or Scipion 3D refinement "
                          "(alignment found: %s)." % parts.getAlignment())
        first = parts.getFirstItem()
        if first is not None and not isMrc(first.getFileName()):
            errors.append("The particle stacks must be MRC (.mrcs/.mrc), got %s." %
                          first.getFileName())
        return errors

    def _validateMap(self, label, vol, parts):
        """Same pixel size and box as the particles, MRC on disk."""
        errors = []
        if vol is None or parts is None:
            return errors
        pa, va = parts.getSamplingRate(), vol.getSamplingRate()
        if not self._samePixel(pa, va):
            errors.append("%s has a sampling rate of %.4f Å/px but the particles have "
                          "%.4f Å/px: resample one of them first." % (label, va, pa))
        pbox, vbox = parts.getXDim(), vol.getXDim()
        if pbox and vbox and pbox != vbox:
            errors.append("%s has a box of %d px but the particles have %d px." %
                          (label, vbox, pbox))
        if not isMrc(mapFile(vol)):
            errors.append("%s must be an MRC file, got %s." % (label, mapFile(vol)))
        return errors

    # ------------------------------------------------------------------ outputs
    @staticmethod
    def _makeVolume(folder, apix, prefix=""):
        """The engine's map.mrc with half1/half2.mrc (or PREFIX.mrc with PREFIX_half1/2.mrc)
        as a pwem Volume."""
        name = prefix or "map"
        halves = ["%s_half%d.mrc" % (prefix, i) if prefix else "half%d.mrc" % i
                  for i in (1, 2)]
        vol = Volume()
        vol.setFileName(os.path.join(folder, "%s.mrc" % name))
        vol.setSamplingRate(apix)
        vol.setHalfMaps([os.path.join(folder, h) for h in halves])
        return vol

    @staticmethod
    def _fmt(x, spec=".2f"):
        return "n/a" if x is None or (isinstance(x, float) and not np.isfinite(x)) else format(x, spec)
