"""SIGKILL at every state of the updater's journal, then a restart: the node serves exactly one verified version.

A node process (``tests.support.updater_child``) serving version 1 applies
version 2 and kills itself with SIGKILL right after a state is durable (and once
mid-download). A fresh process then starts on the same state directory: before
resuming, it must serve exactly one complete version — the new one if it was
committed, else the previous one; after resuming, version 2. Nothing half-written
is kept, and no plaintext model is on disk. Each kill point is repeated 5 times.

The mid-download kill ends the process while the staging file's writer may still
hold the bytes (the test blobs are smaller than its buffer), so the restart
usually downloads from 0; when a partial file survived, it resumes from its length.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from services.updates.update_journal import Assignment
from tests.support.registry import DirectorySource, new_registry
from tests.support.updater_node import (
    PROBE,
    Published,
    apply,
    assignment,
    build_node,
    copy_state,
    model_plaintexts,
    plaintext_leaks,
    publish_real,
    run_model,
)

ROOT = Path(__file__).resolve().parents[2]
REPETITIONS = 5
# Where the process dies, and which version must serve at the restart (before resuming).
KILL_POINTS = {
    "assigned": "1",
    "downloading": "1",
    "downloading-partial": "1",
    "verified": "1",
    "trial": "1",
    "committed": "2",
}


@dataclass
class Setup:
    """A registry with versions 1 and 2, and the state of a node serving version 1."""

    tmp: Path
    repo: Path
    root_file: Path
    template: Path
    assignment_file: Path
    v1: Published
    v2: Published
    files: Path


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> Setup:
    tmp = tmp_path_factory.mktemp("updater-crash")
    kit = new_registry(tmp)
    v1 = publish_real(kit, version="1", seed=1)
    v2 = publish_real(kit, version="2", seed=2)
    root = kit.registry.repository.trusted_root()
    root_file = tmp / "root.json"
    root_file.write_bytes(root)
    template = tmp / "template"

    async def install_v1() -> Assignment:
        node = build_node(template, DirectorySource(kit.registry.repository_dir), root)
        try:
            [row] = await apply(node, assignment(kit, v1, node.node_id, node.keys.agreement_public))
            assert (row.version, row.state) == ("1", "committed")
            return assignment(kit, v2, node.node_id, node.keys.agreement_public)
        finally:
            await node.close()

    a2 = asyncio.run(install_v1())
    assignment_file = tmp / "assign-v2.json"
    assignment_file.write_text(json.dumps(a2.to_json()))
    return Setup(tmp, kit.registry.repository_dir, root_file, template, assignment_file, v1, v2, kit.files)


def child(setup: Setup, state: Path, *args: str) -> subprocess.CompletedProcess[bytes]:
    command = [
        sys.executable,
        "-m",
        "tests.support.updater_child",
        *args,
        "--state",
        str(state),
        "--repo",
        str(setup.repo),
        "--root",
        str(setup.root_file),
    ]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run(command, cwd=ROOT, env=env, capture_output=True, timeout=120, check=False)


def leftovers(state: Path) -> list[str]:
    """Hidden temporary files or directories (half-written things) under the store and the journal."""
    return [
        str(p.relative_to(state))
        for base in (state / "installed", state / "journal")
        for p in base.rglob("*")
        if p.name.startswith(".")
    ]


@pytest.mark.slow
@pytest.mark.parametrize("kill_at", list(KILL_POINTS))
def test_sigkill_at_each_journal_state_then_restart_serves_one_verified_version(setup: Setup, kill_at: str) -> None:
    answers = {"1": run_model(setup.v1.plaintext, PROBE), "2": run_model(setup.v2.plaintext, PROBE)}
    plaintexts = model_plaintexts(setup.files)
    for repetition in range(REPETITIONS):
        state = copy_state(setup.template, setup.tmp / f"{kill_at}-{repetition}")
        killed = child(setup, state, "apply", "--assignment", str(setup.assignment_file), "--kill-at", kill_at)
        assert killed.returncode == -signal.SIGKILL, killed.stderr.decode()[-3000:]

        report_file = state.parent / f"{state.name}.report.json"
        restarted = child(setup, state, "recover", "--report", str(report_file))
        assert restarted.returncode == 0, restarted.stderr.decode()[-3000:]
        report: dict[str, Any] = json.loads(report_file.read_text())

        expected = KILL_POINTS[kill_at]
        recovered = report["recovered"]
        assert recovered["loaded"] == [expected], (kill_at, repetition, report)
        assert recovered["answered_by"] == recovered["committed"] == expected
        assert np.allclose(recovered["answer"], answers[expected])

        resumed = report["resumed"]
        assert resumed["loaded"] == ["2"] and resumed["answered_by"] == "2", (kill_at, repetition, report)
        assert np.allclose(resumed["answer"], answers["2"])
        assert resumed["installed"] == [["2", "committed", ""]]
        if report["partial_sizes"] and report["partial_sizes"][0] > 0:
            assert report["blob_offsets"][0] == report["partial_sizes"][0]  # the download resumed

        assert leftovers(state) == []
        assert sorted(p.name for p in (state / "installed" / "lm").iterdir()) == ["1", "2"]
        assert plaintext_leaks(state, plaintexts) == []


@pytest.mark.slow
def test_a_garbage_journal_after_a_crash_never_wins(setup: Setup) -> None:
    state = copy_state(setup.template, setup.tmp / "garbage-journal")
    killed = child(setup, state, "apply", "--assignment", str(setup.assignment_file), "--kill-at", "trial")
    assert killed.returncode == -signal.SIGKILL
    (state / "journal" / "lm.json").write_bytes(b'{"format": 1, "assignment": {"na')  # torn by a lying disk
    # A commit marker of the uncommitted version, torn too, must not make it serve.
    (state / "installed" / "lm" / "2" / "committed.json").write_bytes(b'{"se')
    report_file = state.parent / "garbage.report.json"
    restarted = child(setup, state, "recover", "--report", str(report_file))
    assert restarted.returncode == 0, restarted.stderr.decode()[-3000:]
    report = json.loads(report_file.read_text())
    assert report["recovered"]["loaded"] == ["1"] and report["recovered"]["committed"] == "1"
    # No update is in progress any more: the node serves version 1 until it is assigned version 2 again.
    assert report["resumed"]["loaded"] == ["1"]
    assert sorted(p.name for p in (state / "installed" / "lm").iterdir()) == ["1"]
