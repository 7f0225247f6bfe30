"""The request-level confidence cascade and degraded answers, on real gRPC servers (issue 11, items 1 and 4).

device-c ─▶ a flaky proxy ─▶ edge-c. Both hold ``cls`` (a 3-class linear
classifier; the device's copy has another seed and a signed threshold of 0.999)
and ``plain`` (no threshold anywhere). The proxy forwards every call untouched
until a test drops, slows, flaps or kills it.
"""

from __future__ import annotations

import asyncio
import statistics
import time
from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
from opentelemetry.sdk.metrics.export import InMemoryMetricReader

from protos.edgecascade.v1 import mesh_pb2, mesh_pb2_grpc
from protos.inference import grpc_service_pb2 as pb
from protos.inference import grpc_service_pb2_grpc as pb_grpc
from services.cascade import (
    DEGRADED_CIRCUIT_OPEN,
    DEGRADED_TIMEOUT,
    DEGRADED_UNAVAILABLE,
    THRESHOLD_PROPERTY,
)
from services.config import load_config
from services.engine.model_repository import ModelRepository
from services.inference import CASCADE, CONFIDENCE, DEGRADED, FALLBACK_REASON, SERVED_BY, THRESHOLD
from services.rpc.node import Node, TierSpec
from services.telemetry_names import (
    BREAKER_STATE,
    BREAKER_TRANSITIONS,
    DEGRADED_ANSWERS,
    DEGRADED_REASON,
    OUTCOME,
    REQUESTS,
    RESULT_CACHE_HIT_RATE,
)
from tests.support.flaky_edge import FlakyEdge
from tests.support.onnx_models import linear_model
from tests.support.requests import infer_request, params
from tier0_device.app import SPEC as DEVICE
from tier1_edge.app import SPEC as EDGE

ON_DEVICE = "tier0:device-c"
ON_EDGE = "tier1:edge-c"
# Breaks fast and comes back fast, so the tests stay short; no result cache (each escalation goes upward).
GUARD = {
    "breaker_failures": 3,
    "breaker_open_s": 0.3,
    "breaker_max_open_s": 1.0,
    "retry_attempts": 2,
    "retry_initial_backoff_s": 0.01,
    "retry_max_backoff_s": 0.02,
    "cache_max_bytes": 0,
}
INPUTS = (np.random.default_rng(11).standard_normal((48, 1, 4)) * 1.5).astype(np.float32)


async def _node(
    spec: TierSpec,
    repository: Path,
    node_id: str,
    upstream: Mapping[str, Any] | None = None,
    readers: Sequence[InMemoryMetricReader] = (),
    **sections: Mapping[str, Any],
) -> Node:
    overrides: dict[str, Mapping[str, Any]] = {
        "server": {"node_id": node_id, "grace_seconds": 0.2},
        "repository": {"path": str(repository)},
        "upstream": dict(upstream or {}),
        **sections,
    }
    node = Node(spec, load_config(spec.config_type, env={}, overrides=overrides), metric_readers=readers)
    await node.start()
    return node


@dataclass
class Mesh:
    device: Node
    edge: Node
    proxy: FlakyEdge
    reader: InMemoryMetricReader
    root: Path
    stub: pb_grpc.GRPCInferenceServiceStub
    edge_stub: pb_grpc.GRPCInferenceServiceStub
    mesh: mesh_pb2_grpc.MeshServiceStub


