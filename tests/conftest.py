"""Shared fixtures. Each area keeps its own in tests/fixtures/<area>.py; all are loaded here."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from harness.distributed import free_port  # noqa: F401  (re-exported for the fixtures)

# Everything the tests start stays on loopback (docs/design.md §6).
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
os.environ.setdefault("MLFLOW_TRACKING_URI", "")
if not os.environ["MLFLOW_TRACKING_URI"]:
    del os.environ["MLFLOW_TRACKING_URI"]

REPO = Path(__file__).resolve().parent.parent

pytest_plugins = sorted(
    f"tests.fixtures.{p.stem}" for p in (Path(__file__).parent / "fixtures").glob("*.py") if p.stem != "__init__"
)


@pytest.fixture
def port() -> int:
    return free_port()


@pytest.fixture(scope="session")
def repo() -> Path:
    return REPO
