"""Nodes' metrics by OTLP: device → edge (relay) → a stand-in for the region, on loopback.

The device records each request (outcome, fallback reason, latency, confidence) and
exports with the stock OTLP exporter to its edge; the edge relays the bytes it got
through a bounded buffer to the receiver above it, keeps them while the receiver is
away, and drops (and counts) the oldest when the buffer is full.
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
from opentelemetry.proto.collector.metrics.v1 import metrics_service_pb2 as otlp
from opentelemetry.sdk.metrics.export import InMemoryMetricReader

from protos.inference import grpc_service_pb2_grpc as pb_grpc
from services.config import load_config
from services.rpc.node import Node, TierSpec
from services.telemetry_names import (
    CONFIDENCE,
    ERROR,
    FALLBACK_REASON,
    FORWARDED,
    HARDWARE_CLASS,
    LATENCY,
    LATENCY_BOUNDS_MS,
    MODEL_NAME,
    MODEL_VARIANT,
    MODEL_VERSION,
    NODE_ID,
    NODE_TIER,
    OK,
    OUTCOME,
    REJECTED,
    REQUESTS,
    UNRESOLVED,
    UPDATE_OUTCOMES,
)
from services.updates.checkin import machine_hardware_class
from tests.integration.conftest import populate
from tests.support.otlp_metrics_receiver import OtlpMetricsReceiver, Point
from tests.support.registry import new_registry
from tests.support.requests import infer_request, params, text_request
from tests.support.updater_node import publish_real
from tier0_device.app import SPEC as DEVICE
from tier1_edge.app import SPEC as EDGE
from tier1_edge.telemetry_relay_service import TelemetryRelayService
from tier2_region.app import SPEC as REGION
from tier2_region.fleet_service import FleetControl

X = {"x": np.ones((1, 4), np.float32)}
BAD = {"x": np.ones((1, 5), np.float32)}  # the linear models take 4 features


async def start(spec: TierSpec, repository: Path, node_id: str, upstream: str = "", **sections: Any) -> Node:
    overrides: dict[str, Mapping[str, Any]] = {
        "server": {"node_id": node_id, "grace_seconds": 0.2},
        "repository": {"path": str(repository)},
        "upstream": {"address": upstream},
        **sections,
    }
    node = Node(spec, load_config(spec.config_type, env={}, overrides=overrides))
    await node.start()
    return node


@dataclass
class Mesh:
    device: Node
    edge: Node
    receiver: OtlpMetricsReceiver
    stub: pb_grpc.GRPCInferenceServiceStub

    @property
    def relay(self) -> TelemetryRelayService:
        return self.edge.component(TelemetryRelayService)


@pytest.fixture
async def mesh_factory(tmp_path: Path) -> AsyncIterator[Callable[..., Any]]:
    """Builds receiver ← edge ← device; the edge sends its own metrics and its devices' to the receiver."""
    populate(tmp_path)
    nodes: list[Node] = []
    receivers: list[OtlpMetricsReceiver] = []
    channels: list[grpc.aio.Channel] = []

    async def build(device_telemetry: Mapping[str, Any], edge_telemetry: Mapping[str, Any] = {}) -> Mesh:
        receiver = OtlpMetricsReceiver()
        receivers.append(receiver)
        await receiver.start()
        edge = await start(
            EDGE,
            tmp_path / "edge",
            "edge-1",
            telemetry={"endpoint": receiver.address, "interval_s": 3600, "timeout_s": 0.5, **edge_telemetry},
        )
        nodes.append(edge)
        device = await start(
            DEVICE,
            tmp_path / "device",
            "device-1",
            upstream=edge.address,
            telemetry={"interval_s": 3600, "timeout_s": 2.0, **device_telemetry},
            updates={"hardware_class": "test-board"},
        )
        nodes.insert(0, device)
        channel = grpc.aio.insecure_channel(device.address)
        channels.append(channel)
        return Mesh(device, edge, receiver, pb_grpc.GRPCInferenceServiceStub(channel))

    try:
        yield build
    finally:
        for channel in channels:
            await channel.close()
        for receiver in receivers:
            await receiver.stop()  # first: a node's last export at stop then fails fast instead of being received
        for node in nodes:
            await node.stop()