@pytest.fixture
async def mesh(tmp_path: Path) -> AsyncIterator[Mesh]:
    files = tmp_path / "files"
    device_repo = ModelRepository(tmp_path / "device")
    device_repo.add("cls", linear_model(files / "cls-d.onnx", seed=0), properties={THRESHOLD_PROPERTY: "0.999"})
    device_repo.add("plain", linear_model(files / "plain-d.onnx", seed=7))
    edge_repo = ModelRepository(tmp_path / "edge")
    edge_repo.add("cls", linear_model(files / "cls-e.onnx", seed=5))
    edge_repo.add("plain", linear_model(files / "plain-e.onnx", seed=8))
    edge_repo.add("edge-only", linear_model(files / "only-e.onnx", seed=9))
    edge = await _node(EDGE, tmp_path / "edge", "edge-c")
    proxy = FlakyEdge(edge.address)
    await proxy.start()
    reader = InMemoryMetricReader()
    device = await _node(DEVICE, tmp_path / "device", "device-c", {"address": proxy.address, **GUARD}, readers=[reader])
    channel = grpc.aio.insecure_channel(device.address)
    edge_channel = grpc.aio.insecure_channel(edge.address)
    try:
        yield Mesh(
            device,
            edge,
            proxy,
            reader,
            tmp_path,
            pb_grpc.GRPCInferenceServiceStub(channel),
            pb_grpc.GRPCInferenceServiceStub(edge_channel),
            mesh_pb2_grpc.MeshServiceStub(channel),
        )
    finally:
        await channel.close()
        await edge_channel.close()
        await device.stop()
        await proxy.stop()
        await edge.stop()


async def _computed(stub: pb_grpc.GRPCInferenceServiceStub, model: str) -> int:
    """Requests a node computed for ``model`` (its own statistics)."""
    stats = await stub.ModelStatistics(pb.ModelStatisticsRequest(name=model))
    return sum(s.inference_count for s in stats.model_stats)


async def _ask(
    m: Mesh, x: np.ndarray[Any, Any], parameters: Mapping[str, Any] | None = None, model: str = "cls"
) -> dict[str, Any]:
    return params(await m.stub.ModelInfer(infer_request(model, {"x": x}, **(parameters or {})), timeout=5))


async def _confidences(m: Mesh) -> list[float]:
    """The device's own confidence of each input (cascade off: nothing goes upward)."""
    return [(await _ask(m, x, {CASCADE: "off"}))[CONFIDENCE] for x in INPUTS]


async def _upstream(m: Mesh) -> mesh_pb2.UpstreamStatus:
    info: mesh_pb2.GetTierInfoResponse = await m.mesh.GetTierInfo(mesh_pb2.GetTierInfoRequest(), timeout=5)
    assert info.HasField("upstream_status")
    return info.upstream_status


def _points(reader: InMemoryMetricReader, metric: str) -> list[Any]:
    data = reader.get_metrics_data()
    if data is None:
        return []
    return [
        p
        for rm in data.resource_metrics
        for sm in rm.scope_metrics
        for metric_data in sm.metrics
        if metric_data.name == metric
        for p in metric_data.data.data_points
    ]


# -- the cascade -----------------------------------------------------------------------------------------------


