"""The mesh ``bench.updates`` measures on: a real registry, region, edge and device processes on loopback.

* :func:`publish` creates dev signing keys and a registry in a temp dir and publishes, through
  the production pipeline (inspect → profile in fresh processes → gate → encrypt → sign), the
  demo device model ``charlm-device`` (fp32 and int8, as ``edgecascade up`` does) as versions
  1 and 2, and a ~20 MB model built here (one large initializer) as ``big-mlp`` version 1.
* :func:`mesh` runs a region (registry + fleet) and an edge in this process. The edge is the
  production edge with one instrument: its artifact service counts the bytes it streams per path
  (:class:`CountingArtifactCache`), so the resume measurement can say what a restarted device
  fetched again.
* Devices are separate processes: ``python -m tier0_device --config FILE`` (:class:`DeviceProcess`),
  or several device nodes in one ``python -m bench.device_host`` process for the lightweight fleet.
* :func:`probe` asks a device for a model with a real ``ModelInfer`` and returns the version that
  answered, when the device itself answered (``edgecascade.served_by``).

Everything listens on 127.0.0.1 and lives under the caller's temp dir. Code that waits is async:
the region and the edge run on this process's event loop and must keep serving meanwhile.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import numpy as np
from grpc import aio

from bench.update_load import served_by
from protos.edgecascade.v1 import artifacts_pb2 as artifacts_pb
from protos.edgecascade.v1 import artifacts_pb2_grpc as artifacts_grpc
from protos.inference import grpc_service_pb2 as pb
from protos.inference import grpc_service_pb2_grpc as pb_grpc
from services.config import load_config
from services.rpc.artifact_servicer import ARTIFACT_SERVICE, ArtifactServicer
from services.rpc.components import NodeContext
from services.rpc.node import Node
from services.rpc.server import ServiceBinding
from tier1_edge.app import SPEC as EDGE
from tier1_edge.cache_service import ArtifactCacheService
from tier1_edge.config import EdgeConfig
from tier2_region.app import SPEC as REGION
from tier2_region.config import RegionConfig
from tier2_region.fleet.fleet import Fleet
from tier2_region.fleet_service import FleetControl
from tier2_region.registry.pipeline import (
    PipelineOptions,
    ValidationChoice,
    default_hardware_class,
    prepare,
    publish_model,
)
from tier2_region.registry.profiler import ProfileSettings
from tier2_region.registry.registry import ModelRegistry, PublishedVariant
from tier2_region.registry.signing_keys import generate_keys, load_keys

ROOT = Path(__file__).resolve().parent.parent
MODELS = ROOT / "examples" / "models"
DEVICE_MODEL = "charlm-device"
DEVICE_FILES = {"fp32": MODELS / "charlm-device.onnx", "int8": MODELS / "charlm-device.int8.onnx"}
BIG_MODEL = "big-mlp"
BIG_WIDTH = 2048
# What `edgecascade up` profiles the demo models with (edgecascade/demo_registry.py).
DEMO_PROFILE = ProfileSettings(batch_sizes=(1, 8, 64), latency_runs=30, latency_budget_s=0.3)
DEMO_ROWS = 2000
BIG_PROFILE = ProfileSettings(batch_sizes=(1, 8), latency_runs=5, latency_budget_s=0.2)
BIG_ROWS = 200


# -- the registry ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Published:
    """The registry the benchmarks use and what is in it."""

    registry_dir: Path
    key_dir: Path
    root_file: Path
    device_model: dict[str, list[PublishedVariant]]  # version → its variants
    big: PublishedVariant
    big_plaintext_bytes: int
    big_rows: int
    seconds: float


def big_rows(megabytes: float) -> int:
    """The input width of the big model of about ``megabytes`` MiB."""
    return max(1, round(megabytes * 1024 * 1024 / (4 * BIG_WIDTH)))


def build_big_model(path: Path, megabytes: float) -> Path:
    """A model of about ``megabytes`` MiB, nearly all of it one initializer: x[batch, k] · W[k, 2048], then tanh."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rows = big_rows(megabytes)
    rng = np.random.default_rng(9)
    weight = numpy_helper.from_array((rng.standard_normal((rows, BIG_WIDTH)) / np.sqrt(rows)).astype(np.float32), "W")
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "W"], ["m"]), helper.make_node("Tanh", ["m"], ["y"])],
        "bench-big",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", rows])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", BIG_WIDTH])],
        initializer=[weight],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], producer_name="edgecascade-bench")
    model.ir_version = 9
    onnx.save(model, str(path))
    return path


