"""What a node records of each request and update: names, attributes, bounds on what callers can add."""

from __future__ import annotations

from typing import Any

import pytest
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader

from services.inference import NodeIdentity
from services.rpc.fleet_metrics import CallRoute, FleetMetrics
from services.telemetry_names import (
    CONFIDENCE,
    ERROR,
    FALLBACK_REASON,
    FORWARDED,
    LATENCY,
    LATENCY_BOUNDS_MS,
    MODEL_NAME,
    MODEL_VARIANT,
    MODEL_VERSION,
    OK,
    OTHER,
    OUTCOME,
    REQUESTS,
    UNRESOLVED,
    UPDATE_OUTCOMES,
    UPDATE_STATE,
)

NODE = NodeIdentity("tier0", "device-1")


@pytest.fixture
def reader() -> InMemoryMetricReader:
    return InMemoryMetricReader()


@pytest.fixture
def metrics(reader: InMemoryMetricReader) -> FleetMetrics:
    return FleetMetrics(MeterProvider(metric_readers=[reader]), max_models=2, max_versions=2)


def points(reader: InMemoryMetricReader, metric: str) -> list[Any]:
    data = reader.get_metrics_data()
    assert data is not None
    return [
        p
        for rm in data.resource_metrics
        for sm in rm.scope_metrics
        for m in sm.metrics
        if m.name == metric
        for p in m.data.data_points
    ]


def local(name: str, version: str, reason: str = "") -> CallRoute:
    route = CallRoute(NODE, name, "")
    route.routed(name, version, "")
    if reason:
        route.routed(name, "", reason)  # the second chance: its queue was full
    return route


def upward(name: str, version: str, reason: str = "model_not_held") -> CallRoute:
    route = CallRoute(NODE, name, version)
    route.routed(name, version, reason)
    return route


def test_each_outcome_is_counted_by_model_version_and_reason(
    metrics: FleetMetrics, reader: InMemoryMetricReader
) -> None:
    for _ in range(3):
        metrics.record(local("lin", "2"), OK, 0.004)
    metrics.record(local("lin", "2"), ERROR, 0.001)
    metrics.record(local("lin", "2", reason="queue_full"), FORWARDED, 0.020)
    metrics.record(upward("big", ""), FORWARDED, 0.030)

    counted = {tuple(sorted(p.attributes.items())): p.value for p in points(reader, REQUESTS)}
    base = {MODEL_NAME: "lin", MODEL_VERSION: "2", MODEL_VARIANT: ""}
    assert counted == {
        tuple(sorted({**base, OUTCOME: OK}.items())): 3,
        tuple(sorted({**base, OUTCOME: ERROR}.items())): 1,
        # A full queue sends the call upward: the fallback is the local version's.
        tuple(sorted({**base, OUTCOME: FORWARDED, FALLBACK_REASON: "queue_full"}.items())): 1,
        tuple(
            sorted(
                {MODEL_NAME: "big", MODEL_VERSION: UNRESOLVED, MODEL_VARIANT: "", OUTCOME: FORWARDED,
                 FALLBACK_REASON: "model_not_held"}.items()
            )
        ): 1,
    }  # fmt: skip
    timed = {(p.attributes[MODEL_NAME], p.attributes[OUTCOME]): p for p in points(reader, LATENCY)}
    assert set(timed) == {("lin", OK), ("lin", FORWARDED), ("big", FORWARDED)}  # an error has no latency
    ok = timed[("lin", OK)]
    assert ok.count == 3 and ok.sum == pytest.approx(12.0)  # milliseconds
    assert tuple(ok.explicit_bounds) == LATENCY_BOUNDS_MS


def test_callers_cannot_grow_the_series_without_bound(metrics: FleetMetrics, reader: InMemoryMetricReader) -> None:
    metrics.record(local("mine", "1"), OK, 0.001)
    for i in range(50):
        metrics.record(upward(f"junk{i}", str(i + 1)), FORWARDED, 0.001)
        metrics.record(upward("junk0", str(i + 1)), FORWARDED, 0.001)
        metrics.record(upward("../etc", ""), ERROR, 0.001)
    # A model this node answered with stays itself when a caller names it, however many names came first.
    metrics.record(upward("mine", "7", reason="memory"), FORWARDED, 0.001)

    names = {(p.attributes[MODEL_NAME], p.attributes[MODEL_VERSION]) for p in points(reader, REQUESTS)}
    assert names == {
        ("mine", "1"),
        ("mine", "7"),
        ("junk0", "1"),
        ("junk0", "2"),
        ("junk0", OTHER),  # versions beyond two per name
        ("junk1", "2"),
        (OTHER, OTHER),  # names beyond two
        (OTHER, UNRESOLVED),  # not a valid name at all
    }


def test_confidence_is_recorded_only_within_the_unit_interval(
    metrics: FleetMetrics, reader: InMemoryMetricReader
) -> None:
    for value in (0.75, 0.25, 1.5, float("nan"), True, "high"):
        metrics.record(local("lm", "1"), OK, 0.01, value)
    metrics.record(local("lm", "1"), OK, 0.01)
    (point,) = points(reader, CONFIDENCE)
    assert point.count == 2 and point.sum == pytest.approx(1.0)
    assert dict(point.attributes) == {MODEL_NAME: "lm", MODEL_VERSION: "1", MODEL_VARIANT: ""}


def test_update_states_are_counted_and_label_the_versions_they_install(
    metrics: FleetMetrics, reader: InMemoryMetricReader
) -> None:
    metrics.record(local("lin", "3"), OK, 0.001)
    for state in ("assigned", "downloading", "verified", "trial", "committed"):
        metrics.updated(state, "lin", "3", "int8")
    metrics.updated("refused", "lin", "4", "int8")
    states = {
        (p.attributes[MODEL_VERSION], p.attributes[UPDATE_STATE]): p.value for p in points(reader, UPDATE_OUTCOMES)
    }
    assert states == {
        ("3", "assigned"): 1,
        ("3", "downloading"): 1,
        ("3", "verified"): 1,
        ("3", "trial"): 1,
        ("3", "committed"): 1,
        ("4", "refused"): 1,
    }
    assert all(p.attributes[MODEL_VARIANT] == "int8" for p in points(reader, UPDATE_OUTCOMES))
    metrics.record(local("lin", "3"), OK, 0.001)
    (counted,) = points(reader, REQUESTS)
    assert counted.attributes[MODEL_VARIANT] == "int8" and counted.value == 2


def test_the_installed_variant_labels_a_version_from_its_first_request(
    metrics: FleetMetrics, reader: InMemoryMetricReader
) -> None:
    metrics.use_variants(lambda name, version: {("lin", "5"): "fp16"}.get((name, version), ""))
    metrics.record(local("lin", "5"), OK, 0.001)
    metrics.record(local("lin", "6"), OK, 0.001)
    variants = {p.attributes[MODEL_VERSION]: p.attributes[MODEL_VARIANT] for p in points(reader, REQUESTS)}
    assert variants == {"5": "fp16", "6": ""}
