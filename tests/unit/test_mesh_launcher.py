"""`edgecascade up` without processes: the children's environment, the restart policy, supervision."""

from __future__ import annotations

import itertools
import json
import tomllib
from pathlib import Path
from typing import Any

import pytest

from edgecascade import mesh_launcher
from edgecascade.mesh_launcher import LAUNCHER_OWNED_SETTINGS, Child, Mesh, RestartPolicy, child_environment
from protos.edgecascade.v1 import mesh_pb2
from services.errors import ConfigError, UnavailableError


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


# --------------------------------------------------------------------------- defect 9: the children's environment


def test_child_environment_drops_exactly_the_settings_the_launcher_writes_per_node() -> None:
    inherited = {
        # What the Dockerfile sets, and the rest of the per-node keys.
        "EDGECASCADE_SERVER__HOST": "0.0.0.0",
        "EDGECASCADE_SERVER__PORT": "8001",
        "EDGECASCADE_SERVER__NODE_ID": "region-1",
        "EDGECASCADE_SERVER__PORT_FILE": "/tmp/port.json",
        "EDGECASCADE_REPOSITORY__PATH": "/var/lib/edgecascade/region-models",
        "EDGECASCADE_UPSTREAM__ADDRESS": "127.0.0.1:8002",
        "EDGECASCADE_REGISTRY__PATH": "/srv/registry",
        "EDGECASCADE_ARTIFACTS__TRUSTED_ROOT": "/srv/root.json",
        # The config loader reads section and key case-insensitively, so this one sets [server] port too.
        "EDGECASCADE_server__port": "9000",
        # Everything else passes through.
        "EDGECASCADE_SERVER__GRACE_SECONDS": "2",
        "EDGECASCADE_REPOSITORY__PRELOAD": "false",
        "EDGECASCADE_CACHE__MEMORY_BUDGET_BYTES": "300000000",
        "EDGECASCADE_REGISTRY__TIMESTAMP_EXPIRY_S": "7200",
        "EDGECASCADE_LOG__LEVEL": "DEBUG",
        "EDGECASCADE_PROFILE": "x",  # not a setting (no section): not ours to touch
        "OTEL_EXPORTER_OTLP_ENDPOINT": "http://127.0.0.1:4317",
        "PATH": "/usr/bin",
    }
    env, ignored = child_environment(inherited)
    assert ignored == sorted(
        [
            "EDGECASCADE_SERVER__HOST",
            "EDGECASCADE_SERVER__PORT",
            "EDGECASCADE_SERVER__NODE_ID",
            "EDGECASCADE_SERVER__PORT_FILE",
            "EDGECASCADE_REPOSITORY__PATH",
            "EDGECASCADE_UPSTREAM__ADDRESS",
            "EDGECASCADE_REGISTRY__PATH",
            "EDGECASCADE_ARTIFACTS__TRUSTED_ROOT",
            "EDGECASCADE_server__port",
        ]
    )
    assert env == {name: value for name, value in inherited.items() if name not in ignored}
    assert inherited["EDGECASCADE_SERVER__PORT"] == "8001"  # the launcher's own environment is left alone


def test_owned_settings_are_exactly_the_keys_of_the_per_node_config_files(tmp_path: Path) -> None:
    mesh = Mesh(tmp_path / "state", 2, tmp_path / "models", lambda _: None)
    written: set[tuple[str, str]] = set()
    for child in mesh.children:
        child.directory.mkdir(parents=True)
        child.token_file.write_text("token\n")  # as the launcher writes it for a node that has not enrolled
        config = tomllib.loads(mesh.node_config(child, upstream="127.0.0.1:1", port=0))
        written |= {(section, key) for section, values in config.items() for key in values}
    # The launcher writes the token file's path; a token from the environment would clash with it.
    assert written == set(LAUNCHER_OWNED_SETTINGS) - {("updates", "enrollment_token")}


