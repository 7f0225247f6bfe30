"""Adaptive logging end to end: device → edge (relay) → a real region, on loopback (issue 10, item 1).

The device is enrolled the way a real one is (its one-time token, through the
edge's fleet relay), sends its anomalies as OTLP logs with the stock SDK exporter
to its edge, and the edge relays their bytes to the region, which keeps them with
the request's trace id.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
from opentelemetry.proto.collector.logs.v1 import logs_service_pb2 as logs_pb
from opentelemetry.sdk.metrics.export import InMemoryMetricReader

from protos.inference import grpc_service_pb2_grpc as pb_grpc
from services.config import load_config
from services.rpc.anomaly_log import ROUTINE, AnomalyLog
from services.rpc.node import Node, TierSpec
from services.rpc.updates_service import NodeUpdatesService
from services.updates.checkin import machine_hardware_class
from tests.integration.conftest import populate
from tests.support.registry import new_registry
from tests.support.requests import infer_request
from tier0_device.app import SPEC as DEVICE
from tier1_edge.app import SPEC as EDGE
from tier1_edge.telemetry_relay_service import TelemetryRelayService
from tier2_region.app import SPEC as REGION
from tier2_region.fleet_service import FleetControl
from tier2_region.telemetry.points import Anomaly
from tier2_region.telemetry.receiver_service import TelemetryReceiver

X = {"x": np.ones((1, 4), np.float32)}
BAD = {"x": np.ones((1, 5), np.float32)}  # the linear models take 4 features


def _traceparent(n: int) -> tuple[str, str, tuple[tuple[str, str], ...]]:
    """A caller's trace id, its span id, and the W3C metadata that carries them."""
    trace_id, span_id = f"{0xA0 + n:032x}", f"{0xB0 + n:016x}"
    return trace_id, span_id, (("traceparent", f"00-{trace_id}-{span_id}-01"),)


@dataclass
class Chain:
    device: Node
    edge: Node
    region: Node
    reader: InMemoryMetricReader  # the device's metrics
    stub: pb_grpc.GRPCInferenceServiceStub

    @property
    def log(self) -> AnomalyLog:
        assert self.device.anomaly_log is not None
        return self.device.anomaly_log

    @property
    def receiver(self) -> TelemetryReceiver:
        return self.region.component(TelemetryReceiver)

    def anomalies(self) -> list[Anomaly]:
        store = self.receiver.store
        assert store is not None
        return store.anomalies("device-1")

    def device_sum(self, metric: str, **attributes: str) -> float:
        """A counter of the device's own, read in memory (its largest point among those with ``attributes``)."""
        data = self.reader.get_metrics_data()
        assert data is not None
        found = [
            float(getattr(p, "value", 0))
            for rm in data.resource_metrics
            for sm in rm.scope_metrics
            for m in sm.metrics
            if m.name == metric
            for p in m.data.data_points
            if all(p.attributes is not None and p.attributes.get(k) == v for k, v in attributes.items())
        ]
        return max(found, default=0.0)


