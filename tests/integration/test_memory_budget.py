"""Models totalling twice the budget never push a fresh process past the budget (kernel's VmHWM)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_peak_memory_stays_within_the_budget_while_models_rotate(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "tests.support.memory_probe", str(tmp_path), "4", "1024"],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=ROOT,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    total = 4 * report["budget"] // 2
    assert total >= 2 * report["budget"] - 4  # the probe asks for twice what fits
    assert report["answered"] == 8 and report["refusals"] == 0
    assert report["evictions"] >= 6  # least recently used models made room, round after round
    assert report["max_used"] <= report["budget"]
    assert report["peak_gain"] <= report["budget"], report
