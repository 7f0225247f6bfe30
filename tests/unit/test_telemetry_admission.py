"""What the region's OTLP receiver accepts, the answers it gives, its write queue and its ``[telemetry]``
section (issue 10 #2)."""

from __future__ import annotations

import asyncio
import math
import threading
from collections.abc import Sequence
from pathlib import Path

import pytest

from services.config import load_config
from services.errors import ConfigError, InvalidArgumentError, PermissionDeniedError, QueueFullError, UnavailableError
from tier1_edge.config import EdgeConfig
from tier2_region.config import RegionConfig
from tier2_region.fleet.figures import (
    CONFIDENCE,
    LATENCY,
    MODEL_NAME,
    MODEL_VERSION,
    NODE_ID,
    OUTCOME,
    REQUESTS,
    SHADOW_AGREEMENT,
    SHADOW_DIFFERENCE,
    SHADOW_LATENCY,
    SHADOW_RUNS,
    SHADOW_SERVING_LATENCY,
)
from tier2_region.telemetry.admission import HISTOGRAM, KEPT, SUM, Limits, Receipt, admit_points, node_of, settle
from tier2_region.telemetry.ingest import Ingest, KnownNodes
from tier2_region.telemetry.points import (
    Batch,
    HistogramPoint,
    MetricPoint,
    MetricsBatch,
    ResourceMetrics,
    SumPoint,
    Temporality,
)
from tier2_region.telemetry.write_queue import WriteQueue

MODEL = ((MODEL_NAME, "lm"), (MODEL_VERSION, "1"))
GOOD = (*MODEL, (OUTCOME, "ok"))


def _sum(value: float | None, attributes: tuple[tuple[str, object], ...] = GOOD, **changes: object) -> SumPoint:
    fields: dict[str, object] = {
        "metric": REQUESTS,
        "attributes": attributes,
        "start_ns": 1,
        "time_ns": 2,
        "value": value,
        "temporality": Temporality.CUMULATIVE,
        "monotonic": True,
        **changes,
    }
    return SumPoint(**fields)  # type: ignore[arg-type]


def _histogram(counts: tuple[int, ...], bounds: tuple[float, ...], **changes: object) -> HistogramPoint:
    fields: dict[str, object] = {
        "metric": LATENCY,
        "attributes": MODEL,
        "start_ns": 1,
        "time_ns": 2,
        "temporality": Temporality.DELTA,
        "count": sum(counts),
        "sum": 1.0,
        "bounds": bounds,
        "counts": counts,
        **changes,
    }
    return HistogramPoint(**fields)  # type: ignore[arg-type]


def _resource(*points: MetricPoint, node: object = "d1") -> ResourceMetrics:
    return ResourceMetrics(((NODE_ID, node),), points)  # type: ignore[arg-type]


def test_a_resource_must_name_its_node() -> None:
    assert node_of(_resource()) == ("d1", "")
    assert node_of(ResourceMetrics(())) == ("", "no_node_id")
    assert node_of(_resource(node="")) == ("", "no_node_id")
    assert node_of(_resource(node=7)) == ("", "bad_node_id")
    assert node_of(_resource(node="../etc")) == ("", "bad_node_id")
    assert node_of(ResourceMetrics((), problem="too_many_attributes")) == ("", "too_many_attributes")