def of(points: list[Point], metric: str, node_id: str, **attributes: str) -> list[Point]:
    return [
        p
        for p in points
        if p.metric == metric
        and p.resource.get(NODE_ID) == node_id
        and all(p.attributes.get(k) == v for k, v in attributes.items())
    ]


def latest(points: list[Point]) -> float:
    """A cumulative counter's value: the largest of its reports."""
    assert points, "no such point"
    return max(p.value or 0 for p in points)


async def eventually(done: Callable[[], bool], timeout_s: float = 20.0) -> None:
    """Polls a state owned by a background task (the relay's sender), within a bound."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    while loop.time() < deadline:
        if done():
            return
        await asyncio.sleep(0.02)
    raise AssertionError(f"not done within {timeout_s} s")


async def test_requests_reach_the_region_stand_in_through_the_edge_with_the_devices_resource(
    mesh_factory: Callable[..., Any],
) -> None:
    mesh: Mesh = await mesh_factory({"export": True}, {"export": True})
    for _ in range(3):
        await mesh.stub.ModelInfer(infer_request("lin", X))
    for i in range(2):
        # The device holds no such model. Two inputs: a repeated one would be answered from its result cache.
        await mesh.stub.ModelInfer(infer_request("edge-only", {"x": X["x"] + i}))
    with pytest.raises(grpc.aio.AioRpcError) as bad:
        await mesh.stub.ModelInfer(infer_request("lin", BAD))
    assert bad.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    with pytest.raises(grpc.aio.AioRpcError) as missing:
        await mesh.stub.ModelInfer(infer_request("nowhere", X))  # forwarded, and the edge holds none either
    assert missing.value.code() == grpc.StatusCode.NOT_FOUND
    replies = [r async for r in mesh.stub.ModelStreamInfer(_one(text_request("lm", "abc", max_tokens=4)))]
    assert not any(r.error_message for r in replies)

    await mesh.device.flush_metrics()
    await mesh.receiver.wait_for(lambda: any(p.resource.get(NODE_ID) == "device-1" for p in mesh.receiver.points()))
    await eventually(lambda: mesh.relay.buffer.stats.forwarded == 1)  # counted once the receiver has answered
    await mesh.edge.flush_metrics()
    await mesh.receiver.wait_for(lambda: any(p.resource.get(NODE_ID) == "edge-1" for p in mesh.receiver.points()))
    got = mesh.receiver.points()

    device = [p for p in got if p.resource.get(NODE_ID) == "device-1"]
    # The device's own resource, as the device made it: the edge forwarded its bytes and added nothing.
    for p in device:
        assert p.resource[NODE_TIER] == "tier0"
        assert p.resource[HARDWARE_CLASS] == "test-board"
        assert p.resource["service.name"] == "edgecascade-tier0"
    assert {p.resource.get(NODE_ID) for p in got} == {"device-1", "edge-1"}

    def requests(node: str, **attrs: str) -> float:
        return latest(of(got, REQUESTS, node, **attrs))

    assert requests("device-1", **{MODEL_NAME: "lin", MODEL_VERSION: "1", OUTCOME: OK}) == 3
    # Bad input is the caller's mistake: counted, but as rejected, never as an error of the version.
    assert requests("device-1", **{MODEL_NAME: "lin", MODEL_VERSION: "1", OUTCOME: REJECTED}) == 1
    assert not of(got, REQUESTS, "device-1", **{MODEL_NAME: "lin", MODEL_VERSION: "1", OUTCOME: ERROR})
    forwarded = of(got, REQUESTS, "device-1", **{MODEL_NAME: "edge-only", OUTCOME: FORWARDED})
    assert latest(forwarded) == 2
    assert forwarded[0].attributes[FALLBACK_REASON] == "model_not_held"
    assert forwarded[0].attributes[MODEL_VERSION] == UNRESOLVED  # the device chose no version of it
    assert forwarded[0].monotonic is True
    failed_above = of(got, REQUESTS, "device-1", **{MODEL_NAME: "nowhere", OUTCOME: REJECTED})  # nobody holds it
    assert latest(failed_above) == 1 and failed_above[0].attributes[FALLBACK_REASON] == "model_not_held"
    assert all(p.attributes[MODEL_VARIANT] == "" for p in of(got, REQUESTS, "device-1"))  # nothing installed here
    assert FALLBACK_REASON not in of(got, REQUESTS, "device-1", **{MODEL_NAME: "lin", OUTCOME: OK})[0].attributes

    latency = of(got, LATENCY, "device-1", **{MODEL_NAME: "lin", MODEL_VERSION: "1", OUTCOME: OK})
    assert max(p.count or 0 for p in latency) == 3
    assert latency[0].bounds == LATENCY_BOUNDS_MS and 0 < (latency[0].sum or 0) < 10_000
    assert not of(got, LATENCY, "device-1", **{OUTCOME: ERROR}), "an error has no latency to speak of"
    confidence = of(got, CONFIDENCE, "device-1", **{MODEL_NAME: "lm"})
    assert max(p.count or 0 for p in confidence) == 1 and 0 < (confidence[0].sum or 0) <= 1

    # The edge answered the forwarded calls itself, and reports them as its own.
    assert requests("edge-1", **{MODEL_NAME: "edge-only", MODEL_VERSION: "1", OUTCOME: OK}) == 2
    edge = of(got, REQUESTS, "edge-1")
    assert edge[0].resource[NODE_TIER] == "tier1" and edge[0].resource[HARDWARE_CLASS] == machine_hardware_class()
    relayed = of(got, "edgecascade.telemetry.relay.requests", "edge-1", **{"edgecascade.relay.result": "forwarded"})
    assert latest(relayed) == 1
    assert mesh.device.metric_exporter is not None and mesh.device.metric_exporter.failed == 0


async def test_the_relay_forwards_the_bytes_it_got(mesh_factory: Callable[..., Any]) -> None:
    mesh: Mesh = await mesh_factory({})
    request = otlp.ExportMetricsServiceRequest()
    attribute = request.resource_metrics.add().resource.attributes.add(key=NODE_ID)
    attribute.value.string_value = "device-7"
    # A field this edge's OTLP does not know (a newer sender's) must reach the region too.
    sent = request.SerializeToString() + b"\xa2\x06\x03new"
    async with grpc.aio.insecure_channel(mesh.edge.address) as channel:
        export: grpc.aio.UnaryUnaryMultiCallable[bytes, bytes] = channel.unary_unary(
            "/opentelemetry.proto.collector.metrics.v1.MetricsService/Export"
        )
        assert await export(sent, timeout=5) == b""
        with pytest.raises(grpc.aio.AioRpcError) as garbage:
            await export(b"\xff\xff not protobuf", timeout=5)
    assert garbage.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    await mesh.receiver.wait_for(lambda: len(mesh.receiver.raw) == 1)
    assert mesh.receiver.raw == [sent]


async def test_the_relay_holds_metrics_while_the_region_is_down_and_forwards_them_after(
    mesh_factory: Callable[..., Any],
) -> None:
    mesh: Mesh = await mesh_factory({"export": True})
    port = mesh.receiver.port
    await mesh.receiver.stop()
    await mesh.stub.ModelInfer(infer_request("lin", X))

    await mesh.device.flush_metrics()  # the edge takes it though the region is away
    stats = mesh.relay.buffer.stats
    assert stats.accepted == 1
    assert mesh.device.metric_exporter is not None and mesh.device.metric_exporter.succeeded == 1
    await eventually(lambda: stats.retries >= 2)  # tried, failed, kept
    assert stats.forwarded == 0 and stats.dropped == 0 and not mesh.receiver.raw

    await mesh.receiver.start(port)
    await mesh.receiver.wait_for(lambda: len(mesh.receiver.raw) == 1)
    await eventually(lambda: stats.forwarded == 1)
    assert stats.dropped == 0 and len(mesh.relay.buffer) == 0
    ok = of(mesh.receiver.points(), REQUESTS, "device-1", **{MODEL_NAME: "lin", OUTCOME: OK})
    assert latest(ok) == 1


async def test_a_request_the_region_refuses_for_good_is_dropped_not_retried(mesh_factory: Callable[..., Any]) -> None:
    mesh: Mesh = await mesh_factory({"export": True})
    mesh.receiver.refuse = grpc.StatusCode.PERMISSION_DENIED  # the region does not know the device
    await mesh.stub.ModelInfer(infer_request("lin", X))
    await mesh.device.flush_metrics()
    stats = mesh.relay.buffer.stats
    await eventually(lambda: stats.rejected == 1)
    assert mesh.receiver.refused == 1 and stats.retries == 0 and len(mesh.relay.buffer) == 0

    mesh.receiver.refuse = None
    await mesh.device.flush_metrics()
    await mesh.receiver.wait_for(lambda: len(mesh.receiver.raw) == 1)
    await eventually(lambda: stats.forwarded == 1)
    assert stats.rejected == 1 and mesh.receiver.refused == 1


async def test_a_full_relay_drops_the_oldest_and_counts_them(mesh_factory: Callable[..., Any]) -> None:
    mesh: Mesh = await mesh_factory({"export": True}, {"export": True, "relay_max_requests": 2})
    port = mesh.receiver.port
    await mesh.receiver.stop()
    for _ in range(4):  # the k-th export counts k requests: each can be told apart
        await mesh.stub.ModelInfer(infer_request("lin", X))
        await mesh.device.flush_metrics()
    stats = mesh.relay.buffer.stats
    assert stats.accepted == 4
    # Two held; the others were dropped, the last of them when a failed attempt put it back behind newer ones.
    await eventually(lambda: stats.dropped == 2)

    await mesh.receiver.start(port)
    await eventually(lambda: stats.forwarded == 2)
    counts = sorted(
        latest(of(_points(raw), REQUESTS, "device-1", **{MODEL_NAME: "lin", OUTCOME: OK})) for raw in mesh.receiver.raw
    )
    assert counts == [3, 4], "the newest two exports survive"
    assert stats.dropped == 2 and stats.dropped_bytes > 0

    await mesh.edge.flush_metrics()
    await mesh.receiver.wait_for(lambda: any(p.resource.get(NODE_ID) == "edge-1" for p in mesh.receiver.points()))
    dropped = of(
        mesh.receiver.points(),
        "edgecascade.telemetry.relay.requests",
        "edge-1",
        **{"edgecascade.relay.result": "dropped"},
    )
    assert latest(dropped) == 2


async def test_with_export_off_nothing_is_sent_and_no_exporter_is_built(mesh_factory: Callable[..., Any]) -> None:
    mesh: Mesh = await mesh_factory({})  # [telemetry] export defaults to off
    await mesh.stub.ModelInfer(infer_request("lin", X))
    assert mesh.device.metric_exporter is None and mesh.edge.metric_exporter is None
    await mesh.device.flush_metrics()
    await mesh.edge.flush_metrics()
    assert mesh.relay.buffer.stats.accepted == 0
    assert not mesh.receiver.raw


async def test_an_installed_version_labels_its_requests_with_its_variant_and_its_update_states_are_counted(
    tmp_path: Path,
) -> None:
    kit = new_registry(tmp_path)
    publish_real(kit, "lm", "1")
    root = tmp_path / "root.json"
    root.write_bytes(kit.registry.repository.trusted_root())
    region = await start(
        REGION,
        tmp_path / "region-models",
        "region-1",
        registry={"path": str(kit.registry.directory)},
        fleet={"path": str(tmp_path / "fleet.sqlite"), "check_interval_s": 1},
    )
    nodes = [region]
    try:
        fleet = region.component(FleetControl).fleet
        assert fleet is not None
        fleet.deploy("lm", "1", tier="device")
        edge = await start(
            EDGE,
            tmp_path / "edge-models",
            "edge-1",
            upstream=region.address,
            artifacts={"cache_dir": str(tmp_path / "edge-cache"), "trusted_root": str(root), "refresh_interval_s": 0},
        )
        nodes.append(edge)
        reader = InMemoryMetricReader()
        overrides: dict[str, Mapping[str, Any]] = {
            "server": {"node_id": "device-1", "grace_seconds": 0.2},
            "repository": {"path": str(tmp_path / "device-models")},
            "upstream": {"address": edge.address},
            "updates": {
                "state_dir": str(tmp_path / "device-state"),
                "enrollment_token": fleet.create_token().token,
                "trusted_root": str(root),
                "hardware_class": machine_hardware_class(),
                "check_interval_s": 0.2,
                "jitter": 0.0,
            },
        }
        device = Node(DEVICE, load_config(DEVICE.config_type, env={}, overrides=overrides), [reader])
        await device.start()
        nodes.append(device)

        def sums(metric: str) -> dict[tuple[str, ...], Any]:
            data = reader.get_metrics_data()
            found: list[Any] = [
                p for rm in data.resource_metrics for sm in rm.scope_metrics for m in sm.metrics if m.name == metric
                for p in m.data.data_points
            ] if data is not None else []  # fmt: skip
            return {tuple(str(v) for _, v in sorted(p.attributes.items())): p.value for p in found}

        # Keys are the attribute values sorted by attribute name: model name, variant, version, update state.
        await eventually(lambda: ("lm", "fp32", "1", "committed") in sums(UPDATE_OUTCOMES))
        states = {k[3] for k in sums(UPDATE_OUTCOMES)}
        assert {"assigned", "downloading", "verified", "trial", "committed"} <= states
        async with grpc.aio.insecure_channel(device.address) as channel:
            stub = pb_grpc.GRPCInferenceServiceStub(channel)
            answer = await stub.ModelInfer(infer_request("lm", {"input_ids": np.zeros((1, 4), np.int64)}))
        assert params(answer)["edgecascade.served_by"] == "tier0:device-1"
        assert sums(REQUESTS) == {("lm", "fp32", "1", OK): 1}
    finally:
        for node in reversed(nodes):
            await node.stop()


async def _one(request: Any) -> AsyncIterator[Any]:
    yield request


def _points(raw: bytes) -> list[Point]:
    from tests.support.otlp_metrics_receiver import points

    return points(otlp.ExportMetricsServiceRequest.FromString(raw))


async def test_what_the_relay_still_holds_when_the_edge_stops_is_dropped_and_counted(
    mesh_factory: Callable[..., Any],
) -> None:
    mesh: Mesh = await mesh_factory({"export": True})
    await mesh.receiver.stop()  # the region is away: nothing can be forwarded
    await mesh.stub.ModelInfer(infer_request("lin", X))
    await mesh.device.flush_metrics()
    stats = mesh.relay.buffer.stats
    await eventually(lambda: stats.retries >= 1)  # a send was in flight and came back, or is in flight now
    held = stats.accepted - stats.forwarded
    assert held == 1
    await mesh.relay.stop()
    assert (stats.dropped, len(mesh.relay.buffer)) == (held, 0)