async def eventually(done: Callable[[], bool], timeout_s: float = 20.0) -> None:
    """Polls a state other tasks and threads move (export, relay, store), within a bound."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    while loop.time() < deadline:
        if done():
            return
        await asyncio.sleep(0.02)
    raise AssertionError(f"not done within {timeout_s} s")


async def _node(spec: TierSpec, node_id: str, readers: tuple[Any, ...] = (), **sections: Mapping[str, Any]) -> Node:
    overrides: dict[str, Mapping[str, Any]] = {"server": {"node_id": node_id, "grace_seconds": 0.2}, **sections}
    node = Node(spec, load_config(spec.config_type, env={}, overrides=overrides), readers)
    await node.start()
    return node


@pytest.fixture
async def chain_factory(tmp_path: Path) -> AsyncIterator[Callable[..., Any]]:
    """Builds region ← edge ← device with the device's [telemetry] as given, once the device is enrolled."""
    populate(tmp_path)
    kit = new_registry(tmp_path)
    nodes: list[Node] = []
    channels: list[grpc.aio.Channel] = []

    async def build(**telemetry: Any) -> Chain:
        region = await _node(
            REGION,
            "region-1",
            repository={"path": str(tmp_path / "region")},
            registry={"path": str(kit.registry.directory)},
            fleet={"path": str(tmp_path / "fleet.sqlite")},
            telemetry={"path": str(tmp_path / "telemetry.sqlite")},
        )
        nodes.insert(0, region)
        fleet = region.component(FleetControl).fleet
        assert fleet is not None
        edge = await _node(
            EDGE, "edge-1", repository={"path": str(tmp_path / "edge")}, upstream={"address": region.address}
        )
        nodes.insert(0, edge)
        reader = InMemoryMetricReader()
        device = await _node(
            DEVICE,
            "device-1",
            (reader,),
            repository={"path": str(tmp_path / "device")},
            upstream={"address": edge.address},
            updates={
                "state_dir": str(tmp_path / "device-state"),
                "enrollment_token": fleet.create_token().token,
                "hardware_class": machine_hardware_class(),
                "check_interval_s": 0.2,
                "jitter": 0.0,
            },
            telemetry={"export": True, "interval_s": 3600, "timeout_s": 2.0, **telemetry},
        )
        nodes.insert(0, device)
        # The region keeps only what enrolled nodes send.
        await eventually(lambda: device.component(NodeUpdatesService).enrolled)
        channel = grpc.aio.insecure_channel(device.address)
        channels.append(channel)
        return Chain(device, edge, region, reader, pb_grpc.GRPCInferenceServiceStub(channel))

    try:
        yield build
    finally:
        for channel in channels:
            await channel.close()
        for node in nodes:
            await node.stop()
        kit.registry.close()


async def test_an_error_and_a_fallback_reach_the_region_as_anomalies_with_their_trace_ids(
    chain_factory: Callable[..., Any],
) -> None:
    chain: Chain = await chain_factory(elevated_sample_rate=1.0)
    error_trace, error_span, error_meta = _traceparent(1)
    with pytest.raises(grpc.aio.AioRpcError) as bad:
        await chain.stub.ModelInfer(infer_request("lin", BAD), metadata=error_meta)
    assert bad.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    fallback_trace, _, fallback_meta = _traceparent(2)
    await chain.stub.ModelInfer(infer_request("edge-only", X), metadata=fallback_meta)  # the device holds none
    await chain.stub.ModelInfer(infer_request("lin", X))  # ordinary: routine, sampled since the detail is raised

    await eventually(lambda: len(chain.anomalies()) == 2)
    by_trace = {a.trace_id: a for a in chain.anomalies()}
    assert set(by_trace) == {error_trace, fallback_trace}
    error, fallback = by_trace[error_trace], by_trace[fallback_trace]
    assert error.severity_text == "ERROR" and (error.model, error.version) == ("lin", "1")
    assert "InvalidArgumentError" in error.body
    # The span is the device's server span for the call, a child of the caller's.
    assert len(error.span_id) == 16 and error.span_id not in ("0" * 16, error_span)
    assert fallback.severity_text == "WARN" and fallback.model == "edge-only"
    assert "model_not_held" in fallback.body
    relay = chain.edge.component(TelemetryRelayService)
    # The region stores what it received before the relay's send returns and is counted: wait for the count.
    await eventually(lambda: relay.logs_buffer.stats.forwarded >= 1)
    assert relay.logs_buffer.stats.dropped == 0
    assert chain.log.stats.emitted == {"error": 1, "fallback": 1, ROUTINE: 1} and chain.log.stats.dropped == 0


