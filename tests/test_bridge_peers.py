"""The field's own readers agree with us: cryoDRGN 4.3.1 and RELION's relion_star_handler.

cryoDRGN pose pickles hold ``(rot [N,3,3], trans [N,2])``: ``rot`` is RELION's matrix ``A``
(``utils.R_from_relion`` of the Euler angles; ``expmap(pose).T`` for a .cs) and ``trans``
is the origin as a fraction of the box, same sign as ``rlnOriginX``:
``rlnOriginXAngst / apix / D`` from a STAR, ``alignments3D/shift / blob/shape[0]`` from a
.cs (alignment pixels: cryoDRGN ignores ``alignments3D/psize_A``). CTF pickles hold float32
``[D, apix, dfU, dfV, dfAngle°, kV, Cs, Q0, phase°]`` per particle.
"""

from __future__ import annotations

import importlib.util
import json
import pickle
import shutil
import subprocess
import sys

import numpy as np
import pytest

from cryogmm.bridge.io import read_particles, write_particles

pytestmark = pytest.mark.peer

CS = "cryosparc_P12_J24_001_particles.cs"


RELION_STAR_HANDLER = shutil.which("relion_star_handler")
HAVE_CRYODRGN = importlib.util.find_spec("cryodrgn") is not None
needs_cryodrgn = pytest.mark.skipif(not HAVE_CRYODRGN, reason="cryodrgn not installed (pip install cryodrgn==4.3.1)")
needs_relion = pytest.mark.skipif(RELION_STAR_HANDLER is None, reason="relion_star_handler not on PATH (apt install relion)")

# Runs `cryodrgn <cmd> <args>` for several commands in one process, exactly as cryoDRGN's
# own entry point does (add_args on a parser, then main(args)), without paying the import
# of all 23 cryoDRGN commands for each call.
_DRIVER = """
import argparse, importlib, json, sys
for cmd, argv in json.loads(sys.argv[1]):
    mod = importlib.import_module("cryodrgn.commands." + cmd)
    parser = argparse.ArgumentParser(prog="cryodrgn " + cmd)
    mod.add_args(parser)
    mod.main(parser.parse_args(argv))
"""


def load(p):
    with open(p, "rb") as f:
        return pickle.load(f)


@pytest.fixture(scope="module")
def converted(shared_dir, tmp_path_factory):
    """The real .cs, our STAR conversions of it (3.1 and 3.0), and cryoDRGN's pickles of all."""
    d = tmp_path_factory.mktemp("peer")
    cs = shared_dir / "data" / "metadata" / CS
    t = read_particles(cs)
    write_particles(t, d / "ours31.star", star_version="3.1")
    write_particles(t, d / "ours30.star", star_version="3.0")
    six = read_particles(shared_dir / "data" / "metadata" / "relion31.6opticsgroups.star")
    write_particles(six, d / "six.star")
    if HAVE_CRYODRGN:
        calls = [
            ("parse_pose_csparc", [str(cs), "-D", str(int(t.box[0])), "-o", str(d / "cs_pose.pkl")]),
            ("parse_pose_star", [str(d / "ours31.star"), "-o", str(d / "ours31.star.pkl")]),
            ("parse_pose_star", [str(d / "ours30.star"), "-o", str(d / "ours30.star.pkl")]),
            ("parse_ctf_csparc", [str(cs), "-o", str(d / "cs_ctf.pkl")]),
            ("parse_ctf_star", [str(d / "ours31.star"), "-o", str(d / "star_ctf.pkl")]),
            ("parse_pose_star", [str(d / "six.star"), "-o", str(d / "six_pose.pkl")]),
            ("parse_ctf_star", [str(d / "six.star"), "-o", str(d / "six_ctf.pkl")]),
        ]
        r = subprocess.run([sys.executable, "-c", _DRIVER, json.dumps(calls)], capture_output=True, text=True, cwd=d)
        assert r.returncode == 0, r.stderr[-3000:]
    return d, cs, t, six


def expected_trans(t):
    return t.shift_A / t.apix[:, None] / t.box[:, None]


