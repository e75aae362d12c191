"""An atomic model series from a series of maps: ``cryogmm refine-series`` as a Scipion
protocol."""

import os

import numpy as np

import pyworkflow.protocol.params as params
from pyworkflow.constants import BETA
from pyworkflow.object import Float, Integer
from pwem.objects import AtomStruct, SetOfAtomStructs
from pwem.protocols import EMProtocol

from ..convert import isMrc, mapFile, readReport
from .protocol_base import CryoGmmBase

OUT_SERIES = "outputAtomStructs"
OUT_MAP_FRAMES = "outputMapAtomStructs"
OUTPUTS = {OUT_SERIES: SetOfAtomStructs, OUT_MAP_FRAMES: SetOfAtomStructs}
LATENT_ATTR = "_cryogmmPC"  # set on the heterogeneity protocol's trajectory volumes


class CryoGmmProtModelSeries(CryoGmmBase, EMProtocol):
    """Build a series of atomic models from a series of maps (e.g. maps along a
    heterogeneity trajectory), run by the cryogmm engine.

    One small network maps a latent coordinate to the model's coordinates (rigid motions of
    k-means patches blended per residue, plus per-atom residuals). It is trained on all maps
    at once: each map pulls the model decoded at its own latent (relative entropy or another
    similarity) while the stereochemical restraints of the model refinement keep every
    frame, including those between the maps, clean. Frames are placed evenly along the
    latent path through the maps and each gets a short geometry polish.

    Outputs: the series (SetOfAtomStructs, one model per frame, in order along the path) and
    the frame at each map's own latent (SetOfAtomStructs, one per input map, overlaying it).
    Per-frame geometry and per-map fit figures are kept as attributes (``_cryogmm_*``).
    """
    _label = "atomic model series"
    _devStatus = BETA
    _possibleOutputs = OUTPUTS

    SIMILARITIES = ["relative-entropy", "cross-correlation", "inner-product", "fsc", "frc"]

    def _defineParams(self, form):
        form.addSection(label="Input")
        form.addParam("inputVolumes", params.PointerParam, pointerClass="SetOfVolumes",
                      important=True, label="Maps (in trajectory order)",
                      help="At least two maps with the same box and sampling rate, in the "
                           "order of the motion (the set's order), e.g. the maps of a "
                           "heterogeneity run along one principal component.")
        form.addParam("inputAtomStruct", params.PointerParam, pointerClass="AtomStruct",
                      important=True, label="Starting model",
                      help="PDB or mmCIF in the maps' frame (their header origin).")
        form.addParam("resolution", params.FloatParam, default=4.0,
                      label="Map resolution (Å)",
                      help="At least twice the maps' sampling rate.")
        form.addParam("frames", params.IntParam, default=20, label="Frames",
                      help="Models in the output series, evenly along the latent path "
                           "(at least 2).")
        form.addParam("useLatent", params.BooleanParam, default=True,
                      label="Use the maps' latent coordinates?",
                      help="When every map carries a trajectory coordinate (the "
                           "heterogeneity protocol's maps do, _cryogmmPC), use it as the "
                           "latent of that map; otherwise (or No) the maps are spread "
                           "evenly over [0, 1] in their order.")
        form.addParam("references", params.PointerParam, pointerClass="SetOfAtomStructs",
                      allowsNull=True, expertLevel=params.LEVEL_ADVANCED,
                      label="Reference models (optional)",
                      help="One model per map, in the same order, to report the Cα RMSD "
                           "of each map's frame against (benchmarks).")

        form.addSection(label="Refinement")
        form.addParam("similarity", params.EnumParam, choices=self.SIMILARITIES, default=3,
                      label="Map similarity")
        form.addParam("steps", params.IntParam, default=60, validators=[params.Positive],
                      expertLevel=params.LEVEL_ADVANCED, label="Steps per phase")
        form.addParam("capture", params.BooleanParam, default=True,
                      expertLevel=params.LEVEL_ADVANCED, label="Per-map capture first?",
                      help="Fit each map with the model refinement first, along a "
                           "curriculum from the map the starting model fits best outwards "
                           "(each warm-started from its neighbour's model), and fit the "
                           "network to these models before its map training. No: the "
                           "network alone, on blurred maps first.")
        form.addParam("captureSteps", params.IntParam, default=30, condition="capture",
                      validators=[params.Positive], expertLevel=params.LEVEL_ADVANCED,
                      label="Capture steps per phase")
        form.addParam("patches", params.IntParam, default=24, validators=[params.Positive],
                      expertLevel=params.LEVEL_ADVANCED, label="Patches of the coarse motion")
        form.addParam("polishIters", params.IntParam, default=40,
                      expertLevel=params.LEVEL_ADVANCED,
                      label="Geometry polish per frame", help="Iterations; 0: none.")
        form.addParam("geometryWeight", params.FloatParam, default=1.0,
                      expertLevel=params.LEVEL_ADVANCED, label="Geometry weight factor")
        form.addParam("seed", params.IntParam, default=0,
                      expertLevel=params.LEVEL_ADVANCED, label="Random seed")
        self._defineComputeParams(form)

    # --------------------------- INSERT steps functions ----------------------
    def _insertAllSteps(self):
        self._insertFunctionStep(self.seriesStep, needsGPU=True)
        self._insertFunctionStep(self.createOutputStep, needsGPU=False)

    def seriesStep(self):
        vols = self._volumes()
        args = [self.inputAtomStruct.get().getFileName(),
                "--maps"] + [mapFile(v) for v in vols] + [
                "--resolution", self.resolution.get(), "--frames", self.frames.get(),
                "--out", self._getSeriesDir(),
                "--similarity", self.SIMILARITIES[self.similarity.get()],
                "--steps", self.steps.get(), "--patches", self.patches.get(),
                "--polish-iters", self.polishIters.get(),
                "--geometry-weight", self.geometryWeight.get(), "--seed", self.seed.get()]
        if self.capture:
            args += ["--capture-steps", self.captureSteps.get()]
        else:
            args.append("--no-capture")
        latent = self._latents(vols)
        if latent is not None:
            path = self._getExtraPath("latent.txt")
            np.savetxt(path, latent, fmt="%.6f")
            args += ["--latent", path]
        if self.references.get() is not None:
            args += ["--references"] + [s.getFileName() for s in
                                        self.references.get().iterItems(orderBy="id")]
        self._runEngine("refine-series", args)

    def createOutputStep(self):
        d = self._getSeriesDir()
        report = readReport(d)
        series = self._createSetOfPDBs("series")
        for row in report["per_frame"]:
            st = AtomStruct(filename=os.path.join(d, "frame_%02d.pdb" % row["frame"]))
            st.setObjComment("frame %d of %d" % (row["frame"], report["frames"]))
            for key in ("bond_rmsz", "angle_rmsz", "clashscore", "rama_outlier_pct"):
                if row.get(key) is not None:
                    setattr(st, "_cryogmm_%s" % key, Float(row[key]))
            st._cryogmm_frame = Integer(row["frame"])
            series.append(st)
        atMaps = self._createSetOfPDBs("maps")
        for i, (row, vol) in enumerate(zip(report["per_map"], self._volumes())):
            st = AtomStruct(filename=os.path.join(d, "map_%02d.pdb" % (i + 1)))
            st.setVolume(vol.clone())
            st._cryogmm_mapCC = Float(row["frame"].get("map_cc_mask"))
            st._cryogmm_startMapCC = Float(row["start"].get("map_cc_mask"))
            if row.get("ca_rmsd_to_reference_A") is not None:
                st._cryogmm_caRmsdRef = Float(row["ca_rmsd_to_reference_A"])
                st._cryogmm_startCaRmsdRef = Float(row["start_ca_rmsd_to_reference_A"])
            atMaps.append(st)
        self._defineOutputs(**{OUT_SERIES: series, OUT_MAP_FRAMES: atMaps})
        for out in (series, atMaps):
            self._defineSourceRelation(self.inputVolumes, out)
            self._defineSourceRelation(self.inputAtomStruct, out)

    # --------------------------- INFO functions ------------------------------
    def _validate(self):
        errors = []
        vols = self.inputVolumes.get()
        model = self.inputAtomStruct.get()
        if model is not None and not os.path.exists(model.getFileName()):
            errors.append("The starting model file %s does not exist." % model.getFileName())
        if vols is None:
            return errors
        vlist = self._volumes()
        if len(vlist) < 2:
            errors.append("A series needs at least two maps, got %d." % len(vlist))
        apix = vols.getSamplingRate()
        samplings = sorted({round(v.getSamplingRate() or 0, 4) for v in vlist})
        dims = sorted({v.getDim() for v in vlist if v.getDim()})
        if not apix or apix <= 0 or 0 in samplings:
            errors.append("The maps have no sampling rate set.")
        elif len(samplings) > 1:
            errors.append("The maps have different sampling rates (%s Å/px): resample them "
                          "to one." % ", ".join("%g" % s for s in samplings))
        elif self.resolution.get() < 2 * apix:
            errors.append("The resolution (%.2f Å) must be at least twice the maps' "
                          "sampling rate (%.2f Å/px)." % (self.resolution.get(), apix))
        if len(dims) > 1:
            errors.append("The maps have different boxes (%s)." %
                          ", ".join("%dx%dx%d" % d for d in dims))
        bad = [mapFile(v) for v in vlist if not isMrc(mapFile(v))]
        if bad:
            errors.append("The maps must be MRC files, got %s." % bad[0])
        if self.frames.get() < 2:
            errors.append("Frames must be at least 2.")
        refs = self.references.get()
        if refs is not None and refs.getSize() != len(vlist):
            errors.append("Give one reference model per map (%d maps, %d references)." %
                          (len(vlist), refs.getSize()))
        return errors

    def _summary(self):
        if not self.hasAttribute(OUT_SERIES):
            return ["Output not ready yet."]
        r = readReport(self._getSeriesDir())
        lines = ["%d frames from %d maps at %s Å (%s, latent in %d dimension(s); %.0f s)." % (
            r["frames"], len(r["maps"]), self._fmt(r["resolution_A"]), r["similarity"],
            r["latent_dim"], r["seconds"]["total"])]
        lines.append("Every frame passes the geometry goals: %s; every map's frame: %s." % (
            "yes" if r.get("all_frames_pass_goals") else "no",
            "yes" if r.get("all_map_frames_pass_goals") else "no"))
        for i, row in enumerate(r["per_map"]):
            line = "Map %d: map CC %s -> %s" % (i + 1, self._fmt(row["start"].get("map_cc_mask"), ".3f"),
                                                self._fmt(row["frame"].get("map_cc_mask"), ".3f"))
            if row.get("ca_rmsd_to_reference_A") is not None:
                line += ", Cα RMSD to reference %s -> %s Å" % (
                    self._fmt(row["start_ca_rmsd_to_reference_A"]),
                    self._fmt(row["ca_rmsd_to_reference_A"]))
            lines.append(line + " (start -> its frame).")
        return lines

    def _methods(self):
        if not self.hasAttribute(OUT_SERIES):
            return []
        r = readReport(self._getSeriesDir())
        return ["A series of %d atomic models was built from %d maps at %s Å with cryogmm: one "
                "network mapping a latent coordinate to the model's coordinates was fitted to "
                "all maps at once under stereochemical restraints [Chen2022model; Blau2023]." % (
                    r["frames"], len(r["maps"]), self._fmt(r["resolution_A"]))]

    def _citations(self):
        return ["Chen2022model", "Blau2023"]

    # --------------------------- UTILS functions -----------------------------
    def _volumes(self):
        return [v.clone() for v in self.inputVolumes.get().iterItems(orderBy="id")]

    def _latents(self, vols):
        if not self.useLatent:
            return None
        values = [v.getAttributeValue(LATENT_ATTR) for v in vols]
        if any(x is None for x in values):
            return None
        return np.array(values, dtype=float)[:, None]

    def _getSeriesDir(self):
        return self._getExtraPath("series")
