"""Real processes: the tier entry points, and `edgecascade up` running the whole mesh."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
from rich.console import Console

from edgecascade.client_commands import status
from edgecascade.demo_models import DEFAULT_MODELS_DIR, DEVICE_MODEL, EDGE_MODEL
from protos.edgecascade.v1 import mesh_pb2, mesh_pb2_grpc
from protos.inference import grpc_service_pb2 as pb
from protos.inference import grpc_service_pb2_grpc as pb_grpc
from services.engine.generation import TEXT_INPUT
from services.inference import SERVED_BY
from services.rpc.converters import params_from_proto
from services.tensors import encode_raw
from tests.support.processes import wait_for_file, wait_until
from tests.support.updater_node import plaintext_leaks

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
            _roll_out_version_2(state)
            _shadow_stops_a_disagreeing_version(state, tmp_path)
        finally:
            up.send_signal(signal.SIGTERM)
            code = up.wait(60)
        output = up.stdout.read().decode() if up.stdout else ""
    assert code == 0, output
    assert "edgecascade mesh is up" in output
    assert "fleet: deployed charlm-device version 1 to every device" in output
    assert "device-2 installed charlm-device version 1" in output
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
    # The edge and the devices got their models through enrollment and their updaters, and say so;
    # none of them holds a plaintext model (only the region keeps demo copies, as the last fallback).
    for address, model in [(endpoints["edge"], EDGE_MODEL)] + [(d, DEVICE_MODEL) for d in endpoints["devices"]]:
        updates = _tier_info(address).updates
        assert updates.enrolled and [(m.name, m.version, m.state) for m in updates.installed] == [
            (model, "1", "committed")
        ]
    demo = [p.read_bytes() for p in DEFAULT_MODELS_DIR.glob("*.onnx")]
    for node in ("edge-1", "device-1", "device-2"):
        assert plaintext_leaks(state / node, demo) == [], node
        assert not (state / node / "enrollment-token").exists()  # used, then removed

    missing = _cli("generate", "x", "--model", "nope", "--state-dir", str(state))
    assert missing.returncode == 1 and "not held" in missing.stdout

    nodes = ("region-1", "edge-1", "device-1", "device-2")
    pids = [json.loads((state / node / "port.json").read_text())["pid"] for node in nodes]
    assert all(_alive(pid) for pid in pids)
    return pids


def _roll_out_version_2(state: Path) -> None:
    """Publishes charlm-device 2 and rolls it out over both devices, gated on their live telemetry.

    A shadow stage comes first: version 2 (the same weights as 1) runs beside version 1 on a share of the
    devices' requests, they report top-1 agreement 1.0, and only then does it serve.
    """
    published = _cli(
        "model", "publish", "--name", DEVICE_MODEL, "--version", "2", "--rows", "300", "--latency-runs", "5",
        "--batch-sizes", "1", "--registry", str(state / "region-1" / "registry"),
        "--keys", str(state / "region-1" / "keys"),
        f"fp32={DEFAULT_MODELS_DIR / 'charlm-device.onnx'}", f"int8={DEFAULT_MODELS_DIR / 'charlm-device.int8.onnx'}",
        timeout=300,
    )  # fmt: skip
    assert published.returncode == 0, published.stdout + published.stderr
    started = _cli(
        "rollout", "start", DEVICE_MODEL, "2", "--steps", "100", "--interval-s", "5", "--min-requests", "5",
        "--max-p99-ratio", "5", "--max-fallback-rate-increase", "0.5", "--shadow-percent", "100",
        "--shadow-interval-s", "5", "--state-dir", str(state),
    )  # fmt: skip
    assert started.returncode == 0, started.stdout + started.stderr
    devices = json.loads((state / "endpoints.json").read_text())["devices"]

    def completed() -> bool:
        for device in devices:  # traffic for the gates to read
            _infer(device, DEVICE_MODEL, "Return the valu")
        shown = _cli("rollout", "status", DEVICE_MODEL, "--json", "--state-dir", str(state))
        rollout = json.loads(shown.stdout)
        assert rollout["state"] in ("running", "waiting", "completed"), rollout
        return bool(rollout["state"] == "completed")

    wait_until(completed, 180, "the rollout of version 2 completing")
    history = json.loads(_cli("rollout", "status", DEVICE_MODEL, "--json", "--state-dir", str(state)).stdout)["history"]
    passed = [e["message"] for e in history if e["message"].startswith("shadow") and "passed its gates" in e["message"]]
    assert passed and "agreement 1.00" in passed[0], history
    # Both devices serve version 2, and the fleet view shows its traffic (exported every 5 s via the edge).

    def fleet_shows_version_2() -> bool:
        for device in devices:
            _infer(device, DEVICE_MODEL, "Return the valu")
        fleet = json.loads(_cli("fleet", "--json", "--state-dir", str(state)).stdout)
        want = [(DEVICE_MODEL, "2")]
        on_2 = [n for n in fleet["nodes"] if [(m["name"], m["version"]) for m in n["installed"]] == want]
        traffic = [v for v in fleet["versions"] if (v["name"], v["version"]) == (DEVICE_MODEL, "2")]
        return len(on_2) == 2 and bool(traffic) and traffic[0]["nodes"] == 2 and traffic[0]["requests"] > 0

    wait_until(fleet_shows_version_2, 60, "fleet --json showing both devices on version 2 with traffic")
    for device in devices:
        answer = _infer(device, DEVICE_MODEL, "Return the valu")
        assert answer[SERVED_BY].startswith("tier0:device-")


def _shadow_stops_a_disagreeing_version(state: Path, tmp_path: Path) -> None:
    """Version 3 has version 2's signature but scrambled weights: its shadow disagrees and it never serves."""
    import onnx
    from onnx import numpy_helper

    model = onnx.load(str(DEFAULT_MODELS_DIR / "charlm-device.onnx"))
    rng = np.random.default_rng(3)
    for tensor in model.graph.initializer:
        weights = numpy_helper.to_array(tensor)
        if weights.dtype == np.float32 and weights.size > 1:
            scrambled = rng.permutation(weights.ravel()).reshape(weights.shape)
            tensor.CopyFrom(numpy_helper.from_array(scrambled, tensor.name))
    path = tmp_path / "charlm-device-scrambled.onnx"
    onnx.save(model, str(path))
    published = _cli(
        "model", "publish", "--name", DEVICE_MODEL, "--version", "3", "--rows", "300", "--latency-runs", "5",
        "--batch-sizes", "1", "--registry", str(state / "region-1" / "registry"),
        "--keys", str(state / "region-1" / "keys"), f"fp32={path}",
        timeout=300,
    )  # fmt: skip
    assert published.returncode == 0, published.stdout + published.stderr
    started = _cli(
        "rollout", "start", DEVICE_MODEL, "3", "--steps", "100", "--shadow-percent", "100", "--shadow-interval-s", "5",
        "--min-requests", "5", "--min-agreement", "0.9", "--state-dir", str(state),
    )  # fmt: skip
    assert started.returncode == 0, started.stdout + started.stderr
    devices = json.loads((state / "endpoints.json").read_text())["devices"]
    prompts = ["Return the valu", "The module", "Raise an error if", "the default is"]

    def rolled_back() -> bool:
        for device in devices:
            for prompt in prompts:  # the shadow runs on these (and they are answered by version 2 meanwhile)
                assert _infer(device, DEVICE_MODEL, prompt)[SERVED_BY].startswith("tier0:device-")
        rollout = json.loads(_cli("rollout", "status", DEVICE_MODEL, "--json", "--state-dir", str(state)).stdout)
        assert rollout["state"] in ("running", "waiting", "rolled_back"), rollout
        assert rollout["phase"] == "shadow", rollout  # it never reaches a serving stage
        return bool(rollout["state"] == "rolled_back")

    wait_until(rolled_back, 120, "the shadow of version 3 being stopped")
    rollout = json.loads(_cli("rollout", "status", DEVICE_MODEL, "--json", "--state-dir", str(state)).stdout)
    assert "agreement" in rollout["reason"], rollout["reason"]
    assert rollout["figures"]["shadow"]["agreement"] < 0.9

    def shadows_removed() -> bool:
        rows = [[(m.version, m.shadow) for m in _tier_info(d).updates.installed] for d in devices]
        return rows == [[("2", False)]] * len(devices)

    wait_until(shadows_removed, 60, "both devices serving version 2 with the shadow of version 3 removed")


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def _tier_info(address: str) -> mesh_pb2.GetTierInfoResponse:
    with grpc.insecure_channel(address) as channel:
        info: mesh_pb2.GetTierInfoResponse = mesh_pb2_grpc.MeshServiceStub(channel).GetTierInfo(
            mesh_pb2.GetTierInfoRequest(), timeout=10
        )
        return info


