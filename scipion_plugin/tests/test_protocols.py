"""End to end in a real pyworkflow project: particles simulated by `cryogmm simulate` are
imported through Scipion's RELION importer, then reconstructed and refined by the plugin's
protocols running the engine through its CLI in the engine's own environment.

Data: adenylate kinase (4AKE), 300 particles, box 48 at 1.5 Å/px, SNR 1, recorded poses
perturbed by ~5° and ~1.5 Å; the truth poses come from truth.star.
"""

import os
import shutil
import subprocess
import tempfile

import numpy as np
import pytest

pytest.importorskip("pwem")

from pyworkflow.tests import BaseTest, setupTestProject  # noqa: E402
from pwem.objects import FSC, SetOfParticles, Volume  # noqa: E402
from pwem.protocols import ProtImportParticles, ProtImportPdb, ProtImportVolumes  # noqa: E402

from cryogmm_scipion import Plugin  # noqa: E402
from cryogmm_scipion.convert import (matrixToRelion, readReport, readStarRows,  # noqa: E402
                                     relionToMatrix, rotationAngleDeg)
from cryogmm_scipion.protocols import (CryoGmmProtReconstruct,  # noqa: E402
                                       CryoGmmProtFitGmm, CryoGmmProtRefinePoses,
                                       CryoGmmProtSimulate)

N, BOX, APIX = 300, 48, 1.5
ACTIVATION = os.environ.get("CRYOGMM_ENV_ACTIVATION", "")


def engine(*args):
    """Run the engine's CLI the way the protocols do (activation, then `cryogmm`)."""
    cmd = Plugin.getProgram() + " " + " ".join(str(a) for a in args)
    subprocess.run(cmd, shell=True, check=True, env=Plugin.getEnviron(),
                   stdout=subprocess.DEVNULL)


def pose_errors(parts, truth_rows, apix):
    """Per particle: rotation error (deg) and origin error (Å) against truth.star."""
    truth = {int(r.rlnImageId) if hasattr(r, "rlnImageId") else i + 1: r
             for i, r in enumerate(truth_rows)}
    rot, shift = [], []
    for p in parts.iterItems():
        t = truth[p.getObjId()]
        Mt = relionToMatrix(t.rlnAngleRot, t.rlnAngleTilt, t.rlnAnglePsi,
                            t.rlnOriginXAngst, t.rlnOriginYAngst, apix)
        M = p.getTransform().getMatrix()
        rot.append(rotationAngleDeg(M, Mt))
        origin = matrixToRelion(M, apix)[1]
        shift.append(np.hypot(origin[0] - t.rlnOriginXAngst, origin[1] - t.rlnOriginYAngst))
    return np.array(rot), np.array(shift)


def import_relion_star(case, star, label, apix):
    """Import a STAR through Scipion's RELION importer in ``case``'s project (a BaseTest class)."""
    prot = case.newProtocol(ProtImportParticles, objLabel="import %s" % label,
                            importFrom=ProtImportParticles.IMPORT_FROM_RELION,
                            starFile=star, samplingRate=apix, magnification=10000,
                            voltage=300, sphericalAberration=2.7, amplitudeContrast=0.1)
    case.launchProtocol(prot)
    return prot


def _skip_without_engine():
    if not ACTIVATION and shutil.which("cryogmm") is None:
        pytest.skip("the cryogmm engine is not reachable: set CRYOGMM_ENV_ACTIVATION "
                    "(e.g. '. /path/to/.venv/bin/activate')")


