"""One running tier node: the shared composition every tier's ``app.py`` starts.

Start order: tracer provider → repository, run pool and model cache → data plane →
upstream client → servicers (and the artifact service: the region's registry or
the edge's verifying cache) → server (live, health NOT_SERVING); then the
repository is preloaded, health turns SERVING, ServerReady turns true, and the
port file is written. Stop order is the reverse,
with health NOT_SERVING first. Everything is built inside the running event
loop; nothing happens at import time.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import signal
import socket
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from opentelemetry.sdk.metrics.export import MetricReader

from protos.edgecascade.v1 import mesh_pb2, mesh_pb2_grpc
from protos.inference import grpc_service_pb2, grpc_service_pb2_grpc
from services import __version__
from services.atomic_files import write_atomically
from services.config import load_config
from services.dataplane import Dataplane, NoUpstream, RequestLimits, Upstream
from services.errors import ConfigError
from services.inference import NodeIdentity
from services.model_cache import ModelCache
from services.model_repository import ModelRepository
from services.rpc.artifact_host import ArtifactHost
from services.rpc.inference_client import InferenceClient
from services.rpc.inference_servicer import InferenceServicer
from services.rpc.mesh_servicer import MeshServicer
from services.rpc.server import GrpcServer, ServiceBinding
from services.rpc.telemetry import NodeMetrics, build_meter_provider, build_tracer_provider, node_resource
from services.rpc.upstream import GrpcUpstream
from services.run_pool import RunPool
from services.tier_config import TierConfig, check_node_id

log = logging.getLogger("edgecascade.node")

INFERENCE_SERVICE = grpc_service_pb2.DESCRIPTOR.services_by_name["GRPCInferenceService"].full_name
MESH_SERVICE = mesh_pb2.DESCRIPTOR.services_by_name["MeshService"].full_name


@dataclass(frozen=True)
class TierSpec:
    """What distinguishes one tier's process from another's."""

    tier: str  # tier0, tier1, tier2
    role: str  # device, edge, region
    service_name: str  # OpenTelemetry service.name
    top_of_chain: bool = False
    artifact_role: str = ""  # origin (region), cache (edge) or "" (serves no artifacts)


class Node:
    """A tier node built from its configuration.

    Args:
        spec: Which tier.
        config: The tier's configuration.
        metric_readers: Extra OpenTelemetry metric readers (tests read metrics in memory).
    """

    def __init__(self, spec: TierSpec, config: TierConfig, metric_readers: Sequence[MetricReader] = ()) -> None:
        if spec.top_of_chain and config.upstream.address:
            raise ConfigError(f"the {spec.role} is the top of the chain; [upstream] address must be empty")
        self.spec = spec
        self.config = config
        node_id = check_node_id(config.server.node_id or f"{spec.role}-{socket.gethostname()}")
        self.identity = NodeIdentity(spec.tier, node_id)
        self._ready = False
        self._server: GrpcServer | None = None
        self._upstream: GrpcUpstream | None = None
        self._cache: ModelCache | None = None
        self._pool: RunPool | None = None
        self._artifacts: ArtifactHost | None = None
        resource = node_resource(self.identity, spec.service_name, __version__)
        self._tracer_provider = build_tracer_provider(resource)
        self._meter_provider = build_meter_provider(resource, metric_readers)
        self._metrics = NodeMetrics(self._meter_provider)
        self.address = ""

    async def start(self) -> str:
        """Builds and starts everything; returns ``host:port`` once the node serves.

        Raises:
            ConfigError: The address cannot be bound or the repository path is unusable.
        """
        cfg = self.config
        try:
            repository = ModelRepository(cfg.repository.path)
        except OSError as exc:
            raise ConfigError(f"[repository] path {cfg.repository.path} is not usable: {exc.strerror}") from None
        self._pool = RunPool(cfg.runtime.concurrent_runs)
        self._cache = ModelCache(
            repository,
            self._pool,
            cfg.batching,
            cfg.cache.budget,
            intra_op_threads=cfg.runtime.intra_op_threads,
            observers=self._metrics.for_model,
        )
        self._metrics.attach(self._cache)
        upstream: Upstream = NoUpstream()
        if cfg.upstream.address:
            self._upstream = GrpcUpstream(
                InferenceClient(cfg.upstream.address, self._tracer_provider, cfg.server.max_message_bytes),
                self.identity,
            )
            upstream = self._upstream
        dataplane = Dataplane(
            self.identity,
            self._cache,
            upstream,
            RequestLimits(cfg.requests.max_timeout_us, cfg.requests.max_hops),
        )
        inference = InferenceServicer(dataplane, lambda: self._ready)
        mesh = MeshServicer(dataplane, cfg.upstream.address)
        self._artifacts = ArtifactHost(self.spec.artifact_role, cfg)
        self._server = GrpcServer(
            cfg.server.host,
            cfg.server.port,
            [
                ServiceBinding(
                    INFERENCE_SERVICE,
                    lambda s: grpc_service_pb2_grpc.add_GRPCInferenceServiceServicer_to_server(inference, s),
                ),
                ServiceBinding(MESH_SERVICE, lambda s: mesh_pb2_grpc.add_MeshServiceServicer_to_server(mesh, s)),
                *self._artifacts.bindings,
            ],
            cfg.server.max_message_bytes,
            cfg.server.grace_seconds,
            self._tracer_provider,
        )
        port = await self._server.start()
        self.address = f"{cfg.server.host}:{port}"
        await self._artifacts.start()
        if cfg.repository.preload:
            await self._cache.preload()
        await self._server.set_serving(True)
        self._ready = True
        for row in self._cache.index():
            log.info("model %s version %s: %s %s", row.name, row.version, row.state.value, row.reason)
        if cfg.server.port_file:
            _write_port_file(Path(cfg.server.port_file), self._port_record())
        log.info(
            "%s %s serving on %s (upstream: %s)",
            self.spec.role,
            self.identity.node_id,
            self.address,
            cfg.upstream.address or "none",
        )
        return self.address

    def _port_record(self) -> dict[str, Any]:
        return {"address": self.address, "tier": self.spec.tier, "node_id": self.identity.node_id, "pid": os.getpid()}

    async def stop(self) -> None:
        """Stops serving gracefully and releases everything."""
        self._ready = False
        if self._server is not None:
            await self._server.stop()
        if self._artifacts is not None:
            await self._artifacts.stop()
        if self._upstream is not None:
            await self._upstream.close()
        if self._cache is not None:
            await self._cache.close()
        if self._pool is not None:
            self._pool.close()
        # Flushing spans is blocking I/O; the loop must stay free (an in-process collector may need it).
        await asyncio.to_thread(self._tracer_provider.shutdown)
        await asyncio.to_thread(self._meter_provider.shutdown)


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
        prog=f"python -m {sys.modules['__main__'].__spec__.name if sys.modules['__main__'].__spec__ else spec.tier}",
        description=f"Run an edgecascade {spec.role} node ({spec.tier}) serving the Open Inference Protocol.",
        epilog="Every setting can also be given as EDGECASCADE_<SECTION>__<KEY>, e.g. EDGECASCADE_SERVER__PORT=8001; "
        "the environment wins over the file. Traces are exported by OTLP when OTEL_EXPORTER_OTLP_ENDPOINT is set.",
    )
    parser.add_argument(
        "--config",
        type=Path,
        help="TOML file with [server], [repository], [upstream], [runtime], [requests], [batching], [cache], "
        "[registry], [artifacts], [log]",
    )
    args = parser.parse_args(argv)
    try:
        config = load_config(TierConfig, args.config, overrides=defaults)
    except ConfigError as exc:
        print(f"configuration error: {exc.message}", file=sys.stderr)
        return 2
    logging.basicConfig(
        level=config.log.level.upper(), format=f"%(asctime)s {spec.tier} %(levelname)s %(name)s: %(message)s"
    )
    # The gRPC instrumentation warns once per call whose peer already left; that is routine under load.
    logging.getLogger("opentelemetry.instrumentation.grpc._server").setLevel(logging.ERROR)
    try:
        asyncio.run(_run_until_signal(spec, config))
    except ConfigError as exc:
        print(f"configuration error: {exc.message}", file=sys.stderr)
        return 2
    return 0


async def _run_until_signal(spec: TierSpec, config: TierConfig) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await serve(spec, config, stop)


__all__ = ["Node", "TierSpec", "main", "serve"]
