"""A real region process for the fleet simulator: ``python -m tier2_region --config region.toml`` on loopback.

:func:`publish_registry` builds a registry in a temp dir with versions of the tiny char-LM the
tests use (``tests.support.updater_node.publish_real``: real blobs, hand-made profiles, so it takes
a second rather than the minute the profiling pipeline takes; the simulated nodes never download
them). :class:`RegionProcess` writes the region's TOML (``[registry]``, ``[fleet]`` with a short
check interval, ``[telemetry]`` with short windows), starts it on a fixed loopback port (so a
restarted region is found where it was), waits for its port file, and can SIGKILL and restart it.
:meth:`RegionProcess.fleet` and :meth:`RegionProcess.controller` open the region's inventory from
this process, the way the ``edgecascade`` CLI does (SQLite lets both in), for enrollment tokens,
deployments and rollouts; :func:`edgecascade` runs the real CLI without blocking the event loop
that runs the simulated nodes.
"""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import tomli_w

from tier2_region.config import FleetSection
from tier2_region.fleet.catalog import RegistryCatalog
from tier2_region.fleet.fleet import Fleet
from tier2_region.fleet.inventory import Inventory
from tier2_region.fleet.rollout_controller import RolloutController
from tier2_region.registry.registry import ModelRegistry

ROOT = Path(__file__).resolve().parent.parent
MODEL = "lm"
VARIANT = "fp32"  # what publish_real publishes
EDGECASCADE = Path(sys.executable).parent / "edgecascade"


def publish_registry(root: Path, name: str = MODEL, versions: Sequence[str] = ("1", "2")) -> Path:
    """Creates a registry under ``root`` holding ``versions`` of the tiny char-LM; returns its directory.

    Each version is a different model (its own seed), published for this machine's hardware class.
    """
    # Test support builds and signs the models; imported here so that importing this module stays light.
    from tests.support.registry import new_registry
    from tests.support.updater_node import publish_real

    kit = new_registry(root)
    try:
        for seed, version in enumerate(versions, start=1):
            publish_real(kit, name=name, version=version, seed=seed)
    finally:
        kit.registry.close()
    return kit.registry.directory