@needs_cryodrgn
def test_cryodrgn_poses_from_cs_and_from_our_star(converted):
    d, cs, t, six = converted
    rot, trans = load(d / "cs_pose.pkl")
    np.testing.assert_allclose(rot, t.rotmat, atol=1e-5)
    a = np.load(cs)
    np.testing.assert_allclose(trans, a["alignments3D/shift"] / a["blob/shape"][:, :1], rtol=1e-6, atol=1e-9)
    np.testing.assert_allclose(trans, expected_trans(t), atol=1e-6)  # alignment px == blob px here
    for star in ("ours31.star", "ours30.star"):
        rot_s, trans_s = load(d / f"{star}.pkl")
        np.testing.assert_allclose(rot_s, t.rotmat, atol=1e-5, err_msg=star)
        np.testing.assert_allclose(rot_s, rot, atol=1e-5, err_msg=star)
        np.testing.assert_allclose(trans_s, expected_trans(t), atol=1e-6, err_msg=star)
        np.testing.assert_allclose(trans_s, trans, atol=1e-6, err_msg=star)


@needs_cryodrgn
def test_cryodrgn_ctf_from_cs_and_from_our_star(converted):
    d, cs, t, six = converted
    ours = np.stack([t.box, t.apix, t.defocus_u_A, t.defocus_v_A, t.defocus_angle_deg, t.voltage_kV,
                     t.cs_mm, t.amp_contrast, t.phase_shift_deg], axis=1)
    for p in ("cs_ctf.pkl", "star_ctf.pkl"):
        c = load(d / p)
        assert c.shape == (t.n, 9)
        np.testing.assert_allclose(c, ours, rtol=1e-6, atol=1e-4, err_msg=p)


@needs_relion
@pytest.mark.parametrize("version", ["3.1", "3.0"])
@pytest.mark.parametrize("src", [CS, "relion31.6opticsgroups.star"])
def test_relion_reads_what_we_write(shared_dir, tmp_path, src, version):
    t = read_particles(shared_dir / "data" / "metadata" / src)
    write_particles(t, tmp_path / "ours.star", star_version=version)
    r = subprocess.run([RELION_STAR_HANDLER, "--i", "ours.star", "--o", "relion.star"],
                       capture_output=True, text=True, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert "could not read optics groups" not in r.stderr
    back = read_particles(tmp_path / "relion.star")  # RELION writes 3.1 (it converts a 3.0 file)
    assert back.n == t.n and back.layout.version == "3.1"
    np.testing.assert_allclose(back.rotmat, t.rotmat, atol=1e-5)
    np.testing.assert_allclose(back.shift_A, t.shift_A, atol=1e-5)
    np.testing.assert_allclose(back.defocus_u_A, t.defocus_u_A, rtol=1e-6)
    np.testing.assert_allclose(back.apix, t.apix, rtol=1e-6)
    np.testing.assert_allclose(back.cs_mm, t.cs_mm, rtol=1e-6)
    np.testing.assert_allclose(back.voltage_kV, t.voltage_kV, rtol=1e-6)
    assert back.particles["rlnImageName"].tolist() == t.particles["rlnImageName"].tolist()


def ctf_rows(t):
    return np.stack([t.box, t.apix, t.defocus_u_A, t.defocus_v_A, t.defocus_angle_deg, t.voltage_kV,
                     t.cs_mm, t.amp_contrast, t.phase_shift_deg], axis=1)


@needs_cryodrgn
def test_cryodrgn_reads_six_optics_groups_as_we_do(converted):
    """Per-particle pixel size and Cs come from each particle's optics group."""
    d, cs, t, six = converted
    rot, trans = load(d / "six_pose.pkl")
    np.testing.assert_allclose(rot, six.rotmat, atol=1e-5)
    np.testing.assert_allclose(trans, expected_trans(six), atol=1e-6)
    np.testing.assert_allclose(load(d / "six_ctf.pkl"), ctf_rows(six), rtol=1e-6, atol=1e-4)
    assert len(np.unique(six.apix)) == 2 and len(np.unique(six.cs_mm)) == 2
