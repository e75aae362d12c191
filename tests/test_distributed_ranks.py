"""torch.distributed across ranks and nodes (gloo, CPU): one decision for every rank
(:func:`cryogmm.distributed.agree`), a failing rank ends every rank with its message printed once,
``--dist-timeout`` ends a hung rank's job, one GPU per rank or a clear error, and a two-node run
(two ``torchrun`` launchers on one machine, c10d rendezvous on 127.0.0.1) equal to one process."""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
import time

import mrcfile
import numpy as np
import pytest
import torch

from cryogmm import distributed
from cryogmm.demo import example_model
from cryogmm.errors import OptionError

pytestmark = pytest.mark.skipif(not torch.distributed.is_available() or not torch.distributed.is_gloo_available(),
                                reason="torch without gloo")

LAUNCH = [sys.executable, "-m", "torch.distributed.run"]


def _env(**extra):
    env = dict(os.environ, OMP_NUM_THREADS="1", **extra)
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT",
              distributed.TEST_FAIL_ENV):
        if k not in extra:
            env.pop(k, None)
    return env


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def sim(tmp_path_factory):
    """Adenylate kinase, 120 particles, box 32 at 3.5 Å."""
    from cryogmm.simulate.particles import SimulateConfig, simulate

    d = tmp_path_factory.mktemp("ranks") / "sim"
    simulate(SimulateConfig(model=example_model("open"), out=d, n=120, box=32, apix=3.5, snr=0.5, seed=5,
                            device="cpu"))
    return d


# --------------------------------------------------------------------------- in-process
def test_agree_and_configure_on_one_process(monkeypatch):
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(k, raising=False)
    assert distributed.agree(True) is True and distributed.agree(0) is False
    assert distributed.report_failure("x") is True and distributed.peer_failure() is None
    with pytest.raises(OptionError, match="--dist-timeout"):
        distributed.configure(timeout_s=float("nan"))


def test_one_gpu_per_rank_or_a_clear_error(monkeypatch):
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")
    monkeypatch.setenv("LOCAL_RANK", "3")
    with pytest.raises(OptionError, match="4 processes on this node but 2 GPU"):
        distributed._cuda_device(torch.device("cuda"))
    with pytest.raises(OptionError, match="all on one GPU"):
        distributed._cuda_device(torch.device("cuda", 1))
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert distributed._cuda_device(torch.device("cuda")) == torch.device("cuda", 1)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "1")
    assert distributed._cuda_device(torch.device("cuda", 1)) == torch.device("cuda", 1)


# --------------------------------------------------------------------------- under torchrun
_AGREE = r'''
import sys, torch
from cryogmm import distributed
distributed.setup(torch.device("cpu"))
r = distributed.rank()
got = [distributed.agree(r == 0), distributed.agree(r != 0), distributed.agree(r == 1)]
print(f"rank {r}: {got}", flush=True)
distributed.barrier()
'''