@pytest.mark.parametrize(
    ("point", "reason"),
    [
        (_sum(math.nan), "not_finite"),
        (_sum(math.inf), "not_finite"),
        (_sum(-1.0), "negative"),
        (_sum(None), "missing_value"),
        (_sum(1.0, monotonic=False), "wrong_type"),
        (_sum(1.0, temporality=Temporality.UNSPECIFIED), "bad_temporality"),
        (_sum(1.0, attributes=MODEL), "bad_attribute"),  # no outcome
        (_sum(1.0, attributes=((MODEL_NAME, "lm"), (MODEL_VERSION, 1), (OUTCOME, "ok"))), "bad_attribute"),
        (_sum(1.0, attributes=((MODEL_NAME, "x" * 300), (MODEL_VERSION, "1"), (OUTCOME, "ok"))), "bad_attribute"),
        (_histogram((1, 1), (10.0,), sum=math.nan), "not_finite"),
        (_histogram((1, 1), (math.inf,)), "not_finite"),
        (_histogram((1, 1), (10.0,), min=-3.0), "negative"),
        (_histogram((1, 1), (10.0,), count=5), "bad_histogram"),
        (_histogram((1, 1, 1), (10.0,)), "bad_histogram"),
        (_histogram((1, 1, 1), (10.0, 5.0)), "bad_histogram"),
        (_histogram((1, 1), (0.5,), metric=CONFIDENCE, max=1.5), "out_of_range"),
        (_histogram((1, 1), (0.5,), metric=SHADOW_AGREEMENT, max=1.5), "out_of_range"),
        # A share's sum is at most its count (each value at most 1), and agrees with its min and max.
        (_histogram((1, 1), (0.5,), metric=SHADOW_AGREEMENT, sum=1e9), "out_of_range"),
        (_histogram((1, 1), (0.5,), metric=SHADOW_AGREEMENT, sum=2.5), "out_of_range"),
        (_histogram((1, 1), (0.5,), metric=CONFIDENCE, sum=3.0), "out_of_range"),
        (_histogram((0, 0), (0.5,), metric=SHADOW_AGREEMENT, sum=0.5), "out_of_range"),  # no value, a sum
        (_histogram((0, 0), (0.1,), metric=SHADOW_DIFFERENCE, sum=0.5), "bad_histogram"),
        (_histogram((1, 1), (0.5,), metric=SHADOW_AGREEMENT, sum=1.9, max=0.9), "bad_histogram"),
        (_histogram((1, 1), (0.5,), metric=SHADOW_AGREEMENT, sum=0.1, min=0.2), "bad_histogram"),
        (_histogram((1, 1), (0.5,), metric=CONFIDENCE, sum=0.5, min=0.6, max=0.4), "bad_histogram"),
        (_histogram((1, 1), (0.5,), metric=SHADOW_AGREEMENT, sum=-0.5), "negative"),
        # A difference is not a share, but its sum is finite, not negative, and agrees with its min and max.
        (_histogram((1, 1), (0.1,), metric=SHADOW_DIFFERENCE, sum=math.inf), "not_finite"),
        (_histogram((1, 1), (0.1,), metric=SHADOW_DIFFERENCE, sum=math.nan), "not_finite"),
        (_histogram((1, 1), (0.1,), metric=SHADOW_DIFFERENCE, sum=-1.0), "negative"),
        (_histogram((1, 1), (0.1,), metric=SHADOW_DIFFERENCE, sum=2.0**41), "out_of_range"),
        (_histogram((1, 1), (0.1,), metric=SHADOW_DIFFERENCE, sum=500.0, max=3.0), "bad_histogram"),
        (_histogram((1, 1), (0.1,), metric=SHADOW_DIFFERENCE, sum=0.01, min=1.0), "bad_histogram"),
        (_sum(1.0, metric=SHADOW_RUNS, attributes=MODEL), "bad_attribute"),  # a shadow run has an outcome
    ],
)
def test_absurd_or_malformed_points_are_refused_with_their_reason(point: MetricPoint, reason: str) -> None:
    accepted, rejected, ignored = admit_points("d1", _resource(point))
    assert (accepted, dict(rejected), ignored) == ([], {reason: 1}, 0)


def test_good_points_are_filed_under_their_model_and_a_point_marked_empty_is_ignored() -> None:
    resource = ResourceMetrics(
        ((NODE_ID, "d1"), *MODEL),  # the model stated once on the resource
        (_sum(3.0, attributes=((OUTCOME, "error"),)), _histogram((0, 0), (10.0,)), _sum(None, no_recorded_value=True)),
    )
    accepted, rejected, ignored = admit_points("d1", resource)
    assert not rejected
    assert ignored == 1
    assert [(s.model, s.version, s.label) for s in accepted] == [("lm", "1", "error"), ("lm", "1", "")]
    # Series are told apart by node, metric and point attributes.
    assert len({s.series for s in accepted}) == 2
    again, _, _ = admit_points("d2", resource)
    assert again[0].series != accepted[0].series


def test_shadow_metrics_are_kept_and_a_shed_shadow_run_is_an_outcome() -> None:
    assert {m: KEPT.get(m) for m in (SHADOW_RUNS, SHADOW_AGREEMENT, SHADOW_DIFFERENCE)} == {
        SHADOW_RUNS: SUM,
        SHADOW_AGREEMENT: HISTOGRAM,
        SHADOW_DIFFERENCE: HISTOGRAM,
    }
    assert KEPT.get(SHADOW_LATENCY) == KEPT.get(SHADOW_SERVING_LATENCY) == HISTOGRAM
    points = [_sum(2.0, metric=SHADOW_RUNS, attributes=(*MODEL, (OUTCOME, o))) for o in ("ok", "error", "shed")]
    accepted, rejected, ignored = admit_points(
        "d1",
        _resource(
            *points,
            _histogram((0, 2), (0.5,), metric=SHADOW_AGREEMENT, sum=2.0, max=1.0),
            _histogram((2, 0), (0.1,), metric=SHADOW_DIFFERENCE, sum=0.03, max=3.0),  # outputs may differ by more
        ),
    )
    assert (dict(rejected), ignored) == ({}, 0)
    assert [(s.point.metric, s.label) for s in accepted] == [
        (SHADOW_RUNS, "ok"),
        (SHADOW_RUNS, "error"),
        (SHADOW_RUNS, "shed"),
        (SHADOW_AGREEMENT, ""),
        (SHADOW_DIFFERENCE, ""),
    ]


