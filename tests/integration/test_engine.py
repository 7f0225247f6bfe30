"""The device engine over real channels: shedding, memory refusals, hot swap under load, batched streams."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import numpy as np
import pytest

from protos.inference import grpc_service_pb2 as pb
from protos.inference import grpc_service_pb2_grpc as pb_grpc
from services.engine.model_repository import ModelRepository
from tests.integration.conftest import Chain, start_node
from tests.support.onnx_models import linear_model, mlp_model
from tests.support.requests import infer_request, output, params, text_request
from tier0_device.app import SPEC as DEVICE
from tier1_edge.app import SPEC as EDGE

X = np.ones((1, 64), np.float32)


async def stats_of(stub: pb_grpc.GRPCInferenceServiceStub, name: str) -> pb.ModelStatistics:
    response: pb.ModelStatisticsResponse = await stub.ModelStatistics(pb.ModelStatisticsRequest(name=name))
    stats: pb.ModelStatistics = response.model_stats[0]
    return stats


async def test_a_full_queue_on_the_device_forwards_upward(tmp_path: Path) -> None:
    for tier in ("device", "edge"):
        ModelRepository(tmp_path / tier).add("mlp", mlp_model(tmp_path / f"{tier}.onnx", width=1024, layers=6))
    edge = await start_node(EDGE, tmp_path / "edge", "edge-1")
    device = await start_node(
        DEVICE, tmp_path / "device", "device-1", upstream=edge.address,
        batching={"max_queue_size": 1, "max_batch_size": 1}, runtime={"max_concurrent_runs": 1},
    )  # fmt: skip
    try:
        async with grpc.aio.insecure_channel(device.address) as channel:
            stub = pb_grpc.GRPCInferenceServiceStub(channel)
            request = infer_request("mlp", {"x": np.ones((64, 64), np.float32)})
            responses = await asyncio.gather(*(stub.ModelInfer(request) for _ in range(24)))
            served = [params(r)["edgecascade.served_by"] for r in responses]
            reasons = {params(r).get("edgecascade.fallback_reason") for r in responses}
            assert "tier0:device-1" in served and "tier1:edge-1" in served
            assert reasons == {None, "queue_full"}
            assert all(output(r, "y").shape == (64, 1024) for r in responses)
            stats = await stats_of(stub, "mlp")
            assert stats.inference_count == served.count("tier0:device-1")
    finally:
        await device.stop()
        await edge.stop()


async def test_a_full_queue_on_a_stream_forwards_upward_as_stream_messages(tmp_path: Path) -> None:
    for tier in ("device", "edge"):
        ModelRepository(tmp_path / tier).add("mlp", mlp_model(tmp_path / f"{tier}.onnx", width=1024, layers=6))
    edge = await start_node(EDGE, tmp_path / "edge", "edge-1")
    device = await start_node(
        DEVICE, tmp_path / "device", "device-1", upstream=edge.address,
        batching={"max_queue_size": 1, "max_batch_size": 1}, runtime={"max_concurrent_runs": 1},
    )  # fmt: skip
    request = infer_request("mlp", {"x": np.ones((64, 64), np.float32)})

    async def one_stream(stub: pb_grpc.GRPCInferenceServiceStub) -> list[pb.ModelStreamInferResponse]:
        async def requests() -> AsyncIterator[pb.ModelInferRequest]:
            yield request

        return [r async for r in stub.ModelStreamInfer(requests())]

    try:
        async with grpc.aio.insecure_channel(device.address) as channel:
            stub = pb_grpc.GRPCInferenceServiceStub(channel)
            streams = await asyncio.gather(*(one_stream(stub) for _ in range(24)))
        replies = [reply for stream in streams for reply in stream]
        assert all(not r.error_message and r.HasField("infer_response") for r in replies), replies[:2]
        served = [params(r.infer_response)["edgecascade.served_by"] for r in replies]
        assert "tier0:device-1" in served and "tier1:edge-1" in served
        forwarded = [
            r.infer_response
            for r in replies
            if params(r.infer_response).get("edgecascade.served_by") != "tier0:device-1"
        ]
        assert {params(r)["edgecascade.fallback_reason"] for r in forwarded} == {"queue_full"}
        assert all(output(r.infer_response, "y").shape == (64, 1024) for r in replies)
    finally:
        await device.stop()
        await edge.stop()


async def test_memory_refusal_forwards_with_reason_memory_or_is_resource_exhausted(
    chain: Chain, tmp_path: Path
) -> None:
    ModelRepository(tmp_path / "tiny").add("edge-only", linear_model(tmp_path / "l.onnx"))
    squeezed = await start_node(
        DEVICE, tmp_path / "tiny", "device-2", upstream=chain.edge.address, cache={"memory_budget_bytes": 1024 * 1024}
    )
    alone = await start_node(DEVICE, tmp_path / "tiny", "device-3", cache={"memory_budget_bytes": 1024 * 1024})
    try:
        async with grpc.aio.insecure_channel(squeezed.address) as channel:
            stub = pb_grpc.GRPCInferenceServiceStub(channel)
            response = await stub.ModelInfer(infer_request("edge-only", {"x": np.ones((1, 4), np.float32)}))
            assert params(response)["edgecascade.served_by"] == "tier1:edge-1"
            assert params(response)["edgecascade.fallback_reason"] == "memory"
        async with grpc.aio.insecure_channel(alone.address) as channel:
            stub = pb_grpc.GRPCInferenceServiceStub(channel)
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await stub.ModelInfer(infer_request("edge-only", {"x": np.ones((1, 4), np.float32)}))
            assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert "more than this node's memory budget of 1.0 MB" in (caught.value.details() or "")
    finally:
        await squeezed.stop()
        await alone.stop()


async def test_a_swap_under_continuous_load_loses_no_request(
    chain: Chain, device_stub: pb_grpc.GRPCInferenceServiceStub
) -> None:
    x = np.ones((1, 4), np.float32)
    stop = asyncio.Event()
    versions: list[str] = []

    async def client() -> None:
        while not stop.is_set():
            response = await device_stub.ModelInfer(infer_request("lin", {"x": x}))
            assert output(response, "y").shape == (1, 3)
            versions.append(response.model_version)

    clients = [asyncio.create_task(client()) for _ in range(8)]
    await asyncio.sleep(0.2)
    repository = ModelRepository(Path(chain.device.config.repository.path))
    repository.add("lin", linear_model(chain.models / "lin-v2.onnx", seed=11))
    await device_stub.RepositoryModelLoad(pb.RepositoryModelLoadRequest(model_name="lin"))
    await asyncio.sleep(0.2)
    stop.set()
    await asyncio.gather(*clients)  # any failed request would raise here
    assert versions[0] == "1" and versions[-1] == "2"
    assert versions.index("2") > 0 and "1" not in versions[versions.index("2") + 64 :]
    index = await device_stub.RepositoryIndex(pb.RepositoryIndexRequest(ready=True))
    assert {(m.name, m.version) for m in index.models if m.name == "lin"} == {("lin", "2")}


async def test_decoding_steps_of_concurrent_streams_share_batches(tmp_path: Path) -> None:
    from tests.support.onnx_models import tiny_char_lm

    ModelRepository(tmp_path / "repo").add("lm", tiny_char_lm(tmp_path / "lm.onnx"))
    node = await start_node(DEVICE, tmp_path / "repo", "device-1", runtime={"max_concurrent_runs": 1})
    try:
        async with grpc.aio.insecure_channel(node.address) as channel:
            stub = pb_grpc.GRPCInferenceServiceStub(channel)

            async def stream() -> int:
                async def one() -> AsyncIterator[pb.ModelInferRequest]:
                    yield text_request("lm", "ab", max_tokens=40, temperature=1.0, seed=3)

                return len([r async for r in stub.ModelStreamInfer(one()) if not r.error_message])

            counts = await asyncio.gather(*(stream() for _ in range(8)))
            assert counts == [41] * 8
            stats = await stats_of(stub, "lm")
            assert stats.inference_count == 8 * 40
            assert stats.execution_count < stats.inference_count
            assert max(b.batch_size for b in stats.batch_stats) > 1
    finally:
        await node.stop()


async def test_engine_metrics_are_recorded(tmp_path: Path) -> None:
    from opentelemetry.sdk.metrics.export import InMemoryMetricReader

    from services.config import load_config
    from services.rpc.node import Node

    ModelRepository(tmp_path / "repo").add("lin", linear_model(tmp_path / "l.onnx"))
    reader = InMemoryMetricReader()
    config = load_config(DEVICE.config_type, env={}, overrides={"repository": {"path": str(tmp_path / "repo")}})
    node = Node(DEVICE, config, metric_readers=[reader])
    await node.start()
    try:
        async with grpc.aio.insecure_channel(node.address) as channel:
            stub = pb_grpc.GRPCInferenceServiceStub(channel)
            for _ in range(3):
                await stub.ModelInfer(infer_request("lin", {"x": np.ones((2, 4), np.float32)}))
        data = reader.get_metrics_data()
    finally:
        await node.stop()
    points: dict[str, list[object]] = {}
    assert data is not None
    for resource_metrics in data.resource_metrics:
        assert resource_metrics.resource.attributes["service.name"] == "edgecascade-tier0"
        for scope in resource_metrics.scope_metrics:
            for metric in scope.metrics:
                points[metric.name] = list(metric.data.data_points)
    compute = points["edgecascade.compute.duration"][0]
    assert compute.count == 3  # type: ignore[attr-defined]
    assert dict(compute.attributes) == {"edgecascade.model.name": "lin", "edgecascade.model.version": "1"}  # type: ignore[attr-defined]
    assert points["edgecascade.batch.size"][0].sum == 6  # type: ignore[attr-defined]
    assert points["edgecascade.queue.duration"][0].count == 3  # type: ignore[attr-defined]
    assert points["edgecascade.cache.loads"][0].value == 1  # type: ignore[attr-defined]
    assert points["edgecascade.model.memory"][0].value > 0  # type: ignore[attr-defined]
    assert points["edgecascade.queue.depth"][0].value == 0  # type: ignore[attr-defined]
