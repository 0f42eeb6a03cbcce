"""Shared test set-up: quiet MLflow, locate the real scanner data beside the repo."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

# Importing MONAI imports MLflow, which would write a telemetry file under HOME.
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO_ROOT.parent / "shared" / "data"


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """The real scanner data (../shared/data); tests that need it skip when it is absent."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f"real scanner data not found at {SHARED_DATA}")
    return SHARED_DATA
