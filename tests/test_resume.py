"""Kill -9 and --resume: refine-model, refine-series and hetero train continue from their last
checkpoint and end with the same files as an uninterrupted run (coordinates byte for byte,
report figures other than timings)."""

import json
import os
import signal
import subprocess
import sys
import time
from importlib import resources
from pathlib import Path

import numpy as np
import pytest

ADK = Path(str(resources.files("cryogmm.data").joinpath("adk_closed.pdb")))
TIMING = {"seconds", "stage_seconds", "t_s", "resumed_from_stage", "resumed_from_unit", "resumed_from_epoch",
          "images_per_s", "seconds_training", "train", "polish", "validate", "total"}


def _strip(x):
    """A report without its timings and resume markers."""
    if isinstance(x, dict):
        return {k: _strip(v) for k, v in x.items() if k not in TIMING}
    if isinstance(x, list):
        return [_strip(v) for v in x]
    return x


def _kill_after_checkpoint(args, ckpt: Path, env=None, timeout=600):
    """Start ``args``, SIGKILL it as soon as ``ckpt`` appears; returns the return code."""
    p = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env)
    t0 = time.time()
    while not ckpt.exists():
        if p.poll() is not None:
            raise AssertionError(f"finished before its first checkpoint: {p.stderr.read().decode()[-2000:]}")
        if time.time() - t0 > timeout:
            p.kill()
            raise AssertionError("no checkpoint written")
        time.sleep(0.02)
    p.send_signal(signal.SIGKILL)
    p.wait()
    return p.returncode


