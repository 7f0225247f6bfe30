"""Every tier serves OIP, health and reflection; requests climb the chain when a tier lacks the model."""

from __future__ import annotations

import asyncio
from pathlib import Path

import grpc
import numpy as np
import onnxruntime as ort
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from protos.edgecascade.v1 import mesh_pb2, mesh_pb2_grpc
from protos.inference import grpc_service_pb2 as pb
from protos.inference import grpc_service_pb2_grpc as pb_grpc
from services.engine.model_repository import ModelRepository
from tests.integration.conftest import Chain, start_node
from tests.support.onnx_models import linear_model
from tests.support.requests import infer_request, output, params
from tier0_device.app import SPEC as DEVICE

X = np.arange(8, dtype=np.float32).reshape(2, 4) / 10


def reference(path: Path, x: np.ndarray) -> np.ndarray:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    result: np.ndarray = session.run(["y"], {"x": x})[0]
    return result


async def test_health_is_serving_on_every_tier_and_reflection_lists_services(chain: Chain) -> None:
    for node in (chain.device, chain.edge, chain.region):
        async with grpc.aio.insecure_channel(node.address) as channel:
            health = health_pb2_grpc.HealthStub(channel)
            for service in ("", "inference.GRPCInferenceService", "edgecascade.v1.MeshService"):
                reply = await health.Check(health_pb2.HealthCheckRequest(service=service))
                assert reply.status == health_pb2.HealthCheckResponse.SERVING
            stub = reflection_pb2_grpc.ServerReflectionStub(channel)
            replies = [
                r
                async for r in stub.ServerReflectionInfo(
                    iter([reflection_pb2.ServerReflectionRequest(list_services="")])
                )
            ]
            names = {s.name for s in replies[0].list_services_response.service}
            assert {"inference.GRPCInferenceService", "edgecascade.v1.MeshService", "grpc.health.v1.Health"} <= names


async def test_local_inference_matches_onnxruntime_and_names_the_server(
    chain: Chain, device_stub: pb_grpc.GRPCInferenceServiceStub
) -> None:
    response = await device_stub.ModelInfer(infer_request("lin", {"x": X}))
    np.testing.assert_allclose(output(response, "y"), reference(chain.models / "lin.onnx", X), rtol=1e-6)
    # The answer's confidence: max probability of its least confident row (the request-level cascade's signal).
    confidence = float(reference(chain.models / "lin.onnx", X).max(axis=-1).min())
    assert params(response) == {
        "edgecascade.served_by": "tier0:device-1",
        "edgecascade.confidence": pytest.approx(confidence),
    }
    assert (response.model_name, response.model_version) == ("lin", "1")


async def test_typed_contents_are_accepted(device_stub: pb_grpc.GRPCInferenceServiceStub) -> None:
    request = pb.ModelInferRequest(model_name="lin")
    tensor = request.inputs.add(name="x", datatype="FP32", shape=[2, 4])
    tensor.contents.fp32_contents.extend(X.reshape(-1).tolist())
    response = await device_stub.ModelInfer(request)
    assert output(response, "y").shape == (2, 3)


@pytest.mark.parametrize(
    ("model", "served_by", "route"),
    [
        ("edge-only", "tier1:edge-1", "tier0:device-1 > tier1:edge-1"),
        ("region-only", "tier2:region-1", "tier0:device-1 > tier1:edge-1 > tier2:region-1"),
    ],
)
async def test_missing_models_climb_the_chain(
    chain: Chain, device_stub: pb_grpc.GRPCInferenceServiceStub, model: str, served_by: str, route: str
) -> None:
    response = await device_stub.ModelInfer(infer_request(model, {"x": X}))
    got = params(response)
    assert got["edgecascade.served_by"] == served_by
    assert got["edgecascade.fallback_reason"] == "model_not_held"
    assert got["edgecascade.route"] == route
    file = chain.models / ("edge.onnx" if model == "edge-only" else "region.onnx")
    np.testing.assert_allclose(output(response, "y"), reference(file, X), rtol=1e-6)


