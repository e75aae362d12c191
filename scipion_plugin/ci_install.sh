#!/usr/bin/env bash
# Install Scipion (pyworkflow, pwem, scipion-em-relion, scipion-app) and this plugin into their OWN venv,
# then run the plugin's tests in real pyworkflow projects against the cryogmm engine.
# Idempotent; needs only python3 (with venv) and PyPI. Scipion's venv never gets torch.
#
#   SCIPION_VENV            where Scipion goes (default: scipion_plugin/.venv-scipion)
#   CRYOGMM_ENV_ACTIVATION  shell command putting the engine's `cryogmm` on PATH
#                           (default: ". <repo>/.venv/bin/activate" when that venv exists;
#                           set it to "" when `cryogmm` is already on PATH)
#   extra arguments are passed to pytest
set -euo pipefail
HERE="$(cd "$(dirname "$0")" && pwd)"
REPO="$(dirname "$HERE")"
VENV="${SCIPION_VENV:-$HERE/.venv-scipion}"
PIP=(-q --disable-pip-version-check)

if [ ! -x "$VENV/bin/python" ]; then
  python3 -m venv "$VENV"
fi
"$VENV/bin/pip" install "${PIP[@]}" "scipion-pyworkflow==3.11.7" "scipion-em==3.11.1" \
  "scipion-em-relion==5.0.2" "scipion-app==3.8.3" "pytest>=7"
"$VENV/bin/pip" install "${PIP[@]}" --no-deps -e "$HERE"
if "$VENV/bin/python" -c "import torch" 2>/dev/null; then
  echo "ci_install.sh: torch is importable in Scipion's venv ($VENV); it must not be" >&2
  exit 1
fi

if [ -z "${CRYOGMM_ENV_ACTIVATION+set}" ]; then
  if [ -x "$REPO/.venv/bin/cryogmm" ]; then
    export CRYOGMM_ENV_ACTIVATION=". $REPO/.venv/bin/activate"
  else
    echo "ci_install.sh: no engine at $REPO/.venv: set CRYOGMM_ENV_ACTIVATION" >&2
    exit 1
  fi
fi
echo "ci_install.sh: engine via '${CRYOGMM_ENV_ACTIVATION:-cryogmm on PATH}'"

# A fresh Scipion home and user-data folder per run (tests/conftest.py fills them in).
export CRYOGMM_SCIPION_TEST_ROOT="$(mktemp -d "${TMPDIR:-/tmp}/cryogmm-scipion-ci.XXXXXX")"
cd "$HERE"
"$VENV/bin/python" -m pytest -q -p no:warnings -p no:cacheprovider "$@" tests
