"""Heterogeneity, conformation to orientation and model refinement end to end in a real
pyworkflow project, on tiny simulated data with known truth (made by tests/engine_data.py
in the engine's own environment).

Heterogeneity: adenylate kinase open -> closed over 10 frames, 300 particles, box 40 at
2.5 Å, SNR 1; 8 epochs of the segments decoder (8 segments, z in 2 dimensions). The latent
PC1 must follow the true frame (|Spearman| > 0.8) and the PC1 trajectory must move the
model. Model refinement: residues 1-25 of 1AKE shifted by 1.6 Å and jittered, refined into
the truth's 4 Å map: the Cα RMSD to the truth must drop.
"""

import os
import subprocess
import tempfile

import numpy as np
import pytest

pytest.importorskip("pwem")

from pyworkflow.tests import BaseTest, setupTestProject  # noqa: E402
from pwem.objects import AtomStruct, SetOfAtomStructs, SetOfParticles, SetOfVolumes, Volume  # noqa: E402,E501
from pwem.objects.data_flexhub import SetOfParticlesFlex  # noqa: E402
from pwem.protocols import (ProtImportPdb, ProtImportVolumes,  # noqa: E402
                            ProtImportMask)

from cryogmm_scipion import Plugin  # noqa: E402
from cryogmm_scipion.convert import readReport, readStarRows  # noqa: E402
from cryogmm_scipion.protocols import (CryoGmmProtHetero, CryoGmmProtModelSeries,  # noqa: E402
                                       CryoGmmProtRefineModel, CryoGmmProtRefinePoses)

from test_protocols import _skip_without_engine, _strip_columns, import_relion_star  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
N, BOX, APIX = 300, 40, 2.5


