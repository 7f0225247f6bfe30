"""Token-level cascade and cross-tier speculative decoding of a generator, on real gRPC nodes (issue 11, items 2-3).

The device's ``lm`` (tiny char-LM, context 4) is paired by ``[token_cascade] pairs``
with the edge's ``edge-lm-long`` (another tiny char-LM with the same vocabulary,
context 6, ``max_batch_size`` 3: a speculative block drafts at most 2 tokens).
The device's ``lm2`` is a generator without a pairing.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest

from protos.inference import grpc_service_pb2 as pb
from protos.inference import grpc_service_pb2_grpc as pb_grpc
from services.engine.generation import GenerationParams, sampling_distribution
from services.engine.model_repository import ModelRepository
from services.engine.speculative import total_variation, tv_bound
from services.inference import (
    CASCADE,
    DEGRADED,
    DRAFTS,
    DRAFTS_ACCEPTED,
    FINAL_RESPONSE,
    THRESHOLD,
    TOKEN_LOCAL,
    TOKEN_ORIGIN,
    TOKEN_UPSTREAM,
    TOKENS,
    TOKENS_ESCALATED,
    TOKENS_LOCAL,
    UPSTREAM_CALLS,
)
from services.rpc.node import Node
from tests.integration.conftest import populate, start_node
from tests.support.flaky_edge import FlakyEdge
from tests.support.onnx_models import tiny_char_lm
from tests.support.requests import infer_request, output, params, text_request
from tier0_device.app import SPEC as DEVICE
from tier1_edge.app import SPEC as EDGE
from tier2_region.app import SPEC as REGION

EDGE_MODEL = "edge-lm-long"
EDGE_CONTEXT = 6
EDGE_MAX_BATCH = 3
VOCAB = ["", "", *"abcdefgh ."]


@dataclass
class Paired:
    device: Node
    edge: Node
    region: Node
    stub: pb_grpc.GRPCInferenceServiceStub
    edge_stub: pb_grpc.GRPCInferenceServiceStub


@pytest.fixture
async def paired(tmp_path: Path) -> AsyncIterator[Paired]:
    files = populate(tmp_path)
    ModelRepository(tmp_path / "device").add("lm2", tiny_char_lm(files / "lm2.onnx", seed=7))
    entry = ModelRepository(tmp_path / "edge").add(
        EDGE_MODEL, tiny_char_lm(files / "edge-lm-long.onnx", context=EDGE_CONTEXT, seed=5)
    )
    meta_file = entry.path / "metadata.json"
    meta = json.loads(meta_file.read_text())
    meta["max_batch_size"] = EDGE_MAX_BATCH
    meta_file.write_text(json.dumps(meta))
    region = await start_node(REGION, tmp_path / "region", "region-1")
    edge = await start_node(EDGE, tmp_path / "edge", "edge-1", upstream=region.address)
    device = await start_node(
        DEVICE,
        tmp_path / "device",
        "device-1",
        upstream=edge.address,
        token_cascade={"pairs": [f"lm={EDGE_MODEL}"]},
    )
    try:
        async with (
            grpc.aio.insecure_channel(device.address) as channel,
            grpc.aio.insecure_channel(edge.address) as edge_channel,
        ):
            yield Paired(
                device,
                edge,
                region,
                pb_grpc.GRPCInferenceServiceStub(channel),
                pb_grpc.GRPCInferenceServiceStub(edge_channel),
            )
    finally:
        for node in (device, edge, region):
            await node.stop()


async def _requests(*items: pb.ModelInferRequest) -> AsyncIterator[pb.ModelInferRequest]:
    for item in items:
        yield item


def cascade(mode: str, threshold: float | None = None) -> dict[str, Any]:
    """The cascade request parameters."""
    return {CASCADE: mode} if threshold is None else {CASCADE: mode, THRESHOLD: threshold}


async def generation(
    stub: pb_grpc.GRPCInferenceServiceStub, model: str = "lm", prompt: str = "abc", **parameters: Any
) -> tuple[list[tuple[str, dict[str, Any]]], dict[str, Any]]:
    """One generation over ModelStreamInfer: ``[(token text, its parameters)]`` and the final parameters."""
    tokens: list[tuple[str, dict[str, Any]]] = []
    async for reply in stub.ModelStreamInfer(_requests(text_request(model, prompt, **parameters)), timeout=20):
        assert not reply.error_message, reply.error_message
        p = params(reply.infer_response)
        if p.get(FINAL_RESPONSE):
            return tokens, p
        tokens.append((bytes(output(reply.infer_response, "text_output")[0]).decode(), p))
    raise AssertionError("the stream ended without a final response")


async def edge_inferences(paired: Paired) -> int:
    """How many requests the edge's paired model has answered (0 while it is not loaded)."""
    reply = await paired.edge_stub.ModelStatistics(pb.ModelStatisticsRequest(name=EDGE_MODEL))
    return sum(s.inference_count for s in reply.model_stats)


