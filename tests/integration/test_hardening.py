"""Regression tests of the request path found in review (issue 7): each failed before its fix.

Text inputs decode as UTF-8 element by element, a request may not carry more rows
than the model's ``max_batch_size``, absurd shapes are INVALID_ARGUMENT and never
end a stream, a forwarding loop is refused at once, and a model's own
``default_timeout_us`` is the deadline its requests get.
"""

from __future__ import annotations

import asyncio
import socket
import tracemalloc
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest

from protos.inference import grpc_service_pb2 as pb
from protos.inference import grpc_service_pb2_grpc as pb_grpc
from services.dataplane import Dataplane, NoUpstream, RequestLimits
from services.engine.batcher import BatchingConfig
from services.engine.model_cache import ModelCache
from services.engine.model_repository import ModelRepository
from services.engine.onnx_session import OnnxSession
from services.engine.run_pool import RunPool
from services.errors import ForwardingLoopError, InvalidArgumentError, ModelNotReadyError
from services.inference import NodeIdentity
from services.rpc.inference_client import InferenceClient
from services.rpc.node import Node
from tests.integration.conftest import Chain, start_node
from tests.support.onnx_models import identity_model, linear_model
from tests.support.requests import infer_request, output, params
from tier0_device.app import SPEC as DEVICE

X = np.ones((1, 4), dtype=np.float32)


def _shaped(model: str, name: str, datatype: str, shape: list[int], raw: bytes) -> pb.ModelInferRequest:
    request = pb.ModelInferRequest(model_name=model)
    request.inputs.add(name=name, datatype=datatype, shape=shape)
    request.raw_input_contents.append(raw)
    return request


def _text(*items: bytes) -> dict[str, np.ndarray]:
    array = np.empty((1, len(items)), dtype=object)
    array[0, :] = list(items)
    return {"inp": array}


@pytest.fixture
async def text_node(tmp_path: Path) -> AsyncIterator[pb_grpc.GRPCInferenceServiceStub]:
    ModelRepository(tmp_path / "repo").add("echo", identity_model(tmp_path / "echo.onnx", "BYTES"))
    node = await start_node(DEVICE, tmp_path / "repo", "text-1")
    try:
        async with grpc.aio.insecure_channel(node.address) as channel:
            yield pb_grpc.GRPCInferenceServiceStub(channel)
    finally:
        await node.stop()


# --- BYTES inputs (defect 3) ---------------------------------------------------------------------


async def test_utf8_text_round_trips_through_a_string_model(text_node: pb_grpc.GRPCInferenceServiceStub) -> None:
    words = ["café".encode(), "naïve €".encode(), b"", "日本".encode()]
    response = await text_node.ModelInfer(infer_request("echo", _text(*words)))
    assert output(response, "out").reshape(-1).tolist() == words


async def test_invalid_utf8_fails_only_its_own_request(text_node: pb_grpc.GRPCInferenceServiceStub) -> None:
    good = [text_node.ModelInfer(infer_request("echo", _text(f"ok {i} é".encode()))) for i in range(6)]
    bad = text_node.ModelInfer(infer_request("echo", _text(b"fine", b"\xff\xfe")))
    results = await asyncio.gather(bad, *good, return_exceptions=True)
    assert isinstance(results[0], grpc.aio.AioRpcError)
    assert results[0].code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "input 'inp' element 1 is not valid UTF-8" in (results[0].details() or "")
    for i, answer in enumerate(results[1:]):
        assert isinstance(answer, pb.ModelInferResponse), answer
        assert output(answer, "out").reshape(-1).tolist() == [f"ok {i} é".encode()]


def test_text_memory_is_linear_in_the_request(tmp_path: Path) -> None:
    # One long element and many empty ones: numpy's fixed-width unicode would
    # pad each of the 5,001 elements to 10,000 characters (200 MB).
    session = OnnxSession(identity_model(tmp_path / "echo.onnx", "BYTES"))
    inputs = _text(b"x" * 10_000, *([b""] * 5_000))
    tracemalloc.start()
    try:
        outputs = session.run(session.prepare(inputs))
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert outputs["out"].shape == (1, 5_001)
    assert peak < 5_000_000, f"peak {peak} bytes for a request of about 10 kB"


