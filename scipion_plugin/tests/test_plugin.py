"""The plugin as Scipion sees it: discovery, protocols tree, engine command, no torch."""

import configparser
import json
import os
import sys

import pytest

pytest.importorskip("pwem")

from pyworkflow.plugin import Domain  # noqa: E402

import cryogmm_scipion  # noqa: E402
from cryogmm_scipion import Plugin  # noqa: E402

PROTOCOLS = ["CryoGmmProtRefinePoses", "CryoGmmProtReconstruct", "CryoGmmProtSimulate",
             "CryoGmmProtFitGmm", "CryoGmmProtHetero", "CryoGmmProtRefineModel",
             "CryoGmmProtModelSeries"]


def test_plugin_and_protocols_are_discovered():
    assert "cryogmm_scipion" in Domain.getPlugins()
    for name in PROTOCOLS:
        assert Domain.findClass(name) is not None, name
    # Scipion's Python never needs the engine or torch
    assert "torch" not in sys.modules
    assert "cryogmm" not in sys.modules


def test_protocols_conf_lists_every_protocol():
    conf = configparser.ConfigParser()
    conf.optionxform = str
    conf.read(os.path.join(os.path.dirname(cryogmm_scipion.__file__), "protocols.conf"))
    tree = json.loads(conf.get("PROTOCOLS", "Protocols SPA"))

    def values(nodes):
        for n in nodes:
            if n.get("tag") == "protocol":
                yield n["value"]
            yield from values(n.get("children", []))

    assert sorted(values(tree)) == sorted(PROTOCOLS)


def test_engine_command_uses_the_activation_variable():
    activation = Plugin.getVar("CRYOGMM_ENV_ACTIVATION")
    program = Plugin.getProgram()
    assert program.endswith("cryogmm")
    if activation:
        assert program.startswith(activation)
    assert "PYTHONPATH" not in Plugin.getEnviron()


def test_every_protocol_defines_help_summary_methods_citations():
    bib = open(os.path.join(os.path.dirname(cryogmm_scipion.__file__), "bibtex.py")).read()
    for name in PROTOCOLS:
        cls = Domain.findClass(name)
        assert cls.__doc__ and cls._label
        prot = cls()
        for key in prot._citations():
            assert "@article{%s," % key in bib, key
        form_params = [p for p, _ in prot._definition.iterAllParams()]
        assert "useGpu" in form_params and "numberOfThreads" in form_params, name
        for pname, param in prot._definition.iterAllParams():
            if pname not in ("runName", "runMode", "comment", "hostName", "useQueue",
                             "queueParams", "numberOfThreads", "numberOfMpi", "useGpu",
                             "gpuList", "useQueueForSteps", "useQueueForProtocol",
                             "_useQueue", "_queueParams"):
                if getattr(param, "label", None) is not None and param.__class__.__name__ \
                        not in ("Line", "Group", "LabelParam"):
                    assert param.label.get(), (name, pname)


def test_define_binaries_builds_the_venv_the_activation_points_to():
    """What `scipion installb cryogmm` would run (scipion-app's installer, when present)."""
    funcs = pytest.importorskip("scipion.install.funcs")
    env = funcs.Environment()
    Plugin.defineBinaries(env)
    target = env.getTarget("cryogmm-0.1.0")
    cmds = [vars(c).get("_cmd") for c in target._commandList]
    install = [c for c in cmds if isinstance(c, str) and "python3 -m venv venv" in c]
    assert len(install) == 1, cmds
    assert "None" not in install[0]
    assert "pip install -q %s" % Plugin.getVar("CRYOGMM_PIP_SPEC") in install[0]
    assert install[0].endswith("touch cryogmm_0.1.0_installed")
    if "CRYOGMM_ENV_ACTIVATION" not in os.environ:  # the default points into that venv
        assert Plugin.getActivationCmd().endswith("cryogmm-0.1.0/venv/bin/activate")
