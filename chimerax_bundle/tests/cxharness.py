"""cryogmm's harness for a headless ChimeraX session inside the test process.

It follows the start-up order of ``chimerax.core.__main__.init`` for ``--nogui`` (app dirs,
Session, core settings, misc commands, attribute registry, log, toolshed, bundles, tools, undo)
for the PyPI library build of ChimeraX 1.7.1 that ``ci_install.sh`` sets up, and says why when
that build cannot run here, so the tests skip with that reason.
"""

from __future__ import annotations

import importlib.util
import os
import sys
import sysconfig
from pathlib import Path

HERE = Path(__file__).resolve().parent
BUNDLE = HERE.parent
REPO = BUNDLE.parent
SHARED_DISTINFO = REPO.parent / "shared" / "reference" / "chimerax" / "distinfo"
VENV = BUNDLE / ".venv-chimerax"


def unavailable_reason() -> str | None:
    """None when a headless ChimeraX session with our bundle can start in this Python."""
    if importlib.util.find_spec("chimerax") is None or importlib.util.find_spec("chimerax.core") is None:
        return (f"ChimeraX is not importable in {sys.executable}: run `bash chimerax_bundle/ci_install.sh` and "
                f"the tests with {VENV}/bin/python")
    sp = Path(sysconfig.get_paths()["purelib"])
    if not (sp / "chimerax" / "core" / "nogui.py").is_file():
        return "this ChimeraX build lacks chimerax/core/nogui.py: run chimerax_bundle/ci_install.sh"
    if not list(sp.glob("ChimeraX_Atomic-*.dist-info")):
        where = SHARED_DISTINFO if SHARED_DISTINFO.is_dir() else f"{SHARED_DISTINFO} (absent here)"
        return ("the PyPI ChimeraX wheel carries no bundle metadata, so no ChimeraX command registers; "
                f"ci_install.sh copies it from {where} into the venv")
    if not list([p for p in sp.glob("*.dist-info") if p.name.lower().startswith("chimerax_cryogmm-")]):
        return "the ChimeraX-CryoGMM bundle is not installed in this venv: run chimerax_bundle/ci_install.sh"
    return None


def start_session(offscreen: bool = False):
    """A ChimeraX ``Session`` without Qt; bundles registered from their metadata."""
    import appdirs
    import chimerax
    from chimerax.core import version
    from packaging.version import Version

    v = Version(version)
    chimerax.app_dirs = appdirs.AppDirs("ChimeraX", appauthor="UCSF", version=f"{v.major}.{v.minor}")
    chimerax.app_dirs_unversioned = appdirs.AppDirs("ChimeraX", appauthor="UCSF")
    prefix = Path(sys.prefix)
    chimerax.app_bin_dir = str(prefix / "bin")
    chimerax.app_data_dir = str(prefix / "share")
    chimerax.app_lib_dir = str(prefix / "lib")
    from chimerax.core import attributes, core_settings, session as cxsession, tools, toolshed, undo
    from chimerax.core.nogui import NoGuiLog

    sess = cxsession.Session("ChimeraX", debug=False, silent=False, minimal=False, offscreen_rendering=offscreen)
    core_settings.init(sess)
    cxsession.register_misc_commands(sess)
    attributes.RegAttrManager(sess)
    sess.logger.add_log(NoGuiLog())
    toolshed.init(sess.logger, debug=False, check_available=False, session=sess)
    sess.toolshed = toolshed.get_toolshed()
    sess.toolshed.bootstrap_bundles(sess, False)
    sess.tools = tools.Tools(sess, first=True)
    sess.undo = undo.Undo(sess, first=True)
    return sess


def chimerax_env(offscreen: bool = False) -> dict:
    """Environment for a ``python -m chimerax.core`` child (OSMesa for ``--offscreen``)."""
    env = dict(os.environ)
    env["PYTHONIOENCODING"] = "utf-8"  # the log has Å and ° whatever the locale
    if offscreen:
        lib = osmesa_dir()
        if lib is not None:
            env["LD_LIBRARY_PATH"] = f"{lib}:{env.get('LD_LIBRARY_PATH', '')}".rstrip(":")
            env["PYOPENGL_PLATFORM"] = "osmesa"
    return env


def osmesa_dir() -> Path | None:
    """Folder holding libOSMesa.so.8 (ci_install.sh unpacks Debian's libosmesa6 next to the venv)."""
    for base in (Path(sys.prefix) / "osmesa", VENV / "osmesa"):
        for lib in base.glob("usr/lib/*/libOSMesa.so.8"):
            return lib.parent
    return None
