"""Headless user interface for the PyPI library build of ChimeraX 1.7.1 (``chimerax==0.1.71``).

That wheel ships ``chimerax.core`` without ``nogui.py``, the module ``chimerax.core.session``
imports for ``--nogui`` sessions. This is cryogmm's own replacement, written for the calls the
1.7.1 core makes on ``session.ui`` when there is no Qt: ``is_gui``, ``has_graphics``,
``initialize_color_output``, ``initialize_offscreen_rendering``, ``splash_info``, ``build``,
``event_loop``, ``thread_safe`` and ``quit``, plus ``NoGuiLog`` for ``__main__``. The cryogmm
bundle's ``ci_install.sh`` copies it to ``chimerax/core/nogui.py`` in the test venv.
"""

import sys
import threading

from .logger import PlainTextLog


class NoGuiLog(PlainTextLog):
    """Log messages as ``LEVEL: text`` lines on stdout (errors too: a test reads one stream)."""

    _LEVELS = {PlainTextLog.LEVEL_INFO: "INFO", PlainTextLog.LEVEL_WARNING: "WARNING",
               PlainTextLog.LEVEL_ERROR: "ERROR", PlainTextLog.LEVEL_BUG: "BUG"}

    def log(self, level, msg):
        tag = self._LEVELS.get(level, str(level))
        _write(f"{tag}: {msg}" + ("" if msg.endswith("\n") else "\n"))
        return True

    def status(self, msg, color, secondary):
        if msg and not secondary:
            _write(f"STATUS: {msg}\n")
        return True


def _write(text):
    """stdout, whatever its encoding (an ASCII locale must not turn 'Å' into a crash)."""
    try:
        sys.stdout.write(text)
    except UnicodeEncodeError:
        enc = getattr(sys.stdout, "encoding", None) or "ascii"
        sys.stdout.write(text.encode(enc, errors="replace").decode(enc))
    sys.stdout.flush()


class UI:
    """One per process; commands read from stdin until EOF when the event loop runs."""

    _instance = None

    def __new__(cls, session):
        if cls._instance is None:
            inst = super().__new__(cls)
            import weakref

            inst._session = weakref.ref(session)
            inst.is_gui = False
            inst.has_graphics = False
            inst.stereo = False
            inst.autostart_tools = False
            inst._main_thread = threading.main_thread()
            cls._instance = inst
        return cls._instance

    @classmethod
    def instance(cls):
        return cls._instance

    def initialize_color_output(self, color_output):
        return None

    def initialize_offscreen_rendering(self):
        """OSMesa context for ``--offscreen`` (PyOpenGL with ``PYOPENGL_PLATFORM=osmesa``)."""
        session = self._session()
        try:
            from chimerax.graphics import OffScreenRenderingContext

            context = OffScreenRenderingContext()
        except Exception as e:  # no libOSMesa, no PyOpenGL: keep running without images
            session.logger.info(f"Offscreen rendering is not available: {e}")
            self.has_graphics = False
            return
        session.main_view.initialize_rendering(context)
        self.has_graphics = True

    def splash_info(self, message, splash_step=None, num_splash_steps=None):
        sys.stderr.write(message + "\n")

    def build(self):
        return None

    def open_pending_files(self, ignore_files=()):
        return None

    def event_loop(self):
        from .commands import run

        session = self._session()
        for line in sys.stdin:
            if line.strip():
                run(session, line)

    def thread_safe(self, func, *args, **kw):
        """No event loop to post to: run now (callers on worker threads accept this headless)."""
        func(*args, **kw)

    def quit(self):
        import os

        session = self._session()
        if session is not None:
            session.logger.clear()
        sys.exit(os.EX_OK)
