"""Refine orientations: ``cryogmm refine-poses`` as a Scipion protocol."""

import os
import re

import pyworkflow.protocol.params as params
from pyworkflow.constants import BETA
from pyworkflow.object import Float, Integer
from pwem.objects import FSC, SetOfParticles, Transform, Volume
from pwem.protocols import ProtRefine3D

from ..constants import ATTR_FRC, ATTR_HALF, ATTR_ORIG_ID
from ..convert import (fscFromReport, mapFile, readReport, readStarRows, relionToMatrix,
                       writeParticlesStar)
from .protocol_base import CryoGmmBase


# A dict, not an Enum: two outputs are Volumes, and Enum members with equal values alias.
OUT_PARTICLES, OUT_VOLUME, OUT_FSC, OUT_COMPOSITE = (
    "outputParticles", "outputVolume", "outputFSC", "outputCompositeVolume")
OUTPUTS = {OUT_PARTICLES: SetOfParticles, OUT_VOLUME: Volume, OUT_FSC: FSC,
           OUT_COMPOSITE: Volume}


class CryoGmmProtRefinePoses(CryoGmmBase, ProtRefine3D):
    """Gold-standard local refinement of particle orientations and origins against
    Gaussian mixtures (Chen, Schmid & Chiu; EMAN2 e2gmm_refine), run by the cryogmm engine.

    Each half set of particles is aligned only against a Gaussian mixture fitted to its own
    half map. Every iteration fits the mixtures, refines each particle's rotation and origin
    locally by maximising the Fourier ring correlation between the particle and the
    CTF-modulated projection of its half's mixture, reconstructs both halves and computes
    their FSC. The output particles carry the new alignment (and the final per-particle
    FRC), the output volume its two half maps.

    A focus mask makes high resolution count inside it only; patch-by-patch refinement
    splits the mixture into K patches, refines each focused on its own mask and combines
    the maps into a composite volume. With Cn/Dn symmetry and focused or patch work the
    particles are symmetry-expanded (one output particle per copy).
    """
    _label = "refine orientations"
    _devStatus = BETA
    _possibleOutputs = OUTPUTS

    # --------------------------- DEFINE param functions ----------------------
    def _defineParams(self, form):
        form.addSection(label="Input")
        form.addParam("inputParticles", params.PointerParam,
                      pointerClass="SetOfParticles", important=True,
                      label="Input particles",
                      help="Particles with CTF and a 3D alignment (the starting poses), "
                           "e.g. from a consensus refinement. Half sets are taken from "
                           "rlnRandomSubset when the particles carry it, random otherwise.")
        form.addParam("inputVolume", params.PointerParam, pointerClass="Volume",
                      allowsNull=True, label="Reference volume (optional)",
                      help="Where the refinement starts. A volume carrying half maps "
                           "(gold-standard halves, e.g. from a RELION or cryoSPARC "
                           "refinement) starts each half from its own map. A volume "
                           "without half maps is a consensus map: both halves start from "
                           "it low-passed to the starting resolution (which must then be "
                           "set), so they share nothing beyond it. Empty: both halves are "
                           "reconstructed from the particles' own poses. Same box and "
                           "sampling rate as the particles.")
        form.addParam("inputMask", params.PointerParam, pointerClass="VolumeMask",
                      allowsNull=True, label="Focus mask (optional)",
                      help="Soft mask (0..1) focusing the alignment: each Gaussian's width "
                           "is scaled by 1/(0.25 + 0.75 M) at its centre, so high resolution "
                           "counts inside the mask only. Same box and sampling rate as the "
                           "particles.")
        form.addParam("inputHetero", params.PointerParam,
                      pointerClass="CryoGmmProtHetero", allowsNull=True,
                      label="Heterogeneity run (optional)",
                      help="Conformation to orientation: a finished 'cryogmm - heterogeneity' "
                           "run on these particles. With a focus mask, each particle's "
                           "decoded conformation of the masked region is aligned onto the "
                           "neutral model (weighted Kabsch) and the rigid motion becomes a "
                           "change of its pose; focused iterations then refine from there. "
                           "Needs the focus mask.")
        form.addParam("symmetry", params.StringParam, default="c1",
                      label="Symmetry group",
                      help="Point group Cn or Dn (RELION's axes: n-fold along z, D's "
                           "two-fold along x), imposed in every reconstruction. With a focus "
                           "mask or patches the particles are symmetry-expanded (one output "
                           "particle per copy, as relion_particle_symmetry_expand).")
        form.addParam("patches", params.IntParam, default=0,
                      label="Patches (patch-by-patch refinement)",
                      help="0: off. K > 0: after the global iterations the mixture is split "
                           "into K patches (k-means), each refined focused on its own soft "
                           "mask; the maps are combined into a composite volume (the global "
                           "map fills what no patch covers).")
        form.addParam("patchIterations", params.IntParam, default=2,
                      condition="patches > 0", expertLevel=params.LEVEL_ADVANCED,
                      validators=[params.Positive], label="Iterations per patch")
        form.addParam("inputAtomStruct", params.PointerParam, pointerClass="AtomStruct",
                      allowsNull=True, expertLevel=params.LEVEL_ADVANCED,
                      label="Atomic model to seed the mixtures (optional)",
                      help="Seed each half's mixture on the model's heavy atoms "
                           "(randomised at the resolution, independently per half). The "
                           "model must overlay the maps.")

        form.addSection(label="Refinement")
        form.addParam("iterations", params.IntParam, default=5,
                      validators=[params.Positive], label="Iterations",
                      help="Most iterations; stops earlier when the FSC stops improving.")
        form.addParam("lowResA", params.FloatParam, default=30.0,
                      validators=[params.Positive], label="Low resolution limit (Å)",
                      help="Lower bound of the FRC band used for alignment.")
        form.addParam("startResA", params.FloatParam, default=0.0,
                      expertLevel=params.LEVEL_ADVANCED,
                      label="Starting high resolution limit (Å)",
                      help="Upper bound of the first band; 0: the FSC of the starting "
                           "halves. Required with a consensus reference (a volume without "
                           "half maps): it is low-passed to this resolution.")
        form.addParam("steps", params.IntParam, default=40,
                      expertLevel=params.LEVEL_ADVANCED, validators=[params.Positive],
                      label="Optimiser steps per particle",
                      help="Adam steps per particle and iteration.")
        form.addParam("lrDeg", params.FloatParam, default=1.0,
                      expertLevel=params.LEVEL_ADVANCED, label="Rotation step (deg)",
                      help="Initial rotation step, cosine-decayed.")
        form.addParam("lrA", params.FloatParam, default=0.3,
                      expertLevel=params.LEVEL_ADVANCED, label="Shift step (Å)",
                      help="Initial shift step, cosine-decayed.")

        form.addSection(label="Gaussian mixtures")
        form.addParam("nGaussians", params.IntParam, default=0,
                      expertLevel=params.LEVEL_ADVANCED, label="Gaussians per half",
                      help="0: chosen from the volume and the resolution (at most the cap "
                           "below).")
        form.addParam("maxGaussians", params.IntParam, default=1000,
                      expertLevel=params.LEVEL_ADVANCED, validators=[params.Positive],
                      label="Most Gaussians (automatic choice)")
        form.addParam("fitIterations", params.IntParam, default=300,
                      expertLevel=params.LEVEL_ADVANCED, validators=[params.Positive],
                      label="Fitting steps per mixture")
        form.addParam("batch", params.IntParam, default=128,
                      expertLevel=params.LEVEL_ADVANCED, validators=[params.Positive],
                      label="Particles per batch",
                      help="GPU/CPU memory scales with it.")
        form.addParam("seed", params.IntParam, default=0,
                      expertLevel=params.LEVEL_ADVANCED, label="Random seed")

        self._defineComputeParams(form)

    # --------------------------- INSERT steps functions ----------------------
    def _insertAllSteps(self):
        self._insertFunctionStep(self.convertInputStep, needsGPU=False)
        self._insertFunctionStep(self.refineStep, needsGPU=True)
        self._insertFunctionStep(self.fscStep, needsGPU=False)
        self._insertFunctionStep(self.createOutputStep, needsGPU=False)

    # --------------------------- STEPS functions -----------------------------
    def convertInputStep(self):
        writeParticlesStar(self.inputParticles.get(), self._getExtraPath("particles.star"),
                           self._getExtraPath())

    def refineStep(self):
        args = [self._getExtraPath("particles.star"),
                "--out", self._getRefineDir(),
                "--project-dir", self._projectDir(),
                "--iterations", self.iterations.get(),
                "--low-res-A", self.lowResA.get(),
                "--steps", self.steps.get(),
                "--lr-deg", self.lrDeg.get(),
                "--lr-A", self.lrA.get(),
                "--max-gaussians", self.maxGaussians.get(),
                "--fit-iterations", self.fitIterations.get(),
                "--batch", self.batch.get(),
                "--seed", self.seed.get()]
        if self.startResA.get() > 0:
            args += ["--start-res-A", self.startResA.get()]
        if self.nGaussians.get() > 0:
            args += ["--n-gaussians", self.nGaussians.get()]
        vol = self.inputVolume.get()
        if vol is not None and vol.hasHalfMaps():
            args += ["--half-maps"] + [f.split(":")[0] for f in vol.getHalfMaps(asList=True)]
        elif vol is not None:
            args += ["--map", mapFile(vol)]
        if self._symmetry() != "C1":
            args += ["--sym", self._symmetry()]
        if self.patches.get() > 0:
            args += ["--patches", self.patches.get(),
                     "--patch-iterations", self.patchIterations.get()]
        if self.inputMask.get() is not None:
            args += ["--mask", mapFile(self.inputMask.get())]
        if self.inputAtomStruct.get() is not None:
            args += ["--model", self.inputAtomStruct.get().getFileName()]
        if self.inputHetero.get() is not None:
            args += ["--hetero", self.inputHetero.get().getRunDir()]
        self._runEngine("refine-poses", args)

    def fscStep(self):
        """The FSC curve of the refined halves: from the refinement's report when it holds
        one, else from ``cryogmm reconstruct`` of the refined STAR (same half sets)."""
        if fscFromReport(readReport(self._getRefineDir())) is None:
            # refined.star keeps the input's image names, relative to the project folder
            self._runEngine("reconstruct", [
                os.path.join(self._getRefineDir(), "refined.star"),
                "--out", self._getExtraPath("fsc"),
                "--project-dir", self._projectDir(),
                "--seed", self.seed.get()])

    def createOutputStep(self):
        inputSet = self.inputParticles.get()
        apix = inputSet.getSamplingRate()
        rows = readStarRows(os.path.join(self._getRefineDir(), "refined.star"))
        byId = {}
        for r in rows:
            byId.setdefault(int(r.rlnImageId), []).append(r)
        missing = [p.getObjId() for p in inputSet.iterItems() if p.getObjId() not in byId]
        if missing:
            raise ValueError("refined.star lacks %d input particles (first id %d)" %
                             (len(missing), missing[0]))

        def setAlignment(item, row):
            item.setTransform(Transform(relionToMatrix(
                row.rlnAngleRot, row.rlnAngleTilt, row.rlnAnglePsi,
                row.rlnOriginXAngst, row.rlnOriginYAngst, apix)))
            if hasattr(row, "rlnCryogmmFrc"):
                setattr(item, ATTR_FRC, Float(row.rlnCryogmmFrc))
            if hasattr(row, "rlnRandomSubset"):
                setattr(item, ATTR_HALF, Integer(row.rlnRandomSubset))

        outSet = self._createSetOfParticles()
        outSet.copyInfo(inputSet)
        outSet.setAlignmentProj()
        if len(rows) == len(byId):
            outSet.copyItems(inputSet,
                             updateItemCallback=lambda item, _row=None:
                             setAlignment(item, byId[item.getObjId()][0]))
        else:
            # symmetry expansion: one output particle per copy, each new id, the input id kept
            for part in inputSet.iterItems():
                for row in byId[part.getObjId()]:
                    copy = part.clone()
                    copy.setObjId(None)
                    setattr(copy, ATTR_ORIG_ID, Integer(part.getObjId()))
                    setAlignment(copy, row)
                    outSet.append(copy)

        outputs = {OUT_PARTICLES: outSet,
                   OUT_VOLUME: self._makeVolume(self._getRefineDir(), apix),
                   OUT_FSC: self._makeFsc()}
        if os.path.exists(os.path.join(self._getRefineDir(), "composite.mrc")):
            outputs[OUT_COMPOSITE] = self._makeVolume(
                self._getRefineDir(), apix, prefix="composite")
        self._defineOutputs(**outputs)
        self._defineTransformRelation(self.inputParticles, outSet)
        for name, obj in outputs.items():
            if name != OUT_PARTICLES:
                self._defineSourceRelation(self.inputParticles, obj)
                if self.inputVolume.get() is not None:
                    self._defineSourceRelation(self.inputVolume, obj)

    # --------------------------- INFO functions ------------------------------
    def _validate(self):
        parts = self.inputParticles.get()
        errors = self._validateParticles(parts, needAlignment=True)
        vol = self.inputVolume.get()
        if vol is not None:
            errors += self._validateMap("The reference volume", vol, parts)
            if not vol.hasHalfMaps() and self.startResA.get() <= 0:
                errors.append("The reference volume has no half maps: as a consensus map "
                              "it is low-passed to the starting resolution, so set "
                              "'Starting high resolution limit' (e.g. 10 Å), or give a volume "
                              "with half maps, or none to reconstruct them from the "
                              "particles.")
        if not re.fullmatch(r"[CD][1-9][0-9]*", self._symmetry()):
            errors.append("Symmetry must be Cn or Dn (e.g. C1, C7, D2), got '%s'." %
                          self.symmetry.get())
        if self.inputMask.get() is not None:
            errors += self._validateMap("The focus mask", self.inputMask.get(), parts)
        hetero = self.inputHetero.get()
        if hetero is not None:
            if self.inputMask.get() is None:
                errors.append("Conformation to orientation (a heterogeneity run) needs a "
                              "focus mask: the region whose conformation becomes a pose "
                              "change.")
            if not hetero.isFinished() or not os.path.exists(
                    os.path.join(hetero.getRunDir(), "checkpoint.pt")):
                errors.append("The heterogeneity run %s has not finished (no trained "
                              "network in %s)." % (hetero.getRunName(), hetero.getRunDir()))
            elif parts is not None and hetero.inputParticles.get() is not None:
                trained = {p.getObjId() for p in hetero.inputParticles.get().iterItems()}
                mine = {p.getObjId() for p in parts.iterItems()}
                if mine != trained:
                    errors.append("The heterogeneity run was trained on %d particles, %d of "
                                  "them among the %d input particles: conformation to "
                                  "orientation needs the same particle set." % (
                                      len(trained), len(mine & trained), len(mine)))
            if self._symmetry() != "C1":
                errors.append("Conformation to orientation runs on unexpanded particles: "
                              "use symmetry C1 with a heterogeneity run.")
        return errors

    def _summary(self):
        if not self.hasAttribute(OUT_PARTICLES):
            return ["Output not ready yet."]
        report = readReport(self._getRefineDir())
        its = report.get("iterations", [])
        lines = ["%d particles refined in %d iteration(s) on %s (%.0f s)." %
                 (report.get("n_particles", 0), len(its), report.get("device", "?"),
                  report.get("seconds", 0.0)),
                 "Gold-standard FSC 0.143: %s Å." % self._fmt(report.get("resolution_A"))]
        if its:
            last = its[-1]
            lines.append("Last iteration: pose change median %s° (90th percentile %s°), "
                         "shift change median %s Å." % (
                             self._fmt(last["pose_change_deg"]["median"]),
                             self._fmt(last["pose_change_deg"]["p90"]),
                             self._fmt(last["shift_change_A"]["median"])))
        if report.get("focused"):
            lines.append("Alignment focused by the mask.")
        if self.inputHetero.get() is not None:
            c2o = report.get("conformation_to_orientation") or {}
            rmsd = c2o.get("region_rmsd_A", {})
            lines.append("Poses started from each particle's conformation (heterogeneity "
                         "run %s): masked-region RMSD to the neutral model, median %s -> %s "
                         "Å; pose change median %s°." % (
                             self.inputHetero.get().getRunName(),
                             self._fmt(rmsd.get("before_median")),
                             self._fmt(rmsd.get("after_median")),
                             self._fmt(c2o.get("pose_change_deg", {}).get("median"), ".1f")))
        if self._symmetry() != "C1":
            lines.append("Symmetry %s imposed." % self._symmetry())
        if self.hasAttribute(OUT_COMPOSITE):
            lines.append("%d patches refined; composite volume in the outputs." %
                         self.patches.get())
        return lines

    def _methods(self):
        if not self.hasAttribute(OUT_PARTICLES):
            return []
        report = readReport(self._getRefineDir())
        return ["The orientations and origins of %d particles were refined locally against "
                "Gaussian mixtures fitted independently to each half map [Chen2024] with "
                "cryogmm, for %d iteration(s); the final gold-standard FSC = 0.143 "
                "resolution was %s Å." % (report.get("n_particles", 0),
                                          len(report.get("iterations", [])),
                                          self._fmt(report.get("resolution_A")))]

    def _citations(self):
        return ["Chen2024"]

    # --------------------------- UTILS functions -----------------------------
    def _symmetry(self):
        return (self.symmetry.get() or "c1").strip().upper()

    def _getRefineDir(self):
        return self._getExtraPath("refine")

    def _makeFsc(self):
        curve = fscFromReport(readReport(self._getRefineDir()))
        if curve is None:
            curve = fscFromReport(readReport(self._getExtraPath("fsc")))
        fsc = FSC(objLabel="%s masked FSC" % self.getRunName())
        fsc.setData(*curve)
        return fsc