# --- rows per request (defect 4) -----------------------------------------------------------------


async def test_more_rows_than_max_batch_size_is_refused_on_the_device_and_not_forwarded(
    chain: Chain, device_stub: pb_grpc.GRPCInferenceServiceStub, monkeypatch: pytest.MonkeyPatch
) -> None:
    forwarded: list[str] = []
    real = InferenceClient.model_infer

    async def counting(self: InferenceClient, request: pb.ModelInferRequest, *args: Any, **kwargs: Any) -> Any:
        forwarded.append(request.model_name)
        return await real(self, request, *args, **kwargs)

    monkeypatch.setattr(InferenceClient, "model_infer", counting)
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await device_stub.ModelInfer(infer_request("lin", {"x": np.ones((65, 4), np.float32)}))
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "input 'x' has 65 rows; model 'lin' version 1 takes at most 64" in (caught.value.details() or "")
    at_limit = await device_stub.ModelInfer(infer_request("lin", {"x": np.ones((64, 4), np.float32)}))
    assert output(at_limit, "y").shape == (64, 3)
    assert forwarded == []
    await device_stub.ModelInfer(infer_request("edge-only", {"x": X}))
    assert forwarded == ["edge-only"]  # the count would see a forwarded request


def _pooling_model(path: Path) -> Path:
    """``y = ReduceMean(x, axis 0)``: a variable first dimension in, none out (so not "batchable")."""
    import onnx
    from onnx import TensorProto, helper

    graph = helper.make_graph(
        [helper.make_node("ReduceMean", ["x"], ["y"], axes=[0], keepdims=0)],
        "pool",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [4])],
    )
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)]), path)
    return path


async def test_rows_are_capped_for_a_model_whose_outputs_have_no_batch_axis(tmp_path: Path) -> None:
    repo = ModelRepository(tmp_path / "repo")
    repo.add("pool", _pooling_model(tmp_path / "pool.onnx"))
    node = await start_node(DEVICE, tmp_path / "repo", "pool-1")
    try:
        async with grpc.aio.insecure_channel(node.address) as channel:
            stub = pb_grpc.GRPCInferenceServiceStub(channel)
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await stub.ModelInfer(infer_request("pool", {"x": np.ones((1_000, 4), np.float32)}))
            assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert "input 'x' has 1000 rows; model 'pool' version 1 takes at most 64" in (caught.value.details() or "")
            answer = await stub.ModelInfer(infer_request("pool", {"x": np.ones((64, 4), np.float32)}))
            assert output(answer, "y").tolist() == [1.0] * 4
    finally:
        await node.stop()


async def test_a_model_whose_metadata_says_max_batch_size_0_is_unavailable_not_internal(tmp_path: Path) -> None:
    repo = ModelRepository(tmp_path / "repo")
    entry = repo.add("lin", linear_model(tmp_path / "lin.onnx"))
    meta = entry.path / "metadata.json"
    meta.write_text(meta.read_text().replace('"max_batch_size": 64', '"max_batch_size": 0'))
    cache = ModelCache(repo, RunPool(1), BatchingConfig(), 1 << 30)
    try:
        with pytest.raises(ModelNotReadyError, match="metadata max_batch_size must be at least 1, got 0"):
            await cache.get("lin")
    finally:
        await cache.close()


async def test_more_rows_than_max_batch_size_is_refused_by_the_edge_that_holds_the_model(
    device_stub: pb_grpc.GRPCInferenceServiceStub,
) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await device_stub.ModelInfer(infer_request("edge-only", {"x": np.ones((65_536, 4), np.float32)}))
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "model 'edge-only' version 1 takes at most 64" in (caught.value.details() or "")