@pytest.mark.slow
def test_edgecascade_up_ignores_inherited_per_node_settings(tmp_path: Path) -> None:
    """The Dockerfile's EDGECASCADE_SERVER__HOST/PORT (and friends) must not put every node on one port."""
    state = tmp_path / "state"
    port = _free_port()
    env = {
        **os.environ,
        "EDGECASCADE_SERVER__HOST": "0.0.0.0",
        "EDGECASCADE_SERVER__PORT": str(port),
        "EDGECASCADE_SERVER__NODE_ID": "region-1",
        "EDGECASCADE_SERVER__PORT_FILE": str(tmp_path / "port.json"),
        "EDGECASCADE_REPOSITORY__PATH": str(tmp_path / "elsewhere"),
        "EDGECASCADE_UPSTREAM__ADDRESS": "127.0.0.1:1",
        # Not per node: passes through to every node.
        "EDGECASCADE_CACHE__MEMORY_BUDGET_BYTES": "300000000",
    }
    log = tmp_path / "up.log"
    with (
        log.open("wb") as out,
        subprocess.Popen(
            [str(BIN / "edgecascade"), "up", "--state-dir", str(state), "--devices", "1"],
            stdout=out,
            stderr=subprocess.STDOUT,
            env=env,
        ) as up,
    ):
        try:
            wait_for_file(state / "endpoints.json", up, 120)
            endpoints = json.loads((state / "endpoints.json").read_text())
            addresses = [endpoints["region"], endpoints["edge"], *endpoints["devices"]]
            infos = [_tier_info(address) for address in addresses]
        finally:
            up.send_signal(signal.SIGTERM)
            code = up.wait(60)
    output = log.read_text()
    assert code == 0, output
    assert len(set(addresses)) == 3, addresses
    assert all(a.startswith("127.0.0.1:") and a != f"127.0.0.1:{port}" for a in addresses), addresses
    assert [i.node_id for i in infos] == ["region-1", "edge-1", "device-1"]
    assert [i.upstream for i in infos] == ["", endpoints["region"], endpoints["edge"]]
    assert all(i.cache.budget_bytes == 300_000_000 for i in infos)
    assert not (tmp_path / "port.json").exists() and not (tmp_path / "elsewhere").exists()
    flat = " ".join(output.split())  # rich wraps long lines
    assert flat.count("EDGECASCADE_SERVER__PORT,") == 1, output  # reported once, not once per node
    assert "EDGECASCADE_UPSTREAM__ADDRESS" in flat and "EDGECASCADE_CACHE" not in flat