class TestCryoGmmProtocols(BaseTest):
    @classmethod
    def setUpClass(cls):
        _skip_without_engine()
        setupTestProject(cls)
        cls.data = tempfile.mkdtemp(prefix="cryogmm-sim-")
        cls.sim = os.path.join(cls.data, "sim")
        engine("simulate", "--model", _adk_model(), "--n", N, "--box", BOX, "--apix", APIX,
               "--snr", 1.0, "--pose-noise-deg", 5, "--shift-noise-A", 1.5, "--seed", 1,
               "--device", "cpu", "--out", cls.sim)
        cls.truthRows = readStarRows(os.path.join(cls.sim, "truth.star"))
        cls.importParts = cls.importStar(os.path.join(cls.sim, "particles.star"), "sim")

    @classmethod
    def importStar(cls, star, label):
        return import_relion_star(cls, star, label, APIX)

    def test_01_import(self):
        parts = self.importParts.outputParticles
        self.assertEqual(parts.getSize(), N)
        self.assertAlmostEqual(parts.getSamplingRate(), APIX)
        self.assertEqual(parts.getXDim(), BOX)
        self.assertTrue(parts.hasCTF())
        self.assertTrue(parts.hasAlignmentProj())

    def test_02_reconstruct_then_refine(self):
        parts = self.importParts.outputParticles
        rec = self.newProtocol(CryoGmmProtReconstruct, useGpu=False, numberOfThreads=2)
        rec.inputParticles.set(parts)
        self.launchProtocol(rec)
        vol = rec.outputVolume
        self.assertIsInstance(vol, Volume)
        self.assertAlmostEqual(vol.getSamplingRate(), APIX)
        self.assertEqual(vol.getDim(), (BOX, BOX, BOX))
        self.assertTrue(vol.hasHalfMaps())
        for half in vol.getHalfMaps(asList=True):
            self.assertTrue(os.path.exists(half))
        self.assertIsInstance(rec.outputFSC, FSC)
        freq, curve = rec.outputFSC.getData()
        self.assertEqual(len(freq), len(curve))
        self.assertGreater(curve[1], 0.9)  # lowest shell of a 300-particle SNR 1 set
        res = float(rec.outputFSC.calculateResolution(0.143))
        reported = readReport(rec._getExtraPath("reconstruct"))["resolution_A"]
        print("reconstruct: FSC 0.143 %.2f A (engine report %.2f A)" % (res, reported))
        self.assertLess(res, 15.0)
        self.assertAlmostEqual(res, reported, delta=0.1 * reported)

        # Refine against the reconstruction's half maps (a Volume carrying its halves).
        ref = self.newProtocol(CryoGmmProtRefinePoses, useGpu=False, numberOfThreads=2,
                               iterations=1, steps=25, maxGaussians=400, fitIterations=150)
        ref.inputParticles.set(parts)
        ref.inputVolume.set(vol)
        self.launchProtocol(ref)

        out = ref.outputParticles
        self.assertIsInstance(out, SetOfParticles)
        self.assertEqual(out.getSize(), N)
        self.assertAlmostEqual(out.getSamplingRate(), APIX)
        self.assertTrue(out.hasAlignmentProj())
        self.assertTrue(out.hasCTF())
        first_in, first_out = parts.getFirstItem(), out.getFirstItem()
        self.assertEqual(first_in.getLocation(), first_out.getLocation())
        self.assertAlmostEqual(first_in.getCTF().getDefocusU(),
                               first_out.getCTF().getDefocusU(), places=2)
        self.assertIn(first_out.getAttributeValue("_rlnRandomSubset"), (1, 2))
        self.assertTrue(np.isfinite(first_out.getAttributeValue("_cryogmm_frc")))

        start_rot, start_shift = pose_errors(parts, self.truthRows, APIX)
        new_rot, new_shift = pose_errors(out, self.truthRows, APIX)
        print("pose error vs truth: median %.2f -> %.2f deg, p90 %.2f -> %.2f deg; "
              "shift median %.2f -> %.2f A" % (
                  np.median(start_rot), np.median(new_rot), np.percentile(start_rot, 90),
                  np.percentile(new_rot, 90), np.median(start_shift), np.median(new_shift)))
        self.assertLess(np.median(new_rot), 0.8 * np.median(start_rot))
        self.assertLess(np.median(new_shift), 0.5 * np.median(start_shift))

        rvol = ref.outputVolume
        self.assertAlmostEqual(rvol.getSamplingRate(), APIX)
        self.assertEqual(rvol.getDim(), (BOX, BOX, BOX))
        self.assertTrue(rvol.hasHalfMaps())
        self.assertIsInstance(ref.outputFSC, FSC)
        self.assertTrue(ref.summary()[0].startswith("%d particles refined" % N))
        self.assertTrue(ref.methods())

        # the viewer draws headless (Agg): FSC curve and convergence
        from cryogmm_scipion.viewers import CryoGmmRunViewer
        png = os.path.join(self.data, "refine_view.png")
        plotter = CryoGmmRunViewer.createPlot(ref)
        plotter.savefig(png)
        self.assertGreater(os.path.getsize(png), 10000)
        axes = plotter.getFigure().axes
        np.testing.assert_allclose(axes[0].lines[0].get_ydata(), ref.outputFSC.getData()[1])

    def test_03_no_alignment_fails_in_validate(self):
        """Particles without angles: refine fails before any step with a clear message."""
        star = os.path.join(self.data, "noalign.star")
        _strip_columns(os.path.join(self.sim, "particles.star"), star,
                       ("rlnAngleRot", "rlnAngleTilt", "rlnAnglePsi",
                        "rlnOriginXAngst", "rlnOriginYAngst"))
        imp = self.importStar(star, "without alignment")
        parts = imp.outputParticles
        self.assertFalse(parts.hasAlignmentProj())
        prot = self.newProtocol(CryoGmmProtRefinePoses, useGpu=False)
        prot.inputParticles.set(parts)
        errors = prot.validate()
        self.assertTrue(any("no 3D alignment" in e for e in errors), errors)
        self._assertFailsBeforeSteps(prot, "no 3D alignment")

    def test_04_different_sampling_fails_in_validate(self):
        """A reference whose sampling differs from the particles': clear message, no step."""
        truth = os.path.join(self.sim, "truth_map.mrc")
        imp = self.newProtocol(ProtImportVolumes, filesPath=truth, samplingRate=2.0,
                               setHalfMaps=True, half1map=truth, half2map=truth)
        self.launchProtocol(imp)
        prot = self.newProtocol(CryoGmmProtRefinePoses, useGpu=False)
        prot.inputParticles.set(self.importParts.outputParticles)
        prot.inputVolume.set(imp.outputVolume)
        errors = prot.validate()
        self.assertTrue(any("sampling rate of 2.0000" in e and "1.5000" in e
                            for e in errors), errors)
        self._assertFailsBeforeSteps(prot, "sampling rate")

    def test_04b_consensus_map_and_symmetry_checked_in_validate(self):
        """A volume without half maps needs a starting resolution; symmetry must be Cn/Dn."""
        truth = os.path.join(self.sim, "truth_map.mrc")
        imp = self.newProtocol(ProtImportVolumes, filesPath=truth, samplingRate=APIX)
        self.launchProtocol(imp)
        parts = self.importParts.outputParticles
        prot = self.newProtocol(CryoGmmProtRefinePoses, useGpu=False, symmetry="x3")
        prot.inputParticles.set(parts)
        prot.inputVolume.set(imp.outputVolume)
        errors = prot.validate()
        self.assertTrue(any("no half maps" in e and "Starting high resolution" in e
                            for e in errors), errors)
        self.assertTrue(any("Symmetry must be Cn or Dn" in e for e in errors), errors)
        ok = self.newProtocol(CryoGmmProtRefinePoses, useGpu=False, symmetry="c2",
                              startResA=10.0)
        ok.inputParticles.set(parts)
        ok.inputVolume.set(imp.outputVolume)
        self.assertEqual(ok.validate(), [])

    def test_05_simulate_fit_and_patches(self):
        """Simulated particles made inside Scipion: CTF, alignment, truth, the truth map."""
        imp = self.newProtocol(ProtImportPdb, inputPdbData=ProtImportPdb.IMPORT_FROM_FILES,
                               pdbFile=_adk_model(), skipChimera=True)
        self.launchProtocol(imp)
        sim = self.newProtocol(CryoGmmProtSimulate, useGpu=False, n=60, box=32, apix=2.5,
                               snr=0.5, poseNoiseDeg=4.0, shiftNoiseA=1.0, seed=3)
        sim.inputAtomStruct.set(imp.outputPdb)
        self.launchProtocol(sim)
        parts, truth = sim.outputParticles, sim.outputTruthParticles
        for s in (parts, truth):
            self.assertEqual(s.getSize(), 60)
            self.assertAlmostEqual(s.getSamplingRate(), 2.5)
            self.assertEqual(s.getXDim(), 32)
            self.assertTrue(s.hasCTF() and s.hasAlignmentProj())
            self.assertTrue(os.path.exists(s.getFirstItem().getFileName()))
        self.assertAlmostEqual(parts.getAcquisition().getVoltage(), 300.0)
        rot = [rotationAngleDeg(p.getTransform().getMatrix(), t.getTransform().getMatrix())
               for p, t in zip(parts.iterItems(), truth.iterItems())]
        # ~N(0, 4 deg) per axis perturbation: median angle a few degrees, never zero
        self.assertGreater(np.median(rot), 2.0)
        self.assertLess(np.median(rot), 12.0)
        self.assertEqual(sim.outputVolume.getDim(), (32, 32, 32))
        self.assertAlmostEqual(sim.outputVolume.getSamplingRate(), 2.5)

        # Gaussians fitted to the simulated noise-free map
        fit = self.newProtocol(CryoGmmProtFitGmm, useGpu=False, resolution=8.0,
                               nGaussians=40, iterations=20)
        fit.inputVolume.set(sim.outputVolume)
        self.launchProtocol(fit)
        self.assertTrue(fit.outputGaussians.getPseudoAtoms())
        with open(fit.outputGaussians.getFileName()) as f:
            self.assertEqual(sum(line.startswith("HETATM") for line in f), 40)
        self.assertEqual(fit.outputVolume.getDim(), (32, 32, 32))
        self.assertAlmostEqual(fit.outputVolume.getSamplingRate(), 2.5)
        report = readReport(fit._getExtraPath("fit"))
        print("fit-gmm: FSC(mixture, map) min to 8 A %.3f (k-means alone %.3f)" % (
            report["fsc_min_to_resolution"], report["kmeans"]["fsc_min_to_resolution"]))
        self.assertGreaterEqual(report["fsc_min_to_resolution"],
                                report["kmeans"]["fsc_min_to_resolution"])
        self.assertIn("40 Gaussians", fit.summary()[0])

        # Patch-by-patch with C2: symmetry-expanded output (one particle per copy, the
        # input id kept) and a composite volume with its halves.
        ref = self.newProtocol(CryoGmmProtRefinePoses, useGpu=False, iterations=1,
                               steps=10, maxGaussians=150, fitIterations=40,
                               symmetry="c2", patches=2, patchIterations=1)
        ref.inputParticles.set(parts)
        self.launchProtocol(ref)
        out = ref.outputParticles
        self.assertEqual(out.getSize(), 2 * parts.getSize())
        ids = [p.getAttributeValue("_cryogmm_inputId") for p in out.iterItems()]
        self.assertEqual(sorted(set(ids)), sorted(p.getObjId() for p in parts.iterItems()))
        self.assertTrue(all(ids.count(i) == 2 for i in set(ids)))
        comp = ref.outputCompositeVolume
        self.assertEqual(comp.getDim(), (32, 32, 32))
        self.assertTrue(comp.hasHalfMaps())
        self.assertTrue(os.path.basename(comp.getFileName()).startswith("composite"))
        self.assertTrue(any("Symmetry C2" in line for line in ref.summary()))

    def _assertFailsBeforeSteps(self, prot, message):
        self.proj.launchProtocol(prot, wait=True)
        self.assertTrue(prot.isFailed())
        self.assertIn(message, prot.getErrorMessage())
        self.assertFalse(os.path.exists(prot._getExtraPath("particles.star")))
        self.assertEqual(len(prot.loadSteps()), 0)


