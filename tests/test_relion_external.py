"""cryogmm jobs as RELION External jobs.

Without RELION: the External protocol in-process (outputs, RELION_OUTPUT_NODES.star, exit
markers, run.out/run.err, --j) and every bad input (no --o, wrong node type, unknown
parameter: one line in run.err, RELION_JOB_EXIT_FAILURE, exit 2, nothing else written).

With RELION 3.1 (``peer``; apt-get install -y --no-install-recommends relion): a real
project where ``relion_pipeliner --addJobFromStar`` + ``--RunJobs`` runs refine-poses and
then reconstruct on its particles, default_pipeline.star lists our nodes with their types,
RELION's own PostProcess job and relion_reconstruct read our outputs unchanged, and failing
runs end as failed jobs with the reason in run.err.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import mrcfile
import numpy as np
import pytest
import torch

from cryogmm.bridge.io import read_particles, write_particles
from cryogmm.bridge.pipeline import EXIT_FAILURE, EXIT_SUCCESS, read_output_nodes
from cryogmm.bridge.star import read_star_blocks
from cryogmm.cli import main as cli
from cryogmm.commands.relion_external import FAMILIES, build_stage_argvs, run_external, split_relion_args

BOX, APIX, N = 32, 3.0, 240
RELION_FILES = {"job.star", "note.txt"}  # what RELION puts in a job folder before running it
BIN = Path(sys.executable).parent


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    """A RELION project folder with simulated particles in Sim/ (image paths project-relative)."""
    from cryogmm.demo import example_model

    proj = tmp_path_factory.mktemp("relionproj")
    sim = tmp_path_factory.mktemp("sim") / "sim"
    rc = cli(["simulate", "--model", str(example_model("open")), "--n", str(N), "--box", str(BOX), "--apix", str(APIX),
              "--snr", "1", "--shift-sd", "1", "--pose-noise-deg", "3", "--seed", "5", "--out", str(sim)])
    assert rc == 0
    (proj / "Sim").mkdir()
    shutil.copy(sim / "particles.mrcs", proj / "Sim" / "particles.mrcs")
    shutil.copy(sim / "truth_map.mrc", proj / "Sim" / "truth_map.mrc")
    t = read_particles(sim / "particles.star")
    t = t.with_columns(rlnImageName=t.particles["rlnImageName"].str.replace("@", "@Sim/").to_numpy())
    write_particles(t, proj / "Sim" / "particles.star")
    return proj


def new_job(proj: Path, name: str) -> Path:
    """A job folder as RELION prepares it (job.star, note.txt) before calling the program."""
    d = proj / name
    d.mkdir(parents=True)
    (d / "job.star").write_text("data_job\n_rlnJobType 99\n")
    (d / "note.txt").write_text("note\n")
    return d


@pytest.fixture
def in_project(project, monkeypatch):
    monkeypatch.chdir(project)
    monkeypatch.setenv("OMP_NUM_THREADS", os.environ.get("OMP_NUM_THREADS", str(torch.get_num_threads())))
    threads = torch.get_num_threads()
    yield project
    torch.set_num_threads(threads)


# ----------------------------------------------------------------------------------- in-process
def test_reconstruct_as_external_job(in_project, capsys):
    job = new_job(in_project, "External/job101")
    rc = cli(["relion", "reconstruct", "--o", "External/job101/", "--in_parts", "Sim/particles.star",
              "--batch", "64", "--no_wiener", "", "--j", "1"])
    _, err = capsys.readouterr()
    assert rc == 0, err
    assert (job / EXIT_SUCCESS).exists() and not (job / EXIT_FAILURE).exists()
    assert read_output_nodes(job / "RELION_OUTPUT_NODES.star") == [
        ("External/job101/map.mrc", 6), ("External/job101/half1.mrc", 10)]
    for name in ("map.mrc", "half1.mrc", "half2.mrc", "report.json"):
        assert (job / name).is_file()
    assert "1 thread(s)" in (job / "run.out").read_text() and torch.get_num_threads() == 1
    assert json.loads((job / "report.json").read_text())["n_particles"] == N
    assert not (job / "run.err").exists() or (job / "run.err").read_text() == ""


def test_parameters_map_onto_the_job_options(in_project):
    own, _ = split_relion_args(["--o", "External/j/", "--in_parts", "Sim/particles.star", "--low_res_A", "20",
                                     "--no_wiener", "", "--sym", "C2", "--j", "3", "--pipeline_control", "External/j/"])
    assert own == {"--o": "External/j/", "--in_parts": "Sim/particles.star", "--j": "3", "--pipeline_control": "External/j/"}
    (mod, args), = build_stage_argvs("refine-poses", FAMILIES["refine-poses"], own, [("--low_res_A", ["20"]), ("--sym", ["C2"])],
                                     Path("External/j"))
    assert mod.endswith("refine_poses") and args.low_res_A == 20 and args.sym == "C2"
    assert str(args.out) == "External/j" and str(args.project_dir) == "." and str(args.star) == "Sim/particles.star"
    for value, expect in (([], True), (["yes"], True), (["no"], False)):
        (_, args), = build_stage_argvs("reconstruct", FAMILIES["reconstruct"], own, [("--no-wiener", value)], Path("External/j"))
        assert args.no_wiener is expect
    # hetero: train and analyze options each go to their stage, --in_3dref becomes --map
    own = {"--o": "External/h/", "--in_parts": "Sim/particles.star", "--in_3dref": "Sim/truth_map.mrc"}
    (_, a1), (_, a2) = build_stage_argvs("hetero", FAMILIES["hetero"], own,
                                           [("--model", ["m.pdb"]), ("--epochs", ["2"]), ("--clusters", ["3"])],
                                           Path("External/h"))
    assert a1.action == "train" and a1.epochs == 2 and str(a1.map) == "Sim/truth_map.mrc" and str(a1.model) == "m.pdb"
    assert a2.action == "analyze" and a2.clusters == 3 and str(a2.run) == "External/h"


def job_files(job: Path) -> set:
    return {p.name for p in job.iterdir()}


@pytest.mark.parametrize("family, args, expect", [
    ("refine-poses", ["--in_parts", "Sim/particles.star", "--bogus", "3"], "unknown parameter --bogus"),
    ("refine-poses", ["--in_parts", "Sim/particles.star", "--iterations", "many"], "--iterations"),
    ("refine-poses", ["--in_parts", "Sim/particles.star", "--out", "elsewhere"], "set by RELION's job itself"),
    ("refine-poses", ["--in_mics", "Sim/particles.star"], "refine-poses takes no --in_mics (micrographs)"),
    ("refine-poses", ["--in_parts", "Sim/truth_map.mrc"], "expected a particles"),
    ("reconstruct", ["--in_parts", "Sim/nope.star"], "file not found"),
    ("reconstruct", [], "reconstruct needs --in_parts"),
    ("refine-poses", ["--in_parts", "Sim/particles.star", "--in_3dref", "Sim/particles.star"], "expected a 3D reference"),
    ("refine-model", ["--in_3dref", "Sim/truth_map.mrc"], "needs the parameter --model"),
    ("reconstruct", ["--in_parts", "Sim/particles.star", "--j", "0"], "--j 0"),
])
def test_bad_input_is_one_line_in_run_err(in_project, capsys, family, args, expect):
    name = f"External/bad{abs(hash((family, tuple(args)))) % 10**8}"
    job = new_job(in_project, name)
    rc = run_external(family, ["--o", name + "/", *args])
    capsys.readouterr()
    assert rc == 2
    lines = (job / "run.err").read_text().splitlines()
    assert len(lines) == 1 and expect in lines[0], lines
    assert job_files(job) == RELION_FILES | {"run.err", EXIT_FAILURE}  # nothing else written


def test_wrong_node_type_in_the_pipeline(in_project, capsys):
    # Sim/particles.star registered in default_pipeline.star as micrographs (type 1)
    (in_project / "default_pipeline.star").write_text(
        "data_pipeline_general\n_rlnPipeLineJobCounter 2\n\ndata_pipeline_nodes\nloop_\n"
        "_rlnPipeLineNodeName #1\n_rlnPipeLineNodeType #2\nSim/particles.star 1\n")
    try:
        job = new_job(in_project, "External/job102")
        rc = run_external("refine-poses", ["--o", "External/job102/", "--in_parts", "Sim/particles.star"])
    finally:
        (in_project / "default_pipeline.star").unlink()
    assert rc == 2
    line = (job / "run.err").read_text().strip()
    assert "type micrographs (1)" in line and "particles (3)" in line
    assert job_files(job) == RELION_FILES | {"run.err", EXIT_FAILURE}
    capsys.readouterr()


def test_missing_o_writes_nothing(in_project, capsys):
    before = sorted(p.name for p in in_project.rglob("*"))
    assert run_external("reconstruct", ["--in_parts", "Sim/particles.star", "--j", "1"]) == 2
    assert "--o JOBDIR" in capsys.readouterr().err
    assert sorted(p.name for p in in_project.rglob("*")) == before


def test_bridge_pipeline_module_is_torch_free():
    code = "import sys, cryogmm.bridge.pipeline, cryogmm.bridge.csfile; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"


# ----------------------------------------------------------------------------- real RELION 3.1
needs_relion = pytest.mark.skipif(
    shutil.which("relion_pipeliner") is None or shutil.which("relion_reconstruct") is None,
    reason="RELION is not installed (apt-get install -y --no-install-recommends relion)")


def job_star(path: Path, job_type: int, options: dict) -> Path:
    """A RELION 3.1 job.star for ``relion_pipeliner --addJobFromStar``."""
    rows = "\n".join(f"{k} {v}" for k, v in options.items())
    path.write_text(f"\n# version 30001\n\ndata_job\n\n_rlnJobType {job_type}\n_rlnJobIsContinue 0\n\n"
                    f"# version 30001\n\ndata_joboptions_values\n\nloop_\n_rlnJobOptionVariable #1\n"
                    f"_rlnJobOptionValue #2\n{rows}\n")
    return path


def external_exe(family: str, proj: Path) -> str:
    """The console script RELION's "External executable" names (a wrapper if not installed)."""
    exe = BIN / f"cryogmm-relion-{family}"
    if exe.exists():
        return str(exe)
    w = proj / f"run-{family}.sh"
    w.write_text(f'#!/bin/sh\nexec "{sys.executable}" -m cryogmm.cli relion {family} "$@"\n')
    w.chmod(0o755)
    return str(w)