def check_tallies(tokens: list[tuple[str, dict[str, Any]]], final: dict[str, Any]) -> tuple[int, int]:
    """Asserts every token says its origin and that they add up to the final tallies; returns (local, escalated)."""
    origins = [p[TOKEN_ORIGIN] for _, p in tokens]
    assert set(origins) <= {TOKEN_LOCAL, TOKEN_UPSTREAM}
    local, escalated = origins.count(TOKEN_LOCAL), origins.count(TOKEN_UPSTREAM)
    assert (final[TOKENS_LOCAL], final[TOKENS_ESCALATED]) == (local, escalated)
    assert final[TOKENS] == len(tokens) == local + escalated
    assert all(len(text) == 1 for text, _ in tokens)
    return local, escalated


async def test_token_cascade_stream_is_well_formed_and_its_origins_add_up(paired: Paired) -> None:
    before = await edge_inferences(paired)
    tokens, final = await generation(paired.stub, max_tokens=40, seed=1, **cascade("confidence", 0.5))
    local, escalated = check_tallies(tokens, final)
    assert local > 0 and escalated > 0  # a tiny random LM is unsure of some steps and sure of others
    assert final[UPSTREAM_CALLS] == escalated  # one ModelInfer of the edge's model per escalated token
    assert await edge_inferences(paired) - before == escalated
    assert DEGRADED not in final
    assert 0.0 < final["edgecascade.confidence"] <= 1.0
    # Each local token cleared the threshold by the device's own confidence; each escalated one did not.
    for _, p in tokens:
        assert (p["edgecascade.confidence"] >= 0.5) == (p[TOKEN_ORIGIN] == TOKEN_LOCAL)


async def test_threshold_zero_keeps_every_token_local_and_one_escalates_every_token(paired: Paired) -> None:
    before = await edge_inferences(paired)
    tokens, final = await generation(paired.stub, max_tokens=20, seed=2, **cascade("confidence", 0.0))
    assert check_tallies(tokens, final) == (20, 0)
    assert final[UPSTREAM_CALLS] == 0
    assert await edge_inferences(paired) == before

    tokens, final = await generation(paired.stub, max_tokens=20, seed=2, **cascade("confidence", 1.0))
    assert check_tallies(tokens, final) == (0, 20)
    assert final[UPSTREAM_CALLS] == 20
    assert await edge_inferences(paired) - before == 20


async def test_a_paired_model_cascades_by_default_and_off_generates_alone(paired: Paired) -> None:
    tokens, final = await generation(paired.stub, max_tokens=10, seed=3)
    check_tallies(tokens, final)
    assert final[CASCADE] == "confidence"

    tokens, final = await generation(paired.stub, max_tokens=10, seed=3, **cascade("off"))
    assert final[TOKENS] == 10
    assert TOKENS_LOCAL not in final and all(TOKEN_ORIGIN not in p for _, p in tokens)


async def test_speculative_stream_is_well_formed_reproducible_and_needs_fewer_calls_than_tokens(
    paired: Paired,
) -> None:
    before = await edge_inferences(paired)
    tokens, final = await generation(paired.stub, max_tokens=60, seed=4, **cascade("speculative"))
    local, escalated = check_tallies(tokens, final)
    assert final[TOKENS] == 60 and DEGRADED not in final
    assert local == final[DRAFTS_ACCEPTED] > 0
    calls = final[UPSTREAM_CALLS]
    assert escalated <= calls < 60  # one corrected or bonus token per verification call
    assert await edge_inferences(paired) - before == calls
    # k + 1 windows per call never exceed the edge model's max_batch_size (3): at most 2 drafts per call.
    assert final[DRAFTS] <= (EDGE_MAX_BATCH - 1) * calls

    again, final_again = await generation(paired.stub, max_tokens=60, seed=4, **cascade("speculative"))
    assert again == tokens and final_again == final  # seeded: the whole stream is reproducible


async def test_speculative_output_follows_the_edge_models_distribution(paired: Paired) -> None:
    """Many one-token speculative generations from one prompt: their histogram is the edge's distribution."""
    prompt = "bad c"
    # The edge model's next-character distribution after the prompt, as sampled at temperature 1.
    ids = [VOCAB.index(ch) for ch in prompt]
    window = np.asarray([[0] * (EDGE_CONTEXT - len(ids)) + ids], dtype=np.int64)
    reply = await paired.edge_stub.ModelInfer(infer_request(EDGE_MODEL, {"input_ids": window}), timeout=10)
    p = sampling_distribution(output(reply, "probs")[0], GenerationParams(temperature=1.0))
    reply = await paired.stub.ModelInfer(text_request("lm", prompt, **cascade("off")), timeout=10)
    q = sampling_distribution(output(reply, "probs")[0], GenerationParams(temperature=1.0))

    n = 400
    requests = [
        text_request("lm", prompt, max_tokens=1, temperature=1.0, seed=seed, **cascade("speculative"))
        for seed in range(n)
    ]
    counts = np.zeros(len(VOCAB))
    drafted_kept = 0
    async for answer in paired.stub.ModelStreamInfer(_requests(*requests), timeout=60):
        assert not answer.error_message, answer.error_message
        p_answer = params(answer.infer_response)
        if p_answer.get(FINAL_RESPONSE):
            assert DEGRADED not in p_answer
            continue
        counts[VOCAB.index(bytes(output(answer.infer_response, "text_output")[0]).decode())] += 1
        drafted_kept += p_answer[TOKEN_ORIGIN] == TOKEN_LOCAL
    assert counts.sum() == n
    bound = tv_bound(p, n, delta=1e-3)
    assert total_variation(counts / n, p) <= bound
    # The test can tell: the device's own distribution is far from the edge's, yet drafts were kept.
    assert total_variation(q, p) > 2 * bound
    assert drafted_kept > 0