async def test_no_batch_is_larger_than_the_model_max_batch_size(tmp_path: Path) -> None:
    repo = ModelRepository(tmp_path / "repo")
    repo.add("lin", linear_model(tmp_path / "lin.onnx"))
    cache = ModelCache(repo, RunPool(1), BatchingConfig(max_batch_size=4096), 1 << 30)
    try:
        model = await cache.get("lin")
        assert model.batcher.config.max_batch_size == model.entry.max_batch_size == 64
    finally:
        await cache.close()


# --- shapes (defect 8) ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("shape", "message"),
    [
        ([0, 2**62], "has more than"),
        ([2**62, 0], "has more than"),
        ([0, 2**31, 2**31], "has more than"),
        ([1] * 40, "40 dimensions, more than the limit"),
    ],
)
async def test_absurd_shapes_are_invalid_argument(
    device_stub: pb_grpc.GRPCInferenceServiceStub, shape: list[int], message: str
) -> None:
    for datatype in ("FP32", "BYTES"):
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await device_stub.ModelInfer(_shaped("lin", "x", datatype, shape, b""))
        assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT, caught.value.details()
        assert message in (caught.value.details() or "")


async def _stream(*items: pb.ModelInferRequest) -> AsyncIterator[pb.ModelInferRequest]:
    for item in items:
        yield item


async def test_a_bad_shape_does_not_end_the_stream(device_stub: pb_grpc.GRPCInferenceServiceStub) -> None:
    replies = [
        r
        async for r in device_stub.ModelStreamInfer(
            _stream(_shaped("lin", "x", "FP32", [0, 2**62], b""), infer_request("lin", {"x": X}))
        )
    ]
    assert len(replies) == 2
    assert "has more than" in replies[0].error_message
    assert output(replies[1].infer_response, "y").shape == (1, 3)