def test_share_sums_within_float_slack_of_their_limits_are_kept() -> None:
    exact = 0.1 + 0.2 + 0.3  # 0.6000000000000001 > 3 × 0.2
    points = (
        _histogram((0, 3), (0.05,), metric=SHADOW_AGREEMENT, sum=exact, min=0.1, max=0.3),
        _histogram((0, 3), (0.05,), metric=SHADOW_AGREEMENT, sum=3 * (1 + 1e-12), min=1.0, max=1.0),
        _histogram((0, 3), (0.05,), metric=CONFIDENCE, sum=3.0, max=1.0),
        _histogram((2, 0), (0.1,), metric=SHADOW_DIFFERENCE, sum=0.2 * (1 - 1e-12), min=0.1, max=0.1),
        _histogram((0, 0), (0.5,), metric=SHADOW_AGREEMENT, sum=0.0),  # an empty delta
        _histogram((1, 1), (10.0,), sum=500.0, max=3.0),  # latencies are not checked against min and max
    )
    accepted, rejected, _ = admit_points("d1", _resource(*points))
    assert (len(accepted), dict(rejected)) == (len(points), {})


def test_hostile_shadow_points_are_refused_with_a_partial_success() -> None:
    good = _histogram((0, 2), (0.5,), metric=SHADOW_AGREEMENT, sum=1.8, min=0.85, max=0.95)
    lying = _histogram((0, 2), (0.5,), metric=SHADOW_AGREEMENT, sum=1e6, min=0.85, max=0.95)
    accepted, rejected, ignored = admit_points("d1", _resource(good, lying))
    assert ([s.point for s in accepted], dict(rejected), ignored) == ([good], {"out_of_range": 1}, 0)
    receipt = settle(Receipt("data points", accepted=len(accepted), rejected=dict(rejected)))
    assert receipt.message().startswith("rejected 1 of 2 data points: out_of_range: 1 (")


def test_the_answer_follows_otlp_partial_success() -> None:
    assert settle(Receipt("data points")) == Receipt("data points")  # an empty request is a success
    partly = Receipt("data points", accepted=3, rejected={"not_finite": 2, "unknown_node": 1})
    assert settle(partly) is partly
    assert partly.rejected_total == 3
    assert partly.message().startswith("rejected 3 of 6 data points: not_finite: 2 (a value is NaN or infinite)")
    # Refused entirely: an error the client must not retry.
    with pytest.raises(PermissionDeniedError, match="not enrolled"):
        settle(Receipt("data points", rejected={"unknown_node": 4}))
    with pytest.raises(InvalidArgumentError, match="no_node_id: 1"):
        settle(Receipt("data points", rejected={"no_node_id": 1, "unknown_node": 4}))
    # Points of metrics the region does not keep were still accepted.
    assert settle(Receipt("data points", ignored=1, rejected={"unknown_node": 4})).ignored == 1


async def test_the_write_queue_writes_what_is_waiting_in_one_call_and_bounds_it_by_points() -> None:
    written: list[list[int]] = []
    gate = threading.Event()

    def write(items: Sequence[int]) -> None:
        gate.wait(5)
        written.append(list(items))

    queue: WriteQueue[int] = WriteQueue("test queue", write, capacity=10)
    queue.start()
    try:
        first = queue.submit(0, 4)
        await asyncio.sleep(0)  # the writer takes the first one and blocks on the gate
        waiting = [queue.submit(i, 2) for i in (1, 2, 3)]
        assert queue.pending_points == 10
        with pytest.raises(QueueFullError, match="10 data points waiting"):
            queue.submit(4, 1)
        gate.set()
        await asyncio.gather(first, *waiting)
        assert written == [[0], [1, 2, 3]]
        assert queue.pending_points == 0
        await queue.submit(5, 10)  # room again
    finally:
        await queue.stop()
    with pytest.raises(UnavailableError):
        queue.submit(6, 1)


