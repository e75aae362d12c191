"""The bad-input catalogue (issue 21): every job, every kind of mistake a user makes.

Each case runs the command line in-process and checks the same four things: exit code 2,
exactly one line on stderr (naming the option or file), nothing new on disk (the whole
working folder is compared before and after) and every input byte-identical. Then a test
runs the fast jobs on read-only inputs and checks that none is ever opened for writing.
"""

import builtins
import hashlib
import os
import shutil
import stat
from pathlib import Path

import mrcfile
import numpy as np
import pytest

from cryogmm.cli import main as cli
from cryogmm.demo import example_model


def _edit_line(src: Path, dst: Path, startswith: str, col: int, value: str):
    """Copy a STAR file, setting whitespace column ``col`` of the first line starting with
    ``startswith`` to ``value``; return that line's 1-based number."""
    lines = src.read_text().splitlines()
    for i, line in enumerate(lines):
        if line.startswith(startswith):
            parts = line.split()
            parts[col] = value
            lines[i] = " ".join(parts)
            dst.write_text("\n".join(lines) + "\n")
            return i + 1
    raise AssertionError(f"no line starting with {startswith!r} in {src}")


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A small project folder: a 20-particle simulation, a model, maps, and broken copies."""
    w = tmp_path_factory.mktemp("catalogue")
    sim = w / "sim"
    assert cli(["simulate", "--model", str(example_model("open")), "--n", "20", "--box", "40", "--apix", "3",
                "--seed", "1", "--out", str(sim)]) == 0
    shutil.copy(example_model("open"), w / "model.pdb")
    (w / "notes.txt").write_text("not a STAR file, not a model\n")
    (w / "junk.pdb").write_text("this is not a model\n")
    (w / "z.txt").write_text("0 0 0 0 0 0 0 0\n")
    (w / "full").mkdir()
    (w / "full" / "old_result.txt").write_text("an earlier result\n")
    (w / "empty").mkdir()
    with mrcfile.new(w / "flat.mrc") as m:
        m.set_data(np.zeros((20, 24, 24), np.float32))
        m.voxel_size = 2.0
    star = sim / "particles.star"
    lines = {}
    # a non-numeric value in a numeric particle column, and in the optics table
    lines["abc"] = _edit_line(star, sim / "bad_value.star", "000003@", 2, "abc")
    lines["optics"] = _edit_line(star, sim / "bad_optics.star", "1 opticsGroup1", 4, "3x0.0")
    lines["nan"] = _edit_line(star, sim / "nan_pose.star", "000005@", 8, "nan")
    text = star.read_text().splitlines()
    (sim / "truncated.star").write_text("\n".join(text[:-3] + [" ".join(text[-3].split()[:5])]) + "\n")
    (sim / "no_particles.txt").write_text("x\n")
    return w, lines


def _snapshot(root: Path) -> dict:
    snap = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for d in dirnames:
            snap[os.path.relpath(os.path.join(dirpath, d), root)] = "dir"
        for f in filenames:
            p = os.path.join(dirpath, f)
            snap[os.path.relpath(p, root)] = hashlib.sha256(Path(p).read_bytes()).hexdigest()
    return snap


SIM = "sim/particles.star"
MODEL = "model.pdb"
MAP = "sim/truth_map.mrc"
BAD = "sim/bad_value.star"
PROC = "/proc/cryogmm_catalogue/out"

# (id, argv, words the one line must hold); paths are relative to the world folder
CASES = [
    # simulate
    ("simulate-apix-nan", ["simulate", "--model", MODEL, "--apix", "nan", "--out", "o"], ["--apix", "nan"]),
    ("simulate-apix-negative", ["simulate", "--model", MODEL, "--apix", "-2", "--out", "o"], ["--apix"]),
    ("simulate-apix-inf", ["simulate", "--model", MODEL, "--apix", "inf", "--out", "o"], ["--apix"]),
    ("simulate-box-zero", ["simulate", "--model", MODEL, "--box", "0", "--out", "o"], ["--box", "0"]),
    ("simulate-box-text", ["simulate", "--model", MODEL, "--box", "big", "--out", "o"], ["--box"]),
    ("simulate-n-zero", ["simulate", "--model", MODEL, "--n", "0", "--out", "o"], ["--n"]),
    ("simulate-snr-zero", ["simulate", "--model", MODEL, "--snr", "0", "--out", "o"], ["--snr"]),
    ("simulate-snr-nan", ["simulate", "--model", MODEL, "--snr", "nan", "--out", "o"], ["--snr"]),
    ("simulate-defocus-reversed", ["simulate", "--model", MODEL, "--defocus", "2.5", "1", "--out", "o"],
     ["--defocus"]),
    ("simulate-defocus-zero", ["simulate", "--model", MODEL, "--defocus", "0", "1", "--out", "o"], ["--defocus"]),
    ("simulate-amp-contrast", ["simulate", "--model", MODEL, "--amp-contrast", "1.5", "--out", "o"],
     ["--amp-contrast"]),
    ("simulate-voltage-zero", ["simulate", "--model", MODEL, "--voltage", "0", "--out", "o"], ["--voltage"]),
    ("simulate-resolution-zero", ["simulate", "--model", MODEL, "--resolution", "0", "--out", "o"],
     ["--resolution"]),
    ("simulate-seed-negative", ["simulate", "--model", MODEL, "--seed", "-1", "--out", "o"], ["--seed"]),
    ("simulate-device-unknown", ["simulate", "--model", MODEL, "--device", "gpu", "--out", "o"], ["--device"]),
    ("simulate-out-proc", ["simulate", "--model", MODEL, "--out", PROC], ["--out", "/proc"]),
    ("simulate-out-is-file", ["simulate", "--model", MODEL, "--out", "notes.txt"], ["--out", "notes.txt"]),
    ("simulate-out-under-file", ["simulate", "--model", MODEL, "--out", "notes.txt/sim"], ["--out", "notes.txt"]),
    ("simulate-out-not-empty", ["simulate", "--model", MODEL, "--out", "full"], ["--out", "--force"]),
    ("simulate-out-holds-input", ["simulate", "--model", MODEL, "--out", ".", "--force"], ["--out", "model.pdb"]),
    ("simulate-model-missing", ["simulate", "--model", "none.pdb", "--out", "o"], ["none.pdb"]),
    ("simulate-model-junk", ["simulate", "--model", "junk.pdb", "--out", "o"], ["junk.pdb"]),
    ("simulate-map-not-cubic", ["simulate", "--map", "flat.mrc", "--out", "o"], ["flat.mrc", "cubic"]),
    ("simulate-poses-bad-value", ["simulate", "--model", MODEL, "--poses", BAD, "--out", "o"],
     ["bad_value.star", "rlnDefocusU", "line {abc}"]),
    # reconstruct
    ("reconstruct-bad-value", ["reconstruct", BAD, "--out", "o"], ["bad_value.star", "rlnDefocusU", "line {abc}"]),
    ("reconstruct-bad-optics", ["reconstruct", "sim/bad_optics.star", "--out", "o"],
     ["bad_optics.star", "rlnVoltage", "line {optics}"]),
    ("reconstruct-nan-pose", ["reconstruct", "sim/nan_pose.star", "--out", "o"], ["nan_pose.star", "rlnAngleRot"]),
    ("reconstruct-truncated", ["reconstruct", "sim/truncated.star", "--out", "o"], ["truncated.star", "line"]),
    ("reconstruct-missing-star", ["reconstruct", "sim/none.star", "--out", "o"], ["none.star"]),
    ("reconstruct-not-star", ["reconstruct", "sim/no_particles.txt", "--out", "o"], ["no_particles.txt"]),
    ("reconstruct-out-is-input", ["reconstruct", SIM, "--out", SIM], ["--out", "particles.star"]),
    ("reconstruct-out-holds-input", ["reconstruct", SIM, "--out", "sim", "--force"], ["--out", "particles.star"]),
    ("reconstruct-out-proc", ["reconstruct", SIM, "--out", PROC], ["--out", "/proc"]),
    ("reconstruct-out-not-empty", ["reconstruct", SIM, "--out", "full"], ["--out", "--force"]),
    ("reconstruct-batch-zero", ["reconstruct", SIM, "--batch", "0", "--out", "o"], ["--batch"]),
    ("reconstruct-reg-nan", ["reconstruct", SIM, "--reg", "nan", "--out", "o"], ["--reg"]),
    ("reconstruct-mask-negative", ["reconstruct", SIM, "--mask-radius-A", "-3", "--out", "o"], ["--mask-radius-A"]),
    ("reconstruct-prefetch-negative", ["reconstruct", SIM, "--prefetch", "-1", "--out", "o"], ["--prefetch"]),
    ("reconstruct-memory-zero", ["reconstruct", SIM, "--max-memory-gb", "0", "--out", "o"], ["--max-memory-gb"]),
    ("reconstruct-no-out", ["reconstruct", SIM], ["--out"]),
    # refine-poses
    ("refine-poses-iterations-zero", ["refine-poses", SIM, "--iterations", "0", "--out", "o"], ["--iterations"]),
    ("refine-poses-low-res-nan", ["refine-poses", SIM, "--low-res-A", "nan", "--out", "o"], ["--low-res-A"]),
    ("refine-poses-lr-negative", ["refine-poses", SIM, "--lr-deg", "-1", "--out", "o"], ["--lr-deg"]),
    ("refine-poses-steps-zero", ["refine-poses", SIM, "--steps", "0", "--out", "o"], ["--steps"]),
    ("refine-poses-gaussians-zero", ["refine-poses", SIM, "--n-gaussians", "0", "--out", "o"], ["--n-gaussians"]),
    ("refine-poses-patches-negative", ["refine-poses", SIM, "--patches", "-1", "--out", "o"], ["--patches"]),
    ("refine-poses-out-not-empty", ["refine-poses", SIM, "--out", "full"], ["--out", "--force"]),
    ("refine-poses-out-is-mask", ["refine-poses", SIM, "--mask", MAP, "--out", MAP, "--force"], ["--out"]),
    ("refine-poses-bad-value", ["refine-poses", BAD, "--out", "o"], ["bad_value.star", "line {abc}"]),
    ("refine-poses-mask-missing", ["refine-poses", SIM, "--mask", "none.mrc", "--out", "o"], ["none.mrc"]),
    # hetero train / analyze / decode
    ("hetero-train-zdim-zero", ["hetero", "train", SIM, "--model", MODEL, "--zdim", "0", "--out", "o"], ["--zdim"]),
    ("hetero-train-epochs-zero", ["hetero", "train", SIM, "--model", MODEL, "--epochs", "0", "--out", "o"],
     ["--epochs"]),
    ("hetero-train-lowpass-nan", ["hetero", "train", SIM, "--model", MODEL, "--lowpass-A", "nan", "--out", "o"],
     ["--lowpass-A"]),
    ("hetero-train-lr-zero", ["hetero", "train", SIM, "--model", MODEL, "--lr", "0", "--out", "o"], ["--lr"]),
    ("hetero-train-model-missing", ["hetero", "train", SIM, "--model", "none.pdb", "--out", "o"], ["none.pdb"]),
    ("hetero-train-out-under-file", ["hetero", "train", SIM, "--model", MODEL, "--out", "notes.txt/run"],
     ["--out", "notes.txt"]),
    ("hetero-train-out-not-empty", ["hetero", "train", SIM, "--model", MODEL, "--out", "full"],
     ["--out", "--resume"]),
    ("hetero-train-resume-nothing", ["hetero", "train", SIM, "--model", MODEL, "--out", "empty", "--resume"],
     ["checkpoint"]),
    ("hetero-train-bad-value", ["hetero", "train", BAD, "--model", MODEL, "--out", "o"], ["line {abc}"]),
    ("hetero-train-memory-zero", ["hetero", "train", SIM, "--model", MODEL, "--max-memory-gb", "0", "--out", "o"],
     ["--max-memory-gb"]),
    ("hetero-train-in-memory-over-budget", ["hetero", "train", SIM, "--model", MODEL, "--in-memory",
                                            "--max-memory-gb", "0.3", "--out", "o"], ["--max-memory-gb", "--in-memory"]),
    ("hetero-no-action", ["hetero"], ["train"]),
    ("hetero-analyze-pcs-zero", ["hetero", "analyze", "empty", "--pcs", "0"], ["--pcs"]),
    ("hetero-analyze-clusters-zero", ["hetero", "analyze", "empty", "--clusters", "0"], ["--clusters"]),
    ("hetero-analyze-frames-text", ["hetero", "analyze", "empty", "--frames", "ten"], ["--frames"]),
    ("hetero-analyze-no-run", ["hetero", "analyze", "empty", "--out", "o"], ["empty"]),
    ("hetero-analyze-missing-run", ["hetero", "analyze", "nowhere"], ["nowhere", "checkpoint"]),
    ("hetero-analyze-out-under-file", ["hetero", "analyze", "empty", "--out", "notes.txt/a"], ["notes.txt"]),
    ("hetero-analyze-out-is-run", ["hetero", "analyze", "full", "--out", "full", "--force"], ["--out", "input"]),
    ("hetero-decode-out-exists", ["hetero", "decode", "empty", "--z", "z.txt", "--out", "full"],
     ["--out", "--force"]),
    ("hetero-decode-out-is-file", ["hetero", "decode", "empty", "--z", "z.txt", "--out", "notes.txt"],
     ["notes.txt", "folder"]),
    ("hetero-decode-out-is-z", ["hetero", "decode", "empty", "--z", "z.txt", "--out", "z.txt", "--force"],
     ["z.txt"]),
    ("hetero-decode-no-run", ["hetero", "decode", "empty", "--z", "z.txt", "--out", "m.pdb"], ["empty"]),
    # validate
    ("validate-model-missing", ["validate", "none.pdb", "--out", "o"], ["none.pdb"]),
    ("validate-model-junk", ["validate", "junk.pdb", "--out", "o"], ["junk.pdb"]),
    ("validate-no-out", ["validate", MODEL], ["--out"]),
    ("validate-resolution-zero", ["validate", MODEL, "--map", MAP, "--resolution", "0"], ["--resolution"]),
    ("validate-out-under-file", ["validate", MODEL, "--out", "notes.txt/v"], ["notes.txt"]),
    ("validate-out-not-empty", ["validate", MODEL, "--out", "full"], ["--force"]),
    # refine-model
    ("refine-model-resolution-nan", ["refine-model", MODEL, "--map", MAP, "--resolution", "nan", "--out", "o"],
     ["--resolution"]),
    ("refine-model-steps-zero", ["refine-model", MODEL, "--geometry-only", "--steps", "0", "--out", "o"], ["--steps"]),
    ("refine-model-patches-zero", ["refine-model", MODEL, "--geometry-only", "--patches", "0", "--out", "o"],
     ["--patches"]),
    ("refine-model-weight-negative", ["refine-model", MODEL, "--geometry-only", "--geometry-weight", "-1",
                                      "--out", "o"], ["--geometry-weight"]),
    ("refine-model-out-is-model", ["refine-model", MODEL, "--geometry-only", "--out", MODEL], ["--out"]),
    ("refine-model-out-holds-model", ["refine-model", MODEL, "--geometry-only", "--out", ".", "--force"],
     ["model.pdb"]),
    ("refine-model-missing", ["refine-model", "none.pdb", "--geometry-only", "--out", "o"], ["none.pdb"]),
    # refine-series
    ("refine-series-resolution-negative", ["refine-series", MODEL, "--maps", MAP, MAP, "--resolution", "-4",
                                           "--out", "o"], ["--resolution"]),
    ("refine-series-frames-zero", ["refine-series", MODEL, "--maps", MAP, MAP, "--resolution", "4", "--frames", "0",
                                   "--out", "o"], ["--frames"]),
    ("refine-series-polish-negative", ["refine-series", MODEL, "--maps", MAP, MAP, "--resolution", "4",
                                       "--polish-iters", "-1", "--out", "o"], ["--polish-iters"]),
    ("refine-series-out-not-empty", ["refine-series", MODEL, "--maps", MAP, MAP, "--resolution", "4",
                                     "--out", "full"], ["--force"]),
    ("refine-series-map-missing", ["refine-series", MODEL, "--maps", MAP, "none.mrc", "--resolution", "4",
                                   "--out", "o"], ["none.mrc"]),
    # fit-gmm
    ("fit-gmm-resolution-zero", ["fit-gmm", MAP, "--resolution", "0", "--out", "o"], ["--resolution"]),
    ("fit-gmm-n-zero", ["fit-gmm", MAP, "--resolution", "8", "--n", "0", "--out", "o"], ["--n"]),
    ("fit-gmm-threshold-nan", ["fit-gmm", MAP, "--resolution", "8", "--threshold", "nan", "--out", "o"],
     ["--threshold"]),
    ("fit-gmm-iterations-negative", ["fit-gmm", MAP, "--resolution", "8", "--iterations", "-1", "--out", "o"],
     ["--iterations"]),
    ("fit-gmm-map-missing", ["fit-gmm", "none.mrc", "--resolution", "8", "--out", "o"], ["none.mrc"]),
    ("fit-gmm-map-not-cubic", ["fit-gmm", "flat.mrc", "--resolution", "8", "--out", "o"], ["flat.mrc"]),
    ("fit-gmm-out-is-map", ["fit-gmm", MAP, "--resolution", "8", "--out", MAP], ["--out"]),
    # convert
    ("convert-same-file", ["convert", SIM, SIM], ["OUT", "input"]),
    ("convert-same-file-force", ["convert", SIM, SIM, "--force"], ["OUT", "input"]),
    ("convert-out-exists", ["convert", SIM, "sim/truth.star"], ["OUT", "--force"]),
    ("convert-out-suffix", ["convert", SIM, "out.txt"], ["OUT", ".star"]),
    ("convert-out-is-folder", ["convert", SIM, "full"], ["OUT"]),
    ("convert-out-under-file", ["convert", SIM, "notes.txt/p.cs"], ["OUT", "notes.txt"]),
    ("convert-bad-value", ["convert", BAD, "out.cs"], ["bad_value.star", "rlnDefocusU", "line {abc}"]),
    ("convert-bad-optics", ["convert", "sim/bad_optics.star", "out.cs"], ["rlnVoltage", "line {optics}"]),
    ("convert-nan-pose", ["convert", "sim/nan_pose.star", "out.cs"], ["rlnAngleRot"]),
    ("convert-missing", ["convert", "sim/none.star", "out.cs"], ["none.star"]),
    ("convert-star-version", ["convert", SIM, "out.star", "--star-version", "2"], ["--star-version"]),
    # subset
    ("subset-box-reversed", ["subset", SIM, "--latent-box", "0:2:1", "--out", "s.star"], ["--latent-box"]),
    ("subset-box-nan", ["subset", SIM, "--latent-box", "0:nan:1", "--out", "s.star"], ["--latent-box"]),
    ("subset-out-is-input", ["subset", SIM, "--label", "1", "--label-column", "rlnRandomSubset", "--out", SIM,
                             "--force"], ["--out", "input"]),
    ("subset-out-exists", ["subset", SIM, "--label", "1", "--label-column", "rlnRandomSubset", "--out",
                           "sim/truth.star"], ["--force"]),
    ("subset-no-match", ["subset", SIM, "--label", "7", "--label-column", "rlnRandomSubset", "--out", "s.star"],
     ["no particle"]),
    ("subset-indices-missing", ["subset", SIM, "--indices", "none.txt", "--out", "s.star"], ["none.txt"]),
    ("subset-bad-value", ["subset", BAD, "--label", "1", "--out", "s.star"], ["line {abc}"]),
    ("subset-no-how", ["subset", SIM, "--out", "s.star"], ["--indices"]),
    # info
    ("info-bad-value", ["info", BAD], ["bad_value.star", "rlnDefocusU", "line {abc}"]),
    ("info-truncated", ["info", "sim/truncated.star"], ["truncated.star", "line"]),
    ("info-missing", ["info", "sim/none.star"], ["none.star"]),
    ("info-folder", ["info", "sim"], ["sim"]),
    # demo
    ("demo-n-zero", ["demo", "--n", "0", "--out", "o"], ["--n"]),
    ("demo-out-not-empty", ["demo", "--out", "full"], ["--force"]),
    ("demo-out-proc", ["demo", "--out", PROC], ["/proc"]),
    ("demo-device-unknown", ["demo", "--device", "cuda9x", "--out", "o"], ["--device"]),
    # the command itself
    ("unknown-command", ["foo"], ["unknown command", "foo"]),
    ("no-command", ["--bogus"], ["no command"]),
]


@pytest.mark.parametrize("argv, needles", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_input(world, monkeypatch, capsys, argv, needles):
    w, lines = world
    monkeypatch.chdir(w)
    capsys.readouterr()
    before = _snapshot(w)
    rc = cli(list(argv))
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2, err
    assert len(err) == 1, err
    assert "Traceback" not in err[0]
    for n in needles:
        assert n.format(**lines) in err[0], err[0]
    assert _snapshot(w) == before  # nothing new on disk, inputs byte-identical
    assert not Path(PROC).parent.exists()


def test_catalogue_size():
    assert len(CASES) >= 60
    jobs = {c[1][0] + (" " + c[1][1] if c[1][0] == "hetero" and len(c[1]) > 1 else "") for c in CASES}
    for job in ("simulate", "reconstruct", "refine-poses", "hetero train", "hetero analyze", "hetero decode",
                "validate", "refine-model", "refine-series", "fit-gmm", "convert", "subset", "info", "demo"):
        assert job in jobs, job


def test_every_help_has_a_description_and_an_example(capsys):
    from cryogmm.cli import COMMANDS

    helps = [[c] for c in COMMANDS if c != "hetero"] + [["hetero", a] for a in ("train", "analyze", "decode")]
    for h in helps:
        with pytest.raises(SystemExit) as e:
            cli([*h, "--help"])
        assert e.value.code == 0
        text = capsys.readouterr().out
        assert "xample" in text, h
        assert len(text.split("options:")[0].splitlines()) > 4, h  # usage plus a description


def test_python_m_cryogmm():
    import subprocess
    import sys

    r = subprocess.run([sys.executable, "-m", "cryogmm", "--version"], capture_output=True, text=True, check=False)
    assert r.returncode == 0 and r.stdout.startswith("cryogmm"), r


def test_force_writes_into_a_non_empty_folder(world, tmp_path, capsys):
    w, _ = world
    out = tmp_path / "rec"
    out.mkdir()
    (out / "keep.txt").write_text("mine\n")
    assert cli(["reconstruct", str(w / SIM), "--out", str(out)]) == 2
    assert cli(["reconstruct", str(w / SIM), "--out", str(out), "--force"]) == 0
    assert (out / "keep.txt").read_text() == "mine\n" and (out / "map.mrc").is_file()


def test_read_only_inputs(world, tmp_path, monkeypatch, capsys):
    """The fast jobs on read-only inputs: none opens an input for writing, all succeed, the
    inputs stay byte-identical."""
    w, _ = world
    src = tmp_path / "inputs"
    shutil.copytree(w / "sim", src)
    shutil.copy(w / MODEL, src / "model.pdb")
    (src / "keep.txt").write_text("0\n2\n4\n")
    inputs = {p.resolve() for p in src.iterdir()}
    for p in inputs:
        p.chmod(stat.S_IRUSR | stat.S_IRGRP | stat.S_IROTH)
    src.chmod(stat.S_IRUSR | stat.S_IXUSR | stat.S_IRGRP | stat.S_IXGRP)
    before = _snapshot(src)
    real_open = builtins.open

    def guarded_open(file, mode="r", *a, **k):
        if isinstance(file, (str, os.PathLike)) and any(c in mode for c in "wax+"):
            assert Path(file).resolve() not in inputs, f"{file} opened with mode {mode}"
        return real_open(file, mode, *a, **k)

    monkeypatch.setattr(builtins, "open", guarded_open)
    o = tmp_path / "out"
    star, model, mp = str(src / "particles.star"), str(src / "model.pdb"), str(src / "truth_map.mrc")
    try:
        for argv in (
            ["info", star, "--check-images"],
            ["convert", star, str(o / "p.cs")],
            ["subset", star, "--indices", str(src / "keep.txt"), "--out", str(o / "s.star")],
            ["reconstruct", star, "--out", str(o / "rec")],
            ["simulate", "--model", model, "--poses", star, "--n", "20", "--box", "40", "--apix", "3",
             "--out", str(o / "sim")],
            ["fit-gmm", mp, "--resolution", "8", "--iterations", "0", "--out", str(o / "gmm")],
            ["validate", model, "--map", mp, "--resolution", "6", "--out", str(o / "val")],
            ["refine-poses", star, "--iterations", "1", "--steps", "2", "--fit-iterations", "5", "--out",
             str(o / "ref")],
        ):
            o.mkdir(exist_ok=True)
            assert cli(argv) == 0, (argv, capsys.readouterr().err)
    finally:
        src.chmod(stat.S_IRWXU)
    assert _snapshot(src) == before


def test_sigterm_leaves_nothing_behind(tmp_path):
    """SIGTERM (what a batch scheduler sends) cleans up like Ctrl-C: no hidden partial stack."""
    import signal
    import subprocess
    import sys
    import time

    out = tmp_path / "sim"
    p = subprocess.Popen([sys.executable, "-m", "cryogmm", "simulate", "--model", str(example_model("open")),
                          "--n", "20000", "--box", "64", "--device", "cpu", "--out", str(out)],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    t0 = time.time()
    while not (out.is_dir() and any(out.iterdir())) and time.time() - t0 < 120 and p.poll() is None:
        time.sleep(0.05)
    assert p.poll() is None, p.communicate()
    time.sleep(0.5)
    p.send_signal(signal.SIGTERM)
    _, err = p.communicate(timeout=60)
    assert p.returncode == 143, err
    assert "terminated" in err.strip().splitlines()[-1]
    assert not out.exists() or not any(out.iterdir()), list(out.rglob("*"))