async def test_low_confidence_answers_go_upward_and_confident_ones_stay(mesh: Mesh) -> None:
    m = mesh
    confidences = await _confidences(m)
    assert all(1 / 3 <= c <= 1 for c in confidences)
    assert await _computed(m.edge_stub, "cls") == 0, "with the cascade off nothing goes upward"
    threshold = statistics.median(confidences)
    below = [c < threshold for c in confidences]
    assert 0 < sum(below) < len(below)

    for x, low, own in zip(INPUTS, below, confidences, strict=True):
        answer = await _ask(m, x, {THRESHOLD: threshold})
        if low:
            assert answer[SERVED_BY] == ON_EDGE and answer[FALLBACK_REASON] == "low_confidence"
        else:
            assert answer[SERVED_BY] == ON_DEVICE and FALLBACK_REASON not in answer
            assert answer[CONFIDENCE] == pytest.approx(own)
        assert 0 <= answer[CONFIDENCE] <= 1 and DEGRADED not in answer
    assert await _computed(m.edge_stub, "cls") == sum(below), "exactly the unsure answers were asked upward"

    # No parameter: the model's signed threshold (0.999) applies, so this answer goes upward.
    assert (await _ask(m, INPUTS[0]))[SERVED_BY] == ON_EDGE
    # Opted out, a threshold of 0, or a model with no threshold anywhere: answered here.
    assert (await _ask(m, INPUTS[0], {CASCADE: "off", THRESHOLD: 1.0}))[SERVED_BY] == ON_DEVICE
    assert (await _ask(m, INPUTS[0], {THRESHOLD: 0.0}))[SERVED_BY] == ON_DEVICE
    plain = await _ask(m, INPUTS[0], model="plain")
    assert plain[SERVED_BY] == ON_DEVICE and 0 < plain[CONFIDENCE] <= 1
    # ``speculative`` on a single inference acts as ``confidence``.
    assert (await _ask(m, INPUTS[0], {CASCADE: "speculative", THRESHOLD: 1.0}))[SERVED_BY] == ON_EDGE
    # The same on a stream: the upward answer comes as a stream message.
    low_x = INPUTS[below.index(True)]

    async def one() -> AsyncIterator[pb.ModelInferRequest]:
        yield infer_request("cls", {"x": low_x}, **{THRESHOLD: threshold})

    streamed = [r async for r in m.stub.ModelStreamInfer(one(), timeout=5)]
    assert len(streamed) == 1 and not streamed[0].error_message
    assert params(streamed[0].infer_response)[SERVED_BY] == ON_EDGE


async def test_a_configured_threshold_overrides_the_signed_one_and_a_request_overrides_both(mesh: Mesh) -> None:
    m = mesh
    other = await _node(
        DEVICE,
        m.root / "device",
        "device-k",
        {"address": m.proxy.address, **GUARD},
        cascade={"thresholds": ["cls=0.0"]},
    )
    try:
        async with grpc.aio.insecure_channel(other.address) as channel:
            stub = pb_grpc.GRPCInferenceServiceStub(channel)
            before = await _computed(m.edge_stub, "cls")
            for x in INPUTS[:5]:
                answer = params(await stub.ModelInfer(infer_request("cls", {"x": x}), timeout=5))
                assert answer[SERVED_BY] == "tier0:device-k" and CONFIDENCE in answer
            assert await _computed(m.edge_stub, "cls") == before
            asked = params(await stub.ModelInfer(infer_request("cls", {"x": INPUTS[0]}, **{THRESHOLD: 1}), timeout=5))
            assert asked[SERVED_BY] == ON_EDGE
    finally:
        await other.stop()


@pytest.mark.parametrize(
    ("parameter", "value", "accepted"),
    [
        (CASCADE, "sometimes", "off, confidence, speculative"),
        (CASCADE, 1, "off, confidence, speculative"),
        (THRESHOLD, 1.5, "[0, 1]"),
        (THRESHOLD, -0.1, "[0, 1]"),
        (THRESHOLD, True, "[0, 1]"),
        (THRESHOLD, "0.5", "[0, 1]"),
    ],
)
async def test_bad_cascade_parameters_are_refused_on_every_path(
    mesh: Mesh, parameter: str, value: Any, accepted: str
) -> None:
    m = mesh
    for model in ("cls", "edge-only"):  # answered here, and forwarded (the device does not hold it)
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await m.stub.ModelInfer(infer_request(model, {"x": INPUTS[0]}, **{parameter: value}), timeout=5)
        assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        details = caught.value.details() or ""
        assert parameter in details and accepted in details
    # Good values are accepted on every tier, the edge included (as a forwarded call carries them).
    good = infer_request("cls", {"x": INPUTS[0]}, **{CASCADE: "confidence", THRESHOLD: 0.5})
    assert params(await m.edge_stub.ModelInfer(good, timeout=5))[SERVED_BY] == ON_EDGE
    forwarded = await _ask(m, INPUTS[0], {CASCADE: "off", THRESHOLD: 0.5}, model="edge-only")
    assert forwarded[SERVED_BY] == ON_EDGE and forwarded[FALLBACK_REASON] == "model_not_held"


