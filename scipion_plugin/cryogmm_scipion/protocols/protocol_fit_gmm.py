"""Fit a Gaussian mixture to a map: ``cryogmm fit-gmm`` as a Scipion protocol."""

import os
from enum import Enum

import pyworkflow.protocol.params as params
from pyworkflow.constants import BETA
from pwem.objects import AtomStruct, Volume
from pwem.protocols import ProtAnalysis3D

from ..convert import isMrc, mapFile, readReport
from .protocol_base import CryoGmmBase


class FitGmmOutputs(Enum):
    outputGaussians = AtomStruct
    outputVolume = Volume


class CryoGmmProtFitGmm(CryoGmmBase, ProtAnalysis3D):
    """Fit a Gaussian mixture to a map (density-weighted k-means seeding, then the Fourier
    ring correlation of projections up to the target resolution), run by the cryogmm engine.

    Outputs: the Gaussians as pseudo-atoms (one HETATM per Gaussian in the map's frame, so
    they overlay it; occupancy = relative amplitude, B-factor = 8 pi^2 sigma^2) and the
    mixture rendered as a map with the same box, sampling and origin.
    """
    _label = "fit gaussian mixture"
    _devStatus = BETA
    _possibleOutputs = FitGmmOutputs

    def _defineParams(self, form):
        form.addSection(label="Input")
        form.addParam("inputVolume", params.PointerParam, pointerClass="Volume",
                      important=True, label="Map", help="A cubic MRC map.")
        form.addParam("resolution", params.FloatParam, default=8.0,
                      validators=[params.Positive], label="Target resolution (Å)",
                      help="Sets the Gaussian widths, the default number of Gaussians and "
                           "the rings fitted; at least twice the sampling rate.")
        form.addParam("nGaussians", params.IntParam, default=0,
                      label="Number of Gaussians",
                      help="0: one per (resolution/2)^3 Å^3 of the volume above the "
                           "threshold.")
        form.addParam("threshold", params.FloatParam, allowsNull=True,
                      expertLevel=params.LEVEL_ADVANCED, label="Seeding threshold",
                      help="Density level for the k-means seeding (map units); empty: "
                           "automatic.")
        form.addParam("iterations", params.IntParam, default=1000,
                      expertLevel=params.LEVEL_ADVANCED, label="Most fitting steps",
                      help="Stops earlier when the fit plateaus; 0: k-means only.")
        form.addParam("batch", params.IntParam, default=16,
                      expertLevel=params.LEVEL_ADVANCED, validators=[params.Positive],
                      label="Orientations per step")
        form.addParam("seed", params.IntParam, default=0,
                      expertLevel=params.LEVEL_ADVANCED, label="Random seed")
        self._defineComputeParams(form)

    def _insertAllSteps(self):
        self._insertFunctionStep(self.fitStep, needsGPU=True)
        self._insertFunctionStep(self.createOutputStep, needsGPU=False)

    def fitStep(self):
        args = [mapFile(self.inputVolume.get()), "--resolution", self.resolution.get(),
                "--iterations", self.iterations.get(), "--batch", self.batch.get(),
                "--seed", self.seed.get(), "--out", self._getFitDir()]
        if self.nGaussians.get() > 0:
            args += ["--n-gaussians", self.nGaussians.get()]
        if self.threshold.get() is not None:
            args += ["--threshold", self.threshold.get()]
        self._runEngine("fit-gmm", args)

    def createOutputStep(self):
        inVol = self.inputVolume.get()
        atoms = AtomStruct(filename=os.path.join(self._getFitDir(), "gaussians.pdb"),
                           pseudoatoms=True)
        vol = Volume()
        vol.setFileName(os.path.join(self._getFitDir(), "gmm_map.mrc"))
        vol.setSamplingRate(inVol.getSamplingRate())
        if inVol.getOrigin(force=False) is not None:
            vol.setOrigin(inVol.getOrigin())
        atoms.setVolume(vol)
        self._defineOutputs(**{FitGmmOutputs.outputGaussians.name: atoms,
                               FitGmmOutputs.outputVolume.name: vol})
        self._defineSourceRelation(self.inputVolume, atoms)
        self._defineSourceRelation(self.inputVolume, vol)

    def _validate(self):
        errors = []
        vol = self.inputVolume.get()
        if vol is not None:
            if not isMrc(mapFile(vol)):
                errors.append("The map must be an MRC file, got %s." % mapFile(vol))
            if self.resolution.get() < 2 * vol.getSamplingRate():
                errors.append("The target resolution (%.2f Å) must be at least twice the "
                              "sampling rate (%.2f Å/px)." % (self.resolution.get(),
                                                              vol.getSamplingRate()))
        return errors

    def _summary(self):
        if not self.hasAttribute(FitGmmOutputs.outputGaussians.name):
            return ["Output not ready yet."]
        r = readReport(self._getFitDir())
        return ["%d Gaussians at %s Å (%s fitting steps, %.0f s on %s)." % (
                    r["n"], self._fmt(r["resolution_A"]), r.get("iterations"),
                    r.get("seconds", 0.0), r.get("device", "?")),
                "FSC(mixture, map) >= %s up to the target resolution; 0.5 at %s Å "
                "(k-means seeding alone: %s)." % (
                    self._fmt(r.get("fsc_min_to_resolution"), ".3f"),
                    self._fmt(r.get("fsc_0.5_A")),
                    self._fmt(r.get("kmeans", {}).get("fsc_min_to_resolution"), ".3f"))]

    def _methods(self):
        if not self.hasAttribute(FitGmmOutputs.outputGaussians.name):
            return []
        r = readReport(self._getFitDir())
        return ["A mixture of %d Gaussians was fitted to the map at %s Å resolution with "
                "cryogmm (k-means seeding, then Fourier ring correlation of projections), as "
                "in [Chen2021]." % (r["n"], self._fmt(r["resolution_A"]))]

    def _citations(self):
        return ["Chen2021"]

    def _getFitDir(self):
        return self._getExtraPath("fit")