def pipeliner(proj: Path, *args, timeout=600):
    p = subprocess.run(["relion_pipeliner", *args], cwd=proj, capture_output=True, text=True, timeout=timeout, check=False)
    assert p.returncode == 0, p.stderr[-2000:]
    return p


def add_and_run(proj: Path, name: str, job_type: int, options: dict) -> str:
    """Add a job from a job.star and run it with the pipeliner; its job folder name."""
    before = pipeline(proj)["processes"]
    pipeliner(proj, "--addJobFromStar", str(job_star(proj / f"{name}.job.star", job_type, options)))
    job = next(j for j in pipeline(proj)["processes"] if j not in before)
    pipeliner(proj, "--RunJobs", job, "--sec_wait_after", "1")
    return job


def pipeline(proj: Path) -> dict:
    b = read_star_blocks(proj / "default_pipeline.star")
    procs = b.get("pipeline_processes")
    nodes = b.get("pipeline_nodes")
    return {"processes": {} if procs is None else dict(zip(procs["rlnPipeLineProcessName"], procs["rlnPipeLineProcessStatus"])),
            "nodes": {} if nodes is None else dict(zip(nodes["rlnPipeLineNodeName"], nodes["rlnPipeLineNodeType"]))}


@pytest.fixture(scope="module")
def relion_project(project, tmp_path_factory):
    proj = tmp_path_factory.mktemp("relion31")
    shutil.copytree(project / "Sim", proj / "Sim")
    # what the RELION GUI writes when it starts a new project
    (proj / "default_pipeline.star").write_text("\n# version 30001\n\ndata_pipeline_general\n\n_rlnPipeLineJobCounter 1\n\n")
    n = np.arange(BOX) - BOX // 2
    r = np.sqrt(n[:, None, None] ** 2 + n[None, :, None] ** 2 + n[None, None, :] ** 2)
    mask = 0.5 + 0.5 * np.cos(np.pi * np.clip((r - 10) / 5, 0, 1))
    (proj / "Masks").mkdir()
    with mrcfile.new(proj / "Masks" / "sphere.mrc") as f:
        f.set_data(mask.astype(np.float32))
        f.voxel_size = APIX
    return proj


