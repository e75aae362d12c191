"""``refine-model --threads`` (issue 17, scale: a run on a machine shared with other jobs): the
number reaches the refinement's configuration; a bad number is refused in one line, exit 2."""

from __future__ import annotations

from importlib import resources
from pathlib import Path

import pytest

from cryogmm.cli import main as cli

ADK = Path(str(resources.files("cryogmm.data").joinpath("adk_closed.pdb")))


@pytest.mark.parametrize("argv,threads", [([], 2), (["--threads", "1"], 1), (["--threads", "3"], 3)])
def test_threads_reach_the_config(argv, threads, tmp_path, monkeypatch):
    import cryogmm.model.refine.job as job

    seen = {}

    def fake(cfg, **kw):
        seen["threads"] = cfg.threads
        raise SystemExit(0)

    monkeypatch.setattr(job, "refine_model", fake)
    with pytest.raises(SystemExit):
        cli(["refine-model", str(ADK), "--geometry-only", "--out", str(tmp_path / "o"), *argv])
    assert seen["threads"] == threads


def test_bad_threads_refused(tmp_path, capsys):
    assert cli(["refine-model", str(ADK), "--geometry-only", "--out", str(tmp_path / "o"), "--threads", "0"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--threads" in err[0]
    assert not (tmp_path / "o").exists()
