#!/usr/bin/env bash
# Build a headless ChimeraX 1.7.1 test venv (the PyPI library build, chimerax==0.1.71), install the
# cryogmm engine and this bundle into it, and run the bundle's tests inside real ChimeraX.
# Idempotent; needs python3 (with venv), PyPI, and apt for the optional offscreen renderer.
#
#   CHIMERAX_VENV        where the venv goes (default: chimerax_bundle/.venv-chimerax)
#   CHIMERAX_PYTHON      a CPython 3.11 to build it with (default: python3.11 or python3 when 3.11)
#   CRYOGMM_CX_DISTINFO  core-bundle metadata folder (default: ../shared/reference/chimerax/distinfo);
#                        the PyPI wheel ships no *.dist-info for its bundles, so without it no
#                        ChimeraX command is registered and the tests skip with that reason
#   CRYOGMM_CX_NO_TESTS  set to 1 to install only
#   CRYOGMM_CLI          the `cryogmm` of a numpy>=2 engine environment for STAR jobs (default:
#                        <repo>/.venv/bin/cryogmm when it exists; the hetero-run test skips without one)
#   extra arguments are passed to pytest
set -euo pipefail
HERE="$(cd "$(dirname "$0")" && pwd)"
REPO="$(dirname "$HERE")"
VENV="${CHIMERAX_VENV:-$HERE/.venv-chimerax}"
DISTINFO="${CRYOGMM_CX_DISTINFO:-$(dirname "$REPO")/shared/reference/chimerax/distinfo}"
PIP=(-q --disable-pip-version-check --no-cache-dir)
PY="$VENV/bin/python"

if [ ! -x "$PY" ]; then
  # the chimerax==0.1.71 wheel is built for CPython 3.11 only
  PYBIN="${CHIMERAX_PYTHON:-}"
  if [ -z "$PYBIN" ]; then
    for c in python3.11 python3; do
      if command -v "$c" >/dev/null 2>&1 && "$c" -c 'import sys; sys.exit(sys.version_info[:2] != (3, 11))'; then
        PYBIN="$c"; break
      fi
    done
  fi
  if [ -z "$PYBIN" ]; then
    echo "ci_install.sh: ChimeraX 1.7.1's PyPI wheel needs CPython 3.11; none found (set CHIMERAX_PYTHON)" >&2
    exit 1
  fi
  "$PYBIN" -m venv "$VENV"
fi
# ChimeraX core without its (unsatisfiable) pinned dependencies, then its runtime deps by hand.
"$VENV/bin/pip" install "${PIP[@]}" --no-deps "chimerax==0.1.71"
"$VENV/bin/pip" install "${PIP[@]}" -r "$HERE/requirements-chimerax.txt"
# The engine: --no-deps (its pyproject asks numpy>=2.2, this ChimeraX needs numpy<2), then torch
# pinned to the CPU build and the engine's pure dependencies resolved under numpy 1.26.
"$VENV/bin/pip" install "${PIP[@]}" -c "$HERE/requirements-chimerax.txt" "torch==2.13.0" \
  "gemmi>=0.6" "mrcfile>=1.4" "starfile>=0.5" "pandas>=1.5" "matplotlib>=3.6" "tqdm>=4.60" "cryosparc-tools>=4.4"
"$VENV/bin/pip" install "${PIP[@]}" --no-deps --no-build-isolation -e "$REPO"
"$PY" -c "import numpy, torch; assert numpy.__version__.startswith('1.'), numpy.__version__; assert torch.__version__.startswith('2.13.0'), torch.__version__"

SP="$("$PY" -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")"
# Python 3.11 removed collections.Mapping & co., which grako (ChimeraX's command-spec parser) uses.
cp "$HERE/harness/zz_cryogmm_collections_compat.pth" "$SP/"
# The wheel lacks chimerax/core/nogui.py (the --nogui UI): ours, written for this build.
cp "$HERE/harness/nogui.py" "$SP/chimerax/core/nogui.py"
if [ -d "$DISTINFO" ]; then
  for d in "$DISTINFO"/*.dist-info; do
    [ -d "$SP/$(basename "$d")" ] || cp -r "$d" "$SP/"
  done
else
  echo "ci_install.sh: no core-bundle metadata at $DISTINFO: ChimeraX commands will not register, tests will skip" >&2
fi

# Offscreen rendering (optional): Mesa's OSMesa from apt, unpacked next to the venv.
OSMESA="$VENV/osmesa"
if [ ! -d "$OSMESA/usr" ] && command -v apt-get >/dev/null 2>&1; then
  ( set +e
    tmp="$(mktemp -d)"; cd "$tmp"
    apt-get download libosmesa6 >/dev/null 2>&1 || { apt-get update -qq >/dev/null 2>&1; apt-get download libosmesa6 >/dev/null 2>&1; }
    deb=$(ls libosmesa6_*.deb 2>/dev/null | head -1)
    if [ -n "$deb" ]; then mkdir -p "$OSMESA" && dpkg -x "$deb" "$OSMESA"; else echo "ci_install.sh: libosmesa6 not available: no offscreen PNG" >&2; fi
    rm -rf "$tmp" )
fi

# The bundle: built with ChimeraX's own bundle builder (shipped in the wheel), installed as a wheel.
rm -rf "$HERE/dist" "$HERE/build"
( cd "$HERE" && "$VENV/bin/pip" wheel "${PIP[@]}" --no-build-isolation --no-deps -w dist . )
# the build leaves an egg-info here, which would shadow the installed bundle for Pythons started here
rm -rf "$HERE"/*.egg-info "$HERE/build"
"$VENV/bin/pip" install "${PIP[@]}" --no-deps --force-reinstall "$HERE"/dist/*.whl

if [ "${CRYOGMM_CX_NO_TESTS:-0}" != 1 ]; then
  # STAR jobs need numpy >= 2 (cryogmm.bridge): the bundle runs them through the engine's own CLI
  if [ -z "${CRYOGMM_CLI:-}" ] && [ -x "$REPO/.venv/bin/cryogmm" ]; then
    export CRYOGMM_CLI="$REPO/.venv/bin/cryogmm"
  fi
  cd "$HERE"
  "$PY" -m pytest -q -p no:cacheprovider "$@" tests
fi
