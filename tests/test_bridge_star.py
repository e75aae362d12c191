"""STAR files: round trips on every real file, RELION 3.0 <-> 3.1, strict parsing."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from cryogmm.bridge.io import read_particles, write_particles
from cryogmm.bridge.star import read_star_blocks, write_star_blocks
from cryogmm.errors import StarError

PARTICLE_STARS = ["relion31.star", "relion31.6opticsgroups.star", "rln3.1_data_style.star"]
OTHER_STARS = ["postprocess.star", "run_it025_optimiser_3D.star"]


def assert_frames_close(a: pd.DataFrame, b: pd.DataFrame, tol=1e-6):
    assert list(a.columns) == list(b.columns)
    assert len(a) == len(b)
    for c in a.columns:
        x, y = a[c], b[c]
        if x.dtype.kind in "iuf" and y.dtype.kind in "iuf":
            np.testing.assert_allclose(x.to_numpy(float), y.to_numpy(float), rtol=tol, atol=tol, err_msg=c)
        else:
            assert x.astype(str).tolist() == y.astype(str).tolist(), c


def assert_tables_equal(a, b, tol=1e-6):
    """Same particles in canonical form: every column, the optics, and the typed views."""
    assert_frames_close(a.particles, b.particles, tol)
    assert_frames_close(a.optics, b.optics, tol)
    names = ["shift_A", "apix", "box", "voltage_kV", "cs_mm", "amp_contrast", "image_index", "optics_group"]
    if a.has_ctf:
        names += ["defocus_u_A", "defocus_v_A", "defocus_angle_deg"]
    for name in names:
        np.testing.assert_allclose(getattr(a, name), getattr(b, name), rtol=tol, atol=tol, err_msg=name)
    if a.has_poses:
        np.testing.assert_allclose(a.rotmat, b.rotmat, atol=tol)


@pytest.mark.parametrize("name", PARTICLE_STARS + OTHER_STARS)
def test_blocks_round_trip_every_real_star(shared_dir, tmp_path, name):
    src = shared_dir / "data" / "metadata" / name
    blocks = read_star_blocks(src)
    write_star_blocks(blocks, tmp_path / name)
    again = read_star_blocks(tmp_path / name)
    assert list(again) == list(blocks)
    for k, b in blocks.items():
        if isinstance(b, pd.DataFrame):
            assert_frames_close(b, again[k], tol=0)  # shortest round-trip text: exact
        else:
            assert again[k] == b


@pytest.mark.parametrize("name", PARTICLE_STARS)
def test_particle_star_read_write_read(shared_dir, tmp_path, name):
    src = shared_dir / "data" / "metadata" / name
    t = read_particles(src)
    write_particles(t, tmp_path / name)
    t2 = read_particles(tmp_path / name)
    assert_tables_equal(t, t2)
    # block names and column order as in the user's file; every column kept
    orig, out = read_star_blocks(src), read_star_blocks(tmp_path / name)
    assert list(out) == list(orig)
    for k in orig:
        cols = list(orig[k].columns)
        assert list(out[k].columns)[: len(cols)] == cols
        assert_frames_close(orig[k], out[k][cols], tol=1e-12)


def test_relion31_known_values(shared_dir):
    t = read_particles(shared_dir / "data" / "metadata" / "relion31.star")
    assert t.n == 5 and len(t.optics) == 1
    np.testing.assert_allclose(t.euler_deg[0], [-102.30296, 82.318041, 124.706463])
    np.testing.assert_allclose(t.shift_A[1], [-0.25248, 0.403454])
    assert t.image_index.tolist() == [0, 1, 2, 3, 4]
    assert t.image_path[0] == str(shared_dir / "data" / "metadata" / "relion31.mrcs")
    np.testing.assert_allclose(t.apix, 2.806)
    assert t.box.tolist() == [256] * 5
    np.testing.assert_allclose(t.cs_mm, 0.01)
    np.testing.assert_allclose(t.phase_shift_deg, 0.0)
    np.testing.assert_allclose(t.ctf_scale, 1.0)


def test_six_optics_groups_lookup(shared_dir):
    t = read_particles(shared_dir / "data" / "metadata" / "relion31.6opticsgroups.star")
    assert len(t.optics) == 6
    opt = t.optics.set_index("rlnOpticsGroup")
    g = t.particles["rlnOpticsGroup"].to_numpy()
    np.testing.assert_array_equal(t.apix, opt.loc[g, "rlnImagePixelSize"].to_numpy())
    np.testing.assert_array_equal(t.cs_mm, opt.loc[g, "rlnSphericalAberration"].to_numpy())
    # "3@Polish/..." (no zero padding) is image 3, index 2
    assert t.image_index[0] == 2


@pytest.mark.parametrize("name", ["relion31.star", "relion31.6opticsgroups.star"])
def test_31_to_30_to_31(shared_dir, tmp_path, name):
    t = read_particles(shared_dir / "data" / "metadata" / name)
    write_particles(t, tmp_path / "p30.star", star_version="3.0")
    blocks = read_star_blocks(tmp_path / "p30.star")
    assert len(blocks) == 1
    p30 = next(iter(blocks.values()))
    assert "rlnOriginX" in p30.columns and "rlnOriginXAngst" not in p30.columns
    np.testing.assert_allclose(p30["rlnOriginX"] * p30["rlnImagePixelSize"], t.shift_A[:, 0], atol=1e-9)
    t30 = read_particles(tmp_path / "p30.star")
    assert t30.layout.version == "3.0"
    for name_ in ("shift_A", "rotmat", "defocus_u_A", "apix", "box", "voltage_kV", "cs_mm", "amp_contrast", "optics_group"):
        np.testing.assert_allclose(getattr(t30, name_), getattr(t, name_), atol=1e-9, err_msg=name_)
    # 3.0 -> 3.0 keeps the file as it was; 3.0 -> 3.1 gives back the original columns
    write_particles(t30, tmp_path / "again30.star", star_version="3.0")
    assert_frames_close(p30, next(iter(read_star_blocks(tmp_path / "again30.star").values())), tol=0)
    write_particles(t30, tmp_path / "p31.star", star_version="3.1")
    t31 = read_particles(tmp_path / "p31.star")
    assert_frames_close(t.particles, t31.particles[list(t.particles.columns)])
    assert_frames_close(t.optics, t31.optics[list(t.optics.columns)])


def test_relion30_detector_pixel_size(tmp_path):
    """A genuine 3.0 file: pixel size from rlnDetectorPixelSize/rlnMagnification, origins in px."""
    text = """
