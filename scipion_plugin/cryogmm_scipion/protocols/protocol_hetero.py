"""Heterogeneity from an atomic model: ``cryogmm hetero train`` + ``analyze`` as a Scipion
protocol."""

import os

import numpy as np

import pyworkflow.protocol.params as params
from pyworkflow.constants import BETA
from pyworkflow.object import Float, Integer
from pwem.objects import (AtomStruct, SetOfAtomStructs, SetOfParticles, SetOfVolumes,
                          Volume)
from pwem.objects.data_flexhub import ParticleFlex, SetOfParticlesFlex
from pwem.protocols import ProtAnalysis3D

from ..constants import ATTR_CLUSTER, FLEX_PROGRAM
from ..convert import (readReport, readStarRows, splitModels, writeParticlesStar,
                       mapFile, volumeOriginFromMrc)
from .protocol_base import CryoGmmBase

OUT_PARTICLES = "outputParticles"
# per principal component N (1-based) and per cluster K (0-based)
OUT_TRAJ = "outputTrajectoryPC%d"
OUT_MAPS = "outputVolumesPC%d"
OUT_BACKPROJ = "outputBackprojPC%d"
OUT_CLUSTER = "outputParticlesCluster%d"
OUT_KEPT = "outputParticlesKept"
OUT_REJECTED = "outputParticlesRejected"
OUT_STATES = "outputCrossvalModelsHalf%d"
OUTPUTS = {OUT_PARTICLES: SetOfParticlesFlex, OUT_TRAJ % 1: SetOfAtomStructs,
           OUT_MAPS % 1: SetOfVolumes, OUT_BACKPROJ % 1: SetOfVolumes,
           OUT_CLUSTER % 0: SetOfParticles, OUT_KEPT: SetOfParticles,
           OUT_REJECTED: SetOfParticles, OUT_STATES % 1: SetOfAtomStructs}
RANDOM_SUBSET = "_rlnRandomSubset"


