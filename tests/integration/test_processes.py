"""Real processes: the tier entry points, and `edgecascade up` running the whole mesh."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from services.cli.demo_models import DEFAULT_MODELS_DIR
from tests.support.processes import wait_for_file

BIN = Path(sys.executable).parent
TIER_MODULES = ["tier0_device", "tier1_edge", "tier2_region"]


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie is a dead child not yet reaped by its parent.
    status = Path(f"/proc/{pid}/status")
    return status.is_file() and "State:\tZ" not in status.read_text()


@pytest.mark.parametrize("module", TIER_MODULES)
def test_tier_help_documents_config_and_environment(module: str) -> None:
    result = subprocess.run(
        [sys.executable, "-m", module, "--help"], capture_output=True, text=True, timeout=60, check=False
    )
    assert result.returncode == 0
    assert "--config" in result.stdout and "EDGECASCADE_<SECTION>__<KEY>" in result.stdout


def test_bad_configuration_exits_2_with_a_message(tmp_path: Path) -> None:
    config = tmp_path / "bad.toml"
    config.write_text("[server]\nport = -1\n")
    result = subprocess.run(
        [sys.executable, "-m", "tier1_edge", "--config", str(config)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 2
    assert "configuration error: [server] port must be between 0 and 65535, got -1" in result.stderr
    env = {**os.environ, "EDGECASCADE_UPSTREAM__ADDRESS": "127.0.0.1:1"}
    result = subprocess.run(
        [sys.executable, "-m", "tier2_region"], capture_output=True, text=True, timeout=60, check=False, env=env
    )
    assert result.returncode == 2
    assert "the region is the top of the chain" in result.stderr


def test_a_tier_stops_cleanly_on_sigterm(tmp_path: Path) -> None:
    port_file = tmp_path / "port.json"
    env = {
        **os.environ,
        "EDGECASCADE_SERVER__PORT": "0",
        "EDGECASCADE_SERVER__PORT_FILE": str(port_file),
        "EDGECASCADE_REPOSITORY__PATH": str(tmp_path / "models"),
    }
    with subprocess.Popen(
        [sys.executable, "-m", "tier0_device"], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT
    ) as process:
        wait_for_file(port_file, process, 60)
        record = json.loads(port_file.read_text())
        assert record["tier"] == "tier0" and record["address"].startswith("127.0.0.1:") and record["pid"] == process.pid
        process.send_signal(signal.SIGTERM)
        assert process.wait(30) == 0
        assert process.stdout is not None
        assert "stopping" in process.stdout.read().decode()


def _cli(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(BIN / "edgecascade"), *args], capture_output=True, text=True, timeout=timeout, check=False
    )


@pytest.mark.slow
def test_edgecascade_up_runs_the_mesh_and_stops_it(tmp_path: Path) -> None:
    assert (DEFAULT_MODELS_DIR / "charlm-device.int8.onnx").is_file(), "demo models are not committed"
    state = tmp_path / "state"
    command = [str(BIN / "edgecascade"), "up", "--state-dir", str(state)]
    with subprocess.Popen([*command, "--devices", "2"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT) as up:
        try:
            wait_for_file(state / "endpoints.json", up, 120)
            pids = _exercise_running_mesh(state)
        finally:
            up.send_signal(signal.SIGTERM)
            code = up.wait(60)
        output = up.stdout.read().decode() if up.stdout else ""
    assert code == 0, output
    assert "edgecascade mesh is up" in output
    assert not (state / "endpoints.json").exists()
    assert not any(_alive(pid) for pid in pids)
    # A second start reuses the placed models and comes up again; Ctrl-C stops it.
    with subprocess.Popen([*command, "--devices", "1"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT) as again:
        try:
            wait_for_file(state / "endpoints.json", again, 120)
        finally:
            again.send_signal(signal.SIGINT)
            assert again.wait(60) == 0
        assert "placed" not in (again.stdout.read().decode() if again.stdout else "")


def _exercise_running_mesh(state: Path) -> list[int]:
    endpoints = json.loads((state / "endpoints.json").read_text())
    assert set(endpoints) == {"region", "edge", "devices"}
    assert len(endpoints["devices"]) == 2
    for address in [endpoints["region"], endpoints["edge"], *endpoints["devices"]]:
        assert address.startswith("127.0.0.1:")

    local = _cli("generate", "The module", "--state-dir", str(state), "--max-tokens", "24", "--seed", "1")
    assert local.returncode == 0, local.stdout + local.stderr
    assert "served by tier0:device-1" in local.stdout
    assert "24 tokens" in local.stdout

    edge = _cli("generate", "Return the", "--model", "charlm-edge", "--state-dir", str(state), "--max-tokens", "8")
    assert edge.returncode == 0, edge.stdout + edge.stderr
    assert "served by tier1:edge-1" in edge.stdout and "model_not_held" in edge.stdout

    infer = _cli("infer", "Return the valu", "--state-dir", str(state))
    assert infer.returncode == 0, infer.stdout + infer.stderr
    assert "next character" in infer.stdout and "tier0:device-1" in infer.stdout

    status = _cli("status", "--state-dir", str(state))
    assert status.returncode == 0, status.stdout
    for tier in ("tier0", "tier1", "tier2"):
        assert tier in status.stdout

    missing = _cli("generate", "x", "--model", "nope", "--state-dir", str(state))
    assert missing.returncode == 1 and "not held" in missing.stdout

    nodes = ("region-1", "edge-1", "device-1", "device-2")
    pids = [json.loads((state / node / "port.json").read_text())["pid"] for node in nodes]
    assert all(_alive(pid) for pid in pids)
    return pids
