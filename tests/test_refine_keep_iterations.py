"""refine-poses --keep-iterations: the poses after every iteration, the last equal to refined.star."""

import json

import numpy as np

from cryogmm.bridge.images import ImageSource
from cryogmm.bridge.io import read_particles
from cryogmm.cli import main as cli
from cryogmm.demo import example_model


def test_keep_iterations_writes_each_iterations_poses(tmp_path):
    sim = tmp_path / "sim"
    assert cli(["simulate", "--model", str(example_model("open")), "--n", "48", "--box", "32", "--apix", "3.5",
                "--snr", "1", "--pose-noise-deg", "4", "--shift-noise-A", "1.5", "--seed", "2", "--out", str(sim)]) == 0
    out = tmp_path / "ref"
    assert cli(["refine-poses", str(sim / "particles.star"), "--out", str(out), "--iterations", "2", "--steps", "4",
                "--fit-iterations", "20", "--max-gaussians", "60", "--keep-iterations"]) == 0
    kept = sorted((out / "iterations").glob("refined_it*.star"))
    n_it = len(json.loads((out / "report.json").read_text())["iterations"])
    assert [p.name for p in kept] == [f"refined_it{i:03d}.star" for i in range(1, n_it + 1)]
    start = read_particles(sim / "particles.star")
    last, final = read_particles(kept[-1]), read_particles(out / "refined.star")
    np.testing.assert_allclose(last.rotmat, final.rotmat, atol=1e-6)
    np.testing.assert_allclose(last.shift_A, final.shift_A, atol=1e-6)
    assert np.abs(read_particles(kept[0]).rotmat - start.rotmat).max() > 1e-4  # iteration 1 moved the poses
    # the kept STAR files find the images from their own folder
    assert ImageSource.from_table(last).images(np.arange(2)).shape == (2, 32, 32)
    assert last.n == start.n and np.isfinite(np.asarray(last.particles["rlnCryogmmFrc"], dtype=float)).all()
    assert not list((out / "iterations").glob(".*"))  # no temporary files left


def test_no_iterations_folder_by_default(tmp_path):
    sim = tmp_path / "sim"
    assert cli(["simulate", "--model", str(example_model("open")), "--n", "24", "--box", "32", "--apix", "3.5",
                "--snr", "1", "--seed", "2", "--out", str(sim)]) == 0
    out = tmp_path / "ref"
    assert cli(["refine-poses", str(sim / "particles.star"), "--out", str(out), "--iterations", "1", "--steps", "2",
                "--fit-iterations", "10", "--max-gaussians", "40"]) == 0
    assert not (out / "iterations").exists()