async def test_a_model_the_device_does_not_hold_still_fails_when_the_edge_is_gone(mesh: Mesh) -> None:
    m = mesh
    m.proxy.drop()
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await _ask(m, INPUTS[0], model="edge-only")
    assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
    assert m.proxy.address in (caught.value.details() or "")
    # Its own models still answer, the unsure ones marked.
    answer = await _ask(m, INPUTS[0], {THRESHOLD: 1.0})
    # (The breaker may have opened by now: three failed attempts, the retries included.)
    assert answer[SERVED_BY] == ON_DEVICE and answer[DEGRADED] in (DEGRADED_UNAVAILABLE, DEGRADED_CIRCUIT_OPEN)


async def test_a_cancelled_status_from_the_edge_gives_a_degraded_answer_not_an_error(mesh: Mesh) -> None:
    m = mesh
    m.proxy.refuse(grpc.StatusCode.CANCELLED)
    answer = await _ask(m, INPUTS[0], {THRESHOLD: 1.0})
    assert answer[SERVED_BY] == ON_DEVICE and answer[DEGRADED] == "upstream_error"
    # It counts against the edge: three of them (GUARD's breaker_failures) open the breaker.
    for _ in range(2):
        await _ask(m, INPUTS[0], {THRESHOLD: 1.0})
    assert (await _upstream(m)).breaker_state == "open"


async def test_the_result_cache_never_answers_for_another_model_or_version(tmp_path: Path) -> None:
    files = tmp_path / "files"
    ModelRepository(tmp_path / "device").add(
        "cls", linear_model(files / "d.onnx", seed=0), properties={THRESHOLD_PROPERTY: "1.0"}
    )
    ModelRepository(tmp_path / "device").add(
        "twin", linear_model(files / "t.onnx", seed=0), properties={THRESHOLD_PROPERTY: "1.0"}
    )
    edge_repo = ModelRepository(tmp_path / "edge")
    edge_repo.add("cls", linear_model(files / "e1.onnx", seed=5))
    edge_repo.add("twin", linear_model(files / "e2.onnx", seed=6))
    edge = await _node(EDGE, tmp_path / "edge", "edge-c")
    reader = InMemoryMetricReader()
    device = await _node(DEVICE, tmp_path / "device", "device-c", {"address": edge.address}, readers=[reader])
    try:
        async with (
            grpc.aio.insecure_channel(device.address) as channel,
            grpc.aio.insecure_channel(edge.address) as edge_channel,
        ):
            stub = pb_grpc.GRPCInferenceServiceStub(channel)
            edge_stub = pb_grpc.GRPCInferenceServiceStub(edge_channel)
            x = INPUTS[0]
            first = await stub.ModelInfer(infer_request("cls", {"x": x}), timeout=5)
            again = await stub.ModelInfer(infer_request("cls", {"x": x}), timeout=5)
            assert params(again).get("edgecascade.cached") is True, "a repeated escalation is answered from the cache"
            assert list(again.raw_output_contents) == list(first.raw_output_contents)
            assert await _computed(edge_stub, "cls") == 1
            # Another model with the same input: asked upward, its own answer.
            twin = await stub.ModelInfer(infer_request("twin", {"x": x}), timeout=5)
            assert "edgecascade.cached" not in params(twin) and twin.model_name == "twin"
            assert list(twin.raw_output_contents) != list(first.raw_output_contents)
            # The edge moves to version 2: once an answer of it arrives, version 1's answers are never served.
            edge_repo.add("cls", linear_model(files / "e3.onnx", seed=12))
            await edge_stub.RepositoryModelLoad(pb.RepositoryModelLoadRequest(model_name="cls"))
            other = await stub.ModelInfer(infer_request("cls", {"x": INPUTS[1]}), timeout=5)
            assert other.model_version == "2"
            moved = await stub.ModelInfer(infer_request("cls", {"x": x}), timeout=5)
            assert moved.model_version == "2" and "edgecascade.cached" not in params(moved)
            assert list(moved.raw_output_contents) != list(first.raw_output_contents)
            # One hit in five lookups: in GetTierInfo and in the metrics.
            async with grpc.aio.insecure_channel(device.address) as mesh_channel:
                info = await mesh_pb2_grpc.MeshServiceStub(mesh_channel).GetTierInfo(mesh_pb2.GetTierInfoRequest())
            assert (info.upstream_status.cache_hits, info.upstream_status.cache_misses) == (1, 4)
            assert info.upstream_status.cache_entries > 0 and info.upstream_status.breaker_state == "closed"
            assert [p.value for p in _points(reader, RESULT_CACHE_HIT_RATE)] == [pytest.approx(0.2)]
    finally:
        await device.stop()
        await edge.stop()


