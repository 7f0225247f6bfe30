"""The bench's peer plumbing that needs no peer: selection, ranking, the numbers check, LD_LIBRARY_PATH."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest

from bench.peers import PEERS, best, missing_venv, ranked, ratio, select
from bench.peers.compare import BATCHED_ATOL, compare, compare_batched
from bench.peers.pytriton_server import libpython_first


def run(throughput: float, p99: float, errors: int = 0, requests: int = 100) -> dict[str, Any]:
    return {"throughput": throughput, "p99_ms": p99, "errors": errors, "requests": requests}


def test_select_names_families_all_or_none() -> None:
    assert select("none") == []
    assert select("") == []
    assert select("all") == list(PEERS)
    chosen = select("kserve, pytriton")
    assert {p.family for p in chosen} == {"kserve", "pytriton"}
    assert [p.label for p in chosen] == ["kserve", "pytriton 1 instance", "pytriton 2 instances"]
    with pytest.raises(ValueError, match="torchserve"):
        select("kserve,torchserve")


def test_the_configurations_the_issue_asks_for() -> None:
    labels = [p.label for p in PEERS]
    assert labels == [
        "kserve",
        "mlserver batching off",
        "mlserver batching on",
        "pytriton 1 instance",
        "pytriton 2 instances",
    ]
    assert len({p.key for p in PEERS}) == len(PEERS)


def test_a_peer_without_its_venv_is_skipped_with_the_reason(tmp_path: Path) -> None:
    kserve = select("kserve")[0]
    reason = missing_venv(kserve, tmp_path)
    assert reason is not None
    assert ".venv-kserve" in reason
    (tmp_path / ".venv-kserve" / "bin").mkdir(parents=True)
    (tmp_path / ".venv-kserve" / "bin" / "python").touch()
    assert missing_venv(kserve, tmp_path) is not None  # half-installed: no stamp yet
    (tmp_path / ".venv-kserve" / ".installed").touch()
    assert missing_venv(kserve, tmp_path) is None


def test_only_checked_error_free_runs_are_ranked() -> None:
    peers: dict[str, dict[str, Any]] = {
        "fast_but_wrong": {"checked": {"ok": False}, "closed_16": run(9000, 1)},
        "fast_with_errors": {"checked": {"ok": True}, "closed_16": run(8000, 1, errors=3)},
        "all_errors": {"checked": {"ok": True}, "closed_16": run(0, 0, errors=500, requests=0)},
        "skipped": {"skipped": ".venv-x is not installed"},
        "slow": {"checked": {"ok": True}, "closed_16": run(100, 50)},
        "steady": {"checked": {"ok": True}, "closed_16": run(300, 80)},
    }
    assert set(ranked(peers, 16)) == {"slow", "steady"}
    assert ranked(peers, 64) == {}
    top = best(ranked(peers, 16))
    assert top is not None
    assert top[0] == "steady"
    calm = best(ranked(peers, 16), lowest_p99=True)
    assert calm is not None
    assert calm[0] == "slow"
    assert best({}) is None
    assert best({"off": None, "on": run(5, 5)}) == ("on", run(5, 5))


def test_ratio_is_none_when_a_side_is_missing() -> None:
    assert ratio(300, 100) == 3
    assert ratio(None, 100) is None
    assert ratio(300, None) is None
    assert ratio(300, 0) is None


def test_compare_accepts_the_same_numbers_and_refuses_others() -> None:
    expected = np.linspace(0, 1, 12, dtype=np.float32).reshape(1, 12)
    assert compare(expected, expected.copy()) == 0
    assert compare(expected, expected + 1e-7) < 1e-6
    with pytest.raises(ValueError, match="differ"):
        compare(expected, expected + 1e-3)
    with pytest.raises(ValueError, match="shape"):
        compare(expected, expected.reshape(12, 1))


def test_answers_sent_at_once_may_move_a_little_but_not_swap_rows() -> None:
    rng = np.random.default_rng(0)
    expected = rng.dirichlet(np.ones(8), size=(6, 1)).astype(np.float32)  # [rows, 1, out], like the check's files
    nudged = expected + rng.uniform(-0.01, 0.01, expected.shape).astype(np.float32)
    assert compare_batched(expected, nudged) < 0.011
    swapped = expected.copy()
    swapped[[1, 4]] = swapped[[4, 1]]
    with pytest.raises(ValueError, match=r"\[1, 4\]"):
        compare_batched(expected, swapped)
    with pytest.raises(ValueError, match="differ"):
        compare_batched(expected, expected + 2 * BATCHED_ATOL)


def test_the_running_interpreters_libdir_goes_first_once() -> None:
    lib = "/opt/python/lib"
    assert libpython_first({}, lib) == lib
    assert libpython_first({"LD_LIBRARY_PATH": "/usr/lib:/opt/python/lib"}, lib) == "/opt/python/lib:/usr/lib"
    assert libpython_first({"LD_LIBRARY_PATH": "/opt/python/lib:/usr/lib"}, lib) is None
    assert libpython_first({"LD_LIBRARY_PATH": "/usr/lib"}, None) is None
