"""The README's main command: `cryogmm demo` runs every job on the bundled example and each
step moves toward the known truth."""

import json

import pytest

from cryogmm.cli import main as cli


@pytest.mark.slow
def test_demo(tmp_path):
    out = tmp_path / "demo"
    assert cli(["demo", "--out", str(out), "--n", "800"]) == 0
    rep = json.loads((out / "report.json").read_text())
    assert (out / "reconstruct" / "map.mrc").is_file() and (out / "refine" / "refined.star").is_file()
    start, ref = rep["start"], rep["refine"]
    assert start["map_vs_truth_correlation"] > 0.9
    assert ref["angle_error_deg"]["median"] < start["angle_error_deg"]["median"]
    assert ref["shift_error_A"]["median"] < start["shift_error_A"]["median"]
    assert ref["map_vs_truth_correlation"] >= start["map_vs_truth_correlation"] - 0.005
