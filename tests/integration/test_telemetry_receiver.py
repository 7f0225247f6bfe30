"""A real region receives OTLP from the stock OpenTelemetry SDK exporter, folds it into the figures rollouts
read, answers bad payloads with the statuses OTLP prescribes, counts them, and keeps working (issue 10 #2)."""

from __future__ import annotations

import asyncio
import math
import threading
import time
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from google.rpc.error_details_pb2 import RetryInfo  # type: ignore[import-untyped]
from opentelemetry.exporter.otlp.proto.grpc.metric_exporter import OTLPMetricExporter
from opentelemetry.proto.collector.logs.v1 import logs_service_pb2 as logs_pb
from opentelemetry.proto.collector.logs.v1 import logs_service_pb2_grpc as logs_grpc
from opentelemetry.proto.collector.metrics.v1 import metrics_service_pb2 as metrics_pb
from opentelemetry.proto.collector.metrics.v1 import metrics_service_pb2_grpc as metrics_grpc
from opentelemetry.proto.common.v1 import common_pb2
from opentelemetry.proto.logs.v1 import logs_pb2
from opentelemetry.proto.metrics.v1 import metrics_pb2
from opentelemetry.proto.resource.v1 import resource_pb2
from opentelemetry.sdk.metrics import Counter, Histogram, MeterProvider
from opentelemetry.sdk.metrics.export import AggregationTemporality, PeriodicExportingMetricReader
from opentelemetry.sdk.resources import Resource

from services.config import load_config
from services.rpc.node import Node
from services.updates.identity import NodeKeys
from tests.support.registry import new_registry
from tier2_region.app import SPEC as REGION
from tier2_region.fleet.domain import Enrollment, NodeFacts
from tier2_region.fleet.figures import (
    CONFIDENCE,
    FALLBACK_REASON,
    HARDWARE_CLASS,
    LATENCY,
    MODEL_NAME,
    MODEL_VARIANT,
    MODEL_VERSION,
    NODE_ID,
    NODE_TIER,
    OUTCOME,
    REQUESTS,
    UPDATE_OUTCOMES,
)
from tier2_region.fleet_service import FleetControl
from tier2_region.telemetry.admission import UPDATE_STATE
from tier2_region.telemetry.receiver_service import TelemetryReceiver
from tier2_region.telemetry.store import TelemetryStore

LATENCY_BOUNDS = [float(b) for b in range(10, 110, 10)]
MAX_POINTS = 200


class Collector(metrics_grpc.MetricsServiceServicer):
    """An external OTLP collector the region forwards a copy to."""

    def __init__(self) -> None:
        self.requests: list[metrics_pb.ExportMetricsServiceRequest] = []
        self._server: grpc.aio.Server | None = None

    async def Export(
        self, request: metrics_pb.ExportMetricsServiceRequest, context: Any
    ) -> metrics_pb.ExportMetricsServiceResponse:
        self.requests.append(request)
        return metrics_pb.ExportMetricsServiceResponse()

    async def start(self) -> str:
        self._server = grpc.aio.server()
        metrics_grpc.add_MetricsServiceServicer_to_server(self, self._server)
        port = self._server.add_insecure_port("127.0.0.1:0")
        await self._server.start()
        return f"127.0.0.1:{port}"

    async def stop(self) -> None:
        if self._server is not None:
            await self._server.stop(0)


@dataclass
class Region:
    node: Node
    collector: Collector

    @property
    def receiver(self) -> TelemetryReceiver:
        return self.node.component(TelemetryReceiver)

    @property
    def store(self) -> TelemetryStore:
        store = self.receiver.store
        assert store is not None
        return store

    @property
    def counts(self) -> dict[str, int]:
        return self.receiver.counts


def _enroll(node: Node, node_id: str) -> None:
    fleet = node.component(FleetControl).fleet
    assert fleet is not None
    keys = NodeKeys(Ed25519PrivateKey.generate(), X25519PrivateKey.generate())
    facts = NodeFacts(node_id, "device", "cpu-x86_64", 64 * 1024 * 1024, "1.20.1", 1024 * 1024)
    fleet.enroll(Enrollment(fleet.create_token().token, facts, keys.identity_public, keys.agreement_public))


