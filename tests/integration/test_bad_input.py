"""Bad input over a real channel: the right status, a message naming the culprit, and the server keeps serving."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import grpc
import numpy as np
import pytest

from protos.inference import grpc_service_pb2 as pb
from protos.inference import grpc_service_pb2_grpc as pb_grpc
from services.engine.model_repository import ModelRepository
from tests.integration.conftest import Chain, start_node
from tests.support.onnx_models import linear_model
from tests.support.requests import infer_request, output, text_request
from tier0_device.app import SPEC as DEVICE

X = np.ones((1, 4), dtype=np.float32)
INVALID = grpc.StatusCode.INVALID_ARGUMENT


def good() -> pb.ModelInferRequest:
    return infer_request("lin", {"x": X})


def with_(
    change: Callable[[pb.ModelInferRequest], None], base: Callable[[], pb.ModelInferRequest] = good
) -> pb.ModelInferRequest:
    request = base()
    change(request)
    return request


def _both_contents(r: pb.ModelInferRequest) -> None:
    r.inputs[0].contents.fp32_contents.extend([1.0] * 4)


def _duplicate_input(r: pb.ModelInferRequest) -> None:
    r.inputs.append(r.inputs[0])
    r.raw_input_contents.append(r.raw_input_contents[0])


def _set_shape(shape: list[int]) -> Callable[[pb.ModelInferRequest], None]:
    def change(r: pb.ModelInferRequest) -> None:
        del r.inputs[0].shape[:]
        r.inputs[0].shape.extend(shape)

    return change


def _set_param(key: str, value: int | str) -> Callable[[pb.ModelInferRequest], None]:
    def change(r: pb.ModelInferRequest) -> None:
        if isinstance(value, str):
            r.parameters[key].string_param = value
        else:
            r.parameters[key].int64_param = value

    return change


@dataclass(frozen=True)
class Case:
    id: str
    request: Callable[[], pb.ModelInferRequest]
    code: grpc.StatusCode
    message: str


CASES = [
    Case(
        "unknown model",
        lambda: infer_request("ghost", {"x": X}),
        grpc.StatusCode.NOT_FOUND,
        "model 'ghost' is not held",
    ),
    Case(
        "unknown datatype",
        lambda: with_(lambda r: setattr(r.inputs[0], "datatype", "FLOAT32")),
        INVALID,
        "input 'x': unknown datatype 'FLOAT32'",
    ),
    Case(
        "raw length vs shape",
        lambda: with_(_set_shape([1, 5])),
        INVALID,
        "input 'x': shape [1, 5] of FP32 needs 20 bytes",
    ),
    Case(
        "shape does not fit",
        lambda: infer_request("lin", {"x": np.ones((1, 5), np.float32)}),
        INVALID,
        "input 'x': shape [1, 5] does not fit the model's [-1, 4]",
    ),
    Case(
        "rank does not fit",
        lambda: infer_request("lin", {"x": np.ones(4, np.float32)}),
        INVALID,
        "input 'x': shape [4] does not fit",
    ),
    Case(
        "wrong datatype",
        lambda: infer_request("lin", {"x": np.ones((1, 4), np.int64)}),
        INVALID,
        "input 'x' must be FP32, got INT64",
    ),
    Case("raw and typed contents", lambda: with_(_both_contents), INVALID, "input 'x' has both raw and typed contents"),
    Case("missing required input", lambda: infer_request("lin", {}), INVALID, "required input 'x' is missing"),
    Case(
        "unknown input",
        lambda: infer_request("lin", {"x": X, "z": X}),
        INVALID,
        "input 'z' is not an input of this model",
    ),
    Case(
        "raw count mismatch",
        lambda: with_(lambda r: r.raw_input_contents.append(b"")),
        INVALID,
        "raw_input_contents has 2 entries for 1 inputs",
    ),
    Case(
        "duplicate input",
        lambda: with_(_duplicate_input),
        INVALID,
        "input 'x' appears more than once",
    ),
    Case(
        "unknown output",
        lambda: with_(lambda r: r.outputs.add(name="nope")),
        INVALID,
        "requested output 'nope' is not an output",
    ),
    Case(
        "non-UTF-8 text",
        lambda: text_request("lm", b"ok \xff\xfe"),
        INVALID,
        "input 'text_input' element 0 is not valid UTF-8",
    ),
    Case(
        "token id out of range",
        lambda: infer_request("lm", {"input_ids": np.full((1, 4), 999, np.int64)}),
        INVALID,
        "the model rejected the input values",
    ),
    Case(
        "negative timeout",
        lambda: with_(_set_param("timeout", -5)),
        INVALID,
        "parameter 'timeout' must not be negative",
    ),
    Case(
        "absurd timeout",
        lambda: with_(_set_param("timeout", 10**15)),
        INVALID,
        "parameter 'timeout' of 1000000000000000 µs exceeds the limit",
    ),
    Case(
        "timeout as text",
        lambda: with_(_set_param("timeout", "soon")),
        INVALID,
        "parameter 'timeout' must be an integer",
    ),
    Case(
        "negative priority",
        lambda: with_(_set_param("priority", -1)),
        INVALID,
        "parameter 'priority' must be a non-negative integer",
    ),
    Case(
        "unknown parameter",
        lambda: with_(_set_param("sequence_id", 7)),
        INVALID,
        "request parameter 'sequence_id' is not supported",
    ),
    Case(
        "empty parameter",
        lambda: with_(lambda r: r.parameters["priority"].Clear()),
        INVALID,
        "request parameter 'priority' has no value",
    ),
    Case(
        "sampling parameter on a classifier",
        lambda: with_(_set_param("max_tokens", 5)),
        INVALID,
        "request parameter 'max_tokens' is not supported",
    ),
    Case(
        "bad input relayed from the edge",
        lambda: infer_request("edge-only", {"x": np.ones((1, 9), np.float32)}),
        INVALID,
        "input 'x': shape [1, 9] does not fit",
    ),
    Case("empty model name", lambda: infer_request("", {"x": X}), INVALID, "model name is empty"),
    Case("path in model name", lambda: infer_request("../lin", {"x": X}), INVALID, "model name '../lin' is not valid"),
    Case(
        "bad version",
        lambda: with_(lambda r: setattr(r, "model_version", "latest")),
        INVALID,
        "model version 'latest' is not valid",
    ),
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
async def test_bad_input_gets_the_right_status_and_the_server_keeps_serving(
    chain: Chain, device_stub: pb_grpc.GRPCInferenceServiceStub, case: Case
) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await device_stub.ModelInfer(case.request())
    assert caught.value.code() == case.code, caught.value.details()
    assert case.message in (caught.value.details() or "")
    assert caught.value.code() != grpc.StatusCode.INTERNAL
    response = await device_stub.ModelInfer(good())
    assert output(response, "y").shape == (1, 3)


async def test_oversized_message_is_resource_exhausted_and_the_server_keeps_serving(tmp_path: Path) -> None:
    ModelRepository(tmp_path / "repo").add("lin", linear_model(tmp_path / "lin.onnx", in_dim=4))
    node = await start_node(DEVICE, tmp_path / "repo", "small-1", max_message_bytes=64 * 1024)
    try:
        async with grpc.aio.insecure_channel(node.address) as channel:
            stub = pb_grpc.GRPCInferenceServiceStub(channel)
            big = infer_request("lin", {"x": np.ones((50_000, 4), np.float32)})  # 800 kB
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await stub.ModelInfer(big)
            assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert "larger than max" in (caught.value.details() or "")
            assert output(await stub.ModelInfer(good()), "y").shape == (1, 3)
    finally:
        await node.stop()


async def test_unexpected_errors_are_internal_with_a_fixed_message(
    chain: Chain, device_stub: pb_grpc.GRPCInferenceServiceStub, monkeypatch: pytest.MonkeyPatch
) -> None:
    from services.dataplane import Dataplane

    async def explode(*args: object, **kwargs: object) -> None:
        raise RuntimeError("secret internals /etc/passwd")

    monkeypatch.setattr(Dataplane, "infer", explode)
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await device_stub.ModelInfer(good())
    assert caught.value.code() == grpc.StatusCode.INTERNAL
    assert "secret" not in (caught.value.details() or "")
    assert (caught.value.details() or "").startswith("internal error; reported with trace id ")