def test_agree_takes_rank_0s_decision(tmp_path):
    script = tmp_path / "agree.py"
    script.write_text(_AGREE)
    p = subprocess.run([*LAUNCH, "--standalone", "--nproc_per_node", "2", str(script)], env=_env(),
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    # the ranks share the launcher's stdout, so their lines may interleave: find each one's record
    assert sorted(re.findall(r"rank \d: \[[^\]]*\]", p.stdout)) == [
        "rank 0: [True, False, False]", "rank 1: [True, False, False]"]


def _reconstruct_args(sim, out):
    return ["-m", "cryogmm.cli", "reconstruct", str(sim / "particles.star"), "--out", str(out), "--device", "cpu",
            "--batch", "40"]


def test_a_failing_rank_ends_every_rank_with_its_message_once(sim, tmp_path):
    """Rank 1 raises at its first collective while rank 0 waits in it: both processes end
    (the collective timeout is 10 min, so it is the failure report that ends rank 0), exit
    non-zero, the message printed once, rank 0 saying why it stopped, nothing written."""
    out = tmp_path / "rec"
    t0 = time.monotonic()
    p = subprocess.run([*LAUNCH, "--standalone", "--nproc_per_node", "2", *_reconstruct_args(sim, out),
                        "--dist-timeout", "600"], env=_env(**{distributed.TEST_FAIL_ENV: "1:1"}),
                       capture_output=True, text=True, timeout=240)
    elapsed = time.monotonic() - t0
    assert p.returncode != 0
    assert p.stderr.count("failure injected on rank 1") == 1, p.stderr[-3000:]
    assert "rank 0 stopped: rank 1 failed" in p.stderr
    assert not out.exists()
    print(f"two ranks, rank 1 fails: every process gone {elapsed:.1f} s after the launch, "
          f"load {os.getloadavg()[0]:.1f}")


def test_a_hung_rank_ends_at_the_dist_timeout(sim, tmp_path):
    """Rank 1 hangs (sleeps) at its first collective: rank 0's collective fails after
    --dist-timeout 5 s with one line naming it, and rank 1 is ended by that failure."""
    p = subprocess.run([*LAUNCH, "--standalone", "--nproc_per_node", "2", *_reconstruct_args(sim, tmp_path / "rec"),
                        "--dist-timeout", "5"], env=_env(**{distributed.TEST_FAIL_ENV: "1:1:hang"}),
                       capture_output=True, text=True, timeout=240)
    assert p.returncode != 0
    assert p.stderr.count("--dist-timeout is 5 s") == 1, p.stderr[-3000:]
    assert "error (rank 0 of 2): the process group failed" in p.stderr
    assert "rank 1 stopped: rank 0 failed" in p.stderr


def _two_nodes(args, tmp_path, **env):
    """Two torchrun launchers (2 processes each) meeting at a c10d rendezvous on 127.0.0.1."""
    port = _free_port()
    cmd = [*LAUNCH, "--nnodes", "2", "--nproc-per-node", "2", "--rdzv-backend", "c10d",
           "--rdzv-endpoint", f"127.0.0.1:{port}", "--rdzv-id", f"cryogmm-test-{port}", *args]
    logs = [open(tmp_path / f"node{i}.log", "w+") for i in (0, 1)]
    procs = [subprocess.Popen(cmd, env=_env(**env), stdout=log, stderr=subprocess.STDOUT, text=True) for log in logs]
    try:
        codes = [p.wait(timeout=300) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    text = []
    for log in logs:
        log.seek(0)
        text.append(log.read())
        log.close()
    return codes, "\n".join(text)


def test_two_nodes_equal_one_process(sim, tmp_path):
    one = tmp_path / "one"
    p = subprocess.run([sys.executable, *_reconstruct_args(sim, one), "--accumulate", "float64"], env=_env(),
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-2000:]
    codes, log = _two_nodes(_reconstruct_args(sim, tmp_path / "four"), tmp_path)
    assert codes == [0, 0], log[-4000:]
    rep = json.loads((tmp_path / "four" / "report.json").read_text())
    assert rep["processes"] == 4 and rep["n_particles"] == 120
    for name in ("half1", "half2", "map"):
        a, b = mrcfile.read(one / f"{name}.mrc"), mrcfile.read(tmp_path / "four" / f"{name}.mrc")
        # float64 Fourier sums: the same maps however the particles are split over ranks and nodes
        assert np.abs(a - b).max() <= 1e-6 * np.abs(a).max(), name


def test_two_nodes_rank_0_failing_at_the_end_ends_both_nodes(sim, tmp_path):
    """Rank 0 fails at its last collective (the barrier after writing; the others already wait in
    it): both launchers end non-zero, the message once, ranks on the other node say why."""
    codes, log = _two_nodes([*_reconstruct_args(sim, tmp_path / "rec"), "--dist-timeout", "600"], tmp_path,
                            **{distributed.TEST_FAIL_ENV: "0:3"})
    assert codes[0] != 0 and codes[1] != 0, log[-4000:]
    assert log.count("failure injected on rank 0") == 1, log[-4000:]
    assert sum(f"rank {r} stopped: rank 0 failed" in log for r in (1, 2, 3)) == 3, log[-4000:]