class CryoGmmProtHetero(CryoGmmBase, ProtAnalysis3D):
    """Continuous heterogeneity from an atomic model (a variational auto-encoder whose decoder
    moves the model), run by the cryogmm engine.

    Each particle image (with its consensus pose and CTF) is encoded to a latent vector z;
    the decoder moves a coarse Gaussian model of the input structure: either learned
    segments of the chain moved as rigid bodies (cryoSPHERE, Ducrocq et al.) or an offset
    per residue held together by bond, side-chain, clash and elastic restraints (atomic VAE,
    Zhong et al.). The CTF-modulated projection of the moved model is compared with the
    image in Fourier space up to the low-pass resolution.

    Outputs: the particles with their latent coordinates (pwem's flexibility convention:
    ``getZFlex()`` = z, ``getZRed()`` = its principal-component coordinates; the k-means
    cluster in ``_cryogmmCluster``), for every principal component a trajectory of atomic
    models (SetOfAtomStructs, one per frame), maps of the decoded models and back-projections
    of the particles nearest each frame (SetOfVolumes), and one particle subset per latent
    cluster. The free-energy landscape over the first two principal components (kT) comes with
    the analysis. With half-set cross-validation (the particles' rlnRandomSubset) each half
    trains its own network and every latent state's model from one half is scored against the
    map back-projected from the other half's particles of that state (map-model FSC, masked):
    the state models of each half (one AtomStruct per state) and the per-state table, with
    states flagged whose model the independent half does not support. With a junk threshold
    the particles that fit their decoded model worst are split off: kept and rejected subsets.
    """
    _label = "heterogeneity (atomic model)"
    _devStatus = BETA
    _possibleOutputs = OUTPUTS

    DECODERS = ["segments", "displacement"]
    LOSSES = ["gaussian", "correlation"]

    # --------------------------- DEFINE param functions ----------------------
    def _defineParams(self, form):
        form.addSection(label="Input")
        form.addParam("inputParticles", params.PointerParam,
                      pointerClass="SetOfParticles", important=True,
                      label="Input particles",
                      help="Particles with CTF and a 3D alignment from a consensus "
                           "refinement; the latent space describes what the consensus "
                           "pose and the model do not.")
        form.addParam("inputAtomStruct", params.PointerParam, pointerClass="AtomStruct",
                      important=True, label="Atomic model",
                      help="The reference conformation (PDB/mmCIF) overlaying the "
                           "consensus map. Its electron-weighted centre is put at the box "
                           "centre unless the consensus map is given below.")
        form.addParam("inputVolume", params.PointerParam, pointerClass="Volume",
                      allowsNull=True, label="Consensus map (optional)",
                      help="The map the model was fitted in: its header origin places the "
                           "model in the particles' box. Same box and sampling rate as "
                           "the particles.")

        form.addSection(label="Network")
        form.addParam("decoder", params.EnumParam, choices=self.DECODERS, default=0,
                      display=params.EnumParam.DISPLAY_HLIST, label="Decoder",
                      help="segments: learned segments of the chain, each moved as a rigid "
                           "body per particle (cryoSPHERE). displacement: an offset per "
                           "residue Gaussian with Cα-bond, side-chain, clash and elastic "
                           "restraints (atomic VAE).")
        form.addParam("segments", params.IntParam, default=20, condition="decoder == 0",
                      validators=[params.Positive], label="Number of segments")
        form.addParam("perChain", params.BooleanParam, default=False,
                      condition="decoder == 0", expertLevel=params.LEVEL_ADVANCED,
                      label="Segments within chains",
                      help="Segments never span two chains.")
        form.addParam("zdim", params.IntParam, default=8, validators=[params.Positive],
                      label="Latent dimensions")
        form.addParam("epochs", params.IntParam, default=20, validators=[params.Positive],
                      label="Epochs")
        form.addParam("lowpassA", params.FloatParam, default=8.0,
                      validators=[params.Positive], label="Low-pass resolution (Å)",
                      help="Highest resolution used; the images are Fourier-cropped to it "
                           "(at least twice the sampling rate).")
        form.addParam("batch", params.IntParam, default=64, validators=[params.Positive],
                      expertLevel=params.LEVEL_ADVANCED, label="Particles per batch")
        form.addParam("loss", params.EnumParam, choices=self.LOSSES, default=0,
                      expertLevel=params.LEVEL_ADVANCED, label="Data term",
                      help="gaussian: Gaussian likelihood (atomic VAE); correlation: "
                           "image correlation (cryoSPHERE).")
        form.addParam("gaussians", params.EnumParam, choices=["ca", "residue2"], default=0,
                      expertLevel=params.LEVEL_ADVANCED, label="Coarse model",
                      help="ca: one Gaussian per residue; residue2: backbone + side chain.")
        form.addParam("drawAtoms", params.BooleanParam, default=False,
                      expertLevel=params.LEVEL_ADVANCED, label="Compare with every atom?",
                      help="Compare the images with every atom of the reference moved by the "
                           "deformation (finer conformational order, several times the work) "
                           "instead of the coarse model.")
        form.addParam("posteriorCandidates", params.IntParam, default=32,
                      validators=[params.GE(0)], expertLevel=params.LEVEL_ADVANCED,
                      label="Posterior candidates",
                      help="Read each particle's latent as its posterior mean over this many "
                           "k-means centres of all particles' latents (what its image supports "
                           "among the states the data hold); 0: the polished (MAP) latents.")
        form.addParam("klWarmup", params.IntParam, default=-1,
                      expertLevel=params.LEVEL_ADVANCED,
                      label="KL warm-up epochs", help="-1: the engine's default.")
        form.addParam("beta", params.FloatParam, default=1.0,
                      expertLevel=params.LEVEL_ADVANCED, label="KL weight (beta)")
        form.addParam("lr", params.FloatParam, default=1e-3,
                      expertLevel=params.LEVEL_ADVANCED, label="Learning rate")
        form.addParam("hidden", params.IntParam, default=256,
                      expertLevel=params.LEVEL_ADVANCED, label="Network width")
        form.addParam("maxParticles", params.IntParam, default=0,
                      expertLevel=params.LEVEL_ADVANCED, label="Use only the first N",
                      help="0: all particles.")
        form.addParam("seed", params.IntParam, default=0,
                      expertLevel=params.LEVEL_ADVANCED, label="Random seed")
        form.addParam("halves", params.BooleanParam, default=False,
                      label="Half-set cross-validation",
                      help="Train one network per half set (the particles' rlnRandomSubset, "
                           "as a RELION 3D refinement leaves it) and score every latent "
                           "state's model from each half against the map back-projected "
                           "from the other half's particles of that state.")

        form.addSection(label="Analysis")
        form.addParam("pcs", params.IntParam, default=2, validators=[params.Positive],
                      label="Principal components",
                      help="Trajectories along this many principal components of z.")
        form.addParam("frames", params.IntParam, default=10, label="Frames per trajectory",
                      help="Points from the 5th to the 95th percentile along each PC.")
        form.addParam("clusters", params.IntParam, default=4, validators=[params.Positive],
                      label="Clusters", help="k-means clusters in latent space; each "
                                             "becomes a particle subset.")
        form.addParam("backproject", params.BooleanParam, default=True,
                      label="Back-project along trajectories",
                      help="Also reconstruct the particles nearest each trajectory point "
                           "(a map from the data, next to the decoded model's map).")
        form.addParam("junk", params.FloatParam, default=0.0,
                      label="Junk threshold (robust SDs)",
                      help="Reject the particles whose fit score (log-likelihood gain under "
                           "their decoded model) lies more than this many robust standard "
                           "deviations below the median (e.g. 3): kept and rejected subsets. "
                           "0: no rejection.")

        self._defineComputeParams(form)

    # --------------------------- INSERT steps functions ----------------------
    def _insertAllSteps(self):
        self._insertFunctionStep(self.convertInputStep, needsGPU=False)
        self._insertFunctionStep(self.trainStep, needsGPU=True)
        self._insertFunctionStep(self.analyzeStep, needsGPU=True)
        self._insertFunctionStep(self.createOutputStep, needsGPU=False)

    # --------------------------- STEPS functions -----------------------------
    def convertInputStep(self):
        writeParticlesStar(self.inputParticles.get(), self._getExtraPath("particles.star"),
                           self._getExtraPath())

    def trainStep(self):
        args = [self._getExtraPath("particles.star"),
                "--model", self.inputAtomStruct.get().getFileName(),
                "--out", self.getRunDir(),
                "--project-dir", self._projectDir(),
                "--decoder", self.DECODERS[self.decoder.get()],
                "--zdim", self.zdim.get(), "--epochs", self.epochs.get(),
                "--batch", self.batch.get(), "--lowpass-A", self.lowpassA.get(),
                "--loss", self.LOSSES[self.loss.get()],
                "--gaussians", ["ca", "residue2"][self.gaussians.get()],
                "--draw", "atoms" if self.drawAtoms else "coarse",
                "--posterior-candidates", self.posteriorCandidates.get(),
                "--beta", self.beta.get(), "--lr", self.lr.get(),
                "--hidden", self.hidden.get(), "--seed", self.seed.get()]
        if self.decoder.get() == 0:
            args += ["--segments", self.segments.get()]
            if self.perChain:
                args.append("--per-chain")
        if self.klWarmup.get() >= 0:
            args += ["--kl-warmup", self.klWarmup.get()]
        if self.maxParticles.get() > 0:
            args += ["--max-particles", self.maxParticles.get()]
        if self.inputVolume.get() is not None:
            args += ["--map", mapFile(self.inputVolume.get())]
        if self.halves:
            args.append("--halves")
        self._runEngine("hetero train", args)

    def analyzeStep(self):
        args = [self.getRunDir(), "--out", self._getAnalyzeDir(),
                "--project-dir", self._projectDir(),
                "--pcs", self.pcs.get(), "--frames", self.frames.get(),
                "--clusters", self.clusters.get(), "--seed", self.seed.get()]
        if not self.backproject:
            args.append("--no-backproject")
        if self.junk.get() > 0:
            args += ["--junk", self.junk.get()]
        self._runEngine("hetero analyze", args)

    def createOutputStep(self):
        inputSet = self.inputParticles.get()
        apix = inputSet.getSamplingRate()
        an = self._getAnalyzeDir()
        report = readReport(an)

        # latent coordinates by rlnImageId
        z, order = {}, []
        for r in readStarRows(os.path.join(an, "particles_latent.star")):
            z[int(r.rlnImageId)] = [float(getattr(r, "rlnCryogmmLatent%d" % k))
                                    for k in range(self.zdim.get())]
            order.append(int(r.rlnImageId))
        missing = [p.getObjId() for p in inputSet.iterItems() if p.getObjId() not in z]
        if self.maxParticles.get() <= 0 and missing:
            raise ValueError("particles_latent.star lacks %d input particles (first id %d)"
                             % (len(missing), missing[0]))
        # the engine's own principal components (pca.npz, rows in particles_latent.star order)
        _, _, proj, _ = enginePcs(an)
        zred = {pid: proj[j].tolist() for j, pid in enumerate(order)}
        cluster = {}
        for c in report.get("clusters", []):
            for r in readStarRows(os.path.join(an, c["star"])):
                cluster[int(r.rlnImageId)] = int(c["cluster"])

        outSet = SetOfParticlesFlex(filename=self._getPath("particles_flex.sqlite"),
                                    progName=FLEX_PROGRAM)
        outSet.copyInfo(inputSet)  # sampling, acquisition, alignment (another set class)
        outSet.setHasCTF(inputSet.hasCTF())
        outSet.setAlignment(inputSet.getAlignment())
        info = outSet.getFlexInfo()
        info.setAttr("zdim", int(self.zdim.get()))
        info.setAttr("decoder", self.DECODERS[self.decoder.get()])
        info.setAttr("runDir", os.path.abspath(self.getRunDir()))
        info.setAttr("pcaExplainedVariance",
                     [float(v) for v in report.get("pca_explained_variance", [])])
        for part in inputSet.iterItems():
            pid = part.getObjId()
            if pid not in z:
                continue
            flex = ParticleFlex(progName=FLEX_PROGRAM)
            flex.copyInfo(part)
            flex.setObjId(pid)
            flex.setZFlex(z[pid])
            flex.setZRed(zred[pid])
            setattr(flex, ATTR_CLUSTER, Integer(cluster.get(pid, -1)))
            outSet.append(flex)
        outputs = {OUT_PARTICLES: outSet}

        for name, traj in sorted(report.get("trajectories", {}).items()):
            k = int(name[2:])
            pdbs = splitModels(os.path.join(an, "%s_trajectory.pdb" % name),
                               self._getExtraPath("trajectories", name))
            structs = self._createSetOfPDBs("PC%d" % k)
            for f, pdb in enumerate(pdbs):
                st = AtomStruct(filename=pdb)
                st.setObjComment("PC%d frame %d, t = %.3f" % (k, f, traj["t"][f]))
                setattr(st, "_cryogmmPC", Float(traj["t"][f]))
                structs.append(st)
            outputs[OUT_TRAJ % k] = structs
            for tag, out in (("model", OUT_MAPS), ("backproj", OUT_BACKPROJ)):
                files = [os.path.join(an, "%s_%s_%02d.mrc" % (name, tag, f))
                         for f in range(len(traj["t"]))]
                if not os.path.exists(files[0]):
                    continue
                vols = self._createSetOfVolumes("%s_PC%d" % (tag, k))
                vols.setSamplingRate(apix)
                for f, fn in enumerate(files):
                    if not os.path.exists(fn):  # too few particles near that frame
                        continue
                    vol = Volume(location=fn)
                    vol.setSamplingRate(apix)
                    vol.setOrigin(volumeOriginFromMrc(fn))
                    setattr(vol, "_cryogmmPC", Float(traj["t"][f]))
                    setattr(vol, "_cryogmmParticles",
                            Integer(traj["particles_per_frame"][f]))
                    vols.append(vol)
                outputs[out % k] = vols

        for c in report.get("clusters", []):
            members = {pid for pid, lab in cluster.items() if lab == c["cluster"]}
            sub = self._createSetOfParticles("cluster%d" % c["cluster"])
            sub.copyInfo(inputSet)
            sub.copyItems(inputSet, updateItemCallback=_keepOnly(members, c["cluster"]))
            outputs[OUT_CLUSTER % c["cluster"]] = sub

        junk = report.get("junk")
        if junk:
            for key, out in (("kept", OUT_KEPT), ("rejected", OUT_REJECTED)):
                members = ({int(r.rlnImageId) for r in readStarRows(os.path.join(an, junk[key]["star"]))}
                           if junk[key]["n"] else set())
                sub = self._createSetOfParticles(key)
                sub.copyInfo(inputSet)
                sub.copyItems(inputSet, updateItemCallback=_keepMembers(members))
                outputs[out] = sub

        cv = report.get("crossval")
        if cv:
            states = [st for st in cv["states"] if "skipped" not in st]
            for h in (1, 2):
                pdb = os.path.join(an, "crossval_models_half%d.pdb" % h)
                if not states or not os.path.exists(pdb):
                    continue
                pdbs = splitModels(pdb, self._getExtraPath("crossval", "half%d" % h))
                structs = self._createSetOfPDBs("crossval_half%d" % h)
                for st, f in zip(states, pdbs):
                    a = AtomStruct(filename=f)
                    a.setObjComment("state %d, half %d: model %d / own map %.3f, other map %.3f%s" % (
                        st["state"], h, h, st["model%d_vs_map%d" % (h, h)],
                        st["model%d_vs_map%d" % (h, 3 - h)],
                        "; flagged: " + ", ".join(st["flags"]) if st["flags"] else ""))
                    setattr(a, "_cryogmmState", Integer(st["state"]))
                    structs.append(a)
                outputs[OUT_STATES % h] = structs

        self._defineOutputs(**outputs)
        for name, obj in outputs.items():
            self._defineSourceRelation(self.inputParticles, obj)
            if not name.startswith("outputParticles"):
                self._defineSourceRelation(self.inputAtomStruct, obj)

    # --------------------------- INFO functions ------------------------------
    def _validate(self):
        parts = self.inputParticles.get()
        errors = self._validateParticles(parts, needAlignment=True)
        if self.inputAtomStruct.get() is None:
            errors.append("Choose the atomic model the decoder moves.")
        elif not os.path.exists(self.inputAtomStruct.get().getFileName()):
            errors.append("The atomic model file %s does not exist." %
                          self.inputAtomStruct.get().getFileName())
        if self.inputVolume.get() is not None:
            errors += self._validateMap("The consensus map", self.inputVolume.get(), parts)
        if parts is not None and self.lowpassA.get() < 2 * parts.getSamplingRate():
            errors.append("The low-pass resolution (%.2f Å) must be at least twice the "
                          "sampling rate (%.2f Å/px)." % (self.lowpassA.get(),
                                                          parts.getSamplingRate()))
        if self.pcs.get() > self.zdim.get():
            errors.append("Principal components (%d) cannot exceed the latent dimensions "
                          "(%d)." % (self.pcs.get(), self.zdim.get()))
        if self.frames.get() < 2:
            errors.append("Frames per trajectory must be at least 2.")
        if self.junk.get() < 0:
            errors.append("The junk threshold must be positive (or 0: no rejection).")
        if self.halves and parts is not None:
            first = parts.getFirstItem()
            if first is None or not first.hasAttribute(RANDOM_SUBSET):
                errors.append("Half-set cross-validation needs the particles' half sets "
                              "(rlnRandomSubset, e.g. from a RELION 3D refinement); the input "
                              "particles have none.")
        return errors

    def _summary(self):
        if not self.hasAttribute(OUT_PARTICLES):
            return ["Output not ready yet."]
        train = readReport(self.getRunDir())
        an = readReport(self._getAnalyzeDir())
        hist = train.get("history") or [{}]
        lines = ["%d particles, %s decoder, z in %d dimensions, %d epochs (%.0f s on %s); "
                 "data term %s -> %s." % (
                     an.get("n_particles", 0), an.get("decoder"), an.get("zdim", 0),
                     train.get("epochs", 0), train.get("seconds", 0.0),
                     train.get("device", "?"), self._fmt(hist[0].get("data"), ".1f"),
                     self._fmt(hist[-1].get("data"), ".1f"))]
        ev = an.get("pca_explained_variance", [])
        if ev:
            lines.append("PCA of z: explained variance %s." %
                         ", ".join("PC%d %.1f %%" % (i + 1, 100 * v) for i, v in enumerate(ev)))
        cl = an.get("clusters", [])
        if cl:
            lines.append("%d clusters: %s particles." %
                         (len(cl), " / ".join(str(c["n"]) for c in cl)))
        land = an.get("landscape")
        if land:
            lines.append("Free-energy landscape over %d PC(s): %d occupied bins, up to %.1f kT "
                         "(landscape.png)." % (land["dims"], land["occupied_bins"],
                                               land["max_free_energy_kT"]))
        junk = an.get("junk")
        if junk:
            lines.append("Junk (fit z > %g): %d rejected, %d kept." % (
                junk["threshold"], junk["rejected"]["n"], junk["kept"]["n"]))
        cv = an.get("crossval")
        if cv:
            lines += crossvalLines(cv)
        segs = an.get("segments")
        if segs:
            lines.append("Segments: %s." % ", ".join(
                "%s%d-%d" % (s["chain"], s["first"], s["last"]) for s in segs))
        return lines

    def _methods(self):
        if not self.hasAttribute(OUT_PARTICLES):
            return []
        ref = "[Ducrocq2025]" if self.decoder.get() == 0 else "[Zhong2021atomic]"
        return ["Conformational heterogeneity of %d particles was analysed with cryogmm: a "
                "variational auto-encoder with a %d-dimensional latent space and a %s "
                "decoder moving the atomic model %s was trained for %d epochs up to %.1f Å; "
                "trajectories were sampled along %d principal components of the latent "
                "space and the particles split into %d k-means clusters." % (
                    self.outputParticles.getSize(), self.zdim.get(),
                    self.DECODERS[self.decoder.get()], ref, self.epochs.get(),
                    self.lowpassA.get(), self.pcs.get(), self.clusters.get())]

    def _citations(self):
        return ["Ducrocq2025", "Zhong2021atomic", "Zhong2021", "Chen2021"]

    # --------------------------- UTILS functions -----------------------------
    def getRunDir(self):
        """The engine's training run (what ``refine-poses --hetero`` takes)."""
        return self._getExtraPath("run")

    def _getAnalyzeDir(self):
        return self._getExtraPath("analyze")


