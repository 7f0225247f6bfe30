"""``edgecascade up``: the whole mesh on this machine.

Starts the region, one edge and N devices as child processes on loopback, each
with its own directory under the state directory (``config.toml``,
``models/``, ``log.txt``, ``port.json``). On first start the region's model
registry is created (``region-1/keys``, ``region-1/registry``) and the demo
models are published into it; the region serves it and the edge caches it
(``edge-1/artifacts``), trusting ``edge-1/trusted-root.json``. Each child binds a free port and
reports it in its port file; the launcher chains the upstream addresses
(device → edge → region), waits until every node answers its health check with
SERVING, then writes ``<state-dir>/endpoints.json``. SIGINT or SIGTERM stops the
children, devices first, each with SIGTERM and then SIGKILL after a grace
period, and removes ``endpoints.json``.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import IO, Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from services.atomic_files import write_atomically
from services.cli.demo_models import place_demo_models
from services.cli.demo_registry import publish_demo_models, trusted_root
from services.errors import ConfigError, UnavailableError

START_TIMEOUT_S = 60.0
STOP_GRACE_S = 10.0

ROLE_MODULES = {"region": "tier2_region", "edge": "tier1_edge", "device": "tier0_device"}


@dataclass
class Child:
    """One tier process."""

    name: str
    role: str
    directory: Path
    process: subprocess.Popen[bytes] | None = None
    address: str = ""
    log: IO[bytes] | None = field(default=None, repr=False)

    @property
    def port_file(self) -> Path:
        """Where the node reports its address."""
        return self.directory / "port.json"

    @property
    def repository(self) -> Path:
        """The node's model repository."""
        return self.directory / "models"


def _die_with_parent() -> None:
    """Asks Linux to SIGTERM the child if the launcher itself is killed (no orphaned nodes)."""
    if sys.platform.startswith("linux"):
        import ctypes

        pr_set_pdeathsig = 1
        ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, signal.SIGTERM)


def _toml_string(value: str) -> str:
    return json.dumps(value)  # a JSON string literal is a valid TOML basic string