@pytest.fixture
async def region(tmp_path: Path) -> AsyncIterator[Region]:
    kit = new_registry(tmp_path)
    collector = Collector()
    forward = await collector.start()
    overrides: dict[str, Mapping[str, Any]] = {
        "server": {"node_id": "region-1", "grace_seconds": 0.2},
        "repository": {"path": str(tmp_path / "region-models")},
        "registry": {"path": str(kit.registry.directory)},
        "fleet": {"path": str(tmp_path / "fleet.sqlite")},
        "telemetry": {
            "path": str(tmp_path / "telemetry.sqlite"),
            "max_points_per_request": MAX_POINTS,
            "queue_points": MAX_POINTS,
            "forward_endpoint": forward,
        },
    }
    node = Node(REGION, load_config(REGION.config_type, env={}, overrides=overrides))
    await node.start()
    try:
        _enroll(node, "device-1")
        yield Region(node, collector)
    finally:
        await node.stop()
        await collector.stop()
        kit.registry.close()


def _meter_provider(address: str, node_id: str, temporality: AggregationTemporality) -> MeterProvider:
    """A node's telemetry as the stock SDK sends it: resource attributes, instruments, OTLP/gRPC exporter."""
    exporter = OTLPMetricExporter(
        endpoint=address,
        insecure=True,
        preferred_temporality={Counter: temporality, Histogram: temporality},
        timeout=10,
    )
    # Exported only when the test flushes.
    reader = PeriodicExportingMetricReader(exporter, export_interval_millis=3_600_000)
    resource = Resource.create({NODE_ID: node_id, NODE_TIER: "device", HARDWARE_CLASS: "cpu-x86_64"})
    return MeterProvider(metric_readers=[reader], resource=resource)


@dataclass
class Instruments:
    requests: Any
    latency: Any
    confidence: Any
    updates: Any


def _instruments(provider: MeterProvider) -> Instruments:
    meter = provider.get_meter("edgecascade.test")
    return Instruments(
        requests=meter.create_counter(REQUESTS, unit="{request}"),
        latency=meter.create_histogram(LATENCY, unit="ms", explicit_bucket_boundaries_advisory=LATENCY_BOUNDS),
        confidence=meter.create_histogram(CONFIDENCE, explicit_bucket_boundaries_advisory=[0.25, 0.5, 0.75, 0.9]),
        updates=meter.create_counter(UPDATE_OUTCOMES),
    )


def _model(version: str) -> dict[str, str]:
    return {MODEL_NAME: "lm", MODEL_VERSION: version, MODEL_VARIANT: "int8"}


async def _flush(provider: MeterProvider) -> None:
    # The SDK exports synchronously; the region serves on this event loop.
    assert await asyncio.to_thread(provider.force_flush, 10_000)


