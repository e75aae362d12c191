"""Bad input to the engine's jobs: one clear line naming the file, exit code 2, nothing written."""

import mrcfile
import numpy as np
import pytest
import starfile

from cryogmm.cli import main as cli
from cryogmm.demo import example_model


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    out = tmp_path_factory.mktemp("bad") / "sim"
    assert cli(["simulate", "--model", str(example_model("open")), "--n", "20", "--box", "40", "--apix", "3",
                "--seed", "1", "--out", str(out)]) == 0
    return out


def fails(capsys, argv, *needles, out=None):
    rc = cli(argv)
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2, err
    assert len(err) == 1, err
    for n in needles:
        assert n in err[0], err[0]
    if out is not None:
        assert not out.exists() or not any(out.iterdir()), list(out.iterdir())
    return err[0]


def write_star(path, blocks):
    starfile.write(blocks, path, overwrite=True)
    return path


def test_missing_stack(small, tmp_path, capsys):
    b = starfile.read(small / "particles.star", always_dict=True)
    star = write_star(tmp_path / "p.star", b)  # the stack is not beside this copy
    fails(capsys, ["reconstruct", str(star), "--out", str(tmp_path / "o")], "particles.mrcs", out=tmp_path / "o")


def test_short_stack(small, tmp_path, capsys):
    b = starfile.read(small / "particles.star", always_dict=True)
    with mrcfile.new(tmp_path / "particles.mrcs") as m:
        m.set_data(mrcfile.read(small / "particles.mrcs")[:10])
        m.voxel_size = 3.0
    star = write_star(tmp_path / "p.star", b)
    fails(capsys, ["reconstruct", str(star), "--out", str(tmp_path / "o")], "particles.mrcs", out=tmp_path / "o")


@pytest.mark.parametrize("column, value, needle", [("rlnImageSize", 48, "48"), ("rlnImagePixelSize", 2.0, "pixel")])
def test_box_or_pixel_mismatch_between_stack_and_star(small, tmp_path, capsys, column, value, needle):
    b = starfile.read(small / "particles.star", always_dict=True)
    b["optics"][column] = value
    with mrcfile.new(tmp_path / "particles.mrcs") as m:
        m.set_data(mrcfile.read(small / "particles.mrcs"))
        m.voxel_size = 3.0
    star = write_star(tmp_path / "p.star", b)
    fails(capsys, ["reconstruct", str(star), "--out", str(tmp_path / "o")], needle, out=tmp_path / "o")


@pytest.mark.parametrize("drop, what", [(["rlnAngleRot", "rlnAngleTilt", "rlnAnglePsi"], "rlnAngleRot"),
                                        (["rlnDefocusU", "rlnDefocusV"], "rlnDefocusU")])
def test_star_without_poses_or_ctf(small, tmp_path, capsys, drop, what):
    b = starfile.read(small / "particles.star", always_dict=True)
    b["particles"] = b["particles"].drop(columns=drop)
    star = write_star(small / f"no_{what}.star", b)
    fails(capsys, ["reconstruct", str(star), "--out", str(tmp_path / "o")], str(star.name), what, out=tmp_path / "o")


def test_non_cubic_map(tmp_path, capsys):
    with mrcfile.new(tmp_path / "flat.mrc") as m:
        m.set_data(np.zeros((20, 24, 24), np.float32))
        m.voxel_size = 2.0
    fails(capsys, ["simulate", "--map", str(tmp_path / "flat.mrc"), "--n", "5", "--out", str(tmp_path / "o")],
          "flat.mrc", "cubic", out=tmp_path / "o")


def test_nan_in_map(tmp_path, capsys):
    data = np.zeros((24, 24, 24), np.float32)
    data[3, 4, 5] = np.nan
    with mrcfile.new(tmp_path / "nan.mrc") as m:
        m.set_data(data)
        m.voxel_size = 2.0
    fails(capsys, ["simulate", "--map", str(tmp_path / "nan.mrc"), "--n", "5", "--out", str(tmp_path / "o")],
          "nan.mrc", "NaN", out=tmp_path / "o")


def test_missing_model_and_unreadable_model(tmp_path, capsys):
    fails(capsys, ["simulate", "--model", str(tmp_path / "none.pdb"), "--out", str(tmp_path / "o")], "none.pdb",
          out=tmp_path / "o")
    (tmp_path / "junk.pdb").write_text("this is not a model\n")
    fails(capsys, ["simulate", "--model", str(tmp_path / "junk.pdb"), "--out", str(tmp_path / "o")], "junk.pdb",
          out=tmp_path / "o")


def test_model_larger_than_box(tmp_path, capsys):
    fails(capsys, ["simulate", "--model", str(example_model("open")), "--box", "16", "--apix", "1",
                   "--out", str(tmp_path / "o")], "--box", out=tmp_path / "o")


def test_inputs_are_never_modified(small, tmp_path):
    before = {p.name: p.read_bytes() for p in small.iterdir() if p.is_file()}
    assert cli(["reconstruct", str(small / "particles.star"), "--out", str(tmp_path / "r")]) == 0
    after = {p.name: p.read_bytes() for p in small.iterdir() if p.is_file() and p.name in before}
    assert before == after
