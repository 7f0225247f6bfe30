"""One request forwarded device → edge → region is one trace with spans from three services."""

from __future__ import annotations

from pathlib import Path

import grpc
import numpy as np
import pytest

from protos.inference import grpc_service_pb2_grpc as pb_grpc
from services.rpc.telemetry import export_enabled
from tests.integration.conftest import populate, start_node
from tests.support.otlp_receiver import OtlpReceiver
from tests.support.requests import infer_request, params
from tier0_device.app import SPEC as DEVICE
from tier1_edge.app import SPEC as EDGE
from tier2_region.app import SPEC as REGION

SERVER, CLIENT = 2, 3  # OTLP SpanKind values


async def test_a_forwarded_request_is_one_trace_across_three_tiers(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    receiver = OtlpReceiver()
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", await receiver.start())
    monkeypatch.setenv("OTEL_BSP_SCHEDULE_DELAY", "50")
    populate(tmp_path)
    region = await start_node(REGION, tmp_path / "region", "region-1")
    edge = await start_node(EDGE, tmp_path / "edge", "edge-1", upstream=region.address)
    device = await start_node(DEVICE, tmp_path / "device", "device-1", upstream=edge.address)
    try:
        async with grpc.aio.insecure_channel(device.address) as channel:
            stub = pb_grpc.GRPCInferenceServiceStub(channel)
            response = await stub.ModelInfer(infer_request("region-only", {"x": np.ones((1, 4), np.float32)}))
            assert params(response)["edgecascade.served_by"] == "tier2:region-1"
    finally:
        for node in (device, edge, region):
            await node.stop()  # flushes each node's exporter
        await receiver.stop()

    infer_spans = [s for s in receiver.spans if s.name == "/inference.GRPCInferenceService/ModelInfer"]
    assert {s.trace_id for s in infer_spans} == {infer_spans[0].trace_id}, "the request was split over several traces"
    by_service = {(s.service, s.kind): s for s in infer_spans}
    assert set(by_service) == {
        ("edgecascade-tier0", SERVER),
        ("edgecascade-tier0", CLIENT),
        ("edgecascade-tier1", SERVER),
        ("edgecascade-tier1", CLIENT),
        ("edgecascade-tier2", SERVER),
    }
    device_server = by_service[("edgecascade-tier0", SERVER)]
    device_client = by_service[("edgecascade-tier0", CLIENT)]
    edge_server = by_service[("edgecascade-tier1", SERVER)]
    edge_client = by_service[("edgecascade-tier1", CLIENT)]
    region_server = by_service[("edgecascade-tier2", SERVER)]
    assert device_server.parent_span_id == ""  # the test's own call is untraced
    assert device_client.parent_span_id == device_server.span_id
    assert edge_server.parent_span_id == device_client.span_id
    assert edge_client.parent_span_id == edge_server.span_id
    assert region_server.parent_span_id == edge_client.span_id

    for span, node_id in ((device_server, "device-1"), (edge_server, "edge-1"), (region_server, "region-1")):
        assert span.attributes["rpc.system"] == "grpc"
        assert span.attributes["rpc.service"] == "inference.GRPCInferenceService"
        assert span.attributes["rpc.method"] == "ModelInfer"
        assert span.attributes["edgecascade.model.name"] == "region-only"
        assert span.attributes["edgecascade.node_id"] == node_id
        assert span.attributes["resource.service.instance.id"] == node_id
    assert device_server.attributes["edgecascade.fallback_reason"] == "model_not_held"
    assert region_server.attributes["edgecascade.model.version"] == "1"
    assert not any(s.name.startswith("/grpc.health") for s in receiver.spans)


def test_export_only_when_the_standard_variable_is_set() -> None:
    assert not export_enabled({})
    assert export_enabled({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://127.0.0.1:4317"})
    assert export_enabled({"OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "http://127.0.0.1:4317"})
    assert not export_enabled({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://127.0.0.1:4317", "OTEL_SDK_DISABLED": "true"})


def test_without_an_exporter_spans_are_not_recorded_but_context_still_propagates() -> None:
    from opentelemetry.sdk.resources import Resource

    from services.rpc.telemetry import build_tracer_provider

    quiet = build_tracer_provider(Resource.create({}), env={}).get_tracer("t")
    with quiet.start_as_current_span("s") as span:
        assert not span.is_recording()
        assert span.get_span_context().is_valid  # ids exist, so traceparent is still sent
    chosen = build_tracer_provider(Resource.create({}), env={"OTEL_TRACES_SAMPLER": "always_on"}).get_tracer("t")
    with chosen.start_as_current_span("s") as span:
        assert span.is_recording()