@pytest.mark.parametrize(
    "temporality", [AggregationTemporality.CUMULATIVE, AggregationTemporality.DELTA], ids=["cumulative", "delta"]
)
async def test_the_stock_sdk_exporter_feeds_the_figures_rollouts_read(
    region: Region, temporality: AggregationTemporality
) -> None:
    since = region.store.window_of(time.time())  # the window the data will land in
    provider = _meter_provider(region.node.address, "device-1", temporality)
    try:
        meter = _instruments(provider)
        rng = np.random.default_rng(1)
        latencies = rng.uniform(0, 100, 400)
        confidences = rng.uniform(0.2, 1.0, 400)
        for round_ in range(2):  # two exports: the second folds against the first
            part = slice(round_ * 200, (round_ + 1) * 200)
            for ms, confidence in zip(latencies[part], confidences[part], strict=True):
                meter.latency.record(float(ms), _model("2"))
                meter.confidence.record(float(confidence), _model("2"))
            meter.requests.add(90, {**_model("2"), OUTCOME: "ok"})
            meter.requests.add(6, {**_model("2"), OUTCOME: "error"})
            meter.requests.add(4, {**_model("2"), OUTCOME: "forwarded", FALLBACK_REASON: "queue_full"})
            meter.requests.add(50, {**_model("1"), OUTCOME: "ok"})
            if round_ == 0:
                meter.updates.add(1, {**_model("2"), UPDATE_STATE: "refused"})
            await _flush(provider)
    finally:
        await asyncio.to_thread(provider.shutdown)

    figures = region.store.figures("lm", "2", since)
    assert (figures.nodes, figures.requests, figures.errors, figures.fallbacks) == (1, 200, 12, 8)
    assert figures.failed_installs == 1
    assert figures.mean_confidence == pytest.approx(float(np.mean(confidences)))
    for estimate, q in ((figures.p50_ms, 0.5), (figures.p99_ms, 0.99), (figures.p999_ms, 0.999)):
        true = float(np.quantile(latencies, q))
        assert estimate is not None
        assert abs(estimate - true) <= 10, (q, true, estimate)  # within one bucket
    assert region.store.figures("lm", "1", since).requests == 100
    assert region.store.figures("lm", "2", since, ["device-2"]).requests == 0
    # The rollout controller judges stages on the same figures, through its own connection to the store.
    rollouts = region.node.component(FleetControl).rollouts
    assert rollouts is not None
    assert rollouts.figures.figures("lm", "2", since) == figures
    assert region.counts.get("metrics.rejected.unknown_node", 0) == 0
    summary = region.store.node_summaries(since)
    assert [(s.node_id, s.requests, s.errors) for s in summary] == [("device-1", 300, 12)]
    # A copy of each export (the two flushes and the one at shutdown) went on to the external collector.
    for _ in range(200):
        if region.counts.get("forward.metrics.sent", 0) == region.counts["metrics.requests"]:
            break
        await asyncio.sleep(0.01)
    assert region.counts["forward.metrics.sent"] == region.counts["metrics.requests"] >= 2
    forwarded = region.collector.requests[0].resource_metrics[0].resource.attributes
    assert {a.key: a.value.string_value for a in forwarded}[NODE_ID] == "device-1"


def _kv(key: str, value: Any) -> common_pb2.KeyValue:
    if isinstance(value, bool):
        return common_pb2.KeyValue(key=key, value=common_pb2.AnyValue(bool_value=value))
    if isinstance(value, int):
        return common_pb2.KeyValue(key=key, value=common_pb2.AnyValue(int_value=value))
    return common_pb2.KeyValue(key=key, value=common_pb2.AnyValue(string_value=value))


def _requests_metric(*values: float, version: str = "9", extra: Mapping[str, Any] | None = None) -> metrics_pb2.Metric:
    now = time.time_ns()
    points = [
        metrics_pb2.NumberDataPoint(
            attributes=[_kv(k, v) for k, v in {**_model(version), OUTCOME: "ok", **(extra or {})}.items()],
            start_time_unix_nano=now - 1_000_000_000,
            time_unix_nano=now,
            as_double=value,
        )
        for value in values
    ]
    return metrics_pb2.Metric(
        name=REQUESTS,
        sum=metrics_pb2.Sum(
            data_points=points,
            aggregation_temporality=metrics_pb2.AGGREGATION_TEMPORALITY_DELTA,
            is_monotonic=True,
        ),
    )


def _metrics_request(
    *metrics: metrics_pb2.Metric, node: str | None = "device-1"
) -> metrics_pb.ExportMetricsServiceRequest:
    attributes = [] if node is None else [_kv(NODE_ID, node)]
    return metrics_pb.ExportMetricsServiceRequest(
        resource_metrics=[
            metrics_pb2.ResourceMetrics(
                resource=resource_pb2.Resource(attributes=attributes),
                scope_metrics=[metrics_pb2.ScopeMetrics(metrics=list(metrics))],
            )
        ]
    )


async def _export(
    channel: grpc.aio.Channel, request: metrics_pb.ExportMetricsServiceRequest
) -> metrics_pb.ExportMetricsServiceResponse:
    answer: metrics_pb.ExportMetricsServiceResponse = await metrics_grpc.MetricsServiceStub(channel).Export(
        request, timeout=10
    )
    return answer


async def _refused(channel: grpc.aio.Channel, request: metrics_pb.ExportMetricsServiceRequest) -> grpc.aio.AioRpcError:
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await _export(channel, request)
    return refused.value


