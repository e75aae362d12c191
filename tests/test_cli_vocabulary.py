"""One option vocabulary across the jobs (issue 21): every job's --help describes it with an
example, --out is a folder everywhere, --device auto|cpu|cuda[:N] (default auto) in every job
that computes, --dist-timeout in the torchrun jobs, --n-particles / --n-gaussians with the old
--n still parsing, one --similarity default, an unknown command answered with an error line."""

from __future__ import annotations

import argparse

import pytest

from cryogmm.cli import COMMANDS, build_parser, main

# jobs whose --out is not a folder option of their own: RELION's External job takes --o, and the
# bridge's convert/subset write the file named as a positional argument, info writes nothing
NOT_OUT = {"relion", "convert", "subset", "info"}
COMPUTES = {"simulate", "reconstruct", "refine-poses", "demo", "fit-gmm", "validate", "refine-model", "refine-series",
            "hetero train", "hetero analyze", "hetero decode"}
TORCHRUN = {"reconstruct", "refine-poses", "hetero train"}


def _jobs():
    out = {}
    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    for name, p in sub.choices.items():
        if name == "hetero":
            inner = next(a for a in p._actions if isinstance(a, argparse._SubParsersAction))
            out.update({f"hetero {k}": v for k, v in inner.choices.items()})
        else:
            out[name] = p
    return out


JOBS = _jobs()


def _option(p, flag):
    return next((a for a in p._actions if flag in a.option_strings), None)


def test_every_job_is_walked():
    assert {j.split()[0] for j in JOBS} == set(COMMANDS)
    assert {"hetero train", "hetero analyze", "hetero decode"} <= set(JOBS)


@pytest.mark.parametrize("job", sorted(JOBS))
def test_help_has_a_description_and_an_example(job, capsys):
    with pytest.raises(SystemExit) as e:
        main([*job.split(), "--help"])
    assert e.value.code == 0
    text = capsys.readouterr().out
    head = text.split("options:")[0].split("positional arguments:")[0]
    description = [line for line in head.splitlines()[1:] if line.strip() and not line.startswith(" " * 10)]
    assert len(description) >= 2, (job, head)
    low = text.lower()
    assert "example" in low and f"cryogmm {job}" in low.split("example", 1)[1], job


@pytest.mark.parametrize("job", sorted(set(JOBS) - NOT_OUT))
def test_out_is_a_folder(job):
    a = _option(JOBS[job], "--out")
    assert a is not None, job
    assert "folder" in (a.help or ""), (job, a.help)
    assert a.required or job == "hetero analyze", job  # analyze defaults to RUN/analyze, a folder too


@pytest.mark.parametrize("job", sorted(COMPUTES))
def test_device_auto_everywhere(job):
    a = _option(JOBS[job], "--device")
    assert a is not None and a.default == "auto", job
    assert "auto" in a.help and "cuda[:N]" in a.help, job
    assert (_option(JOBS[job], "--dist-timeout") is not None) == (job in TORCHRUN), job


def test_counts_have_their_own_names_and_the_old_n_still_parses():
    cases = [("simulate", ["--model", "m.pdb", "--out", "o"], "--n-particles", 1000),
             ("demo", ["--out", "o"], "--n-particles", 1500),
             ("fit-gmm", ["m.mrc", "--resolution", "6", "--out", "o"], "--n-gaussians", None)]
    for job, base, new, default in cases:
        p = build_parser(job)
        assert p.parse_args([job, *base]).n == default
        assert p.parse_args([job, *base, new, "7"]).n == 7
        assert p.parse_args([job, *base, "--n", "9"]).n == 9  # the deprecated alias
        helps = [a for a in JOBS[job]._actions if "--n" in a.option_strings]
        assert helps and helps[0].help == argparse.SUPPRESS  # hidden from --help
    assert _option(JOBS["refine-poses"], "--n-gaussians") is not None


def test_model_jobs_share_the_similarity_default():
    a, b = _option(JOBS["refine-model"], "--similarity"), _option(JOBS["refine-series"], "--similarity")
    assert a.default == b.default == "fsc" and list(a.choices) == list(b.choices)


def test_unknown_command_prints_an_error_line(capsys):
    assert main(["foo"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("cryogmm: error: unknown command 'foo'")


def test_bad_alias_value_names_the_option(capsys):
    assert main(["simulate", "--model", "m.pdb", "--n", "0", "--out", "o"]) == 2
    assert "--n" in capsys.readouterr().err


@pytest.mark.slow  # trains a (tiny) run first: about 2 CPU-minutes
def test_hetero_decode_out_is_a_folder_and_the_old_file_form_still_works(tmp_path):
    import json

    from cryogmm.demo import example_model
    from cryogmm.hetero import config as hetero_config
    from cryogmm.hetero import train as hetero_train
    from cryogmm.simulate.particles import SimulateConfig, simulate

    simulate(SimulateConfig(out=tmp_path / "sim", model=example_model("open"), n=40, box=32, apix=3.5, snr=1.0, seed=1,
                            device="cpu"))
    hetero_train.train_hetero(hetero_config.HeteroConfig(
        star=tmp_path / "sim" / "particles.star", model=example_model("open"), out=tmp_path / "run",
        map=tmp_path / "sim" / "truth_map.mrc", decoder="segments", segments=4, zdim=1, epochs=1, batch=40,
        lowpass_A=12.0, seed=0, device="cpu", hidden=16))
    (tmp_path / "z.txt").write_text("-1\n0\n1\n")
    assert main(["hetero", "decode", str(tmp_path / "run"), "--z", str(tmp_path / "z.txt"), "--out",
                 str(tmp_path / "dec"), "--device", "cpu"]) == 0
    assert sorted(p.name for p in (tmp_path / "dec").iterdir()) == ["models.pdb", "report.json"]
    assert (tmp_path / "dec" / "models.pdb").read_text().count("ENDMDL") == 3
    assert json.loads((tmp_path / "dec" / "report.json").read_text())["models"] == 3
    assert main(["hetero", "decode", str(tmp_path / "run"), "--z", str(tmp_path / "z.txt"), "--out",
                 str(tmp_path / "old.pdb"), "--device", "cpu"]) == 0  # deprecated: --out FILE.pdb
    assert (tmp_path / "old.pdb").read_text().count("ENDMDL") == 3
