"""cryoSPARC .cs: field mapping against the raw file, .cs -> .star -> .cs, lossless .cs -> .cs."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from scipy.spatial.transform import Rotation

from cryogmm.bridge.io import read_particles, write_particles
from cryogmm.errors import CsError

CS = "cryosparc_P12_J24_001_particles.cs"


def raw(path):
    return np.load(path)  # what cryoSPARC and cryoDRGN read


def test_real_cs_mapping_against_raw_fields(shared_dir):
    path = shared_dir / "data" / "metadata" / CS
    a = raw(path)
    t = read_particles(path)
    assert t.n == len(a) == 2019
    # RELION A = expmap(pose).T (independent implementation: scipy)
    A = Rotation.from_rotvec(a["alignments3D/pose"].astype(np.float64)).as_matrix().transpose(0, 2, 1)
    np.testing.assert_allclose(t.rotmat, A, atol=1e-9)
    # shift: pixels of alignments3D/psize_A, same sign as rlnOrigin
    np.testing.assert_allclose(t.shift_A, a["alignments3D/shift"] * a["alignments3D/psize_A"][:, None], rtol=1e-6)
    np.testing.assert_allclose(t.defocus_u_A, a["ctf/df1_A"])
    np.testing.assert_allclose(t.defocus_v_A, a["ctf/df2_A"])
    np.testing.assert_allclose(t.defocus_angle_deg, np.rad2deg(a["ctf/df_angle_rad"].astype(np.float64)), rtol=1e-12)
    np.testing.assert_allclose(t.voltage_kV, a["ctf/accel_kv"])
    np.testing.assert_allclose(t.cs_mm, a["ctf/cs_mm"])
    np.testing.assert_allclose(t.amp_contrast, a["ctf/amp_contrast"], rtol=1e-7)
    np.testing.assert_allclose(t.apix, a["blob/psize_A"], rtol=1e-7)
    assert (t.box == a["blob/shape"][:, 0]).all()
    assert (t.optics_group == a["ctf/exp_group_id"] + 1).all()
    assert (t.half_set == a["alignments3D/split"] + 1).all()
    assert (t.image_index == a["blob/idx"]).all()
    name0 = t.particles["rlnImageName"].iloc[0]
    assert name0 == "%06d@%s" % (a["blob/idx"][0] + 1, a["blob/path"][0].decode())
    # paths are relative to the cryoSPARC project: the .cs is not in a J<n>/ folder here
    assert Path(t.image_path[0]).resolve() == (path.parent / a["blob/path"][0].decode()).resolve()
    t.require(poses=True, ctf=True)


def test_cs_to_cs_keeps_every_field(shared_dir, tmp_path):
    path = shared_dir / "data" / "metadata" / CS
    write_particles(read_particles(path), tmp_path / "o.cs")
    a, b = raw(path), raw(tmp_path / "o.cs")
    assert set(a.dtype.names) <= set(b.dtype.names)
    regenerated = {"alignments3D/pose", "alignments3D/shift"}
    for f in a.dtype.names:
        if f in regenerated:
            continue
        np.testing.assert_array_equal(a[f], b[f], err_msg=f)
    Ra = Rotation.from_rotvec(a["alignments3D/pose"]).as_matrix()
    Rb = Rotation.from_rotvec(b["alignments3D/pose"]).as_matrix()
    np.testing.assert_allclose(Ra, Rb, atol=1e-6)
    np.testing.assert_allclose(a["alignments3D/shift"], b["alignments3D/shift"], rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("version", ["3.1", "3.0"])
def test_cs_to_star_to_cs_keeps_poses_shifts_ctf(shared_dir, tmp_path, version):
    path = shared_dir / "data" / "metadata" / CS
    t = read_particles(path)
    write_particles(t, tmp_path / "p.star", star_version=version)
    write_particles(read_particles(tmp_path / "p.star"), tmp_path / "back.cs")
    a, b = raw(path), raw(tmp_path / "back.cs")
    Ra = Rotation.from_rotvec(a["alignments3D/pose"]).as_matrix()
    Rb = Rotation.from_rotvec(b["alignments3D/pose"]).as_matrix()
    np.testing.assert_allclose(Ra, Rb, atol=1e-6)
    np.testing.assert_allclose(b["alignments3D/shift"], a["alignments3D/shift"], atol=1e-5)
    for f in ("ctf/df1_A", "ctf/df2_A", "ctf/accel_kv", "ctf/cs_mm", "ctf/amp_contrast", "blob/psize_A"):
        np.testing.assert_array_equal(b[f], a[f], err_msg=f)
    np.testing.assert_allclose(b["ctf/df_angle_rad"], a["ctf/df_angle_rad"], rtol=1e-6)
    for f in ("blob/idx", "blob/shape", "ctf/exp_group_id", "alignments3D/split"):
        np.testing.assert_array_equal(b[f], a[f], err_msg=f)
    assert b["blob/path"].tolist() == a["blob/path"].tolist()
    assert len(np.unique(b["uid"])) == len(b)


def make_cs(path, n=6, **extra):
    """A small synthetic particle .cs written with cryosparc-tools."""
    from cryosparc.dataset import NUMPY_FORMAT, Dataset

    rng = np.random.default_rng(0)
    f = {
        "uid": np.arange(1, n + 1, dtype=np.uint64) * 1000003,
        "blob/path": np.array([">J3/imported/012345678901234567890_stack_a.mrcs"] * (n // 2)
                              + ["J3/imported/098765432109876543210_stack_b.mrcs"] * (n - n // 2), dtype=object),
        "blob/idx": np.arange(n, dtype=np.uint32) % 3,
        "blob/shape": np.full((n, 2), 64, np.uint32),
        "blob/psize_A": np.full(n, 1.5, np.float32),
        "ctf/exp_group_id": np.zeros(n, np.uint32),
        "ctf/accel_kv": np.full(n, 300, np.float32),
        "ctf/cs_mm": np.full(n, 2.7, np.float32),
        "ctf/amp_contrast": np.full(n, 0.1, np.float32),
        "ctf/df1_A": rng.uniform(1e4, 2e4, n).astype(np.float32),
        "ctf/df2_A": rng.uniform(1e4, 2e4, n).astype(np.float32),
        "ctf/df_angle_rad": rng.uniform(-3, 3, n).astype(np.float32),
        "ctf/phase_shift_rad": np.zeros(n, np.float32),
        "ctf/bfactor": np.full(n, 20, np.float32),
        "alignments3D/pose": rng.normal(size=(n, 3)).astype(np.float32),
        "alignments3D/shift": rng.normal(size=(n, 2)).astype(np.float32),
        "alignments3D/psize_A": np.full(n, 3.0, np.float32),  # refined at bin 2
        "alignments3D/split": (np.arange(n) % 2).astype(np.uint32),
        "alignments2D/pose": rng.normal(size=n).astype(np.float32),
        "location/micrograph_path": np.array([">J2/motion/mic_a.mrc"] * n, dtype=object),
    }
    f.update(extra)
    for k in [k for k, v in f.items() if v is None]:
        del f[k]
    Dataset(f).save(str(path), format=NUMPY_FORMAT)
    return f


def test_synthetic_cs_prefixes_uids_and_alignment_pixel_size(tmp_path):
    job = tmp_path / "P1" / "J9"
    job.mkdir(parents=True)
    f = make_cs(job / "J9_particles.cs")
    t = read_particles(job / "J9_particles.cs")
    # '>' dropped, UID-prefixed file names kept (they are the files on disk)
    assert t.particles["rlnImageName"].iloc[0] == "000001@J3/imported/012345678901234567890_stack_a.mrcs"
    assert t.particles["rlnMicrographName"].iloc[0] == "J2/motion/mic_a.mrc"
    # paths resolve against the project folder that holds J9/
    assert t.image_path[0] == str(tmp_path / "P1" / "J3/imported/012345678901234567890_stack_a.mrcs")
    # shifts are in pixels of alignments3D/psize_A (3.0), not blob/psize_A (1.5)
    np.testing.assert_allclose(t.shift_A, f["alignments3D/shift"].astype(np.float64) * 3.0)
    np.testing.assert_allclose(t.bfactor_A2, 20.0)
    # writing back keeps the alignment pixel size and the pixel shifts
    write_particles(t, tmp_path / "o.cs")
    b = raw(tmp_path / "o.cs")
    np.testing.assert_allclose(b["alignments3D/shift"], f["alignments3D/shift"], rtol=1e-6)
    assert b["blob/path"][0].decode() == f["blob/path"][0]
    np.testing.assert_array_equal(b["alignments2D/pose"], f["alignments2D/pose"])  # carried


def test_classification_poses_from_most_probable_class(tmp_path):
    n = 4
    rng = np.random.default_rng(1)
    poses = [rng.normal(size=(n, 3)).astype(np.float32) for _ in range(2)]
    post = np.array([[0.9, 0.1], [0.2, 0.8], [0.6, 0.4], [0.3, 0.7]], np.float32)
    extra = {"alignments3D/pose": None, "alignments3D/shift": None, "alignments3D/psize_A": None, "alignments3D/split": None}
    for k in range(2):
        extra[f"alignments_class_{k}/pose"] = poses[k]
        extra[f"alignments_class_{k}/shift"] = np.zeros((n, 2), np.float32)
        extra[f"alignments_class_{k}/psize_A"] = np.full(n, 1.5, np.float32)
        extra[f"alignments_class_{k}/class_posterior"] = post[:, k]
    make_cs(tmp_path / "c.cs", n=n, **extra)
    t = read_particles(tmp_path / "c.cs")
    best = post.argmax(1)
    assert t.particles["rlnClassNumber"].tolist() == (best + 1).tolist()
    want = np.stack([poses[best[i]][i] for i in range(n)]).astype(np.float64)
    np.testing.assert_allclose(t.rotmat, Rotation.from_rotvec(want).as_matrix().transpose(0, 2, 1), atol=1e-9)


def test_exp_group_with_mixed_optics_is_split(tmp_path):
    cs = np.full(6, 2.7, np.float32)
    cs[3:] = 0.01
    make_cs(tmp_path / "m.cs", **{"ctf/cs_mm": cs})
    t = read_particles(tmp_path / "m.cs")
    assert len(t.optics) == 2
    np.testing.assert_allclose(t.cs_mm, cs, rtol=1e-7)


def test_cs_without_alignments_when_poses_needed(tmp_path):
    make_cs(tmp_path / "noalign.cs", **{"alignments3D/pose": None, "alignments3D/shift": None,
                                       "alignments3D/psize_A": None, "alignments3D/split": None})
    t = read_particles(tmp_path / "noalign.cs")
    assert not t.has_poses and t.has_ctf
    with pytest.raises(CsError) as e:
        t.require(poses=True, ctf=True)
    assert str(e.value).startswith(str(tmp_path / "noalign.cs") + ": missing fields alignments3D/pose")


def test_latent_and_labels_map_to_cryogmm_fields(tmp_path):
    from cryogmm.bridge.results import merge_results

    make_cs(tmp_path / "in.cs")
    z = np.arange(12, dtype=np.float64).reshape(6, 2) / 10
    merge_results(tmp_path / "in.cs", tmp_path / "out.cs", latent=z, labels=np.array([0, 1, 1, 2, 2, 2]))
    b = raw(tmp_path / "out.cs")
    np.testing.assert_allclose(b["cryogmm/latent_0"], z[:, 0], rtol=1e-7)
    np.testing.assert_allclose(b["cryogmm/latent_1"], z[:, 1], rtol=1e-7)
    assert b["cryogmm/label"].tolist() == [0, 1, 1, 2, 2, 2]
    assert "alignments2D/pose" in b.dtype.names  # the user's fields are all still there
    t = read_particles(tmp_path / "out.cs")
    np.testing.assert_allclose(t.particles["rlnCryogmmLatent1"], z[:, 1], rtol=1e-7)
    assert t.particles["rlnCryogmmLabel"].tolist() == [0, 1, 1, 2, 2, 2]


@pytest.mark.parametrize("content, expect", [(b"", "not a readable cryoSPARC dataset"), (b"garbage" * 10, "not a readable")])
def test_bad_cs(tmp_path, content, expect):
    p = tmp_path / "bad.cs"
    p.write_bytes(content)
    with pytest.raises(CsError, match=expect) as e:
        read_particles(p)
    assert str(p) in str(e.value) and "\n" not in str(e.value)


def test_cs_without_blob_is_not_a_particle_file(tmp_path):
    from cryosparc.dataset import NUMPY_FORMAT, Dataset

    Dataset({"uid": np.arange(3, dtype=np.uint64), "ctf/df1_A": np.ones(3, np.float32)}).save(
        str(tmp_path / "passthrough.cs"), format=NUMPY_FORMAT)
    with pytest.raises(CsError, match=r"passthrough.cs: no blob/path field: not a particle file"):
        read_particles(tmp_path / "passthrough.cs")
