"""Upstream calls through the breaker, the retry budget and the result cache, against real gRPC servers (issue 11)."""

from __future__ import annotations

import asyncio
import socket
import time
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import numpy as np
import pytest

from protos.inference import grpc_service_pb2 as pb
from protos.inference import grpc_service_pb2_grpc as pb_grpc
from services.circuit_breaker import BreakerSettings, BreakerState, CircuitBreaker
from services.dataplane import InferCall
from services.errors import CircuitOpenError, ModelNotFoundError, UnavailableError
from services.inference import FallbackReason, NodeIdentity
from services.result_cache import ResultCache, ResultCacheSettings
from services.retry_budget import RetryBudget, RetrySettings
from services.rpc.guarded_upstream import CACHED, GuardedUpstream
from services.rpc.inference_client import InferenceClient
from services.rpc.node import Node
from services.rpc.upstream import GrpcUpstream
from tests.integration.conftest import populate, start_node
from tests.support.requests import infer_request, params
from tier0_device.app import SPEC as DEVICE

REASON = FallbackReason.MODEL_NOT_HELD
ME = NodeIdentity("tier0", "device-9")


def _call(request: pb.ModelInferRequest) -> InferCall:
    return InferCall(request.model_name, request.model_version, {}, lambda: None, wire=request)  # type: ignore[arg-type,return-value]


def _guarded(address: str, **breaker: float) -> GuardedUpstream:
    client = InferenceClient(address, None, 4 * 1024 * 1024)
    return GuardedUpstream(
        GrpcUpstream(client, ME),
        CircuitBreaker(address, BreakerSettings(**breaker)),  # type: ignore[arg-type]
        RetryBudget(RetrySettings(max_tokens=10)),
        RetrySettings(attempts=3, initial_backoff_s=0.01, max_backoff_s=0.05),
        ResultCache(ResultCacheSettings(max_bytes=1 << 20, ttl_s=30)),
    )


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


@pytest.fixture
async def upstream_node(tmp_path: Path) -> AsyncIterator[Node]:
    node = await start_node(DEVICE, populate(tmp_path).parent / "device", "upstream-1")
    yield node
    await node.stop()


async def _computed(node: Node, model: str) -> int:
    """Requests the upstream computed for ``model`` (its own statistics, over OIP)."""
    async with grpc.aio.insecure_channel(node.address) as channel:
        stats = await pb_grpc.GRPCInferenceServiceStub(channel).ModelStatistics(pb.ModelStatisticsRequest(name=model))
    return sum(s.inference_count for s in stats.model_stats)


async def test_a_repeated_question_is_answered_from_the_cache_never_across_models_or_versions(
    upstream_node: Node,
) -> None:
    guarded = _guarded(upstream_node.address)
    x = np.arange(8, dtype=np.float32).reshape(2, 4)
    try:
        asked = infer_request("lin", {"x": x})
        asked.id = "a"
        first = (await guarded.infer(_call(asked), REASON, 5, ["tier0:device-9"])).message
        computed = await _computed(upstream_node, "lin")
        again = infer_request("lin", {"x": x}, priority=1)
        again.id = "b"
        second = (await guarded.infer(_call(again), REASON, 5, ["tier0:device-9"])).message
        assert await _computed(upstream_node, "lin") == computed, "a cache hit must not reach the upstream"
        assert params(second)[CACHED] is True and CACHED not in params(first)
        assert second.id == "b" and list(second.raw_output_contents) == list(first.raw_output_contents)
        # Another input, another version asked for: each goes upstream.
        await guarded.infer(_call(infer_request("lin", {"x": x + 1})), REASON, 5, [])
        pinned = infer_request("lin", {"x": x})
        pinned.model_version = "1"
        third = (await guarded.infer(_call(pinned), REASON, 5, [])).message
        assert CACHED not in params(third)
        assert await _computed(upstream_node, "lin") == computed + 2  # two more requests (the cache hit was not one)
        stats = guarded.cache.stats
        assert (stats.hits, stats.misses) == (1, 3)
    finally:
        await guarded.close()


async def test_a_caller_mistake_is_not_retried_and_does_not_open_the_breaker(upstream_node: Node) -> None:
    guarded = _guarded(upstream_node.address, consecutive_failures=2)
    try:
        for _ in range(5):
            with pytest.raises(ModelNotFoundError):
                await guarded.infer(_call(infer_request("nope", {"x": np.zeros((1, 4), np.float32)})), REASON, 5, [])
        assert guarded.breaker.state is BreakerState.CLOSED
        assert guarded.budget.retries == 0
    finally:
        await guarded.close()


async def test_an_unreachable_upstream_opens_the_breaker_and_then_no_call_waits() -> None:
    address = f"127.0.0.1:{_free_port()}"
    guarded = _guarded(address, consecutive_failures=3, open_s=0.5)
    request = infer_request("lin", {"x": np.zeros((1, 4), np.float32)})
    try:
        started = time.monotonic()
        with pytest.raises(UnavailableError):
            await guarded.infer(_call(request), REASON, 0.4, [])
        assert time.monotonic() - started < 0.4 + 0.2, "retries must stay within the request's deadline"
        assert guarded.budget.retries >= 1  # UNAVAILABLE is retried (within the budget)
        while guarded.breaker.state is BreakerState.CLOSED:
            with pytest.raises(UnavailableError):
                await guarded.infer(_call(request), REASON, 0.4, [])
        assert guarded.breaker.state is BreakerState.OPEN
        started = time.monotonic()
        for _ in range(20):
            with pytest.raises(CircuitOpenError, match=r"circuit to upstream .* is open"):
                await guarded.infer(_call(request), REASON, 5, [])
        assert time.monotonic() - started < 0.1, "an open breaker must fail calls at once"
        assert guarded.breaker.rejected >= 20
    finally:
        await guarded.close()


async def test_the_breaker_closes_again_once_the_upstream_is_back(tmp_path: Path) -> None:
    port = _free_port()
    address = f"127.0.0.1:{port}"
    guarded = _guarded(address, consecutive_failures=2, open_s=0.3)
    request = infer_request("lin", {"x": np.zeros((1, 4), np.float32)})
    node = None
    try:
        while guarded.breaker.state is not BreakerState.OPEN:
            with pytest.raises(UnavailableError):
                await guarded.infer(_call(request), REASON, 0.3, [])
        node = await start_node(DEVICE, populate(tmp_path).parent / "device", "upstream-1", port=port)
        answered = None
        for _ in range(100):  # the probe goes out once the cool-down is over (the channel may need to reconnect)
            try:
                answered = await guarded.infer(_call(request), REASON, 2, [])
                break
            except UnavailableError:
                await asyncio.sleep(0.05)
        assert answered is not None
        assert guarded.breaker.snapshot().state is BreakerState.CLOSED
        assert guarded.breaker.opened >= 1
    finally:
        await guarded.close()
        if node is not None:
            await node.stop()
