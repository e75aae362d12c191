"""Fixtures for the bundle's tests in a real headless ChimeraX (see cxharness.py): one session
per test process (ChimeraX's UI is a singleton), skipped with the reason when ChimeraX, its
bundle metadata or this bundle is not installed in the running Python."""

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
import cxharness  # noqa: E402


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: longer tests (still run by ci_install.sh)")
    # ChimeraX 1.7 imports pkg_resources (its toolshed and bundle builder): not our warning
    config.addinivalue_line("filterwarnings", "ignore:pkg_resources is deprecated:UserWarning")


@pytest.fixture(scope="session")
def cx():
    """A headless ChimeraX session with the bundle's commands registered."""
    why = cxharness.unavailable_reason()
    if why:
        pytest.skip(why)
    return cxharness.start_session()


@pytest.fixture()
def session(cx):
    """The session, emptied before each test."""
    from chimerax.core.commands import run

    run(cx, "close session", log=False)
    return cx


@pytest.fixture(scope="session")
def adk_paths():
    """The engine's bundled adenylate kinase models (closed 1AKE, open 4AKE)."""
    try:
        from importlib import resources

        d = Path(str(resources.files("cryogmm.data")))
    except ModuleNotFoundError:
        pytest.skip("the cryogmm engine is not installed in this Python")
    return {"closed": d / "adk_closed.pdb", "open": d / "adk_open.pdb"}


@pytest.fixture(scope="session")
def out_dir():
    """Where the test run leaves files for people to look at (PNG, logs): test_output/."""
    d = Path(__file__).resolve().parent.parent / "test_output"
    d.mkdir(exist_ok=True)
    return d