def _run(args, env=None):
    r = subprocess.run(args, capture_output=True, text=True, env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    return r


def _same_outputs(a: Path, b: Path, names):
    for name in names:
        assert (a / name).read_bytes() == (b / name).read_bytes(), name
    ra, rb = json.loads((a / "report.json").read_text()), json.loads((b / "report.json").read_text())
    assert _strip(ra) == _strip(rb)
    return ra, rb


@pytest.fixture(scope="module")
def peptide(tmp_path_factory):
    """Residues 1-12 of 1AKE (truth), its 4 Å map with noise, and a displaced noisy start."""
    from cryogmm.io.maps import write_map
    from cryogmm.model.density import model_map
    from cryogmm.model.topology import build_topology, write_model

    d = tmp_path_factory.mktemp("pep")
    lines = [ln for ln in ADK.read_text().splitlines() if ln.startswith("ATOM") and int(ln[22:26]) <= 12]
    (d / "truth.pdb").write_text("\n".join(lines) + "\nEND\n")
    t = build_topology(d / "truth.pdb", add_hydrogens=False)
    lo = t.coords.min(0) - 6.0
    n = int(np.ceil((t.coords.max(0) - lo).max() + 6))
    n += n % 2
    m = model_map(t.coords, t.element, 4.0, 1.0, lo, (n, n, n)).numpy()
    rng = np.random.default_rng(0)
    m = m + rng.normal(scale=0.1 * m.std(), size=m.shape)
    write_map(d / "map.mrc", m, 1.0, origin_A=lo)
    write_model(t, t.coords + np.array([1.0, -0.6, 0.5]) + rng.normal(scale=0.2, size=t.coords.shape), d / "start.pdb")
    return d


REFINE = """
import sys
from pathlib import Path
from cryogmm.model.refine.config import RefineModelConfig
from cryogmm.model.refine.job import refine_model
d, out, resume = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3] == "1"
refine_model(RefineModelConfig(model=d / "start.pdb", map=d / "map.mrc", resolution_A=4.0, out=out,
                               stages=("rigid", "residue", "rotamers", "full"), n_patches=4, steps=8,
                               reference=d / "truth.pdb", threads=1,
                               extra={"rigid_levels": ((1, 3.0), (4, 3.0)), "polish_iters": 20}), resume=resume)
"""


def test_refine_model_kill_and_resume(peptide, tmp_path):
    from cryogmm.io.checkpoint import CHECKPOINT

    whole, cut = tmp_path / "whole", tmp_path / "cut"
    _run([sys.executable, "-c", REFINE, str(peptide), str(whole), "0"])
    assert not (whole / CHECKPOINT).exists()  # removed once the outputs are written
    rc = _kill_after_checkpoint([sys.executable, "-c", REFINE, str(peptide), str(cut), "0"], cut / CHECKPOINT)
    assert rc == -signal.SIGKILL and (cut / CHECKPOINT).is_file() and not (cut / "refined.pdb").exists()
    _run([sys.executable, "-c", REFINE, str(peptide), str(cut), "1"])
    ra, rb = _same_outputs(whole, cut, ("refined.pdb", "refined.cif", "trajectory.pdb"))
    assert ra["resumed_from_stage"] is None and rb["resumed_from_stage"] >= 1
    assert not (cut / CHECKPOINT).exists()
    _report_is_the_file(ra, whole, peptide)


def _report_is_the_file(rep, out, data):
    """The report's figures after refinement are those ``cryogmm validate`` gives for the written
    refined.pdb and refined.cif (the coordinates rounded to the file's precision)."""
    from cryogmm.model.validate import ValidateConfig, validate

    assert rep["after_measured_on"] == "refined.pdb"
    for name in ("refined.pdb", "refined.cif"):
        val = json.loads(json.dumps(validate(ValidateConfig(model=out / name, map=data / "map.mrc", resolution_A=4.0))))
        shared = [k for k in rep["after"] if k in val and isinstance(val[k], (int, float))]
        assert {"clashscore", "bond_rmsz", "angle_rmsz", "rama_outlier_pct", "rotamer_outlier_pct",
                "map_cc_mask", "qscore_mean"} <= set(shared)
        assert {k: rep["after"][k] for k in shared} == {k: val[k] for k in shared}, name


def test_refine_model_resume_refusals(peptide, tmp_path):
    """--resume with nothing to resume from, or with other settings: one line, exit 2."""
    from cryogmm.io.checkpoint import CHECKPOINT

    base = [sys.executable, "-m", "cryogmm", "refine-model", str(peptide / "start.pdb"), "--map",
            str(peptide / "map.mrc"), "--resolution", "4", "--stages", "rigid", "full", "--patches", "4", "--steps", "4"]
    empty = tmp_path / "empty"
    empty.mkdir()
    r = subprocess.run([*base, "--out", str(empty), "--resume"], capture_output=True, text=True)
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1 and "checkpoint" in r.stderr
    assert not any(empty.iterdir())
    cut = tmp_path / "cut"
    rc = _kill_after_checkpoint([*base, "--out", str(cut)], cut / CHECKPOINT)
    assert rc == -signal.SIGKILL
    before = sorted(p.name for p in cut.iterdir())
    r = subprocess.run([*base, "--steps", "5", "--out", str(cut), "--resume"], capture_output=True, text=True)
    assert r.returncode == 2 and "steps" in r.stderr and len(r.stderr.strip().splitlines()) == 1
    assert sorted(p.name for p in cut.iterdir()) == before
    # without --resume (or --force) the folder with a checkpoint is refused, offering --resume
    r = subprocess.run([*base, "--out", str(cut)], capture_output=True, text=True)
    assert r.returncode == 2 and "--resume" in r.stderr


SERIES = """
import sys
import torch
from pathlib import Path
from cryogmm.model.series.config import RefineSeriesConfig
from cryogmm.model.series.job import refine_series
d, out, resume = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3] == "1"
torch.set_num_threads(1)
refine_series(RefineSeriesConfig(model=d / "start.pdb", maps=tuple(d / f"map_{i:02d}.mrc" for i in (1, 2, 3)), out=out,
                                 resolution_A=5.0, frames=4, steps=4, n_patches=3, polish_iters=10, capture_steps=3,
                                 extra={"prefit_steps": 30}), resume=resume)
"""


@pytest.fixture(scope="module")
def tiny_series(tmp_path_factory):
    from cryogmm.simulate.maps import series_example

    d = tmp_path_factory.mktemp("tiny")
    ex = series_example(d, n_maps=3, residues=(1, 14), apix=2.0, resolution_A=5.0, noise=0.1)
    assert [Path(p).name for p in ex["maps"]] == ["map_01.mrc", "map_02.mrc", "map_03.mrc"]
    return d


@pytest.mark.slow
def test_refine_series_kill_and_resume(tiny_series, tmp_path):
    """Killed after its first captured model, a resumed series ends as an uninterrupted one; a
    second kill later on (the training or the polish) too."""
    import torch

    from cryogmm.io.checkpoint import CHECKPOINT

    whole, cut = tmp_path / "whole", tmp_path / "cut"
    _run([sys.executable, "-c", SERIES, str(tiny_series), str(whole), "0"])
    rc = _kill_after_checkpoint([sys.executable, "-c", SERIES, str(tiny_series), str(cut), "0"], cut / CHECKPOINT)
    assert rc == -signal.SIGKILL
    first = int(torch.load(cut / CHECKPOINT, weights_only=True)["units_done"])
    # resume, and kill again once it has checkpointed past where it started
    p = subprocess.Popen([sys.executable, "-c", SERIES, str(tiny_series), str(cut), "1"], stderr=subprocess.DEVNULL)
    while p.poll() is None:
        try:
            if int(torch.load(cut / CHECKPOINT, weights_only=True)["units_done"]) > first:
                p.send_signal(signal.SIGKILL)
                break
        except Exception:  # not there yet, or being replaced
            pass
        time.sleep(0.05)
    p.wait()
    _run([sys.executable, "-c", SERIES, str(tiny_series), str(cut), "1"])
    names = ["series.pdb"] + [f"frame_{k:02d}.pdb" for k in range(1, 5)] + [f"map_{k:02d}.pdb" for k in (1, 2, 3)]
    ra, rb = _same_outputs(whole, cut, names)
    assert ra["resumed_from_unit"] is None and rb["resumed_from_unit"] > first >= 1
    na, nb = torch.load(whole / "network.pt", weights_only=False), torch.load(cut / "network.pt", weights_only=False)
    assert all(torch.equal(na["state_dict"][k], nb["state_dict"][k]) for k in na["state_dict"])
    assert not (cut / CHECKPOINT).exists()
    # the frames' figures are those cryogmm validate gives for the written files
    from cryogmm.model.series.config import geometry_summary
    from cryogmm.model.validate import ValidateConfig, validate

    for k, row in enumerate(ra["per_frame"]):
        fig = json.loads(json.dumps(geometry_summary(validate(ValidateConfig(model=whole / f"frame_{k + 1:02d}.pdb")))))
        assert {q: row[q] for q in fig} == fig
    for i, row in enumerate(ra["per_map"]):
        v = json.loads(json.dumps(validate(ValidateConfig(model=whole / f"map_{i + 1:02d}.pdb",
                                                          map=tiny_series / f"map_{i + 1:02d}.mrc", resolution_A=5.0))))
        assert row["frame_geometry"] == geometry_summary(v)
        # map figures: FFTs differ in the last bits between thread counts (the job ran on one)
        assert row["frame"] == pytest.approx({q: v[q] for q in row["frame"]}, rel=1e-9)


def test_report_nulls_and_nyquist(tmp_path):
    """report.json: every non-finite figure null with its place and reason; an FSC table's zero
    frequency null; a resolution at the Nyquist limit flagged."""
    from cryogmm.core.similarity import resolution_at
    from cryogmm.io.outputs import DC_REASON, write_report

    box, apix = 16, 2.0
    flat = np.ones(box // 2 + 1)  # never falls below 0.143: the Nyquist limit
    crossing = np.linspace(1.0, -0.2, box // 2 + 1)
    rep = {"resolution_A": resolution_at(flat, box, apix), "resolution_0.5_A": resolution_at(crossing, box, apix, 0.5),
           "fsc": {"resolution_A": (box * apix / np.maximum(np.arange(box // 2 + 1), 1e-9)).tolist(), "masked": flat},
           "figures": {"cc": float("nan"), "ratio": np.float32("inf"), "ok": np.float64(0.5)},
           "rows": [{"x": -np.inf}, {"x": 1}]}
    back = write_report(tmp_path / "report.json", rep)
    text = (tmp_path / "report.json").read_text()
    assert "NaN" not in text and "Infinity" not in text and "e+11" not in text
    j = json.loads(text)
    assert j["figures"] == {"cc": None, "ratio": None, "ok": 0.5} and j["rows"][0]["x"] is None
    assert j["null_reasons"]["figures.cc"].startswith("not a number")
    assert j["null_reasons"]["figures.ratio"] == "infinite" and j["null_reasons"]["rows[0].x"] == "-infinite"
    assert j["fsc"]["resolution_A"][0] is None and j["null_reasons"]["fsc.resolution_A[0]"] == DC_REASON
    assert j["fsc"]["resolution_A"][1] == box * apix
    assert rep["resolution_A"] == 2 * apix and j["resolution_limited_by"] == {"resolution_A": "nyquist"}
    assert back["resolution_limited_by"] == {"resolution_A": "nyquist"}
    # a table whose shell 0 is written as infinite
    write_report(tmp_path / "r3.json", {"fsc": {"resolution_A": [np.inf, 32.0, 16.0], "masked": [1.0, 0.5, 0.1]}})
    j3 = json.loads((tmp_path / "r3.json").read_text())
    assert j3["fsc"]["resolution_A"] == [None, 32.0, 16.0] and j3["null_reasons"] == {"fsc.resolution_A[0]": DC_REASON}
    # a job's own reason is kept
    write_report(tmp_path / "r2.json", {"a": float("nan"), "null_reasons": {"a": "no particles in this class"}})
    assert json.loads((tmp_path / "r2.json").read_text())["null_reasons"] == {"a": "no particles in this class"}


@pytest.fixture(scope="module")
def het_sim(tmp_path_factory):
    """Open-to-closed adenylate kinase particles (CORE-superposed endpoints), 160 particles, box 32."""
    from cryogmm.hetero.truth import ADK_CORE, superpose_file
    from cryogmm.simulate.particles import SimulateConfig, simulate

    data = Path(str(resources.files("cryogmm.data")))
    d = tmp_path_factory.mktemp("het")
    superpose_file(data / "adk_closed.pdb", data / "adk_open.pdb", d / "closed_on_open.pdb", ADK_CORE)
    simulate(SimulateConfig(out=d / "sim", endpoints=(data / "adk_open.pdb", d / "closed_on_open.pdb"), frames=5,
                            n=160, box=32, apix=3.0, snr=1.0, seed=1, device="cpu"))
    return d / "sim"


@pytest.mark.slow
def test_hetero_train_kill_and_resume(het_sim, tmp_path):
    """hetero train killed after its first epoch's checkpoint, then --resume: the same weights,
    losses and report as an uninterrupted run."""
    import torch

    model = Path(str(resources.files("cryogmm.data"))) / "adk_open.pdb"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}

    def cmd(out, *extra):
        return [sys.executable, "-m", "cryogmm", "hetero", "train", str(het_sim / "particles.star"), "--model",
                str(model), "--map", str(het_sim / "truth_map.mrc"), "--segments", "4", "--zdim", "2", "--epochs", "4",
                "--batch", "32", "--lowpass-A", "12", "--kl-warmup", "2", "--hidden", "32", "--device", "cpu",
                "--out", str(out), *extra]

    whole, cut = tmp_path / "whole", tmp_path / "cut"
    _run(cmd(whole), env=env)
    assert _kill_after_checkpoint(cmd(cut), cut / "checkpoint.pt", env=env) == -signal.SIGKILL
    assert not (cut / "report.json").exists()
    _run(cmd(cut, "--resume"), env=env)
    ca, cb = (json.loads((d / "config.json").read_text()) for d in (whole, cut))
    assert {k: v for k, v in ca.items() if k not in ("out", "resume")} == {
        k: v for k, v in cb.items() if k not in ("out", "resume")}
    ra, rb = (json.loads((d / "report.json").read_text()) for d in (whole, cut))
    for r in (ra, rb):
        r["config"] = {k: v for k, v in r["config"].items() if k not in ("out", "resume")}
    assert _strip(ra) == _strip(rb)
    assert ra["resumed_from_epoch"] is None and 1 <= rb["resumed_from_epoch"] < 4
    sa = torch.load(whole / "checkpoint.pt", weights_only=True)
    sb = torch.load(cut / "checkpoint.pt", weights_only=True)
    assert all(torch.equal(sa["model"][k], sb["model"][k]) for k in sa["model"])
