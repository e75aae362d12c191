"""Simulate particles with known truth: ``cryogmm simulate`` as a Scipion protocol."""

import os
import pyworkflow.protocol.params as params
from pyworkflow.constants import BETA
from pwem.constants import ALIGN_PROJ
from pwem.objects import SetOfParticles, Volume
from pwem.protocols import ProtParticles
from pyworkflow.plugin import Domain

from ..convert import mapFile, readReport
from .protocol_base import CryoGmmBase


# A dict, not an Enum: two outputs share a class and Enum members with equal values alias.
OUTPUTS = {"outputParticles": SetOfParticles,
           "outputTruthParticles": SetOfParticles,
           "outputVolume": Volume}


class CryoGmmProtSimulate(CryoGmmBase, ProtParticles):
    """Simulate a particle set with known ground truth from an atomic model or a map.

    Every heavy atom of the model becomes a Gaussian (or the map is projected along rays);
    particles are projected at random poses, modulated by RELION's CTF with per-particle
    defocus, and given Gaussian noise at the requested SNR. The output particles carry the
    recorded poses (perturbed by the pose/shift noise when asked: a refinement task), the
    truth particles the exact ones, and the volume is the noise-free map.
    """
    _label = "simulate particles"
    _devStatus = BETA
    _possibleOutputs = OUTPUTS

    SOURCE_MODEL, SOURCE_MAP = 0, 1

    def _defineParams(self, form):
        form.addSection(label="Input")
        form.addParam("source", params.EnumParam, choices=["atomic model", "map"],
                      default=self.SOURCE_MODEL, display=params.EnumParam.DISPLAY_HLIST,
                      label="Simulate from")
        form.addParam("inputAtomStruct", params.PointerParam, pointerClass="AtomStruct",
                      condition="source == %d" % self.SOURCE_MODEL, allowsNull=True,
                      label="Atomic model", help="PDB/mmCIF; heavy atoms become Gaussians.")
        form.addParam("inputVolume", params.PointerParam, pointerClass="Volume",
                      condition="source == %d" % self.SOURCE_MAP, allowsNull=True,
                      label="Map", help="A cubic MRC map; its box and sampling are used.")
        form.addParam("n", params.IntParam, default=1000, validators=[params.Positive],
                      label="Number of particles")
        form.addParam("box", params.IntParam, default=64,
                      condition="source == %d" % self.SOURCE_MODEL,
                      validators=[params.Positive], label="Box size (px)")
        form.addParam("apix", params.FloatParam, default=2.0,
                      condition="source == %d" % self.SOURCE_MODEL,
                      validators=[params.Positive], label="Sampling rate (Å/px)")
        form.addParam("snr", params.FloatParam, default=0.1, label="Signal-to-noise ratio",
                      help="Signal variance / noise variance over the box; 0: no noise.")
        form.addSection(label="CTF and poses")
        line = form.addLine("Defocus range (µm)")
        line.addParam("defocusMin", params.FloatParam, default=1.0, label="min")
        line.addParam("defocusMax", params.FloatParam, default=2.5, label="max")
        form.addParam("voltage", params.FloatParam, default=300.0, label="Voltage (kV)")
        form.addParam("cs", params.FloatParam, default=2.7,
                      label="Spherical aberration (mm)")
        form.addParam("ampContrast", params.FloatParam, default=0.1,
                      label="Amplitude contrast")
        form.addParam("poseNoiseDeg", params.FloatParam, default=0.0,
                      label="Pose perturbation (deg)",
                      help="Perturb the recorded rotations by ~N(0, D) degrees.")
        form.addParam("shiftNoiseA", params.FloatParam, default=0.0,
                      label="Shift perturbation (Å)",
                      help="Perturb the recorded origins by ~N(0, T) Å.")
        form.addParam("seed", params.IntParam, default=0, label="Random seed")
        self._defineComputeParams(form, threads=2)

    def _insertAllSteps(self):
        self._insertFunctionStep(self.simulateStep, needsGPU=True)
        self._insertFunctionStep(self.createOutputStep, needsGPU=False)

    def simulateStep(self):
        args = ["--n-particles", self.n.get(), "--snr", self.snr.get() if self.snr.get() > 0 else "inf",
                "--defocus", self.defocusMin.get(), self.defocusMax.get(),
                "--voltage", self.voltage.get(), "--cs", self.cs.get(),
                "--amp-contrast", self.ampContrast.get(), "--seed", self.seed.get(),
                "--out", self._getSimDir()]
        if self.source == self.SOURCE_MODEL:
            args += ["--model", self.inputAtomStruct.get().getFileName(),
                     "--box", self.box.get(), "--apix", self.apix.get()]
        else:
            args += ["--map", mapFile(self.inputVolume.get())]
        if self.poseNoiseDeg.get() > 0:
            args += ["--pose-noise-deg", self.poseNoiseDeg.get()]
        if self.shiftNoiseA.get() > 0:
            args += ["--shift-noise-A", self.shiftNoiseA.get()]
        self._runEngine("simulate", args)

    def createOutputStep(self):
        simDir = self._getSimDir()
        parts = self._readParticles(os.path.join(simDir, "particles.star"), "")
        truth = self._readParticles(os.path.join(simDir, "truth.star"), "truth")
        vol = Volume()
        vol.setFileName(os.path.join(simDir, "truth_map.mrc"))
        vol.setSamplingRate(parts.getSamplingRate())
        self._defineOutputs(outputParticles=parts, outputTruthParticles=truth,
                            outputVolume=vol)
        src = self.inputAtomStruct if self.source == self.SOURCE_MODEL else self.inputVolume
        for out in (parts, truth, vol):
            self._defineSourceRelation(src, out)

    def _readParticles(self, star, suffix):
        relionConvert = Domain.importFromPlugin("relion.convert", doRaise=True)
        folder = os.path.dirname(star)

        def fixLocation(part, row):
            part.setLocation(part.getIndex(), os.path.join(folder, part.getFileName()))

        partSet = self._createSetOfParticles(suffix)
        relionConvert.readSetOfParticles(star, partSet, alignType=ALIGN_PROJ,
                                         postprocessImageRow=fixLocation)
        return partSet

    def _validate(self):
        if self.source == self.SOURCE_MODEL and self.inputAtomStruct.get() is None:
            return ["Choose an atomic model to simulate from."]
        if self.source == self.SOURCE_MAP and self.inputVolume.get() is None:
            return ["Choose a map to simulate from."]
        return []

    def _summary(self):
        if not self.hasAttribute("outputParticles"):
            return ["Output not ready yet."]
        r = readReport(self._getSimDir())
        return ["%s particles, box %s px at %s Å/px, SNR %s, poses perturbed by %s° / %s Å "
                "(seed %s)." % (r.get("n_particles"), r.get("box"), r.get("apix_A"),
                                r.get("snr"), r.get("pose_noise_deg") or 0,
                                r.get("shift_noise_A") or 0, r.get("seed"))]

    def _methods(self):
        if not self.hasAttribute("outputParticles"):
            return []
        return ["%d particles were simulated with cryogmm (Gaussian projections of the "
                "input structure, RELION's CTF, Gaussian noise at SNR %s)." % (
                    self.outputParticles.getSize(), self.snr.get())]

    def _citations(self):
        return ["Scheres2012"]

    def _getSimDir(self):
        return self._getExtraPath("sim")
