"""Scipion's environment for plain pytest; must run before pyworkflow is imported.

pyworkflow reads its configuration once, at import: SCIPION_DOMAIN, a SCIPION_HOME holding
config/hosts.conf, SCIPION_USER_DATA (projects), SCIPION_PYTHON (each protocol runs in a
subprocess of this Python) and SCIPION_TEST_NOSYNC (never download test datasets).

The engine: CRYOGMM_ENV_ACTIVATION (a shell command putting `cryogmm` on PATH, e.g.
". /path/.venv/bin/activate"); when unset, the repository's own .venv is used if present.
"""

import os
import sys
import tempfile
from pathlib import Path

_REPO = Path(__file__).resolve().parents[2]

_root = os.environ.get("CRYOGMM_SCIPION_TEST_ROOT") or tempfile.mkdtemp(prefix="cryogmm-scipion-")
os.environ.setdefault("SCIPION_HOME", _root)
os.environ.setdefault("SCIPION_USER_DATA", os.path.join(_root, "userdata"))
os.environ.setdefault("SCIPION_DOMAIN", "pwem")
os.environ.setdefault("SCIPION_PYTHON", sys.executable)
os.environ.setdefault("SCIPION_TEST_NOSYNC", "1")
os.environ.setdefault("SCIPION_NOTIFY", "False")
_hosts = os.path.join(os.environ["SCIPION_HOME"], "config", "hosts.conf")
os.makedirs(os.path.dirname(_hosts), exist_ok=True)
if not os.path.exists(_hosts):
    with open(_hosts, "w") as f:
        f.write("[localhost]\nPARALLEL_COMMAND = mpirun -np %_(JOB_NODES)d %_(COMMAND)s\n")

if "CRYOGMM_ENV_ACTIVATION" not in os.environ:
    _act = _REPO / ".venv" / "bin" / "activate"
    if _act.is_file():
        os.environ["CRYOGMM_ENV_ACTIVATION"] = ". %s" % _act
