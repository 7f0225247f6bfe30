"""Helpers for tests that run real processes."""

from __future__ import annotations

import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import pytest


def wait_for_file(path: Path, process: subprocess.Popen[bytes], seconds: float) -> None:
    """Waits until ``process`` writes ``path``; fails the test (with its output) if it exits or times out."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if path.is_file():
            return
        if process.poll() is not None:
            out = process.stdout.read().decode() if process.stdout else ""
            pytest.fail(f"process exited with {process.returncode} before writing {path.name}:\n{out}")
        time.sleep(0.1)
    process.kill()
    pytest.fail(f"{path} did not appear within {seconds} s")


def wait_until(condition: Callable[[], bool], seconds: float, what: str) -> None:
    """Polls ``condition`` until it holds; fails the test if it does not within ``seconds``."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(0.05)
    pytest.fail(f"timed out after {seconds} s waiting for: {what}")
