"""``edgecascade up``: the whole mesh on this machine.

Starts the region, one edge and N devices as child processes on loopback, each
with its own directory under the state directory (``config.toml``,
``models/``, ``log.txt``, ``port.json``). On first start the region's model
registry is created (``region-1/keys``, ``region-1/registry``), the demo
models are published into it, and they are deployed through the region's fleet
(``region-1/fleet.sqlite``): ``charlm-device`` to every device, ``charlm-edge``
to the edge. Only the region gets demo copies in its repository (the last
fallback); the edge and the devices start empty. Each of them keeps its keys,
enrollment and installed models in ``<node>/state``, trusts
``<state-dir>/trusted-root.json`` (the registry's root, provisioned, never
fetched), and, until it has enrolled, is started with a fresh one-time token
(``<node>/enrollment-token``, mode 0600, made by the launcher as
``edgecascade fleet token`` would). The nodes then enroll, check in and install
what is deployed to them through their updaters, from the region's registry
through the edge's verifying cache. Each child binds a free port and reports it
in its port file; the launcher chains the upstream addresses (device → edge →
region), waits until every node answers its health check with SERVING and until
the edge and every device have installed what they were assigned (or
``INSTALL_TIMEOUT_S`` passed: requests go upstream meanwhile), then writes
``<state-dir>/endpoints.json``.

The nodes check in every ``DEMO_ENVIRONMENT`` interval (2 s) unless the
environment sets ``EDGECASCADE_FLEET__CHECK_INTERVAL_S``, so ``edgecascade deploy``
reaches the demo mesh within seconds. ``DEMO_ENVIRONMENT`` also pairs the
devices' ``charlm-device`` with the edge's ``charlm-edge`` for the token-level
cascade (``EDGECASCADE_TOKEN_CASCADE__PAIRS``; the region has no such section
and ignores it). The edge and the devices export their
metrics by OTLP every 5 s (the devices to the edge, which relays them); the
region folds them into ``region-1/telemetry.sqlite``, which ``edgecascade
fleet`` shows and ``edgecascade rollout`` gates on.

The children inherit the launcher's environment, so every ``EDGECASCADE_*`` and
``OTEL_*`` setting reaches every node, except the per-node settings the launcher
writes into each ``config.toml`` (:data:`LAUNCHER_OWNED_SETTINGS`: address, node
id, port file, repository, upstream, registry and artifact cache paths): those
variables are left out of the children's environment, and the launcher says once
which ones it ignored.

A node that exits is reported with the tail of its log and restarted after a
backoff (:class:`RestartPolicy`, whatever the exit code, like compose's ``restart: always``) on the
port it had, so the upstream address its children use stays valid; the other
nodes keep running. After too many restarts within the policy's window the
launcher gives up on that node only. The state of every node (``starting``,
``up``, ``restarting``, ``down``) is kept in ``<state-dir>/nodes.json``, written
atomically on every change; ``edgecascade status`` shows it for nodes that do
not answer. SIGINT or SIGTERM stops the children, devices first, each with
SIGTERM and then SIGKILL after a grace period, and removes ``endpoints.json``
and ``nodes.json``.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import IO, Any

import grpc
import tomli_w
from grpc_health.v1 import health_pb2, health_pb2_grpc
from rich.markup import escape

from edgecascade.demo_fleet import deploy_demo_models, issue_token
from edgecascade.demo_models import place_demo_models
from edgecascade.demo_registry import publish_demo_models, trusted_root
from protos.edgecascade.v1 import mesh_pb2, mesh_pb2_grpc
from services.atomic_files import write_atomically
from services.config import ENV_PREFIX
from services.errors import ConfigError, EdgecascadeError, UnavailableError
from services.rpc.updates_service import ENROLLMENT_FILE

START_TIMEOUT_S = 60.0
STOP_GRACE_S = 10.0
LOG_TAIL_BYTES = 64 * 1024
SUPERVISE_INTERVAL_S = 0.2
HEALTH_CHECK_TIMEOUT_S = 2.0
INSTALL_TIMEOUT_S = 180.0  # first start: enroll, check in, download, verify, trial, commit
TOKEN_TTL_S = 3600.0  # a token the launcher makes is used within seconds; an unused one lapses soon

# How often the demo's nodes export their metrics (the region's [telemetry] section has no such key,
# so it cannot come from the environment every node shares).
DEMO_EXPORT_INTERVAL_S = 5

# Defaults the nodes get unless the launcher's own environment sets them.
# The devices' charlm-device cascades token by token to the edge's charlm-edge (``edgecascade generate --cascade``).
DEMO_ENVIRONMENT = {
    "EDGECASCADE_FLEET__CHECK_INTERVAL_S": "2",
    "EDGECASCADE_TOKEN_CASCADE__PAIRS": "charlm-device=charlm-edge",
}

# The states of a node in nodes.json.
STARTING = "starting"  # first start, not yet serving
UP = "up"  # serving
RESTARTING = "restarting"  # exited; waiting for the backoff or for the new process to serve
DOWN = "down"  # exited too often; the launcher gave up on it

# Every ([section], key) the launcher writes into some node's config.toml. The
# launcher decides these per node, so the environment may not override them.
LAUNCHER_OWNED_SETTINGS: tuple[tuple[str, str], ...] = (
    ("server", "host"),
    ("server", "port"),
    ("server", "node_id"),
    ("server", "port_file"),
    ("repository", "path"),
    ("upstream", "address"),
    ("registry", "path"),
    ("registry", "key_dir"),
    ("artifacts", "cache_dir"),
    ("artifacts", "trusted_root"),
    ("fleet", "path"),
    ("updates", "state_dir"),
    ("updates", "trusted_root"),
    ("updates", "enrollment_token"),
    ("updates", "enrollment_token_file"),
    ("telemetry", "path"),
    ("telemetry", "export"),
    ("telemetry", "interval_s"),
    ("telemetry", "window_s"),
)

# Runs a tier module the way ``python -m`` does, after asking Linux to SIGTERM the
# node if the launcher dies (no orphaned nodes). This is done in the child itself,
# not in a preexec_fn: restarts happen while the launcher runs gRPC's threads, and
# running Python code between fork and exec is unsafe then.
_CHILD_BOOTSTRAP = """\
import ctypes, os, runpy, signal, sys
launcher, module = int(sys.argv[1]), sys.argv[2]
if sys.platform.startswith("linux"):
    ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
