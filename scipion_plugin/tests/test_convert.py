"""Alignment conventions: our reader of the engine's STAR against scipion-em-relion's writer."""

from types import SimpleNamespace

import numpy as np
import pytest

pytest.importorskip("pwem")

import pwem.convert.transformations as tfs  # noqa: E402

from cryogmm_scipion.convert import (matrixToRelion, relionToMatrix,  # noqa: E402
                                     rotationAngleDeg)


def _random_relion(rng):
    """Random RELION pose: rot, tilt, psi (deg), origin x, y (Å)."""
    return (rng.uniform(-180, 180), rng.uniform(0, 180), rng.uniform(-180, 180),
            rng.normal(0, 4), rng.normal(0, 4))


def test_our_reader_matches_scipion_em_relion_both_ways():
    """Our STAR -> matrix equals scipion-em-relion's reader; its writer inverts ours."""
    convert31 = pytest.importorskip("relion.convert.convert31")
    from pwem.objects import Particle, Transform
    apix = 1.7
    reader = convert31.Reader()
    reader._angles, reader._shifts, reader._invPixelSize = np.zeros(3), np.zeros(3), 1 / apix
    writer = convert31.Writer()
    writer._pixelSize = apix
    rng = np.random.default_rng(0)
    for _ in range(50):
        rot, tilt, psi, ox, oy = _random_relion(rng)
        ours = relionToMatrix(rot, tilt, psi, ox, oy, apix)

        part = Particle()
        part.setTransform(Transform())
        row = SimpleNamespace(rlnAngleRot=rot, rlnAngleTilt=tilt, rlnAnglePsi=psi,
                              rlnOriginXAngst=ox, rlnOriginYAngst=oy, rlnOriginZAngst=0.0)
        reader._Reader__setParticleTransformProj(part, row)
        np.testing.assert_allclose(ours, part.getTransform().getMatrix(), atol=1e-9)

        written = {}
        writer._alignProjToRow(Transform(ours), written)
        back = relionToMatrix(written["rlnAngleRot"], written["rlnAngleTilt"],
                              written["rlnAnglePsi"], written["rlnOriginXAngst"],
                              written["rlnOriginYAngst"], apix)
        np.testing.assert_allclose(back, ours, atol=1e-9)
        assert written["rlnOriginZAngst"] == pytest.approx(0.0, abs=1e-9)
        angles, origin = matrixToRelion(ours, apix)
        np.testing.assert_allclose(relionToMatrix(*angles, *origin, apix), ours, atol=1e-9)


def test_rotation_angle_known_cases():
    M = np.eye(4)
    assert rotationAngleDeg(M, M) == pytest.approx(0.0, abs=1e-6)
    R = tfs.rotation_matrix(np.radians(7.0), [0.3, -0.2, 0.9])
    assert rotationAngleDeg(M, R) == pytest.approx(7.0, abs=1e-6)
    # same angle whichever of the two conventions (matrix or its inverse) both use
    R2 = tfs.rotation_matrix(np.radians(20.0), [1, 0, 0])
    a = rotationAngleDeg(R, R2)
    assert rotationAngleDeg(np.linalg.inv(R), np.linalg.inv(R2)) == pytest.approx(a, abs=1e-6)


def test_fsc_from_report_shapes():
    from cryogmm_scipion.convert import fscFromReport
    rep = {"fsc": {"resolution_A": [1e11, 20.0, 10.0], "masked": [1.0, 0.8, 0.1],
                   "unmasked": [1.0, 0.7, 0.05]}}
    freq, fsc = fscFromReport(rep)
    assert freq == pytest.approx([1e-11, 0.05, 0.1])
    assert fsc == [1.0, 0.8, 0.1]
    assert fscFromReport({}) is None
    assert fscFromReport({"fsc": [1.0, 0.9]}) is None  # fit-gmm's list: not a half-map curve
