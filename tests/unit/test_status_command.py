"""`edgecascade status` shows what the launcher knows about nodes that do not answer, and what each node reports."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

from rich.console import Console

from edgecascade.client_commands import _thermal, _updates, status
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


def _shown(markup: str) -> str:
    text = Console(record=True, width=300)
    text.print(markup)
    return text.export_text().strip()


def test_the_thermal_column_shows_state_temperature_power_source_and_inferences_per_joule() -> None:
    info = mesh_pb2.GetTierInfoResponse()
    assert _thermal(info) == "-"  # an edge or a region
    info.thermal.SetInParent()
    assert _thermal(info) == "off"  # a device with [thermal] enabled = false
    info.thermal.CopyFrom(
        mesh_pb2.ThermalStatus(enabled=True, state="normal", power_watts=3.25, power_source="estimated")
    )
    info.thermal.energy.add(name="lm", version="1", joules=2.0, inferences=900, source="estimated")
    info.thermal.energy.add(name="lin", version="2", joules=1.0, inferences=300, source="estimated")
    assert _shown(_thermal(info)) == "normal · no sensor · 3.2 W estimated · 400 inferences/J estimated"

    hot = mesh_pb2.ThermalStatus(
        enabled=True,
        state="critical",
        temperature_c=97.04,
        temperature_source="measured",
        power_watts=12.0,
        power_source="measured",
        shrink_steps=12,
        run_slots=1,
        configured_run_slots=4,
        forwarding=True,
        faults={"absurd": 2, "missing": 0},
    )
    hot.batch_caps.add(name="lm", version="1", rows=1, configured_rows=32)
    hot.energy.add(name="lm", version="1", joules=4.0, inferences=10, source="measured")
    info.thermal.CopyFrom(hot)
    assert _shown(_thermal(info)) == (
        "critical (slots 1/4, batch ≤ 1, new work upstream) · 97.0 °C · 12.0 W measured · "
        "2.5 inferences/J measured · 2 bad readings ignored"
    )
    # A sensor that gives only nonsense is not the same as no sensor at all.
    info.thermal.ClearField("temperature_c")
    info.thermal.faults_by_sensor["temperature.absurd"] = 2
    assert "no valid temperature" in _shown(_thermal(info))