def publish(work: Path, big_megabytes: float, say: Callable[[str], None]) -> Published:
    """Creates keys and a registry under ``work`` and publishes what the benchmarks deploy."""
    started = time.perf_counter()
    key_dir, registry_dir = work / "keys", work / "registry"
    generate_keys(key_dir)
    registry = ModelRegistry(registry_dir)
    try:
        registry.create(load_keys(key_dir, key_dir), 1, key_dir, key_dir)
        keys = load_keys(key_dir)
        say(f"registry: profiling {DEVICE_MODEL} (fp32, int8) in fresh processes")
        demo = PipelineOptions(profile=DEMO_PROFILE, validation=ValidationChoice(rows=DEMO_ROWS))
        submissions = prepare(DEVICE_FILES, "fp32", demo)
        device_model = {
            version: publish_model(registry, keys, DEVICE_MODEL, version, submissions, demo) for version in ("1", "2")
        }
        big_file = build_big_model(work / "big.onnx", big_megabytes)
        say(f"registry: profiling {BIG_MODEL} ({big_file.stat().st_size / 1e6:.1f} MB) in a fresh process")
        options = PipelineOptions(profile=BIG_PROFILE, validation=ValidationChoice(rows=BIG_ROWS))
        [big] = publish_model(registry, keys, BIG_MODEL, "1", prepare({"fp32": big_file}, "fp32", options), options)
        root_file = work / "root.json"
        root_file.write_bytes(registry.repository.trusted_root())
    finally:
        registry.close()
    return Published(
        registry_dir,
        key_dir,
        root_file,
        device_model,
        big,
        big_file.stat().st_size,
        big_rows(big_megabytes),
        time.perf_counter() - started,
    )


# -- the region and the edge, in this process ------------------------------------------------------------------


class _CountingServicer(artifacts_grpc.ArtifactServiceServicer):
    """The production artifact servicer, counting the bytes it hands to gRPC per path."""

    def __init__(self, inner: ArtifactServicer, served: Counter[str]) -> None:
        self._inner = inner
        self._served = served

    async def Fetch(
        self, request: artifacts_pb.FetchRequest, context: aio.ServicerContext[object, object]
    ) -> AsyncIterator[artifacts_pb.FetchResponse]:
        async for response in self._inner.Fetch(request, context):
            self._served[request.path] += len(response.data)
            yield response


class CountingArtifactCache(ArtifactCacheService):
    """The edge's artifact cache component, served through a byte-counting wrapper of the same servicer."""

    def __init__(self, context: NodeContext) -> None:
        super().__init__(context)
        self.served: Counter[str] = Counter()
        self._reader: ArtifactServicer | None = None
        self._counting: _CountingServicer | None = None
        config = context.config
        if self.cache is not None and isinstance(config, EdgeConfig):
            self._reader = ArtifactServicer(self.cache, config.artifacts.chunk_bytes)
            self._counting = _CountingServicer(self._reader, self.served)

    @property
    def bindings(self) -> Sequence[ServiceBinding]:
        """The artifact service, counted."""
        counting = self._counting
        if counting is None:
            return []
        return [
            ServiceBinding(
                ARTIFACT_SERVICE, lambda s: artifacts_grpc.add_ArtifactServiceServicer_to_server(counting, s)
            )
        ]

    def served_bytes(self, sha256: str) -> int:
        """Bytes streamed so far of the blob with this digest (its path ends in ``<sha256>.<name>``)."""
        return sum(count for path, count in self.served.items() if sha256 in path)

    async def stop(self) -> None:
        """Releases the counting servicer's readers, then what the component holds."""
        if self._reader is not None:
            self._reader.close()
        await super().stop()


COUNTING_EDGE = dataclasses.replace(
    EDGE, components=tuple(CountingArtifactCache if c is ArtifactCacheService else c for c in EDGE.components)
)


@dataclass
class Mesh:
    """A running region and edge."""

    work: Path
    region: Node
    edge: Node
    fleet: Fleet
    artifacts: CountingArtifactCache
    root_file: Path
    check_interval_s: int