# -- the edge killed, slowed, flapping: under load ----------------------------------------------------------


@dataclass
class Outcome:
    seconds: float
    answer: dict[str, Any] | None
    error: grpc.aio.AioRpcError | None = None


async def _load(
    m: Mesh, threshold: float, requests: int = 200, concurrency: int = 16, timeout: float = 5.0
) -> list[Outcome]:
    """``requests`` requests of ``cls``, ``concurrency`` at a time, each with the threshold given."""
    outcomes: list[Outcome] = []
    queue = list(range(requests))

    async def worker() -> None:
        while queue:
            i = queue.pop()
            started = time.monotonic()
            request = infer_request("cls", {"x": INPUTS[i % len(INPUTS)]}, **{THRESHOLD: threshold})
            try:
                answer = params(await m.stub.ModelInfer(request, timeout=timeout))
                outcomes.append(Outcome(time.monotonic() - started, answer))
            except grpc.aio.AioRpcError as exc:
                outcomes.append(Outcome(time.monotonic() - started, None, exc))

    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return outcomes


def _check_answers(outcomes: list[Outcome], reasons: set[str]) -> list[dict[str, Any]]:
    """Every request answered; an answer not from the edge comes from the device, and an unsure one is marked."""
    errors = [o.error for o in outcomes if o.error is not None]
    assert not errors, f"{len(errors)} client errors, e.g. {errors[0].code().name}: {errors[0].details()}"
    degraded = []
    for outcome in outcomes:
        answer = outcome.answer
        assert answer is not None
        if answer[SERVED_BY] == ON_EDGE:
            assert answer[FALLBACK_REASON] == "low_confidence" and DEGRADED not in answer
        else:
            assert answer[SERVED_BY] == ON_DEVICE and FALLBACK_REASON not in answer
            if DEGRADED in answer:
                assert answer[DEGRADED] in reasons
                degraded.append(answer)
    return degraded


async def _threshold(m: Mesh) -> tuple[float, int]:
    """A threshold that sends about half the inputs upward, and how many of 200 requests are under it."""
    confidences = await _confidences(m)
    threshold = statistics.median(confidences)
    return threshold, sum(confidences[i % len(INPUTS)] < threshold for i in range(200))


async def _until_closed(m: Mesh, within_s: float = 10.0) -> mesh_pb2.UpstreamStatus:
    """Sends unsure requests until the breaker has closed again and the edge answers them."""
    deadline = time.monotonic() + within_s
    while time.monotonic() < deadline:
        answer = await _ask(m, INPUTS[0], {THRESHOLD: 1.0})
        status = await _upstream(m)
        if status.breaker_state == "closed" and answer[SERVED_BY] == ON_EDGE:
            return status
        await asyncio.sleep(0.05)
    raise AssertionError(f"the breaker did not close within {within_s} s: {await _upstream(m)}")


def _transitions(m: Mesh) -> dict[str, int]:
    return {p.attributes[BREAKER_STATE]: int(p.value) for p in _points(m.reader, BREAKER_TRANSITIONS)}


def _degraded_counted(m: Mesh) -> dict[str, int]:
    counted: dict[str, int] = {}
    for p in _points(m.reader, DEGRADED_ANSWERS):
        reason = p.attributes[DEGRADED_REASON]
        counted[reason] = counted.get(reason, 0) + int(p.value)
    return counted