@pytest.fixture(scope="module")
def refined(relion_project):
    """refine-poses, then reconstruct on its refined particles, both run by relion_pipeliner."""
    proj = relion_project
    j1 = add_and_run(proj, "refine", 99, {
        "fn_exe": external_exe("refine-poses", proj), "in_part": "Sim/particles.star", "in_mask": "Masks/sphere.mrc",
        "param1_label": "iterations", "param1_value": 2, "param2_label": "fit_iterations", "param2_value": 60,
        "param3_label": "steps", "param3_value": 10, "param4_label": "max_gaussians", "param4_value": 200,
        "nr_threads": 2})
    j2 = add_and_run(proj, "reconstruct", 99, {
        "fn_exe": external_exe("reconstruct", proj), "in_part": f"{j1}refined.star", "nr_threads": 1})
    return proj, j1, j2


@pytest.mark.peer
@needs_relion
def test_pipeliner_runs_our_jobs_and_lists_their_nodes(refined):
    proj, j1, j2 = refined
    assert (j1, j2) == ("External/job001/", "External/job002/")
    pl = pipeline(proj)
    assert pl["processes"][j1] == 2 and pl["processes"][j2] == 2, (proj / j1 / "run.err").read_text()  # 2 = finished
    assert (proj / j1 / EXIT_SUCCESS).exists() and (proj / j2 / EXIT_SUCCESS).exists()
    nodes = pl["nodes"]
    assert nodes[f"{j1}refined.star"] == 3 and nodes[f"{j1}map.mrc"] == 6 and nodes[f"{j1}half1.mrc"] == 10
    assert nodes[f"{j2}map.mrc"] == 6 and nodes[f"{j2}half1.mrc"] == 10
    assert nodes["Masks/sphere.mrc"] == 7 and nodes["Sim/particles.star"] == 3
    assert "2 thread(s)" in (proj / j1 / "run.out").read_text()
    rep = json.loads((proj / j1 / "report.json").read_text())
    print(f"refine-poses via relion_pipeliner: {rep['n_particles']} particles, FSC 0.143 {rep['resolution_A']:.2f} Å")


