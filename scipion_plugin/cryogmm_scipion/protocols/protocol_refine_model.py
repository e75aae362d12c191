"""Refine an atomic model into a map: ``cryogmm refine-model`` as a Scipion protocol."""

import os

import pyworkflow.protocol.params as params
from pyworkflow.constants import BETA
from pyworkflow.object import Float, Integer
from pwem.objects import AtomStruct
from pwem.protocols import EMProtocol

from ..convert import isMrc, mapFile, readReport
from .protocol_base import CryoGmmBase

OUT_MODEL = "outputAtomStruct"
OUTPUTS = {OUT_MODEL: AtomStruct}

# Validation figures kept as Scipion attributes of the output model: report key, attribute
# suffix, label, format. Stored as _cryogmm_before_<suffix> and _cryogmm_after_<suffix>.
FIGURES = [
    ("map_cc_mask", "mapCC", "map CC (mask)", ".3f"),
    ("map_model_fsc_0.5_A", "fsc05", "map-model FSC 0.5 (Å)", ".2f"),
    ("qscore_mean", "qscore", "Q-score (mean)", ".3f"),
    ("bond_rmsz", "bondRmsz", "bond RMSZ", ".2f"),
    ("angle_rmsz", "angleRmsz", "angle RMSZ", ".2f"),
    ("clashscore", "clashscore", "clashscore", ".1f"),
    ("rama_favoured_pct", "ramaFavoured", "Ramachandran favoured (%)", ".1f"),
    ("rama_outlier_pct", "ramaOutliers", "Ramachandran outliers (%)", ".1f"),
    ("rotamer_outlier_pct", "rotamerOutliers", "rotamer outliers (%)", ".1f"),
    ("cbeta_deviations", "cbetaDeviations", "Cβ deviations", "d"),
    ("chiral_outliers", "chiralOutliers", "chirality outliers", "d"),
    ("ca_rmsd_to_reference_A", "caRmsdRef", "Cα RMSD to reference (Å)", ".2f"),
]


def figureRows(report):
    """(label, before, after, format) for every figure the report holds."""
    b, a = report.get("before", {}), report.get("after", {})
    return [(label, b.get(key), a.get(key), fmt) for key, _, label, fmt in FIGURES
            if b.get(key) is not None or a.get(key) is not None]