async def test_a_model_that_cannot_load_is_forwarded_with_its_reason(
    device_stub: pb_grpc.GRPCInferenceServiceStub,
) -> None:
    response = await device_stub.ModelInfer(infer_request("flaky", {"x": X}))
    assert params(response)["edgecascade.served_by"] == "tier1:edge-1"
    assert params(response)["edgecascade.fallback_reason"] == "model_unavailable"


async def test_unknown_model_at_the_top_is_not_found_with_a_clear_message(
    device_stub: pb_grpc.GRPCInferenceServiceStub,
) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await device_stub.ModelInfer(infer_request("no-such-model", {"x": X}))
    assert caught.value.code() == grpc.StatusCode.NOT_FOUND
    assert caught.value.details() == "model 'no-such-model' is not held by tier2:region-1, the top of the chain"


async def test_metadata_config_and_ready_follow_the_chain(device_stub: pb_grpc.GRPCInferenceServiceStub) -> None:
    meta = await device_stub.ModelMetadata(pb.ModelMetadataRequest(name="region-only"))
    assert meta.name == "region-only" and meta.platform == "onnxruntime_onnx"
    assert [(t.name, t.datatype, list(t.shape)) for t in meta.inputs] == [("x", "FP32", [-1, 4])]
    config = (await device_stub.ModelConfig(pb.ModelConfigRequest(name="lin"))).config
    assert config.max_batch_size == 64 and list(config.input[0].dims) == [4]
    assert (await device_stub.ModelReady(pb.ModelReadyRequest(name="edge-only"))).ready
    assert (await device_stub.ModelReady(pb.ModelReadyRequest(name="lin", version="1"))).ready
    assert not (await device_stub.ModelReady(pb.ModelReadyRequest(name="lin", version="9"))).ready
    assert not (await device_stub.ModelReady(pb.ModelReadyRequest(name="nowhere"))).ready
    assert (await device_stub.ServerReady(pb.ServerReadyRequest())).ready
    assert (await device_stub.ServerLive(pb.ServerLiveRequest())).live
    server = await device_stub.ServerMetadata(pb.ServerMetadataRequest())
    assert server.name == "edgecascade" and "model_repository" in server.extensions


async def test_repository_index_statistics_load_and_unload(
    chain: Chain, device_stub: pb_grpc.GRPCInferenceServiceStub
) -> None:
    index = await device_stub.RepositoryIndex(pb.RepositoryIndexRequest())
    states = {(m.name, m.version): (m.state, m.reason) for m in index.models}
    assert states[("lin", "1")] == ("READY", "")
    assert states[("flaky", "1")][0] == "UNAVAILABLE"
    assert "cannot be loaded" in states[("flaky", "1")][1]
    ready = await device_stub.RepositoryIndex(pb.RepositoryIndexRequest(ready=True))
    assert {m.name for m in ready.models} == {"lin", "lm"}

    for _ in range(3):
        await device_stub.ModelInfer(infer_request("lin", {"x": X}))
    stats = (await device_stub.ModelStatistics(pb.ModelStatisticsRequest(name="lin"))).model_stats
    assert len(stats) == 1
    assert stats[0].inference_count == 3 and stats[0].execution_count == 3
    assert stats[0].inference_stats.success.count == 3 and stats[0].inference_stats.compute_infer.ns > 0
    assert stats[0].last_inference > 0

    await device_stub.RepositoryModelUnload(pb.RepositoryModelUnloadRequest(model_name="lin"))
    assert not (await device_stub.ModelReady(pb.ModelReadyRequest(name="lin"))).ready
    # A new version on disk is picked up by an explicit load and becomes current once warm.
    ModelRepository(Path(chain.device.config.repository.path)).add(
        "lin", linear_model(chain.models / "lin2.onnx", seed=9)
    )
    await device_stub.RepositoryModelLoad(pb.RepositoryModelLoadRequest(model_name="lin"))
    response = await device_stub.ModelInfer(infer_request("lin", {"x": X}))
    assert response.model_version == "2"
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await device_stub.RepositoryModelLoad(pb.RepositoryModelLoadRequest(model_name="absent"))
    assert caught.value.code() == grpc.StatusCode.NOT_FOUND