if os.getppid() != launcher:
    sys.exit("edgecascade up exited before this node started")
sys.argv = [module, *sys.argv[3:]]
runpy.run_module(module, run_name="__main__", alter_sys=True)
"""


def _setting_of(name: str) -> tuple[str, str] | None:
    """The ``(section, key)`` an environment variable sets, read the way :mod:`services.config` reads it."""
    if not name.startswith(ENV_PREFIX):
        return None
    section, separator, key = name[len(ENV_PREFIX) :].partition("__")
    return (section.lower(), key.lower()) if separator else None


def child_environment(environ: Mapping[str, str]) -> tuple[dict[str, str], list[str]]:
    """The environment of the nodes: ``environ`` without the variables for :data:`LAUNCHER_OWNED_SETTINGS`.

    Returns:
        The environment, and the names of the variables left out (sorted).
    """
    owned = set(LAUNCHER_OWNED_SETTINGS)
    env: dict[str, str] = {}
    ignored: list[str] = []
    for name, value in environ.items():
        if _setting_of(name) in owned:
            ignored.append(name)
        else:
            env[name] = value
    return env, sorted(ignored)


@dataclass
class RestartPolicy:
    """When to restart a node that exited (whatever its exit code, like compose's ``restart: always``), with backoff.

    The n-th exit within the last ``window_s`` seconds is followed by a restart
    after ``base_delay_s * factor ** (n - 1)`` seconds, at most ``max_delay_s``.
    An exit that would be restart number ``max_restarts + 1`` within the window
    gets none: the launcher gives up on that node. Exits older than the window
    are forgotten, and the backoff with them.

    Raises:
        ValueError: A delay or factor is not positive, or ``max_restarts`` is negative.
    """

    base_delay_s: float = 1.0
    factor: float = 2.0
    max_delay_s: float = 30.0
    max_restarts: int = 5
    window_s: float = 300.0
    clock: Callable[[], float] = time.monotonic
    _exits: list[float] = field(default_factory=list, init=False, repr=False)

    def __post_init__(self) -> None:
        if min(self.base_delay_s, self.max_delay_s, self.window_s) <= 0 or self.factor < 1:
            raise ValueError("restart delays and window must be positive and the factor at least 1")
        if self.max_restarts < 0:
            raise ValueError(f"max_restarts must not be negative, got {self.max_restarts}")

    def on_exit(self) -> float | None:
        """Records an exit now; returns the delay before the restart, or None to give up."""
        now = self.clock()
        self._exits = [t for t in self._exits if now - t < self.window_s] + [now]
        if len(self._exits) > self.max_restarts:
            return None
        return float(min(self.max_delay_s, self.base_delay_s * self.factor ** (len(self._exits) - 1)))


@dataclass
class Child:
    """One tier process and what the launcher knows about it."""

    name: str
    role: str  # device, edge or region: which demo models it gets, and its name in messages
    directory: Path
    module: str  # the tier's module, run as ``python -m``
    # The tier's own sections of its config.toml (keys in LAUNCHER_OWNED_SETTINGS).
    tier_settings: dict[str, dict[str, str | int]] = field(default_factory=dict)
    process: subprocess.Popen[bytes] | None = None
    address: str = ""
    log: IO[bytes] | None = field(default=None, repr=False)
    upstream: str = ""
    port: int = 0  # 0 until the first start has bound one; restarts reuse it
    state: str = STARTING
    restarts: int = 0
    detail: str = ""
    policy: RestartPolicy = field(default_factory=RestartPolicy, repr=False)
    restart_at: float | None = None  # while waiting out the backoff
    log_offset: int = 0  # where the current process's output starts in log.txt
    serve_deadline: float = 0.0  # while a restarted process has not served yet

    @property
    def port_file(self) -> Path:
        """Where the node reports its address."""
        return self.directory / "port.json"

    @property
    def repository(self) -> Path:
        """The node's model repository."""
        return self.directory / "models"

    @property
    def updates_dir(self) -> Path:
        """Where the node keeps its keys, enrollment and installed models (edge and devices)."""
        return self.directory / "state"

    @property
    def token_file(self) -> Path:
        """The one-time enrollment token the node starts with until it has enrolled."""
        return self.directory / "enrollment-token"

    @property
    def installs(self) -> bool:
        """Whether the node gets its models through enrollment and its updater (all but the region)."""
        return self.role != "region"

    @property
    def enrolled(self) -> bool:
        """Whether the node has recorded its enrollment."""
        return (self.updates_dir / ENROLLMENT_FILE).is_file()


class Mesh:
    """The children of one ``edgecascade up``.

    Args:
        state_dir: Where everything is kept.
        devices: Number of device nodes.
        models_dir: Where the demo models are.
        say: Prints a progress line (rich markup).
        clock: Monotonic seconds, for the restart schedule.
        restart_policy: Makes each child's restart policy.
    """

    def __init__(
        self,
        state_dir: Path,
        devices: int,
        models_dir: Path,
        say: Callable[[str], None],
        *,
        clock: Callable[[], float] = time.monotonic,
        restart_policy: Callable[[], RestartPolicy] = RestartPolicy,
    ) -> None:
        if devices < 1:
            raise ConfigError("--devices must be at least 1")
        self.state_dir = state_dir.resolve()
        self.models_dir = models_dir
        self.say = say
        self.clock = clock
        self.region = Child("region-1", "region", self.state_dir / "region-1", "tier2_region")
        self.edge = Child("edge-1", "edge", self.state_dir / "edge-1", "tier1_edge")
        self.devices = [
            Child(f"device-{i}", "device", self.state_dir / f"device-{i}", "tier0_device")
            for i in range(1, devices + 1)
        ]
        self.region.tier_settings = {
            "registry": {"path": str(self.registry_dir), "key_dir": str(self.key_dir)},
            "fleet": {"path": str(self.fleet_file)},
            # Stages are judged on whole windows that began after the stage did: short ones for a demo.
            "telemetry": {"path": str(self.telemetry_file), "window_s": DEMO_EXPORT_INTERVAL_S},
        }
        self.edge.tier_settings = {
            "artifacts": {
                "cache_dir": str(self.edge.directory / "artifacts"),
                "trusted_root": str(self.trusted_root_file),
            }
        }
        for child in self.children:
            child.policy = restart_policy()
            if child.installs:
                child.tier_settings["updates"] = {
                    "state_dir": str(child.updates_dir),
                    "trusted_root": str(self.trusted_root_file),
                }
                # Devices export to the edge, which relays to the region's receiver: what rollouts judge.
                child.tier_settings["telemetry"] = {"export": True, "interval_s": DEMO_EXPORT_INTERVAL_S}
        self._lock: IO[str] | None = None
        inherited, self._ignored_variables = child_environment(os.environ)
        self._environment = {**DEMO_ENVIRONMENT, **inherited}

    def claim(self) -> None:
        """Takes the state directory for this launcher (until :meth:`stop` or the process ends).

        Two launchers on one state directory would start two processes on each node's
        journal and installed store, and remove each other's endpoints.

        Raises:
            ConfigError: Another ``edgecascade up`` runs on this state directory.
        """
        self.state_dir.mkdir(parents=True, exist_ok=True)
        lock = (self.state_dir / "launcher.lock").open("a+")
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            lock.close()
            raise ConfigError(
                f"another `edgecascade up` is running on {self.state_dir}; stop it first, or use another --state-dir"
            ) from None
        self._lock = lock

    @property
    def children(self) -> list[Child]:
        """All children, region first."""
        return [self.region, self.edge, *self.devices]

    @property
    def endpoints_file(self) -> Path:
        """``<state-dir>/endpoints.json``."""
        return self.state_dir / "endpoints.json"

    @property
    def state_file(self) -> Path:
        """``<state-dir>/nodes.json``: every node's state, as the launcher sees it."""
        return self.state_dir / "nodes.json"

    def provision_demo(self) -> None:
        """On first start: puts the region's demo copies into its repository, creates the region's
        registry (with its dev keys), publishes the demo models into it (see :meth:`publish_registry`)
        and deploys them to the edge and the devices (see :func:`deploy_demo_models`).

        Raises:
            ConfigError: A demo model file is missing.
        """
        for placement in place_demo_models(self.region.repository, self.region.role, self.models_dir):
            self.say(f"placed {placement.name} ({placement.file}) on {self.region.name}")
        for child in self.children:
            if child.installs and child.repository.is_dir() and any(child.repository.iterdir()):
                # An older `edgecascade up` copied plaintext models there; nothing reads them now.
                shutil.rmtree(child.repository)
                self.say(f"removed the plaintext models an older launcher placed in {child.repository}")
        self.publish_registry()
        deploy_demo_models(self.fleet_file, self.registry_dir, self.say)

    @property
    def registry_dir(self) -> Path:
        """The region's model registry."""
        return self.region.directory / "registry"

    @property
    def key_dir(self) -> Path:
        """The region's signing keys (dev set-up: generated on first start, mode 0600)."""
        return self.region.directory / "keys"

    @property
    def fleet_file(self) -> Path:
        """The region's fleet inventory (nodes, tokens, deployments)."""
        return self.region.directory / "fleet.sqlite"

    @property
    def telemetry_file(self) -> Path:
        """The region's telemetry store (what the nodes export, folded into windows)."""
        return self.region.directory / "telemetry.sqlite"

    @property
    def trusted_root_file(self) -> Path:
        """The root metadata the edge and the devices trust."""
        return self.state_dir / "trusted-root.json"

    def publish_registry(self) -> None:
        """Creates the registry and publishes the demo models into it, the first time.

        Raises:
            ConfigError: The registry's keys exist but cannot be used.
        """
        from edgecascade.model_commands import heldout_docs  # imported on use: it pulls in the demo corpus

        publish_demo_models(self.registry_dir, self.key_dir, self.models_dir, self.say, lambda f: heldout_docs(f, None))
        self.state_dir.mkdir(parents=True, exist_ok=True)
        write_atomically(self.trusted_root_file, trusted_root(self.registry_dir))

    def start(self) -> dict[str, Any]:
        """Starts every child in chain order and returns the endpoints once all serve.

        Raises:
            UnavailableError: A child exited or did not serve in time (its log tail is in the message).
        """
        self.state_dir.mkdir(parents=True, exist_ok=True)
        self.endpoints_file.unlink(missing_ok=True)
        if self._ignored_variables:
            self.say(
                "ignored for the nodes (`edgecascade up` sets these per node): " + ", ".join(self._ignored_variables)
            )
        self._spawn(self.region, upstream="")
        self._spawn(self.edge, upstream=self.region.address)
        for device in self.devices:
            self._spawn(device, upstream=self.edge.address, wait=False)
        for device in self.devices:
            self._await_port(device)
        for child in self.children:
            self._await_serving(child)
            child.state = UP
        self._write_state()
        self.await_installs()
        endpoints = {
            "region": self.region.address,
            "edge": self.edge.address,
            "devices": [d.address for d in self.devices],
        }
        write_atomically(self.endpoints_file, (json.dumps(endpoints, indent=2) + "\n").encode())
        return endpoints

    def node_settings(self, child: Child, upstream: str, port: int) -> dict[str, dict[str, str | int]]:
        """The settings the launcher decides for one node (all of them in :data:`LAUNCHER_OWNED_SETTINGS`)."""
        settings: dict[str, dict[str, str | int]] = {
            "server": {"host": "127.0.0.1", "port": port, "node_id": child.name, "port_file": str(child.port_file)},
            "repository": {"path": str(child.repository)},
            "upstream": {"address": upstream},
        }
        settings.update(child.tier_settings)
        if child.installs and child.token_file.is_file():
            settings["updates"] = {**settings["updates"], "enrollment_token_file": str(child.token_file)}
        return settings

    def node_config(self, child: Child, upstream: str, port: int) -> str:
        """The text of a node's ``config.toml``."""
        header = (
            "# Written by `edgecascade up`; rewritten on every start. EDGECASCADE_* variables\n"
            "# for these settings are not passed to the node.\n"
        )
        return header + tomli_w.dumps(self.node_settings(child, upstream, port))

    def _spawn(self, child: Child, upstream: str, wait: bool = True) -> None:
        child.upstream = upstream
        child.state = STARTING
        self._launch(child, upstream, child.port)
        self._write_state()
        if wait:
            self._await_port(child)

    def _launch(self, child: Child, upstream: str, port: int) -> None:
        """Writes the node's config (with a new enrollment token until it has enrolled) and starts its process
        (``port`` 0: any free port)."""
        child.directory.mkdir(parents=True, exist_ok=True)
        child.port_file.unlink(missing_ok=True)
        self._provide_token(child)
        config = child.directory / "config.toml"
        write_atomically(config, self.node_config(child, upstream, port).encode())
        if child.log is not None:
            child.log.close()
        child.log = (child.directory / "log.txt").open("ab")
        child.log_offset = child.log.tell()
        # A stop that arrives while Popen runs must not leave a started child unrecorded (and so unstopped).
        with _stop_deferred():
            child.process = self._popen(child, config)

    def _provide_token(self, child: Child) -> None:
        """Writes a fresh one-time token for a node that has not enrolled (the node reads it as it starts).

        A token from an earlier start may have been used by a process that died before it
        recorded its enrollment, or have lapsed: a new one per start costs nothing. A node
        without keys (its state was deleted) gets its old enrollment revoked first, so that
        it may enroll with its new keys. If no token can be made, the node starts without
        one: it serves what it has and reports that it cannot enroll.
        """
        child.token_file.unlink(missing_ok=True)
        if not child.installs or child.enrolled:
            return
        fresh = not (child.updates_dir / "keys").is_dir()
        try:
            token, revoked = issue_token(self.fleet_file, TOKEN_TTL_S, revoke=child.name if fresh else None)
            write_atomically(child.token_file, (token + "\n").encode(), mode=0o600)
        except (EdgecascadeError, OSError, sqlite3.Error) as exc:
            child.token_file.unlink(missing_ok=True)
            self.say(f"[yellow]no enrollment token for {child.name}: {escape(str(exc))}[/yellow]")
            return
        if revoked:
            self.say(f"revoked the old enrollment of {child.name} (its state was deleted): it enrolls with new keys")

    def _forget_token(self, child: Child) -> None:
        """Removes the token file once the node has read it (it has written its port file, so it has started)."""
        child.token_file.unlink(missing_ok=True)

    def _update_status(self, child: Child) -> mesh_pb2.UpdateStatus | None:
        """What the node reports about its enrollment and updates, or None if it does not answer."""
        with grpc.insecure_channel(child.address) as channel:
            try:
                info = mesh_pb2_grpc.MeshServiceStub(channel).GetTierInfo(
                    mesh_pb2.GetTierInfoRequest(), timeout=HEALTH_CHECK_TIMEOUT_S
                )
            except grpc.RpcError:
                return None
        return info.updates if info.HasField("updates") else None

    def await_installs(self, timeout_s: float = INSTALL_TIMEOUT_S) -> bool:
        """Waits until the edge and every device run what they were assigned at their last check-in.

        A model is done when the node has committed the desired version and variant, or
        refused it (the reason is shown). Progress is reported once per change.

        Returns:
            Whether every node was done within ``timeout_s`` (if not, it says which are not:
            their requests go upstream meanwhile, and they keep installing).
        """
        pending = [child for child in self.children if child.installs]
        shown: set[tuple[str, ...]] = set()
        deadline = time.monotonic() + timeout_s
        while pending:
            for child in list(pending):
                if child.process is not None and child.process.poll() is not None:
                    raise UnavailableError(
                        f"{child.name} exited with code {child.process.returncode} while installing its models:\n"
                        f"{self.log_tail(child)}"
                    )
                status = self._update_status(child)
                if status is not None and status.check_ins and self._installed(child, status, shown):
                    pending.remove(child)
                elif status is not None and status.last_error and ("error", status.last_error) not in shown:
                    shown.add(("error", status.last_error))
                    self.say(f"[yellow]{child.name}: {escape(status.last_error)}[/yellow]")
            if pending and time.monotonic() >= deadline:
                names = ", ".join(child.name for child in pending)
                self.say(
                    f"[yellow]{names} have not installed their models within {timeout_s:.0f} s; they keep "
                    "trying, and forward requests upstream meanwhile (see edgecascade status)[/yellow]"
                )
                return False
            if pending:
                time.sleep(0.2)
        return True

    def _installed(self, child: Child, status: mesh_pb2.UpdateStatus, shown: set[tuple[str, ...]]) -> bool:
        """Whether the node committed or refused each model it was assigned; says each outcome once."""
        rows = {m.name: m for m in status.installed}
        done = True
        for want in status.desired:
            row = rows.get(want.name)
            if row is None or row.state not in ("committed", "refused"):
                done = False
                continue
            if row.state == "committed" and (row.version, row.variant) != (want.version, want.variant):
                done = False  # an older version serves while the assigned one is on its way
                continue
            key = (child.name, row.name, row.version, row.variant, row.state)
            if key in shown:
                continue
            shown.add(key)
            if row.state == "committed":
                self.say(f"{child.name} installed {row.name} version {row.version} ({row.variant})")
            else:
                self.say(
                    f"[yellow]{child.name} refused {escape(want.name)} version {escape(want.version)}: "
                    f"{escape(row.last_error)}[/yellow]"
                )
        return done

    def _popen(self, child: Child, config: Path) -> subprocess.Popen[bytes]:
        return subprocess.Popen(
            [
                sys.executable,
                "-c",
                _CHILD_BOOTSTRAP,
                str(os.getpid()),
                child.module,
                "--config",
                str(config),
            ],
            stdin=subprocess.DEVNULL,
            stdout=child.log,
            stderr=subprocess.STDOUT,
            env=self._environment,
            # Ctrl-C in the terminal goes to the launcher only; it stops the children in order.
            start_new_session=True,
        )

    def _reported_address(self, child: Child) -> str | None:
        """The address in the child's port file, if its current process wrote it."""
        try:
            record = json.loads(child.port_file.read_text())
            address = str(record["address"])
            pid = record.get("pid")
        except (OSError, ValueError, KeyError, TypeError):
            return None  # not there yet (it is written atomically), or a foreign file
        if child.process is None or (pid is not None and pid != child.process.pid):
            return None  # left over from an earlier process
        return address

    def _await_port(self, child: Child) -> None:
        assert child.process is not None
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            if child.process.poll() is not None:
                raise UnavailableError(
                    f"{child.name} exited with code {child.process.returncode}:\n{self.log_tail(child)}"
                )
            address = self._reported_address(child)
            if address is not None:
                child.address = address
                child.port = int(address.rsplit(":", 1)[1])
                self._forget_token(child)
                self.say(f"{child.name} ({child.role}) listening on {child.address}")
                return
            time.sleep(0.05)
        raise UnavailableError(f"{child.name} did not start within {START_TIMEOUT_S:.0f} s:\n{self.log_tail(child)}")

    def _serves(self, child: Child, timeout: float) -> bool:
        """One health check: does the child answer SERVING?"""
        with grpc.insecure_channel(child.address) as channel:
            try:
                status = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=timeout)
            except grpc.RpcError:
                return False
        return bool(status.status == health_pb2.HealthCheckResponse.SERVING)

    def _await_serving(self, child: Child) -> None:
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            if self._serves(child, HEALTH_CHECK_TIMEOUT_S):
                return
            time.sleep(0.1)
        raise UnavailableError(f"{child.name} at {child.address} never reported SERVING")

    def log_tail(self, child: Child, lines: int = 20) -> str:
        """The last lines its current (or last) process wrote to a child's log (at most the last 64 KiB)."""
        path = child.directory / "log.txt"
        try:
            with path.open("rb") as fh:
                size = fh.seek(0, os.SEEK_END)
                fh.seek(max(child.log_offset, size - LOG_TAIL_BYTES))
                text = fh.read().decode(errors="replace")
        except OSError as exc:
            return f"(log {path} unreadable: {exc.strerror})"
        return "\n".join(text.splitlines()[-lines:]) or "(the process wrote nothing)"

    def supervise(self) -> bool:
        """One round of supervision after :meth:`start`: notices exits, restarts nodes when due.

        A restarted node is ``up`` again once its new process has written its port
        file and answers SERVING; one that does not within ``START_TIMEOUT_S`` is
        killed and counts as another exit.

        Returns:
            False once the launcher has given up on every node.
        """
        changed = False
        for child in self.children:
            if child.state == DOWN:
                continue
            if child.process is None:
                if child.restart_at is not None and self.clock() >= child.restart_at:
                    self._restart(child)
                    changed = True
                continue
            code = child.process.poll()
            if code is not None:
                self._exited(child, f"exited with code {code}")
                changed = True
            elif child.state == RESTARTING:
                if self._reported_address(child) == child.address and self._serves(child, HEALTH_CHECK_TIMEOUT_S):
                    child.state, child.detail = UP, ""
                    self._forget_token(child)
                    self.say(f"[green]{child.name} is up again[/green] on {child.address} (restart {child.restarts})")
                    changed = True
                elif self.clock() >= child.serve_deadline:
                    child.process.kill()
                    self._reap(child)
                    self._exited(child, f"did not serve within {START_TIMEOUT_S:.0f} s")
                    changed = True
        if changed:
            self._write_state()
        return any(child.state != DOWN for child in self.children)

    def _exited(self, child: Child, reason: str) -> None:
        self.say(f"[red]{child.name} {reason}[/red]:\n{escape(self.log_tail(child))}")
        child.process = None
        delay = child.policy.on_exit()
        if delay is None:
            child.state = DOWN
            child.restart_at = None
            child.detail = (
                f"{reason}; gave up after {child.policy.max_restarts} restarts within {child.policy.window_s:.0f} s"
            )
            self.say(f"[red]giving up on {child.name}[/red] ({child.detail}); the other nodes keep running")
            return
        child.state = RESTARTING
        child.restart_at = self.clock() + delay
        child.detail = f"{reason}; restart {child.restarts + 1} in {delay:.1f} s"
        self.say(f"restarting {child.name} in {delay:.1f} s (restart {child.restarts + 1}) on {child.address}")

    def _restart(self, child: Child) -> None:
        child.restarts += 1
        child.restart_at = None
        child.serve_deadline = self.clock() + START_TIMEOUT_S
        try:
            self._launch(child, child.upstream, child.port)
        except OSError as exc:
            self._exited(child, f"could not be started: {exc}")
            return
        pid = child.process.pid if child.process is not None else "?"
        child.detail = f"restart {child.restarts}: pid {pid}, waiting for it to serve"

    @staticmethod
    def _reap(child: Child) -> None:
        if child.process is not None:
            with contextlib.suppress(subprocess.TimeoutExpired):  # unkillable (stuck in the kernel): nothing to do
                child.process.wait(STOP_GRACE_S)

    def _write_state(self) -> None:
        nodes = [
            {
                "name": child.name,
                "role": child.role,
                "address": child.address,
                "pid": child.process.pid if child.process is not None else None,
                "state": child.state,
                "restarts": child.restarts,
                "detail": child.detail,
            }
            for child in self.children
        ]
        record = {"launcher_pid": os.getpid(), "nodes": nodes}
        try:
            write_atomically(self.state_file, (json.dumps(record, indent=2) + "\n").encode())
        except OSError as exc:
            # A full disk or a removed state directory must not stop the nodes: status just sees less.
            self.say(f"[yellow]could not record node states in {self.state_file}: {exc.strerror}[/yellow]")

    def stop(self) -> None:
        """Stops every child, devices first; SIGKILL after the grace period."""
        self.endpoints_file.unlink(missing_ok=True)
        self.state_file.unlink(missing_ok=True)
        for child in reversed(self.children):
            if child.process is not None and child.process.poll() is None:
                child.process.send_signal(signal.SIGTERM)
                try:
                    child.process.wait(STOP_GRACE_S)
                except subprocess.TimeoutExpired:
                    child.process.kill()
                    self._reap(child)
            if child.log is not None:
                child.log.close()
                child.log = None
            self._forget_token(child)
        if self._lock is not None:
            self._lock.close()  # releases the state directory
            self._lock = None