def engine_data(kind, out):
    cmd = Plugin.getCommand("python %s %s %s" % (os.path.join(HERE, "engine_data.py"), kind, out))
    subprocess.run(cmd, shell=True, check=True, env=Plugin.getEnviron(),
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def spearman(a, b):
    ra = np.argsort(np.argsort(a)).astype(float)
    rb = np.argsort(np.argsort(b)).astype(float)
    return float(np.corrcoef(ra, rb)[0, 1])


def ca_coords(pdb):
    with open(pdb) as f:
        return np.array([[float(line[30:38]), float(line[38:46]), float(line[46:54])]
                         for line in f if line.startswith("ATOM") and line[12:16].strip() == "CA"])


def atom_coords(pdb, name, resname=None):
    with open(pdb) as f:
        return np.array([[float(line[30:38]), float(line[38:46]), float(line[46:54])]
                         for line in f if line.startswith(("ATOM", "HETATM"))
                         and (name is None or line[12:16].strip() == name)
                         and (resname is None or line[17:20].strip() == resname)])


def atom_rmsd(a, b, name, resname=None):
    return float(np.sqrt(((atom_coords(a, name, resname) - atom_coords(b, name, resname)) ** 2).sum(1).mean()))


def ca_rmsd(a, b):
    return float(np.sqrt(((ca_coords(a) - ca_coords(b)) ** 2).sum(1).mean()))


class TestCryoGmmHeteroModel(BaseTest):
    @classmethod
    def setUpClass(cls):
        _skip_without_engine()
        setupTestProject(cls)
        cls.data = tempfile.mkdtemp(prefix="cryogmm-hm-")
        cls.het = os.path.join(cls.data, "het")
        cls.mod = os.path.join(cls.data, "model")
        engine_data("hetero", cls.het)
        engine_data("model", cls.mod)
        sim = os.path.join(cls.het, "sim")
        cls.truthFrame = {int(r.rlnImageId) if hasattr(r, "rlnImageId") else i + 1:
                          int(r.rlnCryogmmTrueFrame)
                          for i, r in enumerate(readStarRows(os.path.join(sim, "truth.star")))}
        cls.parts = cls.importStar(os.path.join(sim, "particles.star"), "hetero sim").outputParticles
        cls.map = cls.importVolume(os.path.join(sim, "truth_map.mrc"), APIX)
        cls.openModel = cls.importPdb(_engine_file("adk_open.pdb"))

    @classmethod
    def importStar(cls, star, label):
        return import_relion_star(cls, star, label, APIX)

    @classmethod
    def importVolume(cls, path, apix):
        prot = cls.newProtocol(ProtImportVolumes, filesPath=path, samplingRate=apix)
        cls.launchProtocol(prot)
        return prot.outputVolume

    @classmethod
    def importPdb(cls, path):
        prot = cls.newProtocol(ProtImportPdb, inputPdbData=ProtImportPdb.IMPORT_FROM_FILES,
                               pdbFile=path, skipChimera=True)
        cls.launchProtocol(prot)
        return prot.outputPdb

    def _assertFailsBeforeSteps(self, prot, message):
        self.proj.launchProtocol(prot, wait=True)
        self.assertTrue(prot.isFailed())
        self.assertIn(message, prot.getErrorMessage())
        self.assertEqual(len(prot.loadSteps()), 0)
        self.assertFalse(os.path.exists(prot._getExtraPath("particles.star")))

    # ------------------------------------------------------------ heterogeneity
    def test_01_hetero_then_conformation_to_orientation(self):
        het = self.newProtocol(CryoGmmProtHetero, useGpu=False, numberOfThreads=2,
                               decoder=0, segments=8, zdim=2, epochs=8, batch=32,
                               lowpassA=10.0, klWarmup=2, pcs=1, frames=3, clusters=2)
        het.inputParticles.set(self.parts)
        het.inputAtomStruct.set(self.openModel)
        het.inputVolume.set(self.map)
        self.launchProtocol(het)

        # particles with latent coordinates (pwem's flexibility convention)
        out = het.outputParticles
        self.assertIsInstance(out, SetOfParticlesFlex)
        self.assertEqual(out.getSize(), N)
        self.assertAlmostEqual(out.getSamplingRate(), APIX)
        self.assertTrue(out.hasCTF() and out.hasAlignmentProj())
        self.assertEqual(out.getFlexInfo().getAttr("zdim"), 2)
        ids, pc1, clusters = [], [], []
        for p in out.iterItems():
            self.assertEqual(len(p.getZFlex()), 2)
            self.assertEqual(len(p.getZRed()), 1)
            ids.append(p.getObjId())
            pc1.append(p.getZRed()[0])
            clusters.append(p.getAttributeValue("_cryogmmCluster"))
        self.assertEqual(sorted(ids), sorted(p.getObjId() for p in self.parts.iterItems()))
        rho = spearman(np.array(pc1), np.array([self.truthFrame[i] for i in ids]))
        print("hetero: Spearman(latent PC1, true frame) = %.3f" % rho)
        self.assertGreater(abs(rho), 0.8)
        # the same particle keeps its image and pose
        first_in, first_out = self.parts.getFirstItem(), out.getFirstItem()
        self.assertEqual(first_in.getLocation(), first_out.getLocation())
        np.testing.assert_allclose(first_in.getTransform().getMatrix(),
                                   first_out.getTransform().getMatrix())

        # PC1 trajectory: one AtomStruct per frame, the model moves along it
        traj = het.outputTrajectoryPC1
        self.assertIsInstance(traj, SetOfAtomStructs)
        self.assertEqual(traj.getSize(), 3)
        frames = [s.getFileName() for s in traj.iterItems()]
        for fn in frames:
            self.assertEqual(len(ca_coords(fn)), 214)
        span = ca_rmsd(frames[0], frames[-1])
        print("hetero: Cα RMSD between the PC1 end frames %.2f Å" % span)
        self.assertGreater(span, 1.0)

        # maps along PC1: decoded models and back-projections, with the particles' sampling
        for name in ("outputVolumesPC1", "outputBackprojPC1"):
            vols = getattr(het, name)
            self.assertIsInstance(vols, SetOfVolumes)
            self.assertEqual(vols.getSize(), 3)
            for v in vols.iterItems():
                self.assertAlmostEqual(v.getSamplingRate(), APIX)
                self.assertEqual(v.getDim(), (BOX, BOX, BOX))

        # the maps chain into the model-series protocol with their PC1 coordinates as latents
        series = self.newProtocol(CryoGmmProtModelSeries, useGpu=False, resolution=5.0)
        series.inputVolumes.set(het.outputVolumesPC1)
        series.inputAtomStruct.set(self.openModel)
        self.assertEqual(series.validate(), [])
        t = readReport(het._getAnalyzeDir())["trajectories"]["pc1"]["t"]
        np.testing.assert_allclose(series._latents(series._volumes())[:, 0], t)

        # one particle subset per cluster, disjoint, covering the set
        subsets = [het.outputParticlesCluster0, het.outputParticlesCluster1]
        seen = set()
        for c, sub in enumerate(subsets):
            self.assertIsInstance(sub, SetOfParticles)
            self.assertTrue(sub.hasCTF() and sub.hasAlignmentProj())
            members = {p.getObjId() for p in sub.iterItems()}
            self.assertEqual(members, {i for i, k in zip(ids, clusters) if k == c})
            self.assertFalse(members & seen)
            seen |= members
        self.assertEqual(len(seen), N)
        self.assertTrue(any("clusters" in line for line in het.summary()))
        self.assertTrue(het.methods())

        # the latent-space viewer draws headless: one scatter per cluster
        from cryogmm_scipion.viewers import CryoGmmLatentViewer
        png = os.path.join(self.data, "latent.png")
        plotter = CryoGmmLatentViewer.createPlot(het)
        plotter.savefig(png)
        self.assertGreater(os.path.getsize(png), 10000)
        ax = plotter.getFigure().axes[0]
        self.assertEqual(sum(len(c.get_offsets()) for c in ax.collections), N)

        # conformation to orientation: the hetero run + a LID mask into refine-poses
        mask = self.newProtocol(ProtImportMask, maskPath=os.path.join(self.het, "lid_mask.mrc"),
                                samplingRate=APIX)
        self.launchProtocol(mask)
        bad = self.newProtocol(CryoGmmProtRefinePoses, useGpu=False)
        bad.inputParticles.set(self.parts)
        bad.inputHetero.set(het)
        self.assertTrue(any("needs a focus mask" in e for e in bad.validate()), bad.validate())
        ref = self.newProtocol(CryoGmmProtRefinePoses, useGpu=False, numberOfThreads=2,
                               iterations=1, steps=10, maxGaussians=150, fitIterations=40)
        ref.inputParticles.set(self.parts)
        ref.inputHetero.set(het)
        ref.inputMask.set(mask.outputMask)
        self.launchProtocol(ref)
        self.assertEqual(ref.outputParticles.getSize(), N)
        c2o = readReport(ref._getRefineDir()).get("conformation_to_orientation")
        self.assertIsInstance(c2o, dict)
        rmsd = c2o["region_rmsd_A"]
        print("conformation to orientation: LID region RMSD to the neutral model, median "
              "%.2f -> %.2f Å; pose change median %.1f°" % (
                  rmsd["before_median"], rmsd["after_median"], c2o["pose_change_deg"]["median"]))
        # each particle's own LID, moved by its new pose, lies where the neutral LID does
        self.assertLess(rmsd["after_median"], 0.5 * rmsd["before_median"])
        self.assertTrue(any("heterogeneity run" in line for line in ref.summary()))

    def test_01b_hetero_halves_landscape_crossval_and_junk(self):
        """Half-set training (the particles' rlnRandomSubset), the free-energy landscape, the
        per-state cross-validation (table, plot, one AtomStruct per state and half) and the
        kept/rejected subsets of --junk, through the protocol and its viewers."""
        het = self.newProtocol(CryoGmmProtHetero, useGpu=False, numberOfThreads=2,
                               decoder=0, segments=8, zdim=2, epochs=3, batch=32,
                               lowpassA=10.0, klWarmup=1, pcs=1, frames=2, clusters=2,
                               backproject=False, halves=True, junk=3.0)
        het.inputParticles.set(self.parts)
        het.inputAtomStruct.set(self.openModel)
        het.inputVolume.set(self.map)
        self.launchProtocol(het)
        an = readReport(het._getAnalyzeDir())
        cv = an["crossval"]
        scored = [s for s in cv["states"] if "skipped" not in s]
        self.assertTrue(scored)
        # one state model per scored state and half, commented with its figures
        for h in (1, 2):
            structs = getattr(het, "outputCrossvalModelsHalf%d" % h)
            self.assertIsInstance(structs, SetOfAtomStructs)
            self.assertEqual(structs.getSize(), len(scored))
            for st in structs.iterItems():
                self.assertEqual(len(ca_coords(st.getFileName())), 214)
                self.assertIn("own map", st.getObjComment())
        # kept + rejected cover the input, disjoint, as the engine split them
        kept = {p.getObjId() for p in het.outputParticlesKept.iterItems()}
        rejected = {p.getObjId() for p in het.outputParticlesRejected.iterItems()}
        self.assertFalse(kept & rejected)
        self.assertEqual(len(kept | rejected), N)
        self.assertEqual(len(rejected), an["junk"]["rejected"]["n"])
        self.assertTrue(het.outputParticlesKept.hasCTF() and het.outputParticlesKept.hasAlignmentProj())
        summary = "\n".join(het.summary())
        for text in ("Half-set cross-validation", "Flagged states", "landscape", "Junk"):
            self.assertIn(text, summary)
        # the viewers draw headless: landscape (free energy + trajectory), cross-validation bars
        from cryogmm_scipion.viewers import CryoGmmCrossvalViewer, CryoGmmLandscapeViewer
        for name, viewer in (("landscape", CryoGmmLandscapeViewer), ("crossval", CryoGmmCrossvalViewer)):
            png = os.path.join(self.data, "%s.png" % name)
            viewer.createPlot(het).savefig(png)
            self.assertGreater(os.path.getsize(png), 10000)
        header, rows = CryoGmmCrossvalViewer.createTable(het)
        self.assertEqual(len(rows), len(scored))
        self.assertEqual([r[2] for r in rows], ["%.3f" % s["model1_vs_map1"] for s in scored])
        # without half sets the protocol refuses before running
        star = os.path.join(self.data, "nohalves.star")
        _strip_columns(os.path.join(self.het, "sim", "particles.star"), star, ("rlnRandomSubset",))
        nohalves = self.importStar(star, "without half sets").outputParticles
        bad = self.newProtocol(CryoGmmProtHetero, useGpu=False, halves=True)
        bad.inputParticles.set(nohalves)
        bad.inputAtomStruct.set(self.openModel)
        self.assertTrue(any("rlnRandomSubset" in e for e in bad.validate()), bad.validate())

    def test_02_hetero_bad_inputs_fail_in_validate(self):
        star = os.path.join(self.data, "noalign.star")
        _strip_columns(os.path.join(self.het, "sim", "particles.star"), star,
                       ("rlnAngleRot", "rlnAngleTilt", "rlnAnglePsi",
                        "rlnOriginXAngst", "rlnOriginYAngst"))
        noalign = self.importStar(star, "without alignment").outputParticles
        prot = self.newProtocol(CryoGmmProtHetero, useGpu=False)
        prot.inputParticles.set(noalign)
        prot.inputAtomStruct.set(self.openModel)
        self._assertFailsBeforeSteps(prot, "no 3D alignment")

        other = self.importVolume(os.path.join(self.het, "sim", "truth_map.mrc"), 2.0)
        prot = self.newProtocol(CryoGmmProtHetero, useGpu=False, zdim=2, pcs=3, lowpassA=4.0)
        prot.inputParticles.set(self.parts)
        prot.inputAtomStruct.set(self.openModel)
        prot.inputVolume.set(other)
        errors = prot.validate()
        self.assertTrue(any("sampling rate of 2.0000" in e for e in errors), errors)
        self.assertTrue(any("cannot exceed the latent dimensions" in e for e in errors), errors)
        self.assertTrue(any("at least twice the sampling rate" in e for e in errors), errors)
        self._assertFailsBeforeSteps(prot, "sampling rate")

    # ------------------------------------------------------------ model refinement
    def test_03_refine_model_into_map_and_geometry_only(self):
        start = self.importPdb(os.path.join(self.mod, "start.pdb"))
        truth = self.importPdb(os.path.join(self.mod, "truth.pdb"))
        vol = self.importVolume(os.path.join(self.mod, "map.mrc"), 1.0)
        prot = self.newProtocol(CryoGmmProtRefineModel, useGpu=False, numberOfThreads=2,
                                resolution=4.0, stageResidue=False, patches=2, steps=15, rounds=1)
        prot.inputAtomStruct.set(start)
        prot.inputVolume.set(vol)
        prot.reference.set(truth)
        self.launchProtocol(prot)
        model = prot.outputAtomStruct
        self.assertIsInstance(model, AtomStruct)
        self.assertTrue(os.path.exists(model.getFileName()))
        before = ca_rmsd(start.getFileName(), truth.getFileName())
        after = ca_rmsd(model.getFileName(), truth.getFileName())
        print("refine-model: Cα RMSD to truth %.2f -> %.2f Å" % (before, after))
        self.assertLess(after, 0.85 * before)
        # the engine's figures are kept on the output and agree with ours
        self.assertAlmostEqual(model._cryogmm_before_caRmsdRef.get(), before, delta=0.02)
        self.assertAlmostEqual(model._cryogmm_after_caRmsdRef.get(), after, delta=0.02)
        self.assertGreater(model._cryogmm_after_mapCC.get(), model._cryogmm_before_mapCC.get())
        self.assertLess(model._cryogmm_after_bondRmsz.get(), model._cryogmm_before_bondRmsz.get())
        self.assertTrue(any(line.startswith("map CC (mask):") for line in prot.summary()))
        self.assertTrue(prot.methods())
        # defaults: fsc, rotamers on; one rotamer + all-atom round asked for
        self.assertEqual(prot.getReport()["stages"], ["rigid", "rotamers", "full"])
        self.assertEqual(prot.getReport()["similarity"], "fsc")

        from cryogmm_scipion.viewers import CryoGmmValidationViewer
        header, rows = CryoGmmValidationViewer.createTable(prot)
        self.assertEqual(header, ("figure", "before", "after"))
        table = {r[0]: r for r in rows}
        self.assertEqual(table["Cα RMSD to reference (Å)"][1:],
                         ("%.2f" % model._cryogmm_before_caRmsdRef.get(),
                          "%.2f" % model._cryogmm_after_caRmsdRef.get()))
        self.assertIn("clashscore", CryoGmmValidationViewer.formatTable(prot))

        geo = self.newProtocol(CryoGmmProtRefineModel, useGpu=False, geometryOnly=True,
                               steps=10)
        geo.inputAtomStruct.set(truth)
        self.launchProtocol(geo)
        g = geo.outputAtomStruct
        self.assertLess(g._cryogmm_after_bondRmsz.get(), g._cryogmm_before_bondRmsz.get())
        self.assertLess(ca_rmsd(g.getFileName(), truth.getFileName()), 0.3)
        self.assertTrue(any("geometry only" in line for line in geo.summary()))

    def test_04_refine_model_bad_inputs_fail_in_validate(self):
        start = self.importPdb(os.path.join(self.mod, "start.pdb"))
        coarse = self.importVolume(os.path.join(self.mod, "map.mrc"), 3.0)
        prot = self.newProtocol(CryoGmmProtRefineModel, useGpu=False, resolution=4.0)
        prot.inputAtomStruct.set(start)
        prot.inputVolume.set(coarse)
        self._assertFailsBeforeSteps(prot, "at least twice the map's sampling rate")
        nomap = self.newProtocol(CryoGmmProtRefineModel, useGpu=False)
        nomap.inputAtomStruct.set(start)
        self.assertTrue(any("Choose a map" in e for e in nomap.validate()))
        unset = Volume(location=os.path.join(self.mod, "map.mrc"))
        prot2 = self.newProtocol(CryoGmmProtRefineModel, useGpu=False)
        prot2.inputAtomStruct.set(start)
        prot2.inputVolume.set(unset)
        self.assertTrue(any("no sampling rate" in e for e in prot2.validate()),
                        prot2.validate())

    def test_04b_refine_model_nucleic_acid_and_ligand(self):
        """The refine-model protocol on models beyond proteins (issue 17): an RNA hairpin and
        HIV protease with its inhibitor (no shipped dictionary: restrained to its own
        geometry), each displaced by 1.6 Å: P / Cα and the ligand move back towards the truth,
        and the report says which residue got which restraints."""
        for kind, atom, lig in (("rna", "P", None), ("ligand", "CA", "XK2")):
            d = os.path.join(self.data, kind)
            if not os.path.exists(os.path.join(HERE, "..", "..", "tests", "data")):
                pytest.skip("the repository's tests/data is not in this checkout")
            engine_data(kind, d)
            start = self.importPdb(os.path.join(d, "start.pdb"))
            vol = self.importVolume(os.path.join(d, "map.mrc"), 1.0)
            prot = self.newProtocol(CryoGmmProtRefineModel, useGpu=False, numberOfThreads=2,
                                    resolution=4.0, stageResidue=False, patches=2, steps=15, rounds=1)
            prot.inputAtomStruct.set(start)
            prot.inputVolume.set(vol)
            self.launchProtocol(prot)
            out = prot.outputAtomStruct.getFileName()
            truth = os.path.join(d, "truth.pdb")
            before, after = atom_rmsd(start.getFileName(), truth, atom), atom_rmsd(out, truth, atom)
            print("refine-model %s: %s RMSD to truth %.2f -> %.2f Å" % (kind, atom, before, after))
            self.assertLess(after, 0.5 * before)
            rep = prot.getReport()
            self.assertEqual(rep["fixed_residues"], [])
            if lig:
                self.assertIn(lig, [r["residue"] for r in rep["self_restrained"]])
                lb, la = atom_rmsd(start.getFileName(), truth, None, lig), atom_rmsd(out, truth, None, lig)
                self.assertLess(la, 0.5 * lb)
            else:
                self.assertEqual(sum(rep["restrained_residues"]["nucleic acid"].values()), 23)

    # ------------------------------------------------------------ model series
    def test_05_model_series(self):
        d = os.path.join(self.data, "series")
        engine_data("series", d)
        imp = self.newProtocol(ProtImportVolumes, filesPath=d, filesPattern="map_*.mrc",
                               samplingRate=1.5)
        self.launchProtocol(imp)
        maps = imp.outputVolumes
        self.assertEqual(maps.getSize(), 3)
        start = self.importPdb(os.path.join(d, "start.pdb"))
        prot = self.newProtocol(CryoGmmProtModelSeries, useGpu=False, numberOfThreads=2,
                                resolution=5.0, frames=4, steps=10, patches=4, polishIters=5,
                                captureSteps=10)
        prot.inputVolumes.set(maps)
        prot.inputAtomStruct.set(start)
        self.launchProtocol(prot)
        series = prot.outputAtomStructs
        self.assertIsInstance(series, SetOfAtomStructs)
        self.assertEqual(series.getSize(), 4)
        files = [s.getFileName() for s in series.iterItems()]
        for fn in files:
            self.assertEqual(len(ca_coords(fn)), 40)
        # the frames follow the maps: the first frame is nearer the first map's truth
        truth = [os.path.join(d, "truth_%02d.pdb" % i) for i in (1, 2, 3)]
        first, last = ca_rmsd(files[0], truth[0]), ca_rmsd(files[-1], truth[0])
        print("series: Cα RMSD to truth_01 of frame 1 %.2f Å, of frame 4 %.2f Å" % (first, last))
        self.assertLess(first, last)
        atMaps = prot.outputMapAtomStructs
        self.assertEqual(atMaps.getSize(), 3)
        for st in atMaps.iterItems():
            self.assertGreater(st._cryogmm_mapCC.get(), 0.0)
        # the frame at the first map's latent moved from the start (the closed end) towards
        # that map's truth (the open end)
        frame1 = atMaps.getFirstItem().getFileName()
        s0, s1 = ca_rmsd(start.getFileName(), truth[0]), ca_rmsd(frame1, truth[0])
        print("series: map 1 frame Cα RMSD to its truth %.2f -> %.2f Å" % (s0, s1))
        self.assertLess(s1, 0.8 * s0)
        self.assertTrue(any(line.startswith("Map 1: map CC") for line in prot.summary()))

        # a resolution finer than twice the sampling: refused before any step
        bad = self.newProtocol(CryoGmmProtModelSeries, useGpu=False, resolution=2.5)
        bad.inputVolumes.set(maps)
        bad.inputAtomStruct.set(start)
        errors = bad.validate()
        self.assertTrue(any("at least twice the maps' sampling rate" in e for e in errors), errors)
        self._assertFailsBeforeSteps(bad, "at least twice")


def _engine_file(name):
    out = subprocess.run(
        Plugin.getCommand("python -c \"import cryogmm.data, os; print(os.path.join("
                          "os.path.dirname(cryogmm.data.__file__), '%s'))\"" % name),
        shell=True, check=True, capture_output=True, text=True, env=Plugin.getEnviron())
    return out.stdout.strip().splitlines()[-1]
