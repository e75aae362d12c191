"""`cryogmm convert | subset | info` in-process: exit codes, outputs, nothing written on error."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

from cryogmm.bridge.io import read_particles
from cryogmm.bridge.results import merge_results
from cryogmm.cli import main

from test_bridge_star import GOOD, assert_tables_equal


def run(capsys, *argv):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def only_file(folder, name):
    """The folder holds exactly what it held before plus nothing else (no temp files)."""
    return sorted(p.name for p in folder.iterdir() if p.name != name)


@pytest.mark.parametrize("src", ["relion31.star", "relion31.6opticsgroups.star", "cryosparc_P12_J24_001_particles.cs"])
def test_convert_round_trips(shared_dir, tmp_path, capsys, src):
    path = shared_dir / "data" / "metadata" / src
    t = read_particles(path)
    code, out, _ = run(capsys, "convert", path, tmp_path / "a.star", "--star-version", "3.0")
    assert code == 0 and "wrote" in out
    assert run(capsys, "convert", tmp_path / "a.star", tmp_path / "b.star")[0] == 0
    assert run(capsys, "convert", tmp_path / "b.star", tmp_path / "c.cs")[0] == 0
    assert run(capsys, "convert", tmp_path / "c.cs", tmp_path / "d.star")[0] == 0
    d = read_particles(tmp_path / "d.star")
    np.testing.assert_allclose(d.rotmat, t.rotmat, atol=1e-5)
    np.testing.assert_allclose(d.shift_A, t.shift_A, atol=1e-4)
    np.testing.assert_allclose(d.defocus_u_A, t.defocus_u_A, rtol=1e-6)
    np.testing.assert_allclose(d.defocus_angle_deg, t.defocus_angle_deg, atol=1e-4)
    np.testing.assert_allclose(d.apix, t.apix, rtol=1e-6)
    assert (d.image_index == t.image_index).all()
    b = read_particles(tmp_path / "b.star")
    assert_tables_equal(t.subset(np.arange(t.n)), b) if src.endswith(".star") else None


def test_info_on_every_real_file(shared_dir, capsys):
    for p in sorted((shared_dir / "data" / "metadata").glob("*.*")):
        if p.suffix not in (".star", ".cs"):
            continue
        code, out, err = run(capsys, "info", p)
        assert code == 0, err
        if p.name in ("postprocess.star", "run_it025_optimiser_3D.star"):
            assert "no particles" in out and ("postprocess" in out or "optimiser" in out)
        else:
            assert "particles:" in out and "optics groups:" in out and "pixel size" in out


def test_info_check_images(shared_dir, tmp_path, capsys):
    code, out, _ = run(capsys, "info", shared_dir / "data" / "metadata" / "relion31.star", "--check-images")
    assert code == 0 and "5 images of 256x256 px found" in out
    (tmp_path / "p.star").write_text(GOOD)
    code, out, err = run(capsys, "info", tmp_path / "p.star", "--check-images")
    assert code == 2 and err.count("\n") == 1
    assert f"{tmp_path / 's.mrcs'}: particle stack not found (referenced by {tmp_path / 'p.star'})" in err


BAD = {
    "truncated": (GOOD[: GOOD.rindex(" 9000")], "line 25"),
    "malformed": (GOOD.replace("000002@s.mrcs 1 11", "000002@s.mrcs 1 1 11"), "9 values where the loop has 8"),
    "unknown-optics": (GOOD.replace("000002@s.mrcs 1 11", "000002@s.mrcs 3 11"), "optics group 3"),
    "no-image-names": (GOOD.replace("_rlnImageName", "_rlnMicrographName"), "no particle table"),
}


@pytest.mark.parametrize("cmd", ["convert", "subset", "info"])
@pytest.mark.parametrize("case", list(BAD))
def test_bad_input_exit_2_one_line_nothing_written(tmp_path, capsys, cmd, case):
    text, expect = BAD[case]
    (tmp_path / "in.star").write_text(text)
    out = tmp_path / "out.cs"
    argv = {"convert": ["convert", tmp_path / "in.star", out],
            "subset": ["subset", tmp_path / "in.star", "--label", "1", "--label-column", "rlnOpticsGroup", "--out", out],
            "info": ["info", tmp_path / "in.star"]}[cmd]
    code, _, err = run(capsys, *argv)
    if cmd == "info" and case == "no-image-names":
        assert code == 0  # info says what a non-particle STAR is
        return
    assert code == 2
    assert err.count("\n") == 1 and str(tmp_path / "in.star") in err and expect in err
    assert only_file(tmp_path, "in.star") == []  # no output, no temp file


def test_missing_input_and_bad_output_name(tmp_path, capsys):
    code, _, err = run(capsys, "convert", tmp_path / "nope.star", tmp_path / "o.star")
    assert code == 2 and "nope.star: file not found" in err
    code, _, err = run(capsys, "convert", tmp_path / "nope.cs", tmp_path / "o.star")
    assert code == 2 and "nope.cs: file not found" in err
    (tmp_path / "in.star").write_text(GOOD)
    code, _, err = run(capsys, "convert", tmp_path / "in.star", tmp_path / "o.txt")
    assert code == 2 and "expected a .star or .cs" in err
    assert only_file(tmp_path, "in.star") == []


def test_subset_by_indices_label_and_latent_box(shared_dir, tmp_path, capsys):
    src = shared_dir / "data" / "metadata" / "cryosparc_P12_J24_001_particles.cs"
    t = read_particles(src)
    rng = np.random.default_rng(0)
    z = rng.normal(size=(t.n, 2))
    labels = rng.integers(0, 4, t.n)
    merge_results(src, tmp_path / "res.cs", latent=z, labels=labels)
    merge_results(src, tmp_path / "res.star", latent=z, labels=labels)
    # by index list, kept in the file's order of indices
    (tmp_path / "idx.txt").write_text("5 3\n100\n")
    for suffix in (".star", ".cs"):
        assert run(capsys, "subset", tmp_path / f"res{suffix}", "--indices", tmp_path / "idx.txt", "--out", tmp_path / f"i{suffix}")[0] == 0
        s = read_particles(tmp_path / f"i{suffix}")
        np.testing.assert_allclose(s.rotmat, t.rotmat[[5, 3, 100]], atol=1e-6)
        # by label
        assert run(capsys, "subset", tmp_path / f"res{suffix}", "--label", "2", "--label", "3", "--out", tmp_path / f"l{suffix}")[0] == 0
        s = read_particles(tmp_path / f"l{suffix}")
        assert s.n == int(np.isin(labels, [2, 3]).sum())
        np.testing.assert_allclose(s.shift_A, t.shift_A[np.isin(labels, [2, 3])], atol=1e-5)
        # by latent box
        code, out, err = run(capsys, "subset", tmp_path / f"res{suffix}", "--latent-box", "0:-0.5:1", "--latent-box", "1:0:2",
                             "--out", tmp_path / f"z{suffix}")
        assert code == 0, err
        s = read_particles(tmp_path / f"z{suffix}")
        keep = (z[:, 0] >= -0.5) & (z[:, 0] <= 1) & (z[:, 1] >= 0) & (z[:, 1] <= 2)
        assert s.n == keep.sum()
        np.testing.assert_allclose(s.particles["rlnCryogmmLatent0"], z[keep, 0], rtol=1e-6)
    # a subset written as STAR keeps every column of the user's STAR, plus each particle's source row
    star = shared_dir / "data" / "metadata" / "relion31.6opticsgroups.star"
    assert run(capsys, "subset", star, "--label", "2", "--label-column", "rlnRandomSubset", "--out", tmp_path / "h2.star")[0] == 0
    h = read_particles(tmp_path / "h2.star")
    assert list(h.particles.columns) == list(read_particles(star).particles.columns) + ["rlnCryogmmSourceIndex"]
    assert set(h.half_set) == {2}


@pytest.mark.parametrize(
    "args, expect",
    [
        (["--indices", "idx_bad.txt"], "index 99999 out of range: the particle file has 5 particles"),
        (["--label", "1"], "--label-column: "),
        (["--latent-box", "0:0:1"], "no latent coordinates"),
        (["--label", "7", "--label-column", "rlnClassNumber"], "no particle of"),
    ],
)
def test_subset_errors(shared_dir, tmp_path, capsys, args, expect):
    (tmp_path / "idx_bad.txt").write_text("0 99999")
    args = [str(tmp_path / a) if a.endswith(".txt") else a for a in args]
    code, _, err = run(capsys, "subset", shared_dir / "data" / "metadata" / "relion31.star", *args, "--out", tmp_path / "o.star")
    assert code == 2 and expect in err and err.count("\n") == 1
    assert not (tmp_path / "o.star").exists()


def test_merge_into_original_star_keeps_all_columns(shared_dir, tmp_path):
    src = shared_dir / "data" / "metadata" / "relion31.6opticsgroups.star"
    t = read_particles(src)
    R = np.linalg.qr(np.random.default_rng(2).normal(size=(t.n, 3, 3)))[0]
    R *= np.sign(np.linalg.det(R))[:, None, None]
    merge_results(src, tmp_path / "m.star", rotmat=R, shift_A=np.ones((t.n, 2)), latent=np.zeros((t.n, 3)))
    m = read_particles(tmp_path / "m.star")
    assert list(m.particles.columns) == list(t.particles.columns) + ["rlnCryogmmLatent0", "rlnCryogmmLatent1", "rlnCryogmmLatent2"]
    np.testing.assert_allclose(m.rotmat, R, atol=1e-12)
    np.testing.assert_allclose(m.shift_A, 1.0)
    np.testing.assert_array_equal(m.particles["rlnMicrographName"], t.particles["rlnMicrographName"])
    assert m.layout.version == "3.1" and list(m.optics.columns) == list(t.optics.columns)


def test_help_teaches(capsys):
    for cmd in ("convert", "subset", "info"):
        with pytest.raises(SystemExit) as e:
            main([cmd, "--help"])
        assert e.value.code == 0
        assert "example" in capsys.readouterr().out


def test_bridge_never_imports_torch():
    code = (
        "import sys, cryogmm.bridge, cryogmm.bridge.conventions, cryogmm.io.outputs, cryogmm.bridge.star, "
        "cryogmm.bridge.table, cryogmm.bridge.io, cryogmm.bridge.csfile, cryogmm.bridge.images, "
        "cryogmm.bridge.results, cryogmm.bridge.commands.convert, cryogmm.bridge.commands.subset, "
        "cryogmm.bridge.commands.info\n"
        "from cryogmm.cli import main\n"
        "main(['info', '--help']) if False else None\n"
        "print('torch' in sys.modules)"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert r.stdout.strip() == "False"