def enginePcs(analyzeDir):
    """The principal components ``hetero analyze`` computed (``pca.npz`` in its folder): mean [d],
    components [k, d], projection of every particle [n, k] (rows in ``particles_latent.star``
    order) and explained-variance ratios [k]. Read, never recomputed, so the PC signs and axes
    Scipion shows are those of the engine's trajectories."""
    d = np.load(os.path.join(analyzeDir, "pca.npz"))
    return d["mean"], d["components"], d["projection"], d["explained_variance"]


def projectOnPcs(x, mean, components):
    """Coordinates of latent points ``x`` [m, d] on the engine's principal axes."""
    return (np.asarray(x, dtype=float).reshape(-1, len(mean)) - mean) @ np.asarray(components).T

def crossvalLines(cv):
    """The summary of the per-state half-set cross-validation (report.json's ``crossval``)."""
    lines = ["Half-set cross-validation (mean masked map-model FSC to %.1f Å; "
             "model 1 on map 1 / map 2, model 2 on map 2 / map 1):" % cv["resolution_A"]]
    for st in cv["states"]:
        if "skipped" in st:
            lines.append("  state %d: skipped (%s)." % (st["state"], st["skipped"]))
            continue
        lines.append("  state %d (%d/%d particles): %.3f / %.3f, %.3f / %.3f%s" % (
            st["state"], st["n_half1"], st["n_half2"], st["model1_vs_map1"],
            st["model1_vs_map2"], st["model2_vs_map2"], st["model2_vs_map1"],
            " FLAGGED: " + ", ".join(st["flags"]) if st["flags"] else ""))
    lines.append("Flagged states: %s." % (", ".join(map(str, cv["flagged_states"])) or "none"))
    return lines


def _keepMembers(members):
    def update(item, _row=None):
        item._appendItem = item.getObjId() in members
    return update


def _keepOnly(members, label):
    def update(item, _row=None):
        item._appendItem = item.getObjId() in members
        setattr(item, ATTR_CLUSTER, Integer(label))
    return update