def _infer(address: str, model: str, prompt: str) -> dict[str, Any]:
    request = pb.ModelInferRequest(model_name=model)
    request.inputs.add(name=TEXT_INPUT, datatype="BYTES", shape=[1])
    request.raw_input_contents.append(encode_raw(np.array([prompt.encode()], dtype=object)))
    with grpc.insecure_channel(address) as channel:
        response = pb_grpc.GRPCInferenceServiceStub(channel).ModelInfer(request, timeout=20)
    return dict(params_from_proto(response.parameters))


def _forwards_to_edge(device: str) -> bool:
    try:
        return bool(_infer(device, EDGE_MODEL, "Return the")[SERVED_BY] == "tier1:edge-1")
    except grpc.RpcError as exc:
        if exc.code() != grpc.StatusCode.UNAVAILABLE:  # only "cannot reach it yet" is worth waiting out
            raise
        return False


def _node_states(state: Path) -> dict[str, dict[str, Any]]:
    try:
        record = json.loads((state / "nodes.json").read_text())
    except FileNotFoundError:
        return {}
    return {node["name"]: node for node in record["nodes"]}


def _edge_state(state: Path) -> str:
    return str(_node_states(state).get("edge-1", {}).get("state", ""))


@pytest.mark.slow
def test_edgecascade_up_restarts_a_killed_node_and_keeps_the_others(tmp_path: Path) -> None:
    state = tmp_path / "state"
    log = tmp_path / "up.log"
    with (
        log.open("wb") as out,
        subprocess.Popen(
            [str(BIN / "edgecascade"), "up", "--state-dir", str(state), "--devices", "1"],
            stdout=out,
            stderr=subprocess.STDOUT,
        ) as up,
    ):
        try:
            wait_for_file(state / "endpoints.json", up, 120)
            endpoints = json.loads((state / "endpoints.json").read_text())
            device, edge = endpoints["devices"][0], endpoints["edge"]
            nodes = ("region-1", "edge-1", "device-1")
            pids = {n: json.loads((state / n / "port.json").read_text())["pid"] for n in nodes}
            assert _infer(device, EDGE_MODEL, "Return the")[SERVED_BY] == "tier1:edge-1"

            os.kill(pids["edge-1"], signal.SIGKILL)
            wait_until(lambda: _edge_state(state) == "restarting" or up.poll() is not None, 10, "edge-1 restarting")
            # The launcher and the other nodes carry on; the device still answers what it holds.
            assert up.poll() is None, log.read_text()
            assert _alive(pids["region-1"]) and _alive(pids["device-1"])
            console = Console(record=True, width=300)
            assert status(console, state, timeout=2.0) == 1
            edge_row = next(line for line in console.export_text().splitlines() if edge in line)
            assert "edge-1" in edge_row and "restarting" in edge_row, edge_row
            assert _infer(device, DEVICE_MODEL, "Return the valu")[SERVED_BY] == "tier0:device-1"
            assert {n: r["state"] for n, r in _node_states(state).items() if n != "edge-1"} == {
                "region-1": "up",
                "device-1": "up",
            }

            wait_until(lambda: _edge_state(state) == "up", 60, "edge-1 up again")
            record = _node_states(state)["edge-1"]
            assert record["restarts"] == 1 and record["address"] == edge
            new_edge = json.loads((state / "edge-1" / "port.json").read_text())
            assert new_edge["address"] == edge and new_edge["pid"] != pids["edge-1"]  # same port, new process
            assert _alive(pids["region-1"]) and _alive(pids["device-1"])
            # Forwarding through the device to the edge works again, as soon as the device's channel
            # reconnects (its backoff is capped at 2 s).
            wait_until(lambda: _forwards_to_edge(device), 10, "the device forwarding to edge-1 again")
            assert _cli("status", "--state-dir", str(state)).returncode == 0
        finally:
            up.send_signal(signal.SIGTERM)
            code = up.wait(60)
    output = " ".join(log.read_text().split())  # rich wraps long lines
    assert code == 0, output
    assert "edge-1 exited with code -9" in output and "restarting edge-1" in output
    assert f"edge edge-1 serving on {edge}" in output.split("edge-1 exited", 1)[1]  # with the edge's log tail
    assert not (state / "endpoints.json").exists() and not (state / "nodes.json").exists()
    assert not any(_alive(pid) for pid in [*pids.values(), new_edge["pid"]])
