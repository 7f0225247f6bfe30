"""Suite-wide fixtures."""

from __future__ import annotations

import os

import pytest


@pytest.fixture(autouse=True)
def _clean_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """Keeps the developer's EDGECASCADE_* and OTEL_* settings out of every test."""
    for name in list(os.environ):
        if name.startswith(("EDGECASCADE_", "OTEL_")):
            monkeypatch.delenv(name)