def test_the_edge_and_devices_install_through_their_updaters_and_start_with_a_token_until_enrolled(
    tmp_path: Path,
) -> None:
    mesh = Mesh(tmp_path / "state", 2, tmp_path / "models", lambda _: None)
    region = mesh.node_settings(mesh.region, "", 0)
    assert "updates" not in region and region["fleet"] == {"path": str(mesh.fleet_file)}
    for child in (mesh.edge, *mesh.devices):
        child.directory.mkdir(parents=True)
        child.token_file.write_text("token\n")
        assert mesh.node_settings(child, "127.0.0.1:1", 0)["updates"] == {
            "state_dir": str(child.directory / "state"),
            "trusted_root": str(mesh.state_dir / "trusted-root.json"),
            "enrollment_token_file": str(child.directory / "enrollment-token"),
        }
    device = mesh.devices[0]
    (device.directory / "state").mkdir(parents=True)
    (device.directory / "state" / "enrollment.json").write_text("{}")
    mesh._provide_token(device)  # enrolled: no token, and the old file goes
    assert not device.token_file.exists()
    assert "enrollment_token_file" not in mesh.node_settings(device, "127.0.0.1:1", 0)["updates"]


def test_the_demo_check_interval_is_a_default_the_environment_overrides(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("EDGECASCADE_FLEET__CHECK_INTERVAL_S", raising=False)
    assert Mesh(tmp_path, 1, tmp_path, print)._environment["EDGECASCADE_FLEET__CHECK_INTERVAL_S"] == "2"
    monkeypatch.setenv("EDGECASCADE_FLEET__CHECK_INTERVAL_S", "30")
    assert Mesh(tmp_path, 1, tmp_path, print)._environment["EDGECASCADE_FLEET__CHECK_INTERVAL_S"] == "30"


def test_node_config_pins_the_port_on_restart(tmp_path: Path) -> None:
    mesh = Mesh(tmp_path / "state", 1, tmp_path / "models", lambda _: None)
    config = tomllib.loads(mesh.node_config(mesh.edge, upstream="127.0.0.1:7001", port=7002))
    assert config["server"] == {
        "host": "127.0.0.1",
        "port": 7002,
        "node_id": "edge-1",
        "port_file": str(mesh.edge.port_file),
    }
    assert config["upstream"] == {"address": "127.0.0.1:7001"}


def test_no_variable_is_reported_when_nothing_is_inherited() -> None:
    env, ignored = child_environment({"PATH": "/usr/bin", "EDGECASCADE_LOG__LEVEL": "INFO"})
    assert ignored == [] and env == {"PATH": "/usr/bin", "EDGECASCADE_LOG__LEVEL": "INFO"}


# --------------------------------------------------------------------------- defect 14: the restart policy


def test_restart_policy_backs_off_exponentially_then_gives_up() -> None:
    clock = FakeClock()
    policy = RestartPolicy(base_delay_s=1.0, factor=2.0, max_delay_s=30.0, max_restarts=3, window_s=60.0, clock=clock)
    delays = []
    for _ in range(3):
        delays.append(policy.on_exit())
        clock.now += 5
    assert delays == [1.0, 2.0, 4.0]
    assert policy.on_exit() is None  # a fourth exit within the window: give up


def test_restart_policy_caps_the_delay() -> None:
    clock = FakeClock()
    policy = RestartPolicy(base_delay_s=1.0, factor=2.0, max_delay_s=3.0, max_restarts=10, window_s=60.0, clock=clock)
    assert [policy.on_exit() for _ in range(4)] == [1.0, 2.0, 3.0, 3.0]


def test_restart_policy_forgets_exits_older_than_the_window() -> None:
    clock = FakeClock()
    policy = RestartPolicy(base_delay_s=1.0, factor=2.0, max_delay_s=30.0, max_restarts=2, window_s=10.0, clock=clock)
    assert policy.on_exit() == 1.0
    clock.now += 1
    assert policy.on_exit() == 2.0
    clock.now += 20  # both exits are out of the window: a fresh start, backoff included
    assert policy.on_exit() == 1.0
    clock.now += 1
    assert policy.on_exit() == 2.0
    clock.now += 1
    assert policy.on_exit() is None


def test_restart_policy_rejects_nonsense() -> None:
    with pytest.raises(ValueError, match="positive"):
        RestartPolicy(base_delay_s=0)
    with pytest.raises(ValueError, match="max_restarts"):
        RestartPolicy(max_restarts=-1)


# --------------------------------------------------------------------------- defect 14: supervision, no real processes


class FakeProcess:
    """Stands in for a Popen: alive until ``returncode`` is set."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.returncode: int | None = None
        self.signals: list[int] = []

    def poll(self) -> int | None:
        return self.returncode

    def send_signal(self, sig: int) -> None:
        self.signals.append(sig)
        self.returncode = -sig

    def kill(self) -> None:
        self.send_signal(9)

    def wait(self, timeout: float | None = None) -> int | None:
        return self.returncode


class FakeMesh(Mesh):
    """A mesh whose children are fake processes that write their port file at once and always serve."""

    def __init__(self, state_dir: Path, clock: FakeClock, policy: dict[str, Any]) -> None:
        self.said: list[str] = []
        self.launches: list[tuple[str, str, int]] = []
        # Every node has checked in once, with nothing assigned, unless a test says otherwise.
        self.update_status: dict[str, mesh_pb2.UpdateStatus] = {
            name: mesh_pb2.UpdateStatus(enrolled=True, check_ins=1) for name in ("edge-1", "device-1")
        }
        self.next_pid = 100
        self.next_port = 7000
        super().__init__(
            state_dir,
            1,
            state_dir / "models",
            self.said.append,
            clock=clock,
            restart_policy=lambda: RestartPolicy(clock=clock, **policy),
        )

    def _launch(self, child: Child, upstream: str, port: int) -> None:
        self.launches.append((child.name, upstream, port))
        child.directory.mkdir(parents=True, exist_ok=True)
        self.next_pid += 1
        if not port:
            self.next_port += 1
            port = self.next_port
        child.process = FakeProcess(self.next_pid)  # type: ignore[assignment]
        (child.directory / "log.txt").write_text(f"{child.name} log line\n")
        child.port_file.write_text(json.dumps({"address": f"127.0.0.1:{port}", "pid": self.next_pid}))

    def _serves(self, child: Child, timeout: float) -> bool:
        return True

    def _update_status(self, child: Child) -> mesh_pb2.UpdateStatus | None:
        return self.update_status.get(child.name)

    def states(self) -> dict[str, str]:
        record = json.loads((self.state_dir / "nodes.json").read_text())
        return {node["name"]: node["state"] for node in record["nodes"]}


def _kill(child: Child) -> None:
    assert child.process is not None
    child.process.returncode = -9


def test_a_dead_node_is_restarted_on_its_port_and_given_up_on_alone(tmp_path: Path) -> None:
    clock = FakeClock()
    mesh = FakeMesh(
        tmp_path / "state",
        clock,
        {"base_delay_s": 1.0, "factor": 2.0, "max_delay_s": 30.0, "max_restarts": 2, "window_s": 100.0},
    )
    endpoints = mesh.start()
    assert endpoints == {"region": "127.0.0.1:7001", "edge": "127.0.0.1:7002", "devices": ["127.0.0.1:7003"]}
    assert mesh.states() == {"region-1": "up", "edge-1": "up", "device-1": "up"}
    others = [mesh.region.process, mesh.devices[0].process]
    mesh.launches.clear()

    _kill(mesh.edge)
    assert mesh.supervise() is True
    assert mesh.states()["edge-1"] == "restarting"
    assert any("edge-1 exited with code -9" in line and "edge-1 log line" in line for line in mesh.said)
    clock.now += 0.9
    mesh.supervise()
    assert mesh.launches == []  # still backing off
    clock.now += 0.2
    mesh.supervise()
    assert mesh.launches == [("edge-1", "127.0.0.1:7001", 7002)]  # same upstream, same port
    mesh.supervise()
    assert mesh.states() == {"region-1": "up", "edge-1": "up", "device-1": "up"}
    assert mesh.edge.address == "127.0.0.1:7002"

    _kill(mesh.edge)
    mesh.supervise()
    clock.now += 1.5
    mesh.supervise()
    assert len(mesh.launches) == 1  # the second restart waits 2 s
    clock.now += 1.0
    mesh.supervise()
    mesh.supervise()
    assert len(mesh.launches) == 2 and mesh.states()["edge-1"] == "up"

    _kill(mesh.edge)
    assert mesh.supervise() is True  # the others still run
    assert mesh.states() == {"region-1": "up", "edge-1": "down", "device-1": "up"}
    assert any("giving up on edge-1" in line for line in mesh.said)
    clock.now += 1000
    mesh.supervise()
    assert len(mesh.launches) == 2
    assert [mesh.region.process, mesh.devices[0].process] == others
    assert all(p is not None and p.poll() is None for p in others)
    record = json.loads((mesh.state_dir / "nodes.json").read_text())
    edge = next(node for node in record["nodes"] if node["name"] == "edge-1")
    assert edge["restarts"] == 2 and edge["address"] == "127.0.0.1:7002" and "-9" in edge["detail"]

    mesh.stop()
    assert not (mesh.state_dir / "nodes.json").exists()
    assert not (mesh.state_dir / "endpoints.json").exists()


def test_supervision_ends_when_every_node_is_given_up(tmp_path: Path) -> None:
    clock = FakeClock()
    mesh = FakeMesh(
        tmp_path / "state",
        clock,
        {"base_delay_s": 1.0, "factor": 2.0, "max_delay_s": 30.0, "max_restarts": 0, "window_s": 100.0},
    )
    mesh.start()
    for child in mesh.children:
        _kill(child)
    assert mesh.supervise() is False
    assert set(mesh.states().values()) == {"down"}
    mesh.stop()


def test_a_restart_that_never_serves_counts_as_a_failure(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    clock = FakeClock()
    mesh = FakeMesh(
        tmp_path / "state",
        clock,
        {"base_delay_s": 1.0, "factor": 2.0, "max_delay_s": 30.0, "max_restarts": 5, "window_s": 100.0},
    )
    mesh.start()
    _kill(mesh.devices[0])
    mesh.supervise()
    clock.now += 1.0
    monkeypatch.setattr(mesh, "_serves", lambda child, timeout: False)
    mesh.supervise()  # relaunched, but never serves
    hung = mesh.devices[0].process
    clock.now += mesh_launcher.START_TIMEOUT_S + 1
    mesh.supervise()
    assert hung is not None and hung.poll() is not None  # killed
    assert mesh.states()["device-1"] == "restarting"
    assert any("device-1 did not serve" in line for line in mesh.said)
    mesh.stop()


# --------------------------------------------------------------------------- review: stop during a launch, logs, disk


def test_a_stop_signal_during_a_launch_waits_until_the_child_is_recorded() -> None:
    import os
    import signal

    previous = signal.signal(signal.SIGTERM, mesh_launcher._raise_stop)
    recorded: list[str] = []

    def launch() -> None:
        with mesh_launcher._stop_deferred():
            os.kill(os.getpid(), signal.SIGTERM)  # arrives while the child is being started
            recorded.append("child recorded")  # still runs: the stop is held until here

    try:
        with pytest.raises(mesh_launcher.StopRequested):
            launch()
        assert recorded == ["child recorded"]
    finally:
        signal.signal(signal.SIGTERM, previous)
        signal.signal(signal.SIGINT, signal.default_int_handler)


def test_the_log_tail_is_the_current_process_s_own(tmp_path: Path) -> None:
    mesh = Mesh(tmp_path / "state", 1, tmp_path / "models", lambda _: None)
    child = mesh.edge
    child.directory.mkdir(parents=True)
    log = child.directory / "log.txt"
    log.write_text("an earlier run's last words\n")
    child.log_offset = log.stat().st_size
    assert mesh.log_tail(child) == "(the process wrote nothing)"
    with log.open("a") as fh:
        fh.write("x" * (mesh_launcher.LOG_TAIL_BYTES * 2) + "\nthis run failed\n")
    tail = mesh.log_tail(child)
    assert tail.endswith("this run failed") and "earlier run" not in tail
    assert len(tail) <= mesh_launcher.LOG_TAIL_BYTES


def test_a_state_file_that_cannot_be_written_does_not_stop_supervision(tmp_path: Path) -> None:
    clock = FakeClock()
    mesh = FakeMesh(
        tmp_path / "state",
        clock,
        {"base_delay_s": 1.0, "factor": 2.0, "max_delay_s": 30.0, "max_restarts": 5, "window_s": 100.0},
    )
    mesh.start()
    (mesh.state_dir / "nodes.json").unlink()
    (mesh.state_dir / "nodes.json").mkdir()  # writes now fail with IsADirectoryError
    _kill(mesh.edge)
    assert mesh.supervise() is True
    assert any("could not record node states" in line for line in mesh.said)
    (mesh.state_dir / "nodes.json").rmdir()
    mesh.stop()


# ------------------------------------------------------------ issue 9: the mesh comes up through the updaters


def _status(desired: tuple[str, str, str] | None, *installed: tuple[str, str, str, str, str]) -> mesh_pb2.UpdateStatus:
    status = mesh_pb2.UpdateStatus(enrolled=True, installs=True, check_ins=1)
    if desired is not None:
        status.desired.add(name=desired[0], version=desired[1], variant=desired[2])
    for name, version, variant, state, error in installed:
        status.installed.add(name=name, version=version, variant=variant, state=state, last_error=error)
    return status


def test_endpoints_are_written_once_every_node_committed_or_refused_what_it_was_assigned(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    mesh = FakeMesh(tmp_path / "state", FakeClock(), {})
    want = ("charlm-device", "1", "int8")
    mesh.update_status = {
        "edge-1": _status(("charlm-edge", "1", "fp32"), ("charlm-edge", "1", "fp32", "refused", "signed for gpu-h100")),
        "device-1": _status(want, ("charlm-device", "1", "int8", "downloading", "")),
    }
    polls: list[bool] = []

    def sleep(seconds: float) -> None:
        polls.append((mesh.state_dir / "endpoints.json").exists())
        if len(polls) == 3:  # the device commits after a few rounds
            mesh.update_status["device-1"] = _status(want, ("charlm-device", "1", "int8", "committed", ""))

    monkeypatch.setattr("edgecascade.mesh_launcher.time.sleep", sleep)
    mesh.start()
    assert polls[-3:] == [False, False, False]  # not before the device had committed
    assert (mesh.state_dir / "endpoints.json").exists()
    said = " ".join(mesh.said)
    assert "device-1 installed charlm-device version 1 (int8)" in said
    assert "edge-1 refused charlm-edge version 1: signed for gpu-h100" in said
    assert said.count("installed charlm-device") == 1  # each change is said once


def test_a_node_that_does_not_install_in_time_is_named_and_the_mesh_still_starts(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    mesh = FakeMesh(tmp_path / "state", FakeClock(), {})
    # The device has not checked in yet; an older version committed does not count as the desired one.
    mesh.update_status["device-1"] = mesh_pb2.UpdateStatus(enrolled=False)
    mesh.update_status["edge-1"] = _status(("charlm-edge", "2", "fp32"), ("charlm-edge", "1", "fp32", "committed", ""))
    ticks = itertools.count(0, 100)
    monkeypatch.setattr("edgecascade.mesh_launcher.time.monotonic", lambda: float(next(ticks)))
    monkeypatch.setattr("edgecascade.mesh_launcher.time.sleep", lambda _: None)
    assert mesh.await_installs(timeout_s=1000) is False
    assert any("edge-1, device-1 have not installed their models within 1000 s" in line for line in mesh.said)


def test_a_second_launcher_on_the_same_state_directory_is_refused(tmp_path: Path) -> None:
    first = Mesh(tmp_path / "state", 1, tmp_path / "models", lambda _: None)
    first.claim()
    with pytest.raises(ConfigError, match="another `edgecascade up` is running on"):
        Mesh(tmp_path / "state", 1, tmp_path / "models", lambda _: None).claim()
    first.stop()
    again = Mesh(tmp_path / "state", 1, tmp_path / "models", lambda _: None)
    again.claim()  # free again
    again.stop()


def test_a_node_that_has_not_enrolled_starts_with_a_private_token_and_without_one_when_none_can_be_made(
    tmp_path: Path,
) -> None:
    said: list[str] = []
    mesh = Mesh(tmp_path / "state", 1, tmp_path / "models", said.append)
    device = mesh.devices[0]
    device.directory.mkdir(parents=True)
    mesh._provide_token(device)
    assert device.token_file.stat().st_mode & 0o777 == 0o600
    assert len(device.token_file.read_text().strip()) >= 32
    assert mesh.node_settings(device, "127.0.0.1:1", 0)["updates"]["enrollment_token_file"] == str(device.token_file)
    mesh._forget_token(device)  # the node has started: it read the token
    assert not device.token_file.exists()

    mesh.region.directory.mkdir(parents=True, exist_ok=True)
    mesh.fleet_file.unlink()
    mesh.fleet_file.mkdir()  # the inventory cannot be opened
    mesh._provide_token(device)
    assert not device.token_file.exists()
    assert "enrollment_token_file" not in mesh.node_settings(device, "127.0.0.1:1", 0)["updates"]
    assert any("no enrollment token for device-1" in line for line in said)


def test_a_node_that_exits_while_installing_fails_the_start(tmp_path: Path) -> None:
    mesh = FakeMesh(tmp_path / "state", FakeClock(), {})
    mesh.update_status["device-1"] = mesh_pb2.UpdateStatus(enrolled=True, check_ins=0)
    original = mesh._update_status

    def crash(child: Child) -> mesh_pb2.UpdateStatus | None:
        if child.name == "device-1":
            _kill(child)
        return original(child)

    mesh._update_status = crash  # type: ignore[method-assign]
    with pytest.raises(UnavailableError, match="device-1 exited with code -9 while installing"):
        mesh.start()
