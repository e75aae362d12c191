"""Reconstruct: ``cryogmm reconstruct`` as a Scipion protocol."""

from enum import Enum

import pyworkflow.protocol.params as params
from pyworkflow.constants import BETA
from pwem.objects import FSC, Volume
from pwem.protocols import ProtReconstruct3D

from ..convert import fscFromReport, readReport, writeParticlesStar
from .protocol_base import CryoGmmBase


class ReconstructOutputs(Enum):
    outputVolume = Volume
    outputFSC = FSC


class CryoGmmProtReconstruct(CryoGmmBase, ProtReconstruct3D):
    """Direct Fourier reconstruction with CTF correction and gold-standard half maps, run
    by the cryogmm engine.

    Half sets come from rlnRandomSubset (random, seeded, when the particles have none); the
    FSC between the halves (soft spherical mask) gives the resolution and the Wiener filter
    of the final map, reconstructed from all particles.
    """
    _label = "reconstruct"
    _devStatus = BETA
    _possibleOutputs = ReconstructOutputs

    def _defineParams(self, form):
        form.addSection(label="Input")
        form.addParam("inputParticles", params.PointerParam,
                      pointerClass="SetOfParticles", important=True,
                      label="Input particles",
                      help="Particles with CTF and a 3D alignment.")
        form.addParam("doCtf", params.BooleanParam, default=True,
                      label="Correct the CTF?",
                      help="No: the images are not CTF-modulated (e.g. simulated without "
                           "CTF).")
        form.addParam("doWiener", params.BooleanParam, default=True,
                      label="Wiener-filter the final map?",
                      help="Filter the final map by the SNR the half-map FSC implies.")
        form.addParam("maskRadiusA", params.FloatParam, default=0.0,
                      expertLevel=params.LEVEL_ADVANCED,
                      label="FSC mask radius (Å)",
                      help="Radius of the soft spherical FSC mask; 0: box/2 - 4 px.")
        form.addParam("reg", params.FloatParam, default=1e-3,
                      expertLevel=params.LEVEL_ADVANCED, label="Regularisation",
                      help="Fraction of each shell's mean CTF^2 weight added to it.")
        form.addParam("batch", params.IntParam, default=256,
                      expertLevel=params.LEVEL_ADVANCED, validators=[params.Positive],
                      label="Particles per batch")
        form.addParam("seed", params.IntParam, default=0,
                      expertLevel=params.LEVEL_ADVANCED, label="Random seed",
                      help="Seed of the half-set assignment when the particles have none.")
        self._defineComputeParams(form)

    def _insertAllSteps(self):
        self._insertFunctionStep(self.convertInputStep, needsGPU=False)
        self._insertFunctionStep(self.reconstructStep, needsGPU=True)
        self._insertFunctionStep(self.createOutputStep, needsGPU=False)

    def convertInputStep(self):
        writeParticlesStar(self.inputParticles.get(), self._getExtraPath("particles.star"),
                           self._getExtraPath())

    def reconstructStep(self):
        args = [self._getExtraPath("particles.star"), "--out", self._getRecDir(),
                "--project-dir", self._projectDir(), "--reg", self.reg.get(),
                "--batch", self.batch.get(), "--seed", self.seed.get()]
        if not self.doCtf:
            args.append("--no-ctf")
        if not self.doWiener:
            args.append("--no-wiener")
        if self.maskRadiusA.get() > 0:
            args += ["--mask-radius-A", self.maskRadiusA.get()]
        self._runEngine("reconstruct", args)

    def createOutputStep(self):
        apix = self.inputParticles.get().getSamplingRate()
        vol = self._makeVolume(self._getRecDir(), apix)
        fsc = FSC(objLabel="%s masked FSC" % self.getRunName())
        fsc.setData(*fscFromReport(readReport(self._getRecDir())))
        self._defineOutputs(**{ReconstructOutputs.outputVolume.name: vol,
                               ReconstructOutputs.outputFSC.name: fsc})
        self._defineSourceRelation(self.inputParticles, vol)
        self._defineSourceRelation(self.inputParticles, fsc)

    def _validate(self):
        parts = self.inputParticles.get()
        return self._validateParticles(parts, needAlignment=True)

    def _summary(self):
        if not self.hasAttribute(ReconstructOutputs.outputVolume.name):
            return ["Output not ready yet."]
        r = readReport(self._getRecDir())
        return ["%d particles (halves %d / %d) on %s (%.1f s)." % (
                    r.get("n_particles", 0), r.get("n_half1", 0), r.get("n_half2", 0),
                    r.get("device", "?"), r.get("seconds", 0.0)),
                "FSC 0.143: %s Å masked, %s Å unmasked." % (
                    self._fmt(r.get("resolution_A")),
                    self._fmt(r.get("resolution_unmasked_A")))]

    def _methods(self):
        if not self.hasAttribute(ReconstructOutputs.outputVolume.name):
            return []
        r = readReport(self._getRecDir())
        return ["A map was reconstructed from %d particles by direct Fourier inversion with "
                "CTF correction in cryogmm (RELION conventions [Scheres2012]); the "
                "gold-standard FSC = 0.143 resolution was %s Å." % (
                    r.get("n_particles", 0), self._fmt(r.get("resolution_A")))]

    def _citations(self):
        return ["Scheres2012"]

    def _getRecDir(self):
        return self._getExtraPath("reconstruct")
