"""One running tier node: the shared composition every tier's ``app.py`` starts.

Start order: repository, run pool and model cache → data plane and its
upstream → servicers, and the tier's components (:class:`TierSpec.components`,
each binding its services) → server (live, health NOT_SERVING) → the
components start, in their tier's order → the repository is preloaded, health
turns SERVING, ServerReady turns true, and the port file is written. Every part
registers its release on one exit stack as it is built, so stopping (or a
failed start) releases them in reverse: the server first (health NOT_SERVING,
calls in flight get their grace), then the components, the upstream channel,
the model cache, the pool and the telemetry providers. Everything is built
inside the running event loop; nothing happens at import time.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import json
import logging
import os
import signal
import socket
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from opentelemetry.sdk.metrics.export import MetricReader

from protos.edgecascade.v1 import mesh_pb2, mesh_pb2_grpc
from protos.inference import grpc_service_pb2, grpc_service_pb2_grpc
from services import __version__
from services.atomic_files import write_atomically
from services.cascade import Cascade
from services.cascade_generation import TokenCascadeSettings
from services.circuit_breaker import BreakerState, CircuitBreaker
from services.config import load_config
from services.dataplane import Dataplane, NoUpstream, RequestLimits, Upstream
from services.engine.model_cache import ModelCache
from services.engine.model_repository import ModelRepository
from services.engine.run_pool import RunPool
from services.engine.shadow import ShadowRunner
from services.errors import ConfigError
from services.event_loops import loop_factory, loop_name
from services.inference import NodeIdentity
from services.result_cache import ResultCache
from services.retry_budget import RetryBudget
from services.rpc.anomaly_log import AnomalyLog
from services.rpc.components import Component, ComponentFactory, NodeContext
from services.rpc.fleet_metrics import FleetMetrics
from services.rpc.guarded_upstream import GuardedUpstream, log_transition
from services.rpc.hard_example_log import HardExampleLog
from services.rpc.inference_client import InferenceClient
from services.rpc.inference_servicer import InferenceServicer
from services.rpc.mesh_servicer import MeshServicer
from services.rpc.metric_export import CountedMetricExporter, observe_exports, upstream_reader
from services.rpc.served_methods import Tracing
from services.rpc.server import GrpcServer, ServiceBinding
from services.rpc.telemetry import (
    NodeMetrics,
    build_meter_provider,
    build_tracer_provider,
    node_hardware_class,
    node_resource,
    traces_recorded,
)
from services.rpc.upstream import GrpcUpstream
from services.tier_config import (
    CascadeSection,
    TelemetrySection,
    TierConfig,
    TokenCascadeSection,
    check_node_id,
)

log = logging.getLogger("edgecascade.node")


def _token_cascade(cfg: TierConfig) -> TokenCascadeSettings | None:
    """The ``[token_cascade]`` settings of devices and edges; the region has none (no pairs: no token cascade)."""
    section = getattr(cfg, "token_cascade", None)
    return section.settings() if isinstance(section, TokenCascadeSection) else None


INFERENCE_SERVICE = grpc_service_pb2.DESCRIPTOR.services_by_name["GRPCInferenceService"].full_name
MESH_SERVICE = mesh_pb2.DESCRIPTOR.services_by_name["MeshService"].full_name

C = TypeVar("C")


@dataclass(frozen=True)
class TierSpec:
    """What distinguishes one tier's process from another's: stated by its ``app.py``.

    Attributes:
        tier: ``tier0``, ``tier1`` or ``tier2``.
        role: ``device``, ``edge`` or ``region`` (for names and messages).
        service_name: OpenTelemetry ``service.name``.
        top_of_chain: Whether the tier may have no upstream only (the region).
        config_type: The tier's configuration: the shared sections plus its own.
        components: What the tier adds to the node, in start order.
    """

    tier: str
    role: str
    service_name: str
    top_of_chain: bool = False
    config_type: type[TierConfig] = TierConfig
    components: tuple[ComponentFactory, ...] = ()


class Node:
    """A tier node built from its configuration.

    Args:
        spec: Which tier.
        config: The tier's configuration (of ``spec.config_type``).
        metric_readers: Extra OpenTelemetry metric readers (tests read metrics in memory).
    """

    def __init__(self, spec: TierSpec, config: TierConfig, metric_readers: Sequence[MetricReader] = ()) -> None:
        if not isinstance(config, spec.config_type):
            raise ConfigError(f"the {spec.role} needs a {spec.config_type.__name__}, got a {type(config).__name__}")
        if spec.top_of_chain and config.upstream.address:
            raise ConfigError(f"the {spec.role} is the top of the chain; [upstream] address must be empty")
        self.spec = spec
        self.config = config
        node_id = check_node_id(config.server.node_id or f"{spec.role}-{socket.gethostname()}")
        self.identity = NodeIdentity(spec.tier, node_id)
        self._ready = False
        self._cache: ModelCache | None = None
        self._components: list[Component] = []
        self._stack = contextlib.AsyncExitStack()
        resource = node_resource(self.identity, spec.service_name, __version__, node_hardware_class(config))
        self._tracer_provider = build_tracer_provider(resource)
        readers = list(metric_readers)
        self.metric_exporter: CountedMetricExporter | None = None  # None: [telemetry] export is off
        telemetry = getattr(config, "telemetry", None)
        target = ""
        if isinstance(telemetry, TelemetrySection) and telemetry.export:
            target = telemetry.target(config.upstream.address)
            if not target:
                raise ConfigError("[telemetry] export is on but there is no [telemetry] endpoint or [upstream] address")
            reader, self.metric_exporter = upstream_reader(telemetry, target)
            readers.append(reader)
        self._meter_provider = build_meter_provider(resource, readers)
        if self.metric_exporter is not None:
            observe_exports(self._meter_provider, self.metric_exporter)
        self._metrics = NodeMetrics(self._meter_provider)
        self.fleet_metrics = FleetMetrics(self._meter_provider)
        self.anomaly_log: AnomalyLog | None = None  # None: [telemetry] export or logs is off
        if isinstance(telemetry, TelemetrySection) and telemetry.sends_logs:
            self.anomaly_log = AnomalyLog(telemetry, target, resource, self._meter_provider)
            self.fleet_metrics.use_log(self.anomaly_log)
        self.hard_examples: HardExampleLog | None = None  # None: hard_examples_rate is 0 (the default) or logs are off
        if isinstance(telemetry, TelemetrySection) and self.anomaly_log is not None and telemetry.sends_hard_examples:
            self.hard_examples = HardExampleLog(telemetry, self.anomaly_log)
            log.warning(
                "[telemetry] hard_examples_rate is %g: that share of escalated inputs, with this node's and the "
                "upstream's answers, is sent to %s for retraining",
                telemetry.hard_examples_rate,
                target,
            )
        elif isinstance(telemetry, TelemetrySection) and telemetry.hard_examples_rate > 0:
            log.warning("[telemetry] hard_examples_rate is set but export or logs is off: no hard example is sent")
        self.address = ""

    async def flush_metrics(self, timeout_s: float = 10.0) -> None:
        """Collects and exports the node's metrics now, in a worker thread (the exporter blocks; the loop serves).

        Raises:
            Exception: A reader failed to collect (the SDK's own error; a failed export is only counted).
        """
        await asyncio.to_thread(self._meter_provider.force_flush, timeout_s * 1000)

    def component(self, kind: type[C]) -> C:
        """The running component of a type (for status and tests).

        Raises:
            LookupError: The tier has no such component.
        """
        for part in self._components:
            if isinstance(part, kind):
                return part
        raise LookupError(f"the {self.spec.role} has no {kind.__name__}")

    async def start(self) -> str:
        """Builds and starts everything; returns ``host:port`` once the node serves.

        Raises:
            ConfigError: The address cannot be bound, the repository path is
                unusable, or a component's settings are (what was built is released).
        """
        try:
            return await self._start()
        except BaseException:
            await self.stop()
            raise

    async def _start(self) -> str:
        cfg = self.config
        stack = self._stack
        # Telemetry goes last; flushing is blocking I/O, so the loop stays free (an in-process collector may need it).
        stack.push_async_callback(asyncio.to_thread, self._meter_provider.shutdown)
        stack.push_async_callback(asyncio.to_thread, self._tracer_provider.shutdown)
        if self.anomaly_log is not None:
            stack.push_async_callback(self.anomaly_log.shutdown)
        try:
            repository = ModelRepository(cfg.repository.path)
        except OSError as exc:
            raise ConfigError(f"[repository] path {cfg.repository.path} is not usable: {exc.strerror}") from None
        pool = RunPool(cfg.runtime.concurrent_runs)
        stack.callback(pool.close)
        cache = ModelCache(
            repository,
            pool,
            cfg.batching,
            cfg.cache.budget,
            intra_op_threads=cfg.runtime.intra_op_threads,
            observers=self._metrics.for_model,
        )
        stack.push_async_callback(cache.close)
        self._cache = cache
        self._metrics.attach(cache)
        upstream: Upstream = NoUpstream()
        if cfg.upstream.address:
            address = cfg.upstream.address

            def breaker_moved(old: BreakerState, new: BreakerState) -> None:
                log_transition(address, old, new, breaker.last_failure)
                self.fleet_metrics.breaker_moved(address, new)

            breaker = CircuitBreaker(address, cfg.upstream.breaker(), on_change=breaker_moved)
            guarded = GuardedUpstream(
                GrpcUpstream(
                    InferenceClient(address, self._tracer_provider, cfg.server.max_message_bytes),
                    self.identity,
                ),
                breaker,
                RetryBudget(cfg.upstream.retry()),
                cfg.upstream.retry(),
                ResultCache(cfg.upstream.result_cache()),
            )
            stack.push_async_callback(guarded.close)
            self.fleet_metrics.watch_upstream(guarded.status)
            upstream = guarded
        cascade = getattr(cfg, "cascade", None)  # devices and edges have a [cascade] section; the region uses defaults
        # Idle until the node's updater attaches a shadow cache and a check-in assigns a shadow.
        shadows = ShadowRunner(cache, self.fleet_metrics)
        stack.push_async_callback(shadows.close)
        dataplane = Dataplane(
            self.identity,
            cache,
            upstream,
            RequestLimits(cfg.requests.max_timeout_us, cfg.requests.max_hops),
            shadows,
            Cascade(cascade.settings() if isinstance(cascade, CascadeSection) else None),
            _token_cascade(cfg),
            self.hard_examples,
        )
        inference = InferenceServicer(dataplane, lambda: self._ready, self.fleet_metrics)
        mesh = MeshServicer(dataplane, cfg.upstream.address, self._components)  # its parts may add to GetTierInfo
        context = NodeContext(
            cfg, self.identity, self._tracer_provider, cache, self._meter_provider, self.fleet_metrics, shadows
        )
        for factory in self.spec.components:
            part = factory(context)
            # Released in reverse, after the server has stopped taking calls.
            stack.push_async_callback(part.stop)
            self._components.append(part)
        server = GrpcServer(
            cfg.server.host,
            cfg.server.port,
            [
                ServiceBinding(
                    INFERENCE_SERVICE,
                    lambda s: grpc_service_pb2_grpc.add_GRPCInferenceServiceServicer_to_server(inference, s),
                ),
                ServiceBinding(MESH_SERVICE, lambda s: mesh_pb2_grpc.add_MeshServiceServicer_to_server(mesh, s)),
                *(binding for part in self._components for binding in part.bindings),
            ],
            cfg.server.max_message_bytes,
            cfg.server.grace_seconds,
            Tracing(self._tracer_provider.get_tracer("edgecascade.rpc"), every_call=traces_recorded()),
        )
        port = await server.start()
        stack.push_async_callback(server.stop)
        self.address = f"{cfg.server.host}:{port}"
        for part in self._components:
            await part.start()
        if cfg.repository.preload:
            await cache.preload()
        await server.set_serving(True)
        self._ready = True
        for row in cache.index():
            log.info("model %s version %s: %s %s", row.name, row.version, row.state.value, row.reason)
        if cfg.server.port_file:
            _write_port_file(Path(cfg.server.port_file), self._port_record())
        log.info(
            "%s %s serving on %s (upstream: %s; event loop: %s)",
            self.spec.role,
            self.identity.node_id,
            self.address,
            cfg.upstream.address or "none",
            loop_name(asyncio.get_running_loop()),
        )
        return self.address

    def _port_record(self) -> dict[str, Any]:
        return {"address": self.address, "tier": self.spec.tier, "node_id": self.identity.node_id, "pid": os.getpid()}

    async def stop(self) -> None:
        """Stops serving gracefully and releases everything, in the reverse order of start (once)."""
        self._ready = False
        await self._stack.aclose()


def _write_port_file(path: Path, record: Mapping[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomically(path, json.dumps(record).encode())


async def serve(spec: TierSpec, config: TierConfig, stop: asyncio.Event) -> None:
    """Runs a node until ``stop`` is set, then shuts it down gracefully."""
    node = Node(spec, config)
    try:
        await node.start()
        await stop.wait()
    finally:
        log.info("%s %s stopping", spec.role, node.identity.node_id)
        await node.stop()


def main(spec: TierSpec, defaults: Mapping[str, Mapping[str, Any]], argv: Sequence[str] | None = None) -> int:
    """Command-line entry point of a tier: ``python -m tierN_… [--config FILE.toml]``.

    Returns:
        The process exit code: 0 after a clean stop (SIGTERM or Ctrl-C), 2 for a configuration error.
    """
    parser = argparse.ArgumentParser(
        prog=f"python -m {_module_name(spec)}",
        description=f"Run an edgecascade {spec.role} node ({spec.tier}) serving the Open Inference Protocol.",
        epilog="Every setting can also be given as EDGECASCADE_<SECTION>__<KEY>, e.g. EDGECASCADE_SERVER__PORT=8001; "
        "the environment wins over the file. Traces are exported by OTLP when OTEL_EXPORTER_OTLP_ENDPOINT is set.",
    )
    parser.add_argument(
        "--config",
        type=Path,
        help="TOML file with "
        + ", ".join(f"[{f.name}]" for f in dataclasses.fields(spec.config_type))
        + " (see the sections in the module docs of services.tier_config and of this tier's config)",
    )
    args = parser.parse_args(argv)
    try:
        config = load_config(spec.config_type, args.config, overrides=defaults)
    except ConfigError as exc:
        print(f"configuration error: {exc.message}", file=sys.stderr)
        return 2
    logging.basicConfig(
        level=config.log.level.upper(), format=f"%(asctime)s {spec.tier} %(levelname)s %(name)s: %(message)s"
    )
    try:
        with asyncio.Runner(loop_factory=loop_factory(config.server.event_loop)) as runner:
            runner.run(_run_until_signal(spec, config))
    except ConfigError as exc:
        print(f"configuration error: {exc.message}", file=sys.stderr)
        return 2
    return 0


def _module_name(spec: TierSpec) -> str:
    """The module the tier was started as (``tier0_device``), for ``--help``."""
    main_spec = sys.modules["__main__"].__spec__
    return main_spec.name.removesuffix(".__main__") if main_spec is not None else spec.tier


async def _run_until_signal(spec: TierSpec, config: TierConfig) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    try:
        await serve(spec, config, stop)
    finally:
        # uvloop does not give the signals back when it closes: a node stuck on its way out
        # (a thread that will not join) must still stop at a second SIGTERM or Ctrl-C.
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(sig)


__all__ = ["Node", "TierSpec", "main", "serve"]