async def test_with_the_edge_down_the_stream_completes_locally_marked_degraded(paired: Paired) -> None:
    await paired.edge.stop()
    for mode in ("confidence", "speculative"):
        tokens, final = await generation(paired.stub, max_tokens=15, seed=5, **cascade(mode, 1.0))
        assert check_tallies(tokens, final) == (15, 0)
        assert final[DEGRADED] in {"upstream_unavailable", "circuit_open"}


async def test_bad_cascade_parameters_are_invalid_arguments(paired: Paired) -> None:
    bad: list[dict[str, Any]] = [
        {CASCADE: "sometimes"},
        {CASCADE: 1},
        {CASCADE: "confidence", THRESHOLD: 1.5},
        {CASCADE: "confidence", THRESHOLD: "high"},
    ]
    for parameters in bad:
        async for reply in paired.stub.ModelStreamInfer(_requests(text_request("lm", "abc", **parameters))):
            assert reply.error_message, parameters
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await paired.stub.ModelInfer(text_request("lm", "abc", **parameters), timeout=10)
        assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT, parameters
    # A cascade asked of a generator without a pairing.
    replies = [
        r async for r in paired.stub.ModelStreamInfer(_requests(text_request("lm2", "abc", **cascade("speculative"))))
    ]
    assert len(replies) == 1 and "no upstream model to cascade to" in replies[0].error_message


async def test_a_forwarded_generation_of_an_unpaired_model_is_generated_without_the_cascade(paired: Paired) -> None:
    # The device does not hold edge-lm (the edge does, with no pairing): the device accepted the cascade
    # parameters and forwarded the request, so the edge generates without the cascade instead of refusing.
    tokens, final = await generation(paired.stub, model="edge-lm", max_tokens=5, seed=1, **cascade("speculative"))
    assert final[TOKENS] == 5 and len(tokens) == 5
    assert TOKENS_LOCAL not in final and all(TOKEN_ORIGIN not in p for _, p in tokens)
    # Asked of the edge directly, the same request is the client's own mistake.
    request = text_request("edge-lm", "abc", **cascade("speculative"))
    replies = [r async for r in paired.edge_stub.ModelStreamInfer(_requests(request))]
    assert len(replies) == 1 and "no upstream model to cascade to" in replies[0].error_message


async def test_an_edge_slowed_beyond_the_deadline_leaves_the_stream_to_finish_locally(tmp_path: Path) -> None:
    """device → a proxy that holds every call 30 s → edge: each generation (1 s deadline) still completes here."""
    files = populate(tmp_path)
    ModelRepository(tmp_path / "edge").add(
        EDGE_MODEL, tiny_char_lm(files / "edge-lm-long.onnx", context=EDGE_CONTEXT, seed=5)
    )
    edge = await start_node(EDGE, tmp_path / "edge", "edge-1")
    proxy = FlakyEdge(edge.address)
    await proxy.start()
    device = await start_node(
        DEVICE, tmp_path / "device", "device-1", upstream=proxy.address, token_cascade={"pairs": [f"lm={EDGE_MODEL}"]}
    )
    deadline_us = 1_000_000
    try:
        async with grpc.aio.insecure_channel(device.address) as channel:
            stub = pb_grpc.GRPCInferenceServiceStub(channel)
            # The edge is slow from the start: the description of its model times out.
            proxy.delay(30.0)
            for mode in ("confidence", "speculative"):
                tokens, final = await generation(stub, max_tokens=15, seed=6, timeout=deadline_us, **cascade(mode, 1.0))
                assert check_tallies(tokens, final) == (15, 0)
                assert final[DEGRADED] == "upstream_timeout"
            # The edge answers (its model's description is kept), then slows down: an escalation times out.
            proxy.honest()
            tokens, final = await generation(
                stub, max_tokens=15, seed=6, timeout=deadline_us, **cascade("confidence", 1.0)
            )
            assert check_tallies(tokens, final) == (0, 15) and DEGRADED not in final
            proxy.delay(30.0)
            for mode in ("confidence", "speculative"):
                tokens, final = await generation(stub, max_tokens=15, seed=6, timeout=deadline_us, **cascade(mode, 1.0))
                assert check_tallies(tokens, final) == (15, 0)
                assert final[DEGRADED] == "upstream_timeout" and final[UPSTREAM_CALLS] == 1
    finally:
        await device.stop()
        await proxy.stop()
        await edge.stop()
