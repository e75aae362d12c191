"""ChimeraX-CryoGMM: the ``cryogmm`` command word in ChimeraX, over the cryogmm engine.

The engine (``import cryogmm``, with torch) runs in ChimeraX's own Python; it is imported only
when a command runs, so the bundle loads (and explains how to install the engine) without it.
"""

from chimerax.core.toolshed import BundleAPI

__version__ = "0.1.0"


class _CryoGMMAPI(BundleAPI):
    api_version = 1

    @staticmethod
    def register_command(bi, ci, logger):
        # Every subcommand is registered on the first call, whichever name ChimeraX asked for.
        from . import cmd

        cmd.register_all(logger)


bundle_api = _CryoGMMAPI()