async def test_tier_info(chain: Chain) -> None:
    async with grpc.aio.insecure_channel(chain.device.address) as channel:
        info = await mesh_pb2_grpc.MeshServiceStub(channel).GetTierInfo(mesh_pb2.GetTierInfoRequest())
    assert (info.tier, info.tier_name, info.node_id) == (mesh_pb2.TIER_DEVICE, "tier0", "device-1")
    assert info.upstream == chain.edge.address
    assert {m.name for m in info.models} == {"lin", "lm", "flaky"}


async def test_forwarding_uses_the_remaining_deadline(
    chain: Chain, device_stub: pb_grpc.GRPCInferenceServiceStub
) -> None:
    # The region is stopped: the edge cannot reach it, and the device's caller gets
    # UNAVAILABLE naming the unreachable tier well inside its own deadline.
    await chain.region.stop()
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await device_stub.ModelInfer(infer_request("region-only", {"x": X}), timeout=5)
    assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
    assert caught.value.details() == f"upstream {chain.region.address} is unavailable"
    # Models held below keep being served: failure stays local.
    assert (
        params(await device_stub.ModelInfer(infer_request("edge-only", {"x": X})))["edgecascade.served_by"]
        == "tier1:edge-1"
    )
    assert (
        params(await device_stub.ModelInfer(infer_request("lin", {"x": X})))["edgecascade.served_by"]
        == "tier0:device-1"
    )


async def test_timeout_parameter_and_grpc_deadline_cut_a_forwarded_call_short(tmp_path: Path) -> None:
    # An upstream that never answers: a bare server with a handler that sleeps.
    async def hang(
        request: pb.ModelInferRequest, context: grpc.aio.ServicerContext[object, object]
    ) -> pb.ModelInferResponse:
        await asyncio.sleep(30)
        return pb.ModelInferResponse()

    class Hanging(pb_grpc.GRPCInferenceServiceServicer):
        ModelInfer = staticmethod(hang)

    server = grpc.aio.server()
    pb_grpc.add_GRPCInferenceServiceServicer_to_server(Hanging(), server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    device = await start_node(DEVICE, tmp_path / "device", "device-9", upstream=f"127.0.0.1:{port}")
    try:
        async with grpc.aio.insecure_channel(device.address) as channel:
            stub = pb_grpc.GRPCInferenceServiceStub(channel)
            loop = asyncio.get_running_loop()
            started = loop.time()
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await stub.ModelInfer(infer_request("elsewhere", {"x": X}, timeout=300_000))
            assert caught.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
            assert loop.time() - started < 5
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await stub.ModelInfer(infer_request("elsewhere", {"x": X}), timeout=0.3)
            assert caught.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    finally:
        await device.stop()
        await server.stop(0)


async def test_tier_info_reports_the_cache_and_per_model_memory(
    chain: Chain, device_stub: pb_grpc.GRPCInferenceServiceStub
) -> None:
    await device_stub.ModelInfer(infer_request("lin", {"x": X}))
    async with grpc.aio.insecure_channel(chain.device.address) as channel:
        info = await mesh_pb2_grpc.MeshServiceStub(channel).GetTierInfo(mesh_pb2.GetTierInfoRequest())
    models = {m.name: m for m in info.models}
    assert models["lin"].footprint_bytes > 0 and models["lin"].state == "READY"
    assert models["flaky"].state == "UNAVAILABLE" and "cannot be loaded" in models["flaky"].reason
    assert info.cache.budget_bytes > 0
    assert info.cache.used_bytes == sum(m.footprint_bytes for m in info.models)
    assert info.cache.loads == 2 and info.cache.hits >= 1