def free_port() -> int:
    """A loopback port nobody listens on now (the region binds it a moment later)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


@dataclass(frozen=True)
class RegionSettings:
    """What the region process is configured with beyond its paths.

    Attributes:
        check_interval_s: ``[fleet] check_interval_s`` (nodes check in this often; offline after 3 missed).
        window_s: ``[telemetry] window_s``: the resolution of the figures a stage is judged on.
        log_level: ``[log] level``.
        telemetry: More ``[telemetry]`` settings (``queue_points``, …).
    """

    check_interval_s: int = 1
    window_s: int = 1
    log_level: str = "WARNING"
    telemetry: Mapping[str, Any] = field(default_factory=dict)


class RegionProcess:
    """One region process over files under ``root``.

    Args:
        root: Its directory (config, inventory, telemetry store, log).
        registry_dir: The registry it serves and assigns from.
        settings: Its intervals and windows.
    """

    def __init__(self, root: Path, registry_dir: Path, settings: RegionSettings | None = None) -> None:
        self.root = root
        self.registry_dir = registry_dir
        self.settings = settings or RegionSettings()
        self.fleet_path = root / "fleet.sqlite"
        self.telemetry_path = root / "telemetry.sqlite"
        self.config_path = root / "region.toml"
        self.port_file = root / "region.port.json"
        self.log_path = root / "region.log"
        self.port = free_port()
        self.process: subprocess.Popen[bytes] | None = None
        root.mkdir(parents=True, exist_ok=True)
        self._write_config()

    @property
    def address(self) -> str:
        """``host:port`` of the region (the same across restarts)."""
        return f"127.0.0.1:{self.port}"

    @property
    def pid(self) -> int:
        """The running process's id."""
        assert self.process is not None, "the region is not running"
        return self.process.pid

    def _write_config(self) -> None:
        s = self.settings
        config = {
            "server": {
                "node_id": "region-1",
                "host": "127.0.0.1",
                "port": self.port,
                "port_file": str(self.port_file),
                "grace_seconds": 0.5,
            },
            "repository": {"path": str(self.root / "region-models"), "preload": False},
            "registry": {"path": str(self.registry_dir)},
            "fleet": {"path": str(self.fleet_path), "check_interval_s": s.check_interval_s},
            "telemetry": {
                "path": str(self.telemetry_path),
                "window_s": s.window_s,
                "retention_s": max(3600, 2 * s.window_s),
                **s.telemetry,
            },
            "log": {"level": s.log_level},
        }
        self.config_path.write_bytes(tomli_w.dumps(config).encode())

    def start(self) -> None:
        """Starts the process (see :meth:`wait_ready`)."""
        assert self.process is None or self.process.poll() is not None, "the region is running already"
        self.port_file.unlink(missing_ok=True)
        env = {k: v for k, v in os.environ.items() if not k.startswith(("EDGECASCADE_", "OTEL_"))}
        env["PYTHONPATH"] = str(ROOT)
        with self.log_path.open("ab") as log:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "tier2_region", "--config", str(self.config_path)],
                cwd=ROOT,
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
            )

    async def wait_ready(self, timeout_s: float = 60.0) -> None:
        """Waits until the region serves (its port file is written).

        Raises:
            RuntimeError: It exited first, or did not serve within ``timeout_s`` (with its log's tail).
        """
        assert self.process is not None
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.port_file.is_file():
                return
            if self.process.poll() is not None:
                raise RuntimeError(f"the region exited with {self.process.returncode}:\n{self.log_tail()}")
            await asyncio.sleep(0.05)
        raise RuntimeError(f"the region did not serve within {timeout_s} s:\n{self.log_tail()}")

    async def start_and_wait(self, timeout_s: float = 60.0) -> None:
        """Starts the process and waits until it serves."""
        self.start()
        await self.wait_ready(timeout_s)

    def kill(self) -> None:
        """SIGKILLs the process (no goodbye: what was committed is all that is left)."""
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGKILL)
            self.process.wait(30)

    def stop(self, timeout_s: float = 20.0) -> None:
        """Stops the process gracefully (SIGTERM), SIGKILL if it does not exit within ``timeout_s``."""
        if self.process is None or self.process.poll() is not None:
            return
        self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(timeout_s)
        except subprocess.TimeoutExpired:
            self.kill()

    def log_tail(self, chars: int = 4000) -> str:
        """The end of the region's log."""
        if not self.log_path.is_file():
            return ""
        return self.log_path.read_bytes()[-chars:].decode(errors="replace")

    @contextmanager
    def fleet(self) -> Iterator[Fleet]:
        """The region's fleet, opened from this process (tokens, deployments, the rollouts' tables)."""
        registry = ModelRegistry(self.registry_dir)
        inventory = Inventory(self.fleet_path)
        try:
            settings = FleetSection(path=str(self.fleet_path), check_interval_s=self.settings.check_interval_s)
            yield Fleet(inventory, RegistryCatalog(registry), settings)
        finally:
            inventory.close()
            registry.close()

    @contextmanager
    def controller(self) -> Iterator[RolloutController]:
        """A rollout controller over the region's fleet, as the CLI builds it (no figures: it does not tick)."""
        with self.fleet() as fleet:
            yield RolloutController(fleet)

    def issue_tokens(self, count: int, ttl_s: float = 3600.0) -> list[str]:
        """``count`` one-time enrollment tokens (:meth:`~tier2_region.fleet.fleet.Fleet.create_token`)."""
        with self.fleet() as fleet:
            return [fleet.create_token(ttl_s).token for _ in range(count)]

    def location_args(self) -> list[str]:
        """The CLI options that name this region's inventory and registry."""
        return ["--fleet", str(self.fleet_path), "--registry", str(self.registry_dir)]


@dataclass(frozen=True)
class CliResult:
    """What a CLI run returned."""

    returncode: int
    stdout: str
    stderr: str


async def edgecascade(*args: str, timeout_s: float = 60.0) -> CliResult:
    """Runs ``edgecascade ARGS`` (the installed CLI) in a subprocess without blocking the event loop."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("EDGECASCADE_", "OTEL_"))}
    # A wide terminal: rich would wrap long lines of text output.
    env["COLUMNS"] = "400"
    process = await asyncio.create_subprocess_exec(
        str(EDGECASCADE),
        *args,
        cwd=ROOT,
        env=env,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        out, err = await asyncio.wait_for(process.communicate(), timeout_s)
    except TimeoutError:
        process.kill()
        await process.wait()
        raise
    return CliResult(process.returncode or 0, out.decode(), err.decode())