@asynccontextmanager
async def mesh(work: Path, published: Published, check_interval_s: int) -> AsyncIterator[Mesh]:
    """A region (registry, fleet with its own inventory) and an edge (its own empty cache) under ``work``."""
    await asyncio.to_thread(work.mkdir, parents=True, exist_ok=True)
    region_settings: dict[str, Mapping[str, Any]] = {
        "server": {"node_id": "region-1", "grace_seconds": 0.5},
        "repository": {"path": str(work / "region-models")},
        "registry": {"path": str(published.registry_dir), "key_dir": str(published.key_dir)},
        "fleet": {"path": str(work / "fleet.sqlite"), "check_interval_s": check_interval_s},
    }
    region = Node(REGION, load_config(RegionConfig, env={}, overrides=region_settings))
    await region.start()
    try:
        edge_settings: dict[str, Mapping[str, Any]] = {
            "server": {"node_id": "edge-1", "grace_seconds": 0.5},
            "repository": {"path": str(work / "edge-models")},
            "upstream": {"address": region.address},
            "artifacts": {"cache_dir": str(work / "edge-cache"), "trusted_root": str(published.root_file)},
        }
        edge = Node(COUNTING_EDGE, load_config(EdgeConfig, env={}, overrides=edge_settings))
        await edge.start()
        try:
            fleet = region.component(FleetControl).fleet
            assert fleet is not None, "the region runs a fleet"
            yield Mesh(
                work, region, edge, fleet, edge.component(CountingArtifactCache), published.root_file, check_interval_s
            )
        finally:
            await edge.stop()
    finally:
        await region.stop()


# -- devices ---------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class DeviceFiles:
    """One device's configuration file, port file, state directory and log."""

    node_id: str
    config: Path
    port_file: Path
    state: Path
    log: Path

    @property
    def served_by(self) -> str:
        """The ``edgecascade.served_by`` of this device's own answers."""
        return f"tier0:{self.node_id}"


def write_toml(path: Path, sections: Mapping[str, Mapping[str, str | int | float | bool]]) -> Path:
    """A TOML file of flat sections (strings, numbers, booleans)."""
    lines = []
    for section, values in sections.items():
        lines.append(f"[{section}]")
        for key, value in values.items():
            text = ("true" if value else "false") if isinstance(value, bool) else json.dumps(value)
            lines.append(f"{key} = {text}")
        lines.append("")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines))
    return path


def device_files(m: Mesh, node_id: str, token: str) -> DeviceFiles:
    """Writes a device's configuration: upstream the edge, ``[updates]`` enrolling with ``token``."""
    home = m.work / node_id
    files = DeviceFiles(node_id, home / "device.toml", home / "port.json", home / "state", home / "device.log")
    write_toml(
        files.config,
        {
            "server": {"node_id": node_id, "port": 0, "port_file": str(files.port_file), "grace_seconds": 1.0},
            "repository": {"path": str(home / "models")},
            "upstream": {"address": m.edge.address},
            "updates": {
                "state_dir": str(files.state),
                "enrollment_token": token,
                "trusted_root": str(m.root_file),
                "hardware_class": default_hardware_class(),
                "check_interval_s": float(m.check_interval_s),
            },
            "log": {"level": "WARNING"},
        },
    )
    return files


def child_env() -> dict[str, str]:
    """This environment without settings that would change what a child node does."""
    return {
        k: v for k, v in os.environ.items() if not k.startswith("EDGECASCADE_") and k != "OTEL_EXPORTER_OTLP_ENDPOINT"
    }


def log_tail(path: Path, lines: int = 15) -> str:
    """The last lines of a log file."""
    if not path.is_file():
        return ""
    return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])