class CryoGmmProtRefineModel(CryoGmmBase, EMProtocol):
    """Refine an atomic model into a map with differentiable stereochemistry, run by the
    cryogmm engine.

    The model's density (each atom a Gaussian at the map's resolution) is compared with the
    map (relative entropy by default, after Blau, Yvonnesdotter & Lindahl; or correlation,
    FSC or FRC of projections as Chen & Ludtke) while bonds, angles, planarity, chirality,
    Ramachandran, rotamer and clash terms keep the geometry. Stages run coarse to fine:
    rigid patches of residues, every residue a rigid body, a rotamer rebuild of outliers,
    then every atom free. Without a map (geometry only) the model is regularised in place.

    The output model carries the validation figures before and after (map CC, map-model
    FSC, Q-score, bond and angle RMSZ, clashscore, Ramachandran and rotamer outliers) as
    attributes ``_cryogmm_before_*`` / ``_cryogmm_after_*``; the summary and the viewer show
    them.
    """
    _label = "refine atomic model"
    _devStatus = BETA
    _possibleOutputs = OUTPUTS

    SIMILARITIES = ["relative-entropy", "cross-correlation", "inner-product", "fsc", "frc"]

    def _defineParams(self, form):
        form.addSection(label="Input")
        form.addParam("inputAtomStruct", params.PointerParam, pointerClass="AtomStruct",
                      important=True, label="Atomic model", help="PDB or mmCIF.")
        form.addParam("geometryOnly", params.BooleanParam, default=False,
                      label="Geometry only (no map)?",
                      help="Regularise the model without a map: a 0.15 Å harmonic tether "
                           "keeps every atom near its start.")
        form.addParam("inputVolume", params.PointerParam, pointerClass="Volume",
                      condition="not geometryOnly", allowsNull=True, label="Map",
                      help="MRC map in the model's frame (its header origin places it); "
                           "its sampling rate must be set.")
        form.addParam("resolution", params.FloatParam, default=4.0,
                      condition="not geometryOnly", label="Map resolution (Å)",
                      help="Sets the width of each atom's Gaussian; at least twice the "
                           "map's sampling rate.")
        form.addParam("reference", params.PointerParam, pointerClass="AtomStruct",
                      allowsNull=True, expertLevel=params.LEVEL_ADVANCED,
                      label="Reference model (optional)",
                      help="A model of the same chain(s) to report the Cα RMSD against "
                           "(e.g. the truth in a benchmark).")

        form.addSection(label="Refinement")
        form.addParam("similarity", params.EnumParam, choices=self.SIMILARITIES, default=3,
                      condition="not geometryOnly", label="Map similarity",
                      help="fsc (default; mean FSC up to the resolution), frc (mean FRC of "
                           "projections), or relative-entropy, cross-correlation, inner-product "
                           "(Blau & Lindahl). On adenylate kinase (closed into the open form's "
                           "4 Å map) fsc reached a Cα RMSD of 0.29 Å, relative-entropy 0.62 Å.")
        line = form.addLine("Stages", condition="not geometryOnly",
                            help="Run in this order; each optional.")
        line.addParam("stageRigid", params.BooleanParam, default=True, label="rigid patches")
        line.addParam("stageResidue", params.BooleanParam, default=True, label="residues")
        line.addParam("stageRotamers", params.BooleanParam, default=True, label="rotamers")
        line.addParam("stageFull", params.BooleanParam, default=True, label="all atoms")
        form.addParam("rounds", params.IntParam, default=3, condition="not geometryOnly",
                      validators=[params.Positive], expertLevel=params.LEVEL_ADVANCED,
                      label="Rotamer + all-atom rounds",
                      help="How many times the rotamer and all-atom stages run (3, as refine-model's "
                           "default; 1 with 50 steps is about a third of the time).")
        form.addParam("patches", params.IntParam, default=64, condition="not geometryOnly",
                      validators=[params.Positive], expertLevel=params.LEVEL_ADVANCED,
                      label="Rigid patches")
        form.addParam("steps", params.IntParam, default=100, validators=[params.Positive],
                      expertLevel=params.LEVEL_ADVANCED, label="Steps per phase")
        form.addParam("geometryWeight", params.FloatParam, default=1.0,
                      expertLevel=params.LEVEL_ADVANCED, label="Geometry weight factor",
                      help="Multiplies the automatic geometry weight.")
        form.addParam("seed", params.IntParam, default=0,
                      expertLevel=params.LEVEL_ADVANCED, label="Random seed")
        self._defineComputeParams(form)

    # --------------------------- INSERT steps functions ----------------------
    def _insertAllSteps(self):
        self._insertFunctionStep(self.refineStep, needsGPU=True)
        self._insertFunctionStep(self.createOutputStep, needsGPU=False)

    def refineStep(self):
        args = [self.inputAtomStruct.get().getFileName(), "--out", self._getRefineDir(),
                "--steps", self.steps.get(), "--geometry-weight", self.geometryWeight.get(),
                "--seed", self.seed.get()]
        if self.geometryOnly:
            args.append("--geometry-only")
        else:
            args += ["--map", mapFile(self.inputVolume.get()),
                     "--resolution", self.resolution.get(),
                     "--similarity", self.SIMILARITIES[self.similarity.get()],
                     "--patches", self.patches.get(),
                     "--stages"] + self._stages()
        if self.reference.get() is not None:
            args += ["--reference", self.reference.get().getFileName()]
        self._runEngine("refine-model", args)

    def createOutputStep(self):
        src = self.inputAtomStruct.get().getFileName()
        ext = ".cif" if src.lower().endswith((".cif", ".mmcif")) else ".pdb"
        model = AtomStruct(filename=os.path.join(self._getRefineDir(), "refined" + ext))
        if not self.geometryOnly:
            model.setVolume(self.inputVolume.get())
        report = readReport(self._getRefineDir())
        for key, suffix, _, fmt in FIGURES:
            for when in ("before", "after"):
                value = report.get(when, {}).get(key)
                if value is not None:
                    setattr(model, "_cryogmm_%s_%s" % (when, suffix),
                            Integer(int(value)) if fmt == "d" else Float(float(value)))
        model._cryogmm_rmsMovedA = Float(report.get("rms_moved_A"))
        self._defineOutputs(**{OUT_MODEL: model})
        self._defineSourceRelation(self.inputAtomStruct, model)
        if not self.geometryOnly:
            self._defineSourceRelation(self.inputVolume, model)

    # --------------------------- INFO functions ------------------------------
    def _validate(self):
        errors = []
        model = self.inputAtomStruct.get()
        if model is not None and not os.path.exists(model.getFileName()):
            errors.append("The atomic model file %s does not exist." % model.getFileName())
        if self.geometryOnly:
            return errors
        vol = self.inputVolume.get()
        if vol is None:
            return errors + ["Choose a map, or set 'Geometry only'."]
        apix = vol.getSamplingRate()
        if apix is None or apix <= 0:
            errors.append("The map has no sampling rate set: import it with its sampling "
                          "rate (Å/px).")
        elif self.resolution.get() < 2 * apix:
            errors.append("The resolution (%.2f Å) must be at least twice the map's "
                          "sampling rate (%.2f Å/px)." % (self.resolution.get(), apix))
        if not isMrc(mapFile(vol)):
            errors.append("The map must be an MRC file, got %s." % mapFile(vol))
        if not self._stages():
            errors.append("Choose at least one stage.")
        return errors

    def _summary(self):
        if not self.hasAttribute(OUT_MODEL):
            return ["Output not ready yet."]
        report = readReport(self._getRefineDir())
        mode = ("geometry only" if report.get("geometry_only") else
                "into the map at %s Å (%s; stages %s)" % (
                    self._fmt(report.get("resolution_A")), report.get("similarity"),
                    " ".join(report.get("stages") or [])))
        lines = ["Refined %s: atoms moved %s Å RMS in %.0f s." % (
            mode, self._fmt(report.get("rms_moved_A")), report.get("seconds", 0.0))]
        lines += ["%s: %s -> %s" % (label, self._fmt(b, fmt), self._fmt(a, fmt))
                  for label, b, a, fmt in figureRows(report)]
        return lines

    def _methods(self):
        if not self.hasAttribute(OUT_MODEL):
            return []
        report = readReport(self._getRefineDir())
        if report.get("geometry_only"):
            return ["The atomic model's geometry was regularised with cryogmm (bonds, "
                    "angles, planarity, chirality, Ramachandran, rotamer and clash terms)."]
        return ["The atomic model was refined into the map at %s Å with cryogmm, maximising "
                "the %s between the map and the model's Gaussian density [Blau2023] under "
                "differentiable stereochemical restraints, stages %s [Chen2022model]." % (
                    self._fmt(report.get("resolution_A")), report.get("similarity"),
                    ", ".join(report.get("stages") or []))]

    def _citations(self):
        return ["Blau2023", "Chen2022model"]

    # --------------------------- UTILS functions -----------------------------
    def _stages(self):
        first = [name for name, on in (("rigid", self.stageRigid), ("residue", self.stageResidue)) if on.get()]
        late = [name for name, on in (("rotamers", self.stageRotamers), ("full", self.stageFull)) if on.get()]
        return first + late * max(1, int(self.rounds.get() or 1))

    def _getRefineDir(self):
        return self._getExtraPath("refine")

    def getReport(self):
        return readReport(self._getRefineDir())