@pytest.mark.peer
@needs_relion
def test_relion_jobs_read_our_outputs_unchanged(refined):
    proj, j1, _ = refined
    # RELION's PostProcess job on our half maps, through the pipeline
    j3 = add_and_run(proj, "post", 15, {"fn_in": f"{j1}half1.mrc", "fn_mask": "Masks/sphere.mrc",
                                        "do_auto_bfac": "No", "do_adhoc_bfac": "Yes", "adhoc_bfac": -50})
    assert pipeline(proj)["processes"][j3] == 2, (proj / j3 / "run.err").read_text()
    post = read_star_blocks(proj / j3 / "postprocess.star")["general"]
    res, ours = float(post["rlnFinalResolution"]), json.loads((proj / j1 / "report.json").read_text())["resolution_A"]
    assert post["rlnUnfilteredMapHalf2"] == f"{j1}half2.mrc"
    assert 2 * APIX <= res < 2.0 * ours, (res, ours)
    # relion_reconstruct on our refined particles, from the project folder
    p = subprocess.run(["relion_reconstruct", "--i", f"{j1}refined.star", "--o", "relion_rec.mrc", "--ctf"],
                       cwd=proj, capture_output=True, text=True, timeout=300, check=False)
    assert p.returncode == 0, p.stderr[-2000:]
    rec, truth = mrcfile.read(proj / "relion_rec.mrc"), mrcfile.read(proj / "Sim" / "truth_map.mrc")
    cc = float(np.corrcoef(rec.ravel(), truth.ravel())[0, 1])
    print(f"RELION PostProcess on our half maps: {res:.2f} Å (ours {ours:.2f} Å); "
          f"relion_reconstruct of refined.star vs truth CC {cc:.3f}")
    assert cc > 0.8


@pytest.mark.peer
@needs_relion
def test_failing_runs_are_failed_jobs_with_the_reason_in_run_err(relion_project):
    proj = relion_project
    # bad input: a parameter no option matches
    j = add_and_run(proj, "bad", 99, {"fn_exe": external_exe("refine-poses", proj), "in_part": "Sim/particles.star",
                                       "param1_label": "bogus", "param1_value": 1})
    assert pipeline(proj)["processes"][j] == 3  # finished with failure
    assert (proj / j / EXIT_FAILURE).exists() and not (proj / j / EXIT_SUCCESS).exists()
    assert "unknown parameter --bogus" in (proj / j / "run.err").read_text()
    assert not list((proj / j).glob("*.mrc")) and not (proj / j / "RELION_OUTPUT_NODES.star").exists()
    # a run that fails in the engine: the particle stack is missing
    t = read_particles(proj / "Sim" / "particles.star")
    write_particles(t.with_columns(rlnImageName=t.particles["rlnImageName"].str.replace("Sim/", "Gone/").to_numpy()),
                    proj / "Sim" / "gone.star")
    j = add_and_run(proj, "gone", 99, {"fn_exe": external_exe("reconstruct", proj), "in_part": "Sim/gone.star"})
    assert pipeline(proj)["processes"][j] == 3
    err = (proj / j / "run.err").read_text()
    assert "Gone/particles.mrcs" in err and (proj / j / EXIT_FAILURE).exists()
    assert not list((proj / j).glob("*.mrc"))