class NodeProcess:
    """A child process running device nodes, each of which writes its port file once it serves.

    Args:
        args: The command line.
        files: The devices it runs.
        log: Where its output goes.
    """

    def __init__(self, args: list[str], files: Sequence[DeviceFiles], log: Path) -> None:
        self.args = args
        self.files = list(files)
        self.log = log
        self.proc: subprocess.Popen[bytes] | None = None
        self.started_at = 0.0

    def start(self) -> None:
        """Starts the process (port files of an earlier run are removed first)."""
        for f in self.files:
            f.port_file.unlink(missing_ok=True)
        self.log.parent.mkdir(parents=True, exist_ok=True)
        with self.log.open("ab") as out:
            self.started_at = time.monotonic()
            self.proc = subprocess.Popen(self.args, stdout=out, stderr=subprocess.STDOUT, env=child_env(), cwd=ROOT)

    @property
    def pid(self) -> int:
        """The process id."""
        assert self.proc is not None
        return self.proc.pid

    async def ready(self, timeout_s: float = 120.0, poll_s: float = 0.005) -> list[str]:
        """Waits until every device writes its port file; returns their addresses.

        Raises:
            RuntimeError: The process exited or the time ran out (with the end of its log).
        """
        assert self.proc is not None
        deadline = time.monotonic() + timeout_s
        while not all(f.port_file.is_file() for f in self.files):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"{' '.join(self.args[1:])} did not start:\n{log_tail(self.log)}")
            await asyncio.sleep(poll_s)
        return [str(json.loads(f.port_file.read_text())["address"]) for f in self.files]

    def kill(self) -> None:
        """SIGKILL: no shutdown of any kind."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)

    async def wait(self, timeout_s: float) -> int | None:
        """Waits for the process to exit; returns its code (None if it is still running)."""
        assert self.proc is not None
        try:
            return await asyncio.to_thread(self.proc.wait, timeout_s)
        except subprocess.TimeoutExpired:
            return None

    async def stop(self) -> None:
        """SIGTERM (a graceful stop), SIGKILL after 30 s."""
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGTERM)
        if await self.wait(30.0) is None:
            self.kill()
            await self.wait(10.0)


def device_process(files: DeviceFiles) -> NodeProcess:
    """One device as operators run it: ``python -m tier0_device --config FILE``."""
    return NodeProcess([sys.executable, "-m", "tier0_device", "--config", str(files.config)], [files], files.log)


def host_process(files: Sequence[DeviceFiles], log: Path) -> NodeProcess:
    """Several device nodes in one process (``python -m bench.device_host``): the lightweight fleet."""
    return NodeProcess([sys.executable, "-m", "bench.device_host", *(str(f.config) for f in files)], files, log)


def journal_state(state: Path, model: str) -> tuple[str, str, str]:
    """(version, state, last error) of a model's latest update in a device's journal; empty when there is none."""
    try:
        data = json.loads((state / "journal" / f"{model}.json").read_text())
        return str(data["assignment"]["version"]), str(data["state"]), str(data.get("last_error", ""))
    except (OSError, ValueError, KeyError, TypeError):
        return "", "", ""


def journal_variant(state: Path, model: str) -> str:
    """The variant of a model's latest assignment in a device's journal ("" when there is none)."""
    try:
        return str(json.loads((state / "journal" / f"{model}.json").read_text())["assignment"]["variant"])
    except (OSError, ValueError, KeyError, TypeError):
        return ""


# -- asking a device -------------------------------------------------------------------------------------------


def float_request(model: str, name: str, width: int) -> pb.ModelInferRequest:
    """A request of one FP32 row of zeros."""
    request = pb.ModelInferRequest(model_name=model)
    request.inputs.add(name=name, datatype="FP32", shape=[1, width])
    request.raw_input_contents.append(np.zeros((1, width), dtype="<f4").tobytes())
    return request


async def probe(stub: pb_grpc.GRPCInferenceServiceStub, request: pb.ModelInferRequest, files: DeviceFiles) -> str:
    """The version that answers ``request`` on the device itself; "" when it failed or was answered elsewhere."""
    try:
        response = await stub.ModelInfer(request, timeout=10)
    except grpc.aio.AioRpcError:
        return ""
    return response.model_version if served_by(response) == files.served_by else ""


async def wait_serving(
    addresses: Sequence[str],
    files: Sequence[DeviceFiles],
    request: pb.ModelInferRequest,
    version: str,
    timeout_s: float,
    poll_s: float = 0.05,
) -> list[float]:
    """Asks every device until it answers ``request`` itself with ``version``; returns each one's monotonic time.

    Raises:
        TimeoutError: A device did not within ``timeout_s`` (its journal state is in the message).
    """
    channels = [aio.insecure_channel(a) for a in addresses]
    try:

        async def one(channel: aio.Channel, f: DeviceFiles) -> float:
            stub = pb_grpc.GRPCInferenceServiceStub(channel)
            deadline = time.monotonic() + timeout_s
            while await probe(stub, request, f) != version:
                if time.monotonic() > deadline:
                    state = journal_state(f.state, request.model_name)
                    raise TimeoutError(f"{f.node_id} did not serve {request.model_name} v{version}: journal {state}")
                await asyncio.sleep(poll_s)
            return time.monotonic()

        return list(await asyncio.gather(*(one(c, f) for c, f in zip(channels, files, strict=True))))
    finally:
        for channel in channels:
            await channel.close()


async def wait_journal(files: DeviceFiles, model: str, version: str, states: set[str], timeout_s: float) -> str:
    """Polls a device's journal until the model's update of ``version`` reaches one of ``states``.

    Raises:
        TimeoutError: It did not within ``timeout_s``.
    """
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        got, state, _ = journal_state(files.state, model)
        if got == version and state in states:
            return state
        await asyncio.sleep(0.02)
    raise TimeoutError(
        f"{files.node_id}: {model} v{version} never reached {sorted(states)}: {journal_state(files.state, model)}"
    )