class StopRequested(BaseException):
    """SIGINT or SIGTERM arrived; raised from the signal handler to end any wait at once."""


# While a child is being started, a stop signal is held here and raised right after.
_deferral = {"depth": 0, "pending": 0}


@contextlib.contextmanager
def _stop_deferred() -> Iterator[None]:
    _deferral["depth"] += 1
    try:
        yield
    finally:
        _deferral["depth"] -= 1
    pending, _deferral["pending"] = _deferral["pending"], 0
    if pending and not _deferral["depth"]:
        raise StopRequested(pending)


def _raise_stop(signum: int, frame: FrameType | None) -> None:
    # Ignore repeats first: a second Ctrl-C (or a supervisor's SIGTERM after
    # ours) must not cut the orderly stop short.
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, signal.SIG_IGN)
    if _deferral["depth"]:
        _deferral["pending"] = signum
        return
    raise StopRequested(signum)


def run_until_signal(mesh: Mesh, on_ready: Callable[[dict[str, Any]], None]) -> int:
    """Starts the mesh, calls ``on_ready`` and supervises it until SIGINT/SIGTERM.

    A node that exits is restarted (see :meth:`Mesh.supervise`); the others keep running.

    Returns:
        0 after a requested stop; 1 if the mesh did not start, or once every node has been given up on.
    """
    previous = {sig: signal.signal(sig, _raise_stop) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        try:
            on_ready(mesh.start())
        except UnavailableError as exc:
            mesh.say(f"[red]start failed:[/red] {escape(exc.message)}")
            return 1
        while mesh.supervise():
            time.sleep(SUPERVISE_INTERVAL_S)
        mesh.say("[red]every node has exited too often; giving up[/red]")
        return 1
    except StopRequested:
        return 0
    finally:
        for sig in previous:
            signal.signal(sig, signal.SIG_IGN)
        mesh.say("stopping the mesh")
        mesh.stop()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
