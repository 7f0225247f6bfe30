"""Upstream calls through the breaker, the retry budget and the result cache, against real gRPC servers (issue 11)."""

from __future__ import annotations

import asyncio
import socket
import time
from collections.abc import AsyncIterator, Mapping
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest

from protos.edgecascade.v1 import mesh_pb2, mesh_pb2_grpc
from protos.inference import grpc_service_pb2 as pb
from protos.inference import grpc_service_pb2_grpc as pb_grpc
from services.circuit_breaker import BreakerSettings, BreakerState, CircuitBreaker
from services.config import load_config
from services.dataplane import InferCall
from services.engine.model_repository import ModelRepository
from services.errors import CircuitOpenError, ModelNotFoundError, UnavailableError
from services.inference import FallbackReason, NodeIdentity
from services.result_cache import ResultCache, ResultCacheSettings
from services.retry_budget import RetryBudget, RetrySettings
from services.rpc.guarded_upstream import CACHED, GuardedUpstream
from services.rpc.inference_client import InferenceClient
from services.rpc.node import Node, TierSpec
from services.rpc.upstream import GrpcUpstream
from tests.integration.conftest import populate, start_node
from tests.support.flaky_edge import FlakyEdge
from tests.support.onnx_models import linear_model
from tests.support.requests import infer_request, params
from tier0_device.app import SPEC as DEVICE
from tier1_edge.app import SPEC as EDGE
from tier2_region.app import SPEC as REGION

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


async def _chain_node(spec: TierSpec, repository: Path, node_id: str, **sections: Mapping[str, Any]) -> Node:
    overrides: dict[str, Mapping[str, Any]] = {
        "server": {"node_id": node_id, "grace_seconds": 0.2},
        "repository": {"path": str(repository), "preload": False},
        **sections,
    }
    node = Node(spec, load_config(spec.config_type, env={}, overrides=overrides))
    await node.start()
    return node


@pytest.mark.parametrize("refusal", ["unavailable", "exhausted"])
async def test_a_regions_refusal_relayed_by_the_edge_is_neither_retried_nor_counted_at_the_device(
    tmp_path: Path, refusal: str
) -> None:
    """device → edge → (counting proxy) → region; only the region holds ``far``, and refuses it:
    UNAVAILABLE (it cannot load it) or RESOURCE_EXHAUSTED (it does not fit in its memory)."""
    region_repo = tmp_path / "region"
    region_sections: dict[str, Mapping[str, Any]] = {}
    if refusal == "unavailable":
        (region_repo / "far" / "1").mkdir(parents=True)
        (region_repo / "far" / "1" / "model.onnx").write_bytes(b"\x08\x07garbage that is not a model")
        (region_repo / "far" / "1" / "metadata.json").write_text('{"task": ""}')
    else:
        ModelRepository(region_repo).add("far", linear_model(tmp_path / "far.onnx", seed=2))
        region_sections["cache"] = {"memory_budget_bytes": 1}
    (tmp_path / "edge").mkdir()
    (tmp_path / "device").mkdir()
    region = await _chain_node(REGION, region_repo, "region-b", **region_sections)
    proxy = FlakyEdge(region.address)
    await proxy.start()
    # (The edge's own breaker to the region is kept closed, so every request reaches the region.)
    edge = await _chain_node(
        EDGE, tmp_path / "edge", "edge-b", upstream={"address": proxy.address, "breaker_failures": 100}
    )
    device = await _chain_node(
        DEVICE,
        tmp_path / "device",
        "device-b",
        upstream={"address": edge.address, "breaker_failures": 2, "cache_max_bytes": 0},
    )
    expected = grpc.StatusCode.UNAVAILABLE if refusal == "unavailable" else grpc.StatusCode.RESOURCE_EXHAUSTED
    requests = 3  # (within the edge's retry budget: each is tried three times there)
    try:
        async with grpc.aio.insecure_channel(device.address) as channel:
            stub = pb_grpc.GRPCInferenceServiceStub(channel)
            for _ in range(requests):
                with pytest.raises(grpc.aio.AioRpcError) as caught:
                    await stub.ModelInfer(infer_request("far", {"x": np.zeros((1, 4), np.float32)}), timeout=5)
                assert caught.value.code() == expected, caught.value.details()
            info = await mesh_pb2_grpc.MeshServiceStub(channel).GetTierInfo(mesh_pb2.GetTierInfoRequest(), timeout=5)
        status = info.upstream_status
        assert status.breaker_state == "closed", "the edge relayed the region's refusal: the edge is healthy"
        assert (status.breaker_failures, status.breaker_opened, status.retries) == (0, 0, 0)
        # The edge retried an UNAVAILABLE region (its own upstream) as it should; the device did not retry again.
        per_request = 3 if refusal == "unavailable" else 1
        assert proxy.seen == requests * per_request
    finally:
        await device.stop()
        await edge.stop()
        await proxy.stop()
        await region.stop()