data_

loop_
_rlnImageName #1
_rlnDefocusU #2
_rlnDefocusV #3
_rlnDefocusAngle #4
_rlnVoltage #5
_rlnSphericalAberration #6
_rlnAmplitudeContrast #7
_rlnMagnification #8
_rlnDetectorPixelSize #9
_rlnAngleRot #10
_rlnAngleTilt #11
_rlnAnglePsi #12
_rlnOriginX #13
_rlnOriginY #14
000001@a.mrcs 10000 9000 30 300 2.7 0.1 50000 7.0 10 20 30 1.5 -2
000002@a.mrcs 11000 9500 35 300 2.7 0.1 50000 7.0 11 21 31 0.5 2
000001@b.mrcs 12000 9900 40 200 2.0 0.07 50000 7.0 12 22 32 -1 0
"""
    (tmp_path / "r30.star").write_text(text)
    t = read_particles(tmp_path / "r30.star")
    np.testing.assert_allclose(t.apix, 1.4)
    assert t.optics_group.tolist() == [1, 1, 2]
    assert len(t.optics) == 2
    np.testing.assert_allclose(t.shift_A, [[2.1, -2.8], [0.7, 2.8], [-1.4, 0.0]])
    np.testing.assert_allclose(t.voltage_kV, [300, 300, 200])
    assert "rlnVoltage" not in t.particles.columns  # moved to the optics table
    write_particles(t, tmp_path / "again.star", star_version="3.0")
    a, b = read_star_blocks(tmp_path / "r30.star")[""], read_star_blocks(tmp_path / "again.star")[""]
    assert_frames_close(a, b, tol=0)  # same columns, same order, same values


def test_read_star_blocks_matches_starfile_package(shared_dir, tmp_path):
    """An independent reader (starfile) reads what we write, value for value."""
    starfile = pytest.importorskip("starfile")
    t = read_particles(shared_dir / "data" / "metadata" / "relion31.6opticsgroups.star")
    write_particles(t, tmp_path / "o.star")
    theirs = starfile.read(tmp_path / "o.star", always_dict=True)
    assert list(theirs) == ["optics", "particles"]
    assert_frames_close(t.particles, theirs["particles"])
    assert_frames_close(t.optics, theirs["optics"])


def test_quoted_and_empty_strings_round_trip(tmp_path):
    df = pd.DataFrame({"rlnImageName": ["1@a b.mrcs", "2@c.mrcs"], "rlnMicrographName": ["", "x"], "v": [1e-9, 2.5]})
    write_star_blocks({"particles": df}, tmp_path / "q.star")
    back = read_star_blocks(tmp_path / "q.star")["particles"]
    assert back["rlnImageName"].tolist() == ["1@a b.mrcs", "2@c.mrcs"]
    assert back["rlnMicrographName"].tolist() == ["", "x"]
    assert back["v"].tolist() == [1e-9, 2.5]


# ------------------------------------------------------------------ malformed input
GOOD = """
data_optics

loop_
_rlnOpticsGroup
_rlnImagePixelSize
_rlnImageSize
_rlnVoltage
_rlnSphericalAberration
_rlnAmplitudeContrast
1 1.5 64 300 2.7 0.1

