"""`edgecascade status` shows what the launcher knows about nodes that do not answer."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

from rich.console import Console

from edgecascade.client_commands import _updates, status
from protos.edgecascade.v1 import mesh_pb2


def _closed_port() -> str:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return f"127.0.0.1:{sock.getsockname()[1]}"


def _mesh_files(tmp_path: Path, launcher_pid: int) -> tuple[str, str, str]:
    region, edge, device = _closed_port(), _closed_port(), _closed_port()
    (tmp_path / "endpoints.json").write_text(json.dumps({"region": region, "edge": edge, "devices": [device]}))
    nodes: list[dict[str, Any]] = [
        {"name": "region-1", "role": "region", "address": region, "state": "up", "restarts": 0, "detail": ""},
        {
            "name": "edge-1",
            "role": "edge",
            "address": edge,
            "state": "restarting",
            "restarts": 1,
            "detail": "exited with code -9; restart 1 in 1.0 s",
        },
        {
            "name": "device-1",
            "role": "device",
            "address": device,
            "state": "down",
            "restarts": 5,
            "detail": "gave up after 5 restarts within 300 s (last exit code 1)",
        },
    ]
    (tmp_path / "nodes.json").write_text(json.dumps({"launcher_pid": launcher_pid, "nodes": nodes}))
    return region, edge, device


def _rows(console: Console) -> dict[str, str]:
    return {line.split("│")[1].strip(): line for line in console.export_text().splitlines() if "127.0.0.1" in line}


def test_status_shows_the_launchers_state_of_a_node_that_does_not_answer(tmp_path: Path) -> None:
    region, edge, device = _mesh_files(tmp_path, launcher_pid=os.getpid())
    console = Console(record=True, width=300)
    assert status(console, tmp_path, timeout=2.0) == 1
    rows = _rows(console)
    assert "edge-1" in rows[edge] and "restarting" in rows[edge] and "exited with code -9" in rows[edge]
    assert "device-1" in rows[device] and "down" in rows[device] and "gave up" in rows[device]
    assert "UNAVAILABLE" in rows[region]  # the launcher thinks it is up, yet it does not answer: the RPC error


def test_status_without_a_state_file_still_reports_rpc_errors(tmp_path: Path) -> None:
    address = _closed_port()
    (tmp_path / "endpoints.json").write_text(json.dumps({"region": address, "edge": address, "devices": []}))
    console = Console(record=True, width=300)
    assert status(console, tmp_path, timeout=2.0) == 1
    assert "UNAVAILABLE" in console.export_text()


def test_status_ignores_the_state_file_of_a_launcher_that_is_gone(tmp_path: Path) -> None:
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, check=True)
    _, edge, device = _mesh_files(tmp_path, launcher_pid=int(gone.stdout))
    console = Console(record=True, width=300)
    assert status(console, tmp_path, timeout=2.0) == 1
    rows = _rows(console)
    assert "restarting" not in rows[edge] and "UNAVAILABLE" in rows[edge]
    assert "down" not in rows[device] and "UNAVAILABLE" in rows[device]


def test_the_updates_column_shows_each_model_against_its_desired_version() -> None:
    info = mesh_pb2.GetTierInfoResponse()
    assert _updates(info) == "-"  # a node that does not check in
    info.updates.CopyFrom(mesh_pb2.UpdateStatus(enrolled=False, failed_check_ins=3))
    assert "not enrolled" in _updates(info) and "3 failed" in _updates(info)
    info.updates.CopyFrom(mesh_pb2.UpdateStatus(enrolled=True, check_ins=4, last_check_in_age_s=1.2))
    info.updates.installed.add(name="lm", version="1", variant="fp32", state="downloading")
    info.updates.installed.add(name="old", version="3", variant="int8", state="refused", last_error="failed its golden")
    info.updates.desired.add(name="lm", version="2", variant="fp32")
    info.updates.desired.add(name="new", version="1", variant="int8")
    text = Console(record=True, width=300)
    text.print(_updates(info))
    shown = text.export_text()
    assert "lm 1 fp32 downloading → 2 fp32" in shown
    assert "old 3 int8 refused (failed its golden)" in shown
    assert "new → 1 int8 (waiting)" in shown and "checked in 1 s ago" in shown
    # A rollout's shadow stage: the shadow is listed apart and never taken for what the model is waiting for.
    info.updates.installed.add(name="lm", version="2", variant="fp32", state="committed", shadow=True)
    text = Console(record=True, width=300)
    text.print(_updates(info))
    shown = text.export_text()
    assert "shadow lm 2 fp32 committed" in shown and "lm 1 fp32 downloading → 2 fp32" in shown
