"""Shared fixtures: the real data in ../shared (beside the repository), skipped when absent."""

from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="session")
def shared_dir() -> Path:
    """``../shared`` next to the repository root (real STAR/.cs/.mrcs files in data/metadata)."""
    d = REPO.parent / "shared"
    if not (d / "data" / "metadata").is_dir():
        pytest.skip(f"real data not available: {d / 'data' / 'metadata'} is absent")
    return d
