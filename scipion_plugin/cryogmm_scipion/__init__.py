"""Scipion plugin for cryogmm (Gaussian-mixture methods for cryo-EM).

The engine (PyTorch) lives in its own environment: Scipion's Python never imports torch or
cryogmm. Protocols write STAR files, run the ``cryogmm`` command line through ``runJob``
after the activation command ``CRYOGMM_ENV_ACTIVATION``, and read the results back into
pwem objects.
"""

import os
import shlex

import pwem
import pyworkflow.utils as pwutils

from .constants import (CRYOGMM_ENV_ACTIVATION, CRYOGMM_ENV_DIR, CRYOGMM_PIP_SPEC,
                        CRYOGMM_TORCH_SPEC, CRYOGMM_VERSION)

__version__ = "0.1.0"
_references = ["Chen2024"]
_logo = ""


class Plugin(pwem.Plugin):
    _url = ""  # no public home yet
    _supportedVersions = [CRYOGMM_VERSION]

    @classmethod
    def _defineVariables(cls):
        venv = os.path.join(pwem.Config.EM_ROOT, CRYOGMM_ENV_DIR, "venv")
        cls._defineVar(CRYOGMM_ENV_ACTIVATION,
                       ". %s" % shlex.quote(os.path.join(venv, "bin", "activate")),
                       description="Shell command that puts the engine's `cryogmm` on PATH "
                                   "(a venv's activate script or `conda activate ENV`); "
                                   "empty when `cryogmm` is already on PATH.")
        cls._defineVar(CRYOGMM_PIP_SPEC, "cryogmm",
                       description="What `scipion installb cryogmm` installs with pip "
                                   "(a source folder, a wheel or a VCS URL).")
        cls._defineVar(CRYOGMM_TORCH_SPEC, "torch",
                       description="pip arguments installing torch first (e.g. a CUDA "
                                   "build with --index-url).")

    @classmethod
    def _var(cls, name):
        """A plugin variable, defined on first use (also when the plugin was imported
        directly rather than discovered by Scipion's Domain)."""
        if cls.getVar(name) is None:
            cls._defineVariables()
        return cls.getVar(name)

    @classmethod
    def getActivationCmd(cls):
        return (cls._var(CRYOGMM_ENV_ACTIVATION) or "").strip()

    @classmethod
    def getCommand(cls, command):
        """``command`` (shell) run after the engine's activation."""
        activation = cls.getActivationCmd()
        return "%s && %s" % (activation, command) if activation else command

    @classmethod
    def getProgram(cls):
        """The shell prefix that runs the engine's CLI: activation, then ``cryogmm``."""
        return cls.getCommand("cryogmm")

    @classmethod
    def getEnviron(cls):
        """Environment for the engine: Scipion's PYTHONPATH would shadow the engine's venv."""
        environ = pwutils.Environ(os.environ)
        for var in ("PYTHONPATH", "PYTHONHOME"):
            environ.pop(var, None)
        return environ

    @classmethod
    def defineBinaries(cls, env):
        """``scipion installb cryogmm``: a venv with torch and the engine under EM_ROOT."""
        flag = "cryogmm_%s_installed" % CRYOGMM_VERSION
        commands = " && ".join([
            "python3 -m venv venv",
            "venv/bin/pip install -q %s" % cls._var(CRYOGMM_TORCH_SPEC),
            "venv/bin/pip install -q %s" % cls._var(CRYOGMM_PIP_SPEC),
            "venv/bin/cryogmm --version",
            "touch %s" % flag,
        ])
        env.addPackage("cryogmm", version=CRYOGMM_VERSION, tar="void.tgz",
                       commands=[(commands, flag)], neededProgs=["python3"],
                       default=True)