async def test_anomalies_beyond_the_rate_limit_are_dropped_and_counted(chain_factory: Callable[..., Any]) -> None:
    chain: Chain = await chain_factory(anomalies_per_s=0.01, anomaly_burst=3)
    for _ in range(7):
        with pytest.raises(grpc.aio.AioRpcError):
            await chain.stub.ModelInfer(infer_request("lin", BAD))

    assert chain.log.stats.emitted == {"error": 3} and chain.log.stats.rate_limited == 4
    assert chain.device_sum("edgecascade.telemetry.logs.dropped", **{"edgecascade.drop.reason": "rate_limited"}) == 4
    await chain.log.flush()
    await eventually(lambda: len(chain.anomalies()) == 3)
    assert chain.receiver.counts.get("logs.accepted") == 3


async def test_routine_records_are_sampled_only_while_an_anomaly_has_raised_the_detail(
    chain_factory: Callable[..., Any],
) -> None:
    chain: Chain = await chain_factory(routine_sample_rate=0.0, elevated_sample_rate=1.0, elevated_s=0.5)
    for _ in range(5):
        await chain.stub.ModelInfer(infer_request("lin", X))
    await chain.log.flush()
    assert chain.log.stats.emitted == {} and chain.log.exporter.handed == 0  # rate 0: nothing sent

    with pytest.raises(grpc.aio.AioRpcError):
        await chain.stub.ModelInfer(infer_request("lin", BAD))
    assert chain.log.detail.elevated
    for _ in range(4):
        await chain.stub.ModelInfer(infer_request("lin", X))
    assert chain.log.stats.emitted == {"error": 1, ROUTINE: 4}
    # The region keeps the anomaly and counts the routine records it got as ignored.
    await eventually(lambda: chain.receiver.counts.get("logs.ignored") == 4 and len(chain.anomalies()) == 1)

    await eventually(lambda: not chain.log.detail.elevated)  # elevated_s after the anomaly, by the loop's timer
    assert (chain.log.detail.raised, chain.log.detail.lowered) == (1, 1)
    for _ in range(5):
        await chain.stub.ModelInfer(infer_request("lin", X))
    assert chain.log.stats.emitted == {"error": 1, ROUTINE: 4}
    transitions = {
        direction: chain.device_sum("edgecascade.telemetry.logs.detail", **{"edgecascade.detail.direction": direction})
        for direction in ("raised", "lowered")
    }
    assert transitions == {"raised": 1, "lowered": 1}


async def test_the_edge_holds_devices_logs_while_the_region_is_away_and_counts_what_it_drops(tmp_path: Path) -> None:
    populate(tmp_path)
    away = "127.0.0.1:9"  # nothing listens: every attempt fails and is retried
    edge = await _node(
        EDGE,
        "edge-1",
        repository={"path": str(tmp_path / "edge")},
        upstream={"address": away},
        telemetry={"relay_max_requests": 2, "timeout_s": 0.2},
    )
    try:
        relay = edge.component(TelemetryRelayService)
        request = logs_pb.ExportLogsServiceRequest()
        request.resource_logs.add().scope_logs.add().log_records.add(severity_number=17)
        async with grpc.aio.insecure_channel(edge.address) as channel:
            export: grpc.aio.UnaryUnaryMultiCallable[bytes, bytes] = channel.unary_unary(
                "/opentelemetry.proto.collector.logs.v1.LogsService/Export"
            )
            for _ in range(4):
                assert await export(request.SerializeToString(), timeout=5) == b""
            with pytest.raises(grpc.aio.AioRpcError) as garbage:
                await export(b"\xff\xff not protobuf", timeout=5)
        assert garbage.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "ExportLogsServiceRequest" in (garbage.value.details() or "")
        stats = relay.logs_buffer.stats
        assert stats.accepted == 4 and relay.buffer.stats.accepted == 0  # each signal has its own buffer
        await eventually(lambda: stats.dropped == 2 and stats.retries >= 1)
        assert stats.forwarded == 0
    finally:
        await edge.stop()