async def test_a_failed_write_fails_its_requests_as_unavailable_and_the_queue_goes_on() -> None:
    calls = 0

    def write(items: Sequence[int]) -> None:
        nonlocal calls
        calls += 1
        if calls == 1:
            raise OSError("disk full")

    queue: WriteQueue[int] = WriteQueue("test queue", write, capacity=10)
    queue.start()
    try:
        with pytest.raises(UnavailableError, match="could not write"):
            await queue.submit(1, 1)
        await queue.submit(2, 1)
        assert queue.pending_points == 0
    finally:
        await queue.stop()


async def test_stopping_writes_what_is_queued() -> None:
    written: list[int] = []
    queue: WriteQueue[int] = WriteQueue("test queue", written.extend, capacity=10)
    queue.start()
    futures = [queue.submit(i, 1) for i in range(3)]
    await queue.stop()
    assert written == [0, 1, 2]
    assert all(f.done() and f.exception() is None for f in futures)


async def test_stopping_a_queue_that_never_started_is_safe() -> None:
    await WriteQueue[int]("test queue", lambda items: None, capacity=1).stop()


async def test_enrolment_answers_are_remembered_briefly_and_unknown_ones_more_briefly() -> None:
    asked: list[str] = []
    now = [0.0]

    def known(node_id: str) -> bool:
        asked.append(node_id)
        return node_id == "d1"

    nodes = KnownNodes(known, clock=lambda: now[0])
    assert await nodes.check({"d1", "x"}) == {"d1": True, "x": False}
    assert await nodes.check({"d1", "x"}) == {"d1": True, "x": False}
    assert sorted(asked) == ["d1", "x"]
    now[0] = 10.0  # past the unknown node's time, not the known one's
    await nodes.check({"d1", "x"})
    assert sorted(asked) == ["d1", "x", "x"]


async def test_an_inventory_that_cannot_be_read_is_unavailable_not_unknown() -> None:
    def broken(node_id: str) -> bool:
        raise OSError("locked")

    with pytest.raises(UnavailableError, match="fleet inventory"):
        await KnownNodes(broken).check({"d1"})


async def test_a_full_queue_drops_a_request_whole_and_counts_it() -> None:
    queue: WriteQueue[Batch] = WriteQueue("test queue", lambda items: None, capacity=1)
    queue.start()
    try:
        ingest = Ingest(queue, KnownNodes(lambda n: True), Limits())
        queue.submit(MetricsBatch(0.0, ()), 1)  # the queue is now full
        with pytest.raises(QueueFullError):
            await ingest.metrics([_resource(_sum(1.0), _sum(2.0, attributes=(*MODEL, (OUTCOME, "error"))))])
        assert ingest.counts["metrics.dropped.queue_full"] == 2
        assert ingest.counts["metrics.accepted"] == 0
    finally:
        await queue.stop()


def test_the_telemetry_section(tmp_path: Path) -> None:
    config = load_config(RegionConfig, env={})
    assert (config.telemetry.path, config.telemetry.window_s, config.telemetry.forward_endpoint) == ("", 60, "")
    paths = {
        "registry": {"path": str(tmp_path / "registry")},
        "fleet": {"path": str(tmp_path / "fleet.sqlite")},
    }
    env = {"EDGECASCADE_TELEMETRY__PATH": str(tmp_path / "t.sqlite"), "EDGECASCADE_TELEMETRY__WINDOW_S": "10"}
    config = load_config(RegionConfig, env=env, overrides=paths)
    assert (config.telemetry.window_s, config.telemetry.retention_s) == (10, 7 * 86400)


@pytest.mark.parametrize(
    ("telemetry", "message"),
    [
        ({"window_s": 0}, "window_s must be positive"),
        ({"max_points_per_request": -1}, "max_points_per_request must be positive"),
        ({"window_s": 60, "retention_s": 100}, "at least two windows"),
        ({"queue_points": 10, "max_points_per_request": 100}, "queue_points"),
        ({"forward_endpoint": "collector"}, "host:port"),
        ({"path": "t.sqlite"}, "\\[telemetry\\] path is set but \\[fleet\\] path is empty"),
    ],
)
def test_bad_telemetry_settings_stop_start_up(telemetry: dict[str, object], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        load_config(RegionConfig, env={}, overrides={"telemetry": telemetry})


def test_only_the_region_has_a_telemetry_section() -> None:
    with pytest.raises(ConfigError, match="telemetry"):
        load_config(EdgeConfig, env={}, overrides={"telemetry": {"path": "x"}})
