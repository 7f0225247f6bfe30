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
from tier2_region.fleet.figures import CONFIDENCE, LATENCY, MODEL_NAME, MODEL_VERSION, NODE_ID, OUTCOME, REQUESTS
from tier2_region.telemetry.admission import Limits, Receipt, admit_points, node_of, settle
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