def _adk_model():
    """The engine's bundled 4AKE model, found through the engine's own environment."""
    out = subprocess.run(
        Plugin.getCommand("python -c \"import cryogmm.data, os; print(os.path.join("
                          "os.path.dirname(cryogmm.data.__file__), 'adk_open.pdb'))\""),
        shell=True, check=True, capture_output=True, text=True, env=Plugin.getEnviron())
    return out.stdout.strip().splitlines()[-1]


def _strip_columns(src, dst, labels):
    """Copy a RELION 3.1 STAR without some particle columns (text level, like a user would)."""
    from emtable import Table
    optics = Table(fileName=src, tableName="optics")
    parts = Table(fileName=src, tableName="particles")
    keep = [c.getName() for c in parts.getColumns() if c.getName() not in labels]
    out = Table(columns=keep)
    for row in parts:
        out.addRow(*[getattr(row, c) for c in keep])
    with open(dst, "w") as f:
        f.write("# version 30001\n")
        optics.writeStar(f, tableName="optics")
        f.write("# version 30001\n")
        out.writeStar(f, tableName="particles")
    # the stack sits beside the source STAR: link it beside the copy
    stack = os.path.join(os.path.dirname(src), "particles.mrcs")
    link = os.path.join(os.path.dirname(dst), "particles.mrcs")
    if not os.path.exists(link):
        os.symlink(stack, link)