@pytest.mark.slow
async def test_the_edge_killed_under_load_gives_degraded_answers_and_no_errors(mesh: Mesh) -> None:
    m = mesh
    threshold, unsure = await _threshold(m)
    healthy = await _load(m, threshold, requests=40)
    _check_answers(healthy, set())
    assert any(o.answer and o.answer[SERVED_BY] == ON_EDGE for o in healthy)

    await m.proxy.kill()
    outcomes = await _load(m, threshold)
    degraded = _check_answers(outcomes, {DEGRADED_UNAVAILABLE, DEGRADED_CIRCUIT_OPEN})
    assert len(degraded) == unsure, "every unsure answer is the device's own, marked"
    assert DEGRADED_CIRCUIT_OPEN in {a[DEGRADED] for a in degraded}
    # Nobody waited on the dead edge: refused connections and an open breaker answer at once.
    assert max(o.seconds for o in outcomes) < 1.0
    status = await _upstream(m)
    assert status.breaker_opened >= 1 and status.breaker_rejected > 0
    assert status.breaker_state in ("open", "half_open")
    # Counted as answers of this node (not forwarded), and as degraded, by reason.
    assert sum(_degraded_counted(m).values()) == len(degraded)
    outcomes_counted: dict[str, int] = {}
    for point in _points(m.reader, REQUESTS):
        outcome = point.attributes[OUTCOME]
        outcomes_counted[outcome] = outcomes_counted.get(outcome, 0) + int(point.value)
    forwarded = sum(1 for o in healthy if o.answer and o.answer[SERVED_BY] == ON_EDGE)
    assert outcomes_counted == {"ok": len(INPUTS) + 40 - forwarded + 200, "forwarded": forwarded}

    await m.proxy.revive()
    assert (await _until_closed(m)).breaker_state == "closed"
    moves = _transitions(m)
    assert moves.get("open", 0) >= 1 and moves.get("closed", 0) >= 1


@pytest.mark.slow
async def test_the_edge_slowed_beyond_the_deadline_costs_one_timeout_then_none(mesh: Mesh) -> None:
    m = mesh
    threshold, unsure = await _threshold(m)
    m.proxy.delay(30.0)
    outcomes = await _load(m, threshold, timeout=2.0)
    degraded = _check_answers(outcomes, {DEGRADED_TIMEOUT, DEGRADED_CIRCUIT_OPEN})
    assert len(degraded) == unsure
    reasons = [a[DEGRADED] for a in degraded]
    assert DEGRADED_TIMEOUT in reasons and DEGRADED_CIRCUIT_OPEN in reasons
    # Only the requests in flight when the edge slowed down (16 at most), and the breaker's few probes,
    # waited for the edge; every other one was answered at once.
    slow = [o for o in outcomes if o.seconds > 1.0]
    assert len(slow) <= 16 + 8
    assert reasons.count(DEGRADED_CIRCUIT_OPEN) > len(slow)
    assert (await _upstream(m)).breaker_opened >= 1

    m.proxy.honest()
    assert (await _until_closed(m)).breaker_state == "closed"


@pytest.mark.slow
async def test_a_flapping_edge_under_load_gives_answers_from_it_or_marked_ones(mesh: Mesh) -> None:
    m = mesh
    threshold, _ = await _threshold(m)
    m.proxy.flap(0.15)
    outcomes = await _load(m, threshold)
    degraded = _check_answers(outcomes, {DEGRADED_UNAVAILABLE, DEGRADED_CIRCUIT_OPEN})
    assert degraded, "some escalations met the edge down"
    assert m.proxy.dropped > 0 and (await _upstream(m)).breaker_opened >= 1
    assert max(o.seconds for o in outcomes) < 1.0

    m.proxy.honest()
    assert (await _until_closed(m)).breaker_state == "closed"
