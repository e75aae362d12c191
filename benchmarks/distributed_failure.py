"""How fast a failing rank ends every rank of a two-node run (issue 21: within 60 s).

Usage: python benchmarks/distributed_failure.py [--workdir /tmp/dist_failure] [--repeat 1]
       [--out benchmarks/results/distributed_failure.json]

1. ``cryogmm simulate`` makes 120 particles of adenylate kinase (box 32): what is measured is
   the failure path between processes, which does not depend on the molecule, so one small
   set serves every case (an exception to the two-molecule rule of the benchmarks);
2. two ``torchrun`` launchers (``--nnodes 2 --nproc-per-node 2``, c10d rendezvous on
   127.0.0.1, gloo) run ``cryogmm reconstruct`` with ``CRYOGMM_TEST_FAIL=RANK:N``: rank RANK
   raises at its N-th collective while the others wait in it (``--dist-timeout 600``, so it is
   the failure report, not a timeout, that ends them). Cases: rank 1 (node of rank 0) at the
   first all-reduce; rank 0 at its last barrier (the others already in it); rank 3 (the other
   node) at the second all-reduce;
3. recorded: the seconds from the failure message to the exit of both launchers, their exit
   codes, how often the message was printed, and the load average.

On one node torchrun's agent also stops the other workers of a failed one; across nodes only
the failure report does (without it they would wait out the process-group timeout).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

CASES = ("1:1", "0:3", "3:2")


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_case(spec: str, star: Path, workdir: Path) -> dict:
    port = _port()
    env = dict(os.environ, OMP_NUM_THREADS="1", CRYOGMM_TEST_FAIL=spec)
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc-per-node", "2",
           "--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{port}", "--rdzv-id", f"bench{port}",
           "-m", "cryogmm.cli", "reconstruct", str(star), "--out", str(workdir / f"rec_{port}"), "--device", "cpu",
           "--batch", "40", "--dist-timeout", "600"]
    t_fail, text = [], []

    def watch(p):
        for line in p.stdout:
            text.append(line)
            if "failure injected" in line and not t_fail:
                t_fail.append(time.monotonic())

    t0 = time.monotonic()
    procs = [subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for _ in range(2)]
    threads = [threading.Thread(target=watch, args=(p,)) for p in procs]
    for t in threads:
        t.start()
    codes = [p.wait(timeout=900) for p in procs]
    t_end = time.monotonic()
    for t in threads:
        t.join()
    log = "".join(text)
    return {"fail": spec, "exit_codes": codes, "seconds_launch_to_exit": round(t_end - t0, 1),
            "seconds_failure_to_all_exited": round(t_end - t_fail[0], 1) if t_fail else None,
            "message_printed": log.count(f"failure injected on rank {spec.split(':')[0]}"),
            "ranks_saying_why": sum(f"rank {r} stopped: rank {spec.split(':')[0]} failed" in log for r in range(4)),
            "load_avg_1min": os.getloadavg()[0]}


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/dist_failure"))
    ap.add_argument("--repeat", type=int, default=1)
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "distributed_failure.json")
    a = ap.parse_args()
    a.workdir.mkdir(parents=True, exist_ok=True)
    sim = a.workdir / "sim"
    if not (sim / "particles.star").exists():
        from cryogmm.demo import example_model

        subprocess.run([sys.executable, "-m", "cryogmm", "simulate", "--model", str(example_model("open")),
                        "--n-particles", "120", "--box", "32", "--apix", "3.5", "--snr", "0.5", "--seed", "5",
                        "--device", "cpu", "--out", str(sim)], check=True)
    rows = [run_case(spec, sim / "particles.star", a.workdir) for _ in range(a.repeat) for spec in CASES]
    for r in rows:
        print(r)
    res = {"benchmark": "distributed_failure", "date": datetime.datetime.now(datetime.timezone.utc).isoformat(),
           "host": {"machine": platform.machine(), "cpus": os.cpu_count(), "python": platform.python_version()},
           "command": " ".join([Path(sys.executable).name, *sys.argv]),
           "setup": "2 torchrun launchers x 2 processes, c10d rendezvous on 127.0.0.1, gloo, reconstruct of 120 "
                    "box-32 particles, --dist-timeout 600",
           "goal": "every process gone within 60 s of a rank's exception, exit non-zero, the message printed once",
           "rows": rows,
           "max_seconds_failure_to_all_exited": max(r["seconds_failure_to_all_exited"] or float("inf") for r in rows)}
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(res, indent=2) + "\n")
    print(f"-> {a.out}")


if __name__ == "__main__":
    main()