async def test_unnamed_unknown_and_absurd_points_get_otlp_statuses_and_are_counted(region: Region) -> None:
    since = region.store.window_of(time.time())  # the window the data will land in
    async with grpc.aio.insecure_channel(region.node.address) as channel:
        # No node id: nothing accepted, not retryable.
        error = await _refused(channel, _metrics_request(_requests_metric(1.0), node=None))
        assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "no_node_id: 1" in (error.details() or "")
        # A node that is not enrolled.
        error = await _refused(channel, _metrics_request(_requests_metric(1.0, 2.0), node="stranger"))
        assert error.code() == grpc.StatusCode.PERMISSION_DENIED
        assert "not enrolled" in (error.details() or "")
        # NaN, a negative count and a wrong type beside good points: partial success, the client must not retry.
        gauge = metrics_pb2.Metric(
            name=REQUESTS, gauge=metrics_pb2.Gauge(data_points=[metrics_pb2.NumberDataPoint(as_int=3)])
        )
        answer = await _export(channel, _metrics_request(_requests_metric(5.0, math.nan, -1.0), gauge))
        assert answer.partial_success.rejected_data_points == 3
        message = answer.partial_success.error_message
        assert "not_finite: 1" in message
        assert "negative: 1" in message
        assert "wrong_type: 1" in message
        # A model version that is not a string.
        answer = await _export(
            channel, _metrics_request(_requests_metric(1.0, extra={MODEL_VERSION: 3}), _requests_metric(1.0))
        )
        assert answer.partial_success.rejected_data_points == 1
        assert "bad_attribute: 1" in answer.partial_success.error_message
    counts = region.counts
    assert counts["metrics.rejected.no_node_id"] == 1
    assert counts["metrics.rejected.unknown_node"] == 2
    assert counts["metrics.rejected.not_finite"] == 1
    assert counts["metrics.rejected.negative"] == 1
    assert counts["metrics.rejected.wrong_type"] == 1
    assert counts["metrics.rejected.bad_attribute"] == 1
    assert region.store.figures("lm", "9", since).requests == 5 + 1
    # Only what was accepted is forwarded: the stranger's and the nameless requests are not.
    for _ in range(200):
        if counts.get("forward.metrics.sent", 0) >= 2:
            break
        await asyncio.sleep(0.01)
        counts = region.counts
    assert counts["forward.metrics.sent"] == 2
    nodes = {
        a.value.string_value
        for r in region.collector.requests
        for rm in r.resource_metrics
        for a in rm.resource.attributes
        if a.key == NODE_ID
    }
    assert nodes == {"device-1"}


async def test_huge_and_unreadable_requests_are_refused_and_the_receiver_keeps_working(region: Region) -> None:
    since = region.store.window_of(time.time())  # the window the data will land in
    async with grpc.aio.insecure_channel(region.node.address) as channel:
        # 100,000 attributes on a point, and on a resource.
        huge = _requests_metric(1.0)
        huge.sum.data_points[0].attributes.extend(_kv(f"k{i}", "v") for i in range(100_000))
        error = await _refused(channel, _metrics_request(huge))
        assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "too_many_attributes: 1" in (error.details() or "")
        crowded = _metrics_request(_requests_metric(1.0, 1.0))
        crowded.resource_metrics[0].resource.attributes.extend(_kv(f"k{i}", i) for i in range(100_000))
        error = await _refused(channel, crowded)
        assert "too_many_attributes: 2" in (error.details() or "")
        # More points than a request may carry.
        error = await _refused(channel, _metrics_request(_requests_metric(*([1.0] * (MAX_POINTS + 1)))))
        assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert f"more than {MAX_POINTS} data points" in (error.details() or "")
        # A request that is not an OTLP request at all.
        junk: Any = channel.unary_unary("/opentelemetry.proto.collector.metrics.v1.MetricsService/Export")
        with pytest.raises(grpc.aio.AioRpcError) as broken:
            await junk(b"\xff\xff\xff\xff", timeout=10)
        assert broken.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert broken.value.details() == "the request is not a serialized ExportMetricsServiceRequest"

        # Still working: a good request is a full success and is stored.
        answer = await _export(channel, _metrics_request(_requests_metric(7.0)))
        assert not answer.HasField("partial_success")
    counts = region.counts
    assert counts["metrics.rejected.too_many_attributes"] == 3
    assert counts["metrics.requests_refused.too_large"] == 1
    assert counts["metrics.requests_refused.unreadable"] == 1
    assert region.store.figures("lm", "9", since).requests == 7


