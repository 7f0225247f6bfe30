"""Generation over ModelStreamInfer: one response per token, a final response, errors that keep the stream open."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import numpy as np
import pytest

from protos.inference import grpc_service_pb2 as pb
from protos.inference import grpc_service_pb2_grpc as pb_grpc
from tests.integration.conftest import Chain
from tests.support.requests import infer_request, output, params, text_request


async def requests(*items: pb.ModelInferRequest) -> AsyncIterator[pb.ModelInferRequest]:
    for item in items:
        yield item


async def collect(
    stub: pb_grpc.GRPCInferenceServiceStub, *items: pb.ModelInferRequest
) -> list[pb.ModelStreamInferResponse]:
    return [r async for r in stub.ModelStreamInfer(requests(*items))]


async def test_generation_streams_one_response_per_token_then_a_final_one(
    device_stub: pb_grpc.GRPCInferenceServiceStub,
) -> None:
    replies = await collect(device_stub, text_request("lm", "abc", max_tokens=12, temperature=0.0))
    assert not any(r.error_message for r in replies)
    tokens, final = replies[:-1], replies[-1]
    assert len(tokens) == 12
    for reply in tokens:
        got = params(reply.infer_response)
        assert got["edgecascade.served_by"] == "tier0:device-1"
        assert 0.0 < got["edgecascade.token_probability"] <= 1.0
        text = output(reply.infer_response, "text_output")
        assert text.shape == (1,) and len(text[0].decode()) == 1
    summary = params(final.infer_response)
    assert summary["triton_final_response"] is True
    assert summary["edgecascade.tokens"] == 12
    assert summary["edgecascade.finish_reason"] == "length"
    assert 0.0 < summary["edgecascade.confidence"] <= 1.0
    assert not final.infer_response.outputs


async def test_same_seed_same_text_and_stop_strings_end_early(device_stub: pb_grpc.GRPCInferenceServiceStub) -> None:
    def text(replies: list[pb.ModelStreamInferResponse]) -> str:
        return "".join(output(r.infer_response, "text_output")[0].decode() for r in replies[:-1])

    first = text(await collect(device_stub, text_request("lm", "ab", max_tokens=30, temperature=1.0, seed=11)))
    second = text(await collect(device_stub, text_request("lm", "ab", max_tokens=30, temperature=1.0, seed=11)))
    assert first == second and len(first) == 30
    stop = first[5]
    stopped = await collect(device_stub, text_request("lm", "ab", max_tokens=30, temperature=1.0, seed=11, stop=stop))
    assert text(stopped) == first[: first.index(stop) + 1]
    assert params(stopped[-1].infer_response)["edgecascade.finish_reason"] == "stop"


async def test_a_bad_request_is_an_error_message_and_the_stream_goes_on(
    device_stub: pb_grpc.GRPCInferenceServiceStub,
) -> None:
    replies = await collect(
        device_stub,
        text_request("lm", b"\xff"),
        text_request("lm", "a", max_tokens=0),
        text_request("ghost", "a"),
        text_request("lm", "a", max_tokens=3),
    )
    assert "not valid UTF-8" in replies[0].error_message
    assert "max_tokens" in replies[1].error_message
    assert "model 'ghost' is not held" in replies[2].error_message
    assert [bool(r.error_message) for r in replies[3:]] == [False] * 4
    assert params(replies[-1].infer_response)["triton_final_response"] is True


async def test_plain_inference_over_the_stream(device_stub: pb_grpc.GRPCInferenceServiceStub) -> None:
    x = np.ones((3, 4), np.float32)
    replies = await collect(device_stub, infer_request("lin", {"x": x}), infer_request("lin", {"x": x[:1]}))
    assert [output(r.infer_response, "y").shape for r in replies] == [(3, 3), (1, 3)]


async def test_generation_is_forwarded_when_the_model_is_upstream(
    device_stub: pb_grpc.GRPCInferenceServiceStub,
) -> None:
    replies = await collect(device_stub, text_request("edge-lm", "abc", max_tokens=5, temperature=0.0))
    assert len(replies) == 6
    for reply in replies:
        got = params(reply.infer_response)
        assert got["edgecascade.served_by"] == "tier1:edge-1"
        assert got["edgecascade.fallback_reason"] == "model_not_held"


async def test_a_cancelled_stream_stops_generating(chain: Chain, device_stub: pb_grpc.GRPCInferenceServiceStub) -> None:
    call = device_stub.ModelStreamInfer(requests(text_request("lm", "a", max_tokens=2000, temperature=1.0)))
    received = 0
    async for reply in call:
        assert not reply.error_message
        received += 1
        if received == 5:
            call.cancel()
            break
    await asyncio.sleep(0.3)
    stats = (await device_stub.ModelStatistics(pb.ModelStatisticsRequest(name="lm"))).model_stats[0]
    after_cancel = stats.execution_count
    await asyncio.sleep(0.3)
    stats = (await device_stub.ModelStatistics(pb.ModelStatisticsRequest(name="lm"))).model_stats[0]
    assert stats.execution_count == after_cancel, "generation went on after the stream was cancelled"
    assert after_cancel < 100


async def test_next_character_distribution_by_model_infer(device_stub: pb_grpc.GRPCInferenceServiceStub) -> None:
    response = await device_stub.ModelInfer(text_request("lm", "abc"))
    probs = output(response, "probs")
    assert probs.shape[0] == 1
    assert probs.sum() == pytest.approx(1.0, abs=1e-5)
    ids = infer_request("lm", {"input_ids": np.array([[0, 2, 3, 4]], dtype=np.int64)})
    np.testing.assert_allclose(output(await device_stub.ModelInfer(ids), "probs"), probs, rtol=1e-6)


async def test_deadline_ends_a_long_generation(device_stub: pb_grpc.GRPCInferenceServiceStub) -> None:
    # The request's own timeout (20 ms) ends it with an error on the stream; the
    # stream itself stays usable for the next request.
    replies = await collect(
        device_stub, text_request("lm", "a", max_tokens=2000, timeout=20_000), text_request("lm", "a", max_tokens=2)
    )
    errors = [r.error_message for r in replies if r.error_message]
    assert len(errors) == 1 and "deadline" in errors[0]
    assert len(replies) - 1 < 2000 + 3
    assert params(replies[-1].infer_response)["triton_final_response"] is True