data_particles

loop_
_rlnImageName
_rlnOpticsGroup
_rlnAngleRot
_rlnAngleTilt
_rlnAnglePsi
_rlnDefocusU
_rlnDefocusV
_rlnDefocusAngle
000001@s.mrcs 1 10 20 30 10000 9000 5
000002@s.mrcs 1 11 21 31 10000 9000 5
"""


@pytest.mark.parametrize(
    "text, expect",
    [
        (GOOD[: GOOD.rindex(" 9000")], "line 25: row 2 of the loop has 6 values for its 8 columns (truncated"),
        (GOOD.replace("000002@s.mrcs 1 11", "000002@s.mrcs 1 1 11"), "line 25: 9 values where the loop has 8 columns"),
        (GOOD.replace("000002@s.mrcs 1 11", "000002@s.mrcs 7 11"), "refers to optics group 7"),
        ("", "no data_ block"),
        ("hello\n", "expected a data_ block"),
        (GOOD.replace("_rlnImageName", "_rlnImageNameX"), "no particle table"),
        (GOOD.replace("loop_\n_rlnImageName", "loop_\n_rlnOpticsGroup\n_rlnImageName"), "repeated column labels"),
    ],
    ids=["truncated", "extra-value", "unknown-optics-group", "empty", "not-star", "no-particles", "duplicate-label"],
)
def test_bad_star_is_one_clear_error(tmp_path, text, expect):
    p = tmp_path / "bad.star"
    p.write_text(text)
    with pytest.raises(StarError) as e:
        read_particles(p)
    msg = str(e.value)
    assert str(p) in msg and expect in msg and "\n" not in msg


def test_require_names_missing_columns(tmp_path):
    p = tmp_path / "noposes.star"
    p.write_text(GOOD.replace("_rlnAngleRot", "_rlnSomething"))
    t = read_particles(p)
    assert not t.has_poses and t.has_ctf
    t.require(poses=False, ctf=True)
    with pytest.raises(StarError, match=r"noposes.star: missing columns rlnAngleRot needed for poses"):
        t.require()


def test_table_api(tmp_path):
    p = tmp_path / "good.star"
    p.write_text(GOOD)
    t = read_particles(p)
    h = t.with_half_sets(seed=1)
    assert sorted(h.half_set.tolist()) == [1, 2] and "rlnRandomSubset" not in t.particles.columns
    assert h.with_half_sets(seed=2) is h  # unchanged when present
    R = np.stack([np.eye(3), np.diag([1.0, -1.0, -1.0])])
    w = t.with_poses(rotmat=R, shift_A=[[1.0, 2.0], [3.0, 4.0]])
    np.testing.assert_allclose(w.rotmat, R, atol=1e-12)
    np.testing.assert_allclose(w.euler_deg[0], [0, 0, 0], atol=1e-12)
    assert list(w.particles.columns)[:5] == list(t.particles.columns)[:5]  # replaced in place
    s = w.subset([1])
    assert s.n == 1 and s.shift_A.tolist() == [[3.0, 4.0]]
    c = t.with_columns(rlnCryogmmLatent0=np.array([0.5, -0.5]))
    assert c.particles["rlnCryogmmLatent0"].tolist() == [0.5, -0.5]
    assert t.image_path[0] == str(tmp_path / "s.mrcs")
    assert read_particles(p, project_dir="/data/proj").image_path[0] == "/data/proj/s.mrcs"


def test_relion5_style_general_block_and_extra_columns_kept(tmp_path):
    """RELION 4/5 particle files: a data_general block first, tomography columns: all carried."""
    text = "data_general\n\n_rlnTomoSubTomosAre2DStacks 1\n\n" + GOOD.replace(
        "_rlnDefocusAngle\n", "_rlnDefocusAngle\n_rlnTomoName\n").replace(" 5\n", " 5 TS_01\n")
    (tmp_path / "r5.star").write_text(text)
    t = read_particles(tmp_path / "r5.star")
    assert t.particles["rlnTomoName"].tolist() == ["TS_01", "TS_01"]
    write_particles(t, tmp_path / "o.star")
    blocks = read_star_blocks(tmp_path / "o.star")
    assert list(blocks) == ["general", "optics", "particles"]
    assert blocks["general"] == {"rlnTomoSubTomosAre2DStacks": 1}
    assert list(blocks["particles"].columns) == list(read_star_blocks(tmp_path / "r5.star")["particles"].columns)


def test_bad_image_name(tmp_path):
    p = tmp_path / "names.star"
    p.write_text(GOOD.replace("000002@s.mrcs", "abc@s.mrcs"))
    t = read_particles(p)
    with pytest.raises(StarError, match=r"names.star: rlnImageName 'abc@s.mrcs' does not start with a 1-based image number"):
        t.image_index
