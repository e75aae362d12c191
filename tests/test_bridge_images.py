"""ImageSource: the real stack by the names in relion31.star; several stacks; bad stacks."""

from __future__ import annotations

import warnings

import mrcfile
import numpy as np
import pandas as pd
import pytest

from cryogmm.bridge.images import ImageSource
from cryogmm.bridge.io import read_particles
from cryogmm.bridge.table import ParticleTable
from cryogmm.errors import StackError


def test_real_stack_through_relion31_star(shared_dir):
    star = shared_dir / "data" / "metadata" / "relion31.star"
    src = ImageSource.from_table(read_particles(star))
    assert (src.n, src.box) == (5, 256)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with mrcfile.open(shared_dir / "data" / "metadata" / "relion31.mrcs", permissive=True) as m:
            direct = np.array(m.data, dtype=np.float32)
    got = src.images([3, 0])
    assert got.dtype == np.float32 and got.shape == (2, 256, 256)
    np.testing.assert_array_equal(got[0], direct[3])  # "000004@relion31.mrcs"
    np.testing.assert_array_equal(got[1], direct[0])
    assert float(got[0, 128, 128]) == float(direct[3, 128, 128])
    seen = np.concatenate([i for i, _ in src.chunks(2)])
    assert seen.tolist() == [0, 1, 2, 3, 4]


def write_stack(path, n, box=16, seed=0):
    data = np.random.default_rng(seed).normal(size=(n, box, box)).astype(np.float32)
    with mrcfile.new(path, overwrite=True) as m:
        m.set_data(data)
        m.set_image_stack()
    return data


def table_for(tmp_path, names, box=16):
    particles = pd.DataFrame({"rlnImageName": names, "rlnOpticsGroup": 1})
    optics = pd.DataFrame({"rlnOpticsGroup": [1], "rlnImagePixelSize": [2.0], "rlnImageSize": [box]})
    return ParticleTable(particles, optics, source=tmp_path / "p.star")


def test_several_stacks_and_single_images(tmp_path):
    a = write_stack(tmp_path / "mic1.mrcs", 3, seed=1)
    b = write_stack(tmp_path / "mic2.mrcs", 2, seed=2)
    single = np.random.default_rng(3).normal(size=(16, 16)).astype(np.float32)
    with mrcfile.new(tmp_path / "one.mrc") as m:
        m.set_data(single)
    t = table_for(tmp_path, ["000002@mic2.mrcs", "000003@mic1.mrcs", "one.mrc", "000001@mic1.mrcs", "000001@mic2.mrcs"])
    src = ImageSource.from_table(t)
    got = src.images([0, 1, 2, 3, 4])
    for g, want in zip(got, [b[1], a[2], single, a[0], b[0]]):
        np.testing.assert_array_equal(g, want)
    np.testing.assert_array_equal(src.images([4, 0]), np.stack([b[0], b[1]]))


@pytest.mark.parametrize(
    "names, box, expect",
    [
        (["000001@missing.mrcs"], 16, "missing.mrcs: particle stack not found (referenced by"),
        (["000004@s.mrcs"], 16, "s.mrcs: holds 3 image(s) but"),
        (["000001@s.mrcs"], 32, "s.mrcs: images are 16x16 px but"),
    ],
    ids=["missing", "short", "wrong-size"],
)
def test_bad_stacks(tmp_path, names, box, expect):
    write_stack(tmp_path / "s.mrcs", 3)
    t = table_for(tmp_path, names, box=box)
    with pytest.raises(StackError) as e:
        ImageSource.from_table(t)
    assert expect in str(e.value) and "\n" not in str(e.value)
    if "missing" not in expect:
        assert "p.star" in str(e.value)


def test_truncated_stack(tmp_path):
    write_stack(tmp_path / "s.mrcs", 3)
    data = (tmp_path / "s.mrcs").read_bytes()
    (tmp_path / "s.mrcs").write_bytes(data[: len(data) - 100])
    with pytest.raises(StackError, match="file is truncated"):
        ImageSource.from_table(table_for(tmp_path, ["000001@s.mrcs"]))


def test_pixel_size_in_header_must_match(tmp_path):
    write_stack(tmp_path / "s.mrcs", 3)
    with mrcfile.open(tmp_path / "s.mrcs", mode="r+") as m:
        m.voxel_size = 3.0
    with pytest.raises(StackError, match=r"s.mrcs: pixel size is 3 Å in its header but .*p.star gives rlnImagePixelSize 2"):
        ImageSource.from_table(table_for(tmp_path, ["000001@s.mrcs"]))
    with mrcfile.open(tmp_path / "s.mrcs", mode="r+") as m:
        m.voxel_size = 2.01  # within 1%
    assert ImageSource.from_table(table_for(tmp_path, ["000001@s.mrcs"])).box == 16


def test_relion_project_layout_and_relocation(tmp_path):
    """Paths relative to a RELION project folder resolve from a STAR two levels down, and a
    table written elsewhere keeps paths that still find the same stacks."""
    from cryogmm.bridge.io import write_particles

    proj = tmp_path / "proj"
    (proj / "Extract" / "job005").mkdir(parents=True)
    (proj / "Refine3D" / "job010").mkdir(parents=True)
    write_stack(proj / "Extract" / "job005" / "p.mrcs", 3)
    t = table_for(proj / "Refine3D" / "job010", ["000002@Extract/job005/p.mrcs"])
    star = proj / "Refine3D" / "job010" / "run_data.star"
    write_particles(t, star)
    t = read_particles(star)
    assert t.image_path[0] == str(proj / "Extract" / "job005" / "p.mrcs")
    assert ImageSource.from_table(t).images([0]).shape == (1, 16, 16)
    # written into another job folder of the same project: the relative path still works, kept as is
    inside = t.relocated(proj / "CryoGMM" / "job001")
    assert inside.particles["rlnImageName"][0] == "000002@Extract/job005/p.mrcs"
    # written outside the project: made absolute, so it finds the same stack
    outside = t.relocated(tmp_path / "elsewhere")
    assert outside.particles["rlnImageName"][0] == f"000002@{proj / 'Extract' / 'job005' / 'p.mrcs'}"
    write_particles(outside, tmp_path / "elsewhere.star")
    again = read_particles(tmp_path / "elsewhere.star")
    np.testing.assert_array_equal(ImageSource.from_table(again).images([0]), ImageSource.from_table(t).images([0]))