async def test_an_unexpected_error_ends_only_its_own_request_on_a_stream(
    device_stub: pb_grpc.GRPCInferenceServiceStub, monkeypatch: pytest.MonkeyPatch
) -> None:
    real = Dataplane._infer_local
    calls = 0

    async def explode_once(self: Dataplane, *args: object, **kwargs: object) -> object:
        nonlocal calls
        calls += 1
        if calls == 1:
            raise ValueError("secret internals")
        return await real(self, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(Dataplane, "_infer_local", explode_once)
    request = infer_request("lin", {"x": X})
    replies = [r async for r in device_stub.ModelStreamInfer(_stream(request, request))]
    assert len(replies) == 2
    assert replies[0].error_message.startswith("internal error; reported with trace id ")
    assert "secret" not in replies[0].error_message
    assert output(replies[1].infer_response, "y").shape == (1, 3)


# --- forwarding loops (defect 10) ----------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


async def test_a_forwarding_loop_is_refused_at_once_naming_the_route(tmp_path: Path) -> None:
    port_a = _free_port()
    b = await start_node(DEVICE, tmp_path / "b", "b", upstream=f"127.0.0.1:{port_a}")
    a = await start_node(DEVICE, tmp_path / "a", "a", upstream=b.address, port=port_a)
    try:
        async with grpc.aio.insecure_channel(a.address) as channel:
            stub = pb_grpc.GRPCInferenceServiceStub(channel)
            for call in (
                stub.ModelInfer(infer_request("ghost", {"x": X}), timeout=30),
                stub.ModelMetadata(pb.ModelMetadataRequest(name="ghost"), timeout=30),
                stub.ModelConfig(pb.ModelConfigRequest(name="ghost"), timeout=30),
            ):
                with pytest.raises(grpc.aio.AioRpcError) as caught:
                    await call
                assert caught.value.code() == grpc.StatusCode.FAILED_PRECONDITION, caught.value.details()
                assert caught.value.details() == "forwarding loop: tier0:a > tier0:b > tier0:a"
            replies = [r async for r in stub.ModelStreamInfer(_stream(infer_request("ghost", {"x": X})), timeout=30)]
            assert replies[0].error_message == "forwarding loop: tier0:a > tier0:b > tier0:a"
    finally:
        for node in (a, b):
            await node.stop()


async def test_a_chain_longer_than_max_hops_is_refused(tmp_path: Path) -> None:
    ModelRepository(tmp_path / "n4").add("far", linear_model(tmp_path / "far.onnx"))
    nodes: list[Node] = []
    upstream = ""
    try:
        for i in (4, 3, 2, 1):
            node = await start_node(DEVICE, tmp_path / f"n{i}", f"n{i}", upstream=upstream, requests={"max_hops": 2})
            nodes.append(node)
            upstream = node.address
        async with grpc.aio.insecure_channel(nodes[-1].address) as channel:
            stub = pb_grpc.GRPCInferenceServiceStub(channel)
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await stub.ModelInfer(infer_request("far", {"x": X}), timeout=30)
        assert caught.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert "forwarding chain longer than 2 hops: tier0:n1 > tier0:n2 > tier0:n3 > tier0:n4;" in (
            caught.value.details() or ""
        )
        # Two hops are within the limit: the third node answers what it holds.
        ModelRepository(tmp_path / "n3").add("near", linear_model(tmp_path / "near.onnx"))
        async with grpc.aio.insecure_channel(nodes[-1].address) as channel:
            stub = pb_grpc.GRPCInferenceServiceStub(channel)
            response = await stub.ModelInfer(infer_request("near", {"x": X}), timeout=30)
        assert params(response)["edgecascade.route"] == "tier0:n1 > tier0:n2 > tier0:n3"
    finally:
        for node in nodes:
            await node.stop()


def test_check_route_unit() -> None:
    dp = Dataplane(NodeIdentity("tier1", "e"), None, NoUpstream(), RequestLimits(max_hops=3))  # type: ignore[arg-type]
    assert dp.check_route(()) == ("tier1:e",)
    assert dp.check_route(("tier0:d",)) == ("tier0:d", "tier1:e")
    with pytest.raises(ForwardingLoopError, match="forwarding loop: tier1:e > tier2:r > tier1:e"):
        dp.check_route(("tier1:e", "tier2:r"))
    assert len(dp.check_route(("tier0:a", "tier0:b", "tier0:c"))) == 4
    with pytest.raises(
        ForwardingLoopError, match="longer than 3 hops: tier0:a > tier0:b > tier0:c > tier0:d > tier1:e"
    ):
        dp.check_route(("tier0:a", "tier0:b", "tier0:c", "tier0:d"))


# --- one default timeout (defect 13) -------------------------------------------------------------


async def test_a_models_default_timeout_override_sets_its_requests_deadline(tmp_path: Path) -> None:
    repo = ModelRepository(tmp_path / "repo")
    repo.add("lin", linear_model(tmp_path / "lin.onnx"))
    repo.add(
        "quick",
        linear_model(tmp_path / "quick.onnx", seed=5),
        properties={"edgecascade.batching.default_timeout_us": "250000"},
    )
    cache = ModelCache(repo, RunPool(1), BatchingConfig(default_timeout_us=9_000_000), 1 << 30)
    dp = Dataplane(NodeIdentity("tier0", "d"), cache, NoUpstream(), RequestLimits())
    try:
        budget = dp.budget({}, None)
        assert dp.deadline(budget, await cache.get("quick")) == pytest.approx(budget.arrived + 0.25)
        assert dp.deadline(budget, await cache.get("lin")) == pytest.approx(budget.arrived + 9.0)
        assert dp.deadline(budget) == pytest.approx(budget.arrived + 9.0)  # forwarded: the tier's default
        shorter = dp.budget({"timeout": 100_000}, None)
        assert dp.deadline(shorter, await cache.get("quick")) == pytest.approx(shorter.arrived + 0.1)
        with pytest.raises(InvalidArgumentError, match="must not be negative"):
            dp.budget({"timeout": -1}, None)
        # A model's default never exceeds what a client may ask for.
        capped = Dataplane(NodeIdentity("tier0", "d"), cache, NoUpstream(), RequestLimits(max_timeout_us=200_000))
        assert capped.deadline(budget, await cache.get("lin")) == pytest.approx(budget.arrived + 0.2)
    finally:
        await cache.close()