async def test_a_full_queue_is_resource_exhausted_with_retry_info_and_counted(region: Region) -> None:
    queue = region.receiver._queue  # the writer is held so that the queue fills
    assert queue is not None
    gate = threading.Event()
    holding = asyncio.ensure_future(queue.call(lambda: gate.wait(10)))
    try:
        async with grpc.aio.insecure_channel(region.node.address) as channel:
            filling = asyncio.ensure_future(_export(channel, _metrics_request(_requests_metric(*([1.0] * MAX_POINTS)))))
            for _ in range(500):
                if queue.pending_points == MAX_POINTS:
                    break
                await asyncio.sleep(0.01)
            error = await _refused(channel, _metrics_request(_requests_metric(1.0)))
            assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            trailers = dict(error.trailing_metadata() or ())
            retry = RetryInfo.FromString(trailers["google.rpc.retryinfo-bin"])
            assert retry.retry_delay.seconds >= 1
            gate.set()
            answer = await filling
            assert not answer.HasField("partial_success")
    finally:
        gate.set()
        await holding
    assert region.counts["metrics.dropped.queue_full"] == 1
    assert region.counts["metrics.accepted"] == MAX_POINTS


def _logs_request(*records: logs_pb2.LogRecord, node: str = "device-1") -> logs_pb.ExportLogsServiceRequest:
    return logs_pb.ExportLogsServiceRequest(
        resource_logs=[
            logs_pb2.ResourceLogs(
                resource=resource_pb2.Resource(attributes=[_kv(NODE_ID, node)]),
                scope_logs=[logs_pb2.ScopeLogs(log_records=list(records))],
            )
        ]
    )


async def test_anomalies_are_kept_with_their_trace_id_and_bad_records_are_refused(region: Region) -> None:
    trace_id = bytes(range(1, 17))
    now = time.time_ns()
    routine = logs_pb2.LogRecord(
        time_unix_nano=now, severity_number=logs_pb2.SEVERITY_NUMBER_INFO, body=common_pb2.AnyValue(string_value="ok")
    )
    slow = logs_pb2.LogRecord(
        time_unix_nano=now,
        severity_number=logs_pb2.SEVERITY_NUMBER_INFO,
        body=common_pb2.AnyValue(string_value="answer slower than 3 x p99"),
        attributes=[_kv("edgecascade.anomaly", True), _kv(MODEL_NAME, "lm"), _kv(MODEL_VERSION, "2")],
        trace_id=trace_id,
        span_id=bytes(8),
    )
    failed = logs_pb2.LogRecord(
        time_unix_nano=now + 1,
        severity_number=logs_pb2.SEVERITY_NUMBER_ERROR,
        body=common_pb2.AnyValue(string_value="x" * 100_000),
    )
    bad_trace = logs_pb2.LogRecord(severity_number=logs_pb2.SEVERITY_NUMBER_ERROR, trace_id=b"short")
    async with grpc.aio.insecure_channel(region.node.address) as channel:
        stub = logs_grpc.LogsServiceStub(channel)
        answer = await stub.Export(_logs_request(routine, slow, failed, bad_trace), timeout=10)
        assert answer.partial_success.rejected_log_records == 1
        assert "bad_trace_id" in answer.partial_success.error_message
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await stub.Export(_logs_request(failed, node="stranger"), timeout=10)
        assert refused.value.code() == grpc.StatusCode.PERMISSION_DENIED
    kept = region.store.anomalies("device-1")
    assert [len(a.body) for a in kept] == [1024, len("answer slower than 3 x p99")]  # bodies are cut to size
    assert (kept[1].trace_id, kept[1].model, kept[1].version) == (trace_id.hex(), "lm", "2")
    summary = region.store.node_summaries(time.time() - 60, ["device-1"])[0]
    assert summary.last_anomaly is not None
    assert summary.last_anomaly.severity_number == 17
    counts = region.counts
    assert (counts["logs.accepted"], counts["logs.ignored"], counts["logs.rejected.bad_trace_id"]) == (2, 1, 1)
    assert counts["logs.rejected.unknown_node"] == 1