class Mesh:
    """The children of one ``edgecascade up``.

    Args:
        state_dir: Where everything is kept.
        devices: Number of device nodes.
        models_dir: Where the demo models are.
        say: Prints a progress line.
    """

    def __init__(self, state_dir: Path, devices: int, models_dir: Path, say: Callable[[str], None]) -> None:
        if devices < 1:
            raise ConfigError("--devices must be at least 1")
        self.state_dir = state_dir.resolve()
        self.models_dir = models_dir
        self.say = say
        self.region = Child("region-1", "region", self.state_dir / "region-1")
        self.edge = Child("edge-1", "edge", self.state_dir / "edge-1")
        self.devices = [Child(f"device-{i}", "device", self.state_dir / f"device-{i}") for i in range(1, devices + 1)]

    @property
    def children(self) -> list[Child]:
        """All children, region first."""
        return [self.region, self.edge, *self.devices]

    @property
    def endpoints_file(self) -> Path:
        """``<state-dir>/endpoints.json``."""
        return self.state_dir / "endpoints.json"

    def place_models(self) -> None:
        """Puts the demo models into each node's repository the first time.

        Raises:
            ConfigError: A demo model file is missing.
        """
        for child in self.children:
            for placement in place_demo_models(child.repository, child.role, self.models_dir):
                self.say(f"placed {placement.name} ({placement.file}) on {child.name}")
        self.publish_registry()

    @property
    def registry_dir(self) -> Path:
        """The region's model registry."""
        return self.region.directory / "registry"

    @property
    def key_dir(self) -> Path:
        """The region's signing keys (dev set-up: generated on first start, mode 0600)."""
        return self.region.directory / "keys"

    @property
    def trusted_root_file(self) -> Path:
        """The root metadata the edge trusts."""
        return self.edge.directory / "trusted-root.json"

    def publish_registry(self) -> None:
        """Creates the registry and publishes the demo models into it, the first time.

        Raises:
            ConfigError: The registry's keys exist but cannot be used.
        """
        from services.cli.model_commands import heldout_docs  # imported on use: it pulls in the demo corpus

        publish_demo_models(self.registry_dir, self.key_dir, self.models_dir, self.say, lambda f: heldout_docs(f, None))
        self.edge.directory.mkdir(parents=True, exist_ok=True)
        write_atomically(self.trusted_root_file, trusted_root(self.registry_dir))

    def start(self) -> dict[str, Any]:
        """Starts every child in chain order and returns the endpoints once all serve.

        Raises:
            UnavailableError: A child exited or did not serve in time (its log tail is in the message).
        """
        self.endpoints_file.unlink(missing_ok=True)
        self._spawn(self.region, upstream="")
        self._spawn(self.edge, upstream=self.region.address)
        for device in self.devices:
            self._spawn(device, upstream=self.edge.address, wait=False)
        for device in self.devices:
            self._await_port(device)
        for child in self.children:
            self._await_serving(child)
        endpoints = {
            "region": self.region.address,
            "edge": self.edge.address,
            "devices": [d.address for d in self.devices],
        }
        tmp = self.endpoints_file.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(endpoints, indent=2) + "\n")
        os.replace(tmp, self.endpoints_file)
        return endpoints

    def _spawn(self, child: Child, upstream: str, wait: bool = True) -> None:
        child.directory.mkdir(parents=True, exist_ok=True)
        child.port_file.unlink(missing_ok=True)
        config = child.directory / "config.toml"
        config.write_text(
            "# Written by `edgecascade up`; rewritten on every start.\n"
            "[server]\n"
            'host = "127.0.0.1"\n'
            "port = 0\n"
            f"node_id = {_toml_string(child.name)}\n"
            f"port_file = {_toml_string(str(child.port_file))}\n"
            "[repository]\n"
            f"path = {_toml_string(str(child.repository))}\n"
            "[upstream]\n"
            f"address = {_toml_string(upstream)}\n"
            f"{self._artifact_sections(child)}"
        )
        child.log = (child.directory / "log.txt").open("ab")
        child.process = subprocess.Popen(
            [sys.executable, "-m", ROLE_MODULES[child.role], "--config", str(config)],
            stdin=subprocess.DEVNULL,
            stdout=child.log,
            stderr=subprocess.STDOUT,
            # Ctrl-C in the terminal goes to the launcher only; it stops the children in order.
            start_new_session=True,
            # No threads exist yet when children are spawned (health checks come after).
            preexec_fn=_die_with_parent,  # noqa: PLW1509
        )
        if wait:
            self._await_port(child)

    def _artifact_sections(self, child: Child) -> str:
        if child.role == "region":
            return (
                "[registry]\n"
                f"path = {_toml_string(str(self.registry_dir))}\n"
                f"key_dir = {_toml_string(str(self.key_dir))}\n"
            )
        if child.role == "edge":
            return (
                "[artifacts]\n"
                f"cache_dir = {_toml_string(str(child.directory / 'artifacts'))}\n"
                f"trusted_root = {_toml_string(str(self.trusted_root_file))}\n"
            )
        return ""

    def _await_port(self, child: Child) -> None:
        assert child.process is not None
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            if child.process.poll() is not None:
                raise UnavailableError(
                    f"{child.name} exited with code {child.process.returncode}:\n{self.log_tail(child)}"
                )
            if child.port_file.is_file():
                try:
                    child.address = json.loads(child.port_file.read_text())["address"]
                except (ValueError, KeyError):
                    pass  # written atomically, so only a foreign file gets here; keep waiting
                else:
                    self.say(f"{child.name} ({child.role}) listening on {child.address}")
                    return
            time.sleep(0.05)
        raise UnavailableError(f"{child.name} did not start within {START_TIMEOUT_S:.0f} s:\n{self.log_tail(child)}")

    def _await_serving(self, child: Child) -> None:
        deadline = time.monotonic() + START_TIMEOUT_S
        with grpc.insecure_channel(child.address) as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            while time.monotonic() < deadline:
                try:
                    status = stub.Check(health_pb2.HealthCheckRequest(), timeout=2).status
                except grpc.RpcError:
                    status = health_pb2.HealthCheckResponse.UNKNOWN
                if status == health_pb2.HealthCheckResponse.SERVING:
                    return
                time.sleep(0.1)
        raise UnavailableError(f"{child.name} at {child.address} never reported SERVING")

    def log_tail(self, child: Child, lines: int = 20) -> str:
        """The last lines of a child's log."""
        path = child.directory / "log.txt"
        if not path.is_file():
            return "(no log)"
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])

    def failed(self) -> Child | None:
        """A child that has exited, if any."""
        return next((c for c in self.children if c.process is not None and c.process.poll() is not None), None)

    def stop(self) -> None:
        """Stops every child, devices first; SIGKILL after the grace period."""
        self.endpoints_file.unlink(missing_ok=True)
        for child in reversed(self.children):
            if child.process is not None and child.process.poll() is None:
                child.process.send_signal(signal.SIGTERM)
                try:
                    child.process.wait(STOP_GRACE_S)
                except subprocess.TimeoutExpired:
                    child.process.kill()
                    child.process.wait()
            if child.log is not None:
                child.log.close()


class StopRequested(BaseException):
    """SIGINT or SIGTERM arrived; raised from the signal handler to end any wait at once."""


def _raise_stop(signum: int, frame: FrameType | None) -> None:
    # Ignore repeats first: a second Ctrl-C (or a supervisor's SIGTERM after
    # ours) must not cut the orderly stop short.
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, signal.SIG_IGN)
    raise StopRequested(signum)


def run_until_signal(mesh: Mesh, on_ready: Callable[[dict[str, Any]], None]) -> int:
    """Starts the mesh, calls ``on_ready`` and blocks until SIGINT/SIGTERM or a child dies.

    Returns:
        0 after a requested stop, 1 if a child failed.
    """
    previous = {sig: signal.signal(sig, _raise_stop) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        try:
            on_ready(mesh.start())
        except UnavailableError as exc:
            mesh.say(f"[red]start failed:[/red] {exc.message}")
            return 1
        while True:
            dead = mesh.failed()
            if dead is not None:
                code = dead.process.returncode if dead.process else "?"
                mesh.say(f"[red]{dead.name} exited with code {code}[/red]:\n{mesh.log_tail(dead)}")
                return 1
            time.sleep(0.2)
    except StopRequested:
        return 0
    finally:
        for sig in previous:
            signal.signal(sig, signal.SIG_IGN)
        mesh.say("stopping the mesh")
        mesh.stop()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
