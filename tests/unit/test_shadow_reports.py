"""How a node hears of a shadow and reports one: the check-in answer's shadow assignments, the shadow rows of
GetTierInfo, and the shadow metrics the region reads (names, attributes, bucket bounds)."""

from __future__ import annotations

import math
from typing import Any

import pytest
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader

from protos.edgecascade.v1 import fleet_pb2 as pb
from services.engine.shadow import Comparison
from services.rpc.fleet_client import desired_state_from_proto, installed_to_proto
from services.rpc.fleet_metrics import FleetMetrics
from services.telemetry_names import (
    AGREEMENT_BOUNDS,
    DIFFERENCE_BOUNDS,
    ERROR,
    LATENCY_BOUNDS_MS,
    MODEL_NAME,
    MODEL_VARIANT,
    MODEL_VERSION,
    OK,
    OUTCOME,
    SHADOW_AGREEMENT,
    SHADOW_DIFFERENCE,
    SHADOW_LATENCY,
    SHADOW_RUNS,
    SHADOW_SERVING_LATENCY,
    SHED,
)
from services.updates.checkin import InstalledModel


def _answer(*assignments: dict[str, Any]) -> pb.CheckInResponse:
    answer = pb.CheckInResponse()
    for a in assignments:
        answer.assignments.add(name="lm", variant="fp32", target_path="lm/x", **a)
    return answer


def test_a_shadow_assignment_comes_beside_the_serving_one() -> None:
    desired = desired_state_from_proto(
        _answer({"version": "1"}, {"version": "2", "shadow": True, "shadow_share": 0.25})
    )
    [serving, shadow] = desired.assignments
    assert (serving.version, serving.shadow, serving.shadow_share) == ("1", False, 0.0)
    assert (shadow.version, shadow.shadow, shadow.shadow_share) == ("2", True, 0.25)


@pytest.mark.parametrize("share", [0.0, -0.5, math.nan, -math.inf])
def test_a_shadow_share_that_is_not_a_positive_number_drops_the_shadow(
    share: float, caplog: pytest.LogCaptureFixture
) -> None:
    desired = desired_state_from_proto(
        _answer({"version": "1"}, {"version": "2", "shadow": True, "shadow_share": share})
    )
    assert [(a.version, a.shadow) for a in desired.assignments] == [("1", False)]
    assert "not in (0, 1]; ignored" in caplog.text


def test_a_shadow_share_above_one_is_clamped_and_a_serving_assignment_has_none(
    caplog: pytest.LogCaptureFixture,
) -> None:
    desired = desired_state_from_proto(
        _answer({"version": "1", "shadow_share": 0.5}, {"version": "2", "shadow": True, "shadow_share": 7.0})
    )
    assert [(a.shadow, a.shadow_share) for a in desired.assignments] == [(False, 0.0), (True, 1.0)]
    assert "clamped to 1" in caplog.text


def test_a_model_has_at_most_one_shadow() -> None:
    desired = desired_state_from_proto(
        _answer(
            {"version": "2", "shadow": True, "shadow_share": 0.5},
            {"version": "3", "shadow": True, "shadow_share": 0.5},
            {"version": "1"},
        )
    )
    assert [a.version for a in desired.assignments] == ["2", "1"]


def test_a_shadow_without_a_serving_assignment_of_its_model_is_dropped(caplog: pytest.LogCaptureFixture) -> None:
    answer = _answer({"version": "1"}, {"version": "2", "shadow": True, "shadow_share": 0.5})
    answer.assignments.add(
        name="other", version="5", variant="fp32", target_path="other/x", shadow=True, shadow_share=1
    )
    desired = desired_state_from_proto(answer)
    assert [(a.name, a.version, a.shadow) for a in desired.assignments] == [("lm", "1", False), ("lm", "2", True)]
    assert [r.levelname for r in caplog.records] == ["WARNING"]
    assert "'other' version '5' ignored: the model has no serving assignment" in caplog.text


def test_a_shadow_of_the_serving_version_itself_is_dropped(caplog: pytest.LogCaptureFixture) -> None:
    desired = desired_state_from_proto(_answer({"version": "1"}, {"version": "1", "shadow": True, "shadow_share": 0.5}))
    assert [(a.version, a.shadow) for a in desired.assignments] == [("1", False)]
    assert [r.levelname for r in caplog.records] == ["WARNING"]
    assert "it is the serving version" in caplog.text


def test_an_installed_shadow_is_marked_on_the_wire() -> None:
    rows = installed_to_proto(
        [InstalledModel("lm", "1", "fp32", "committed"), InstalledModel("lm", "2", "fp32", "trial", shadow=True)]
    )
    assert [(r.version, r.state, r.shadow) for r in rows] == [("1", "committed", False), ("2", "trial", True)]


def _points(reader: InMemoryMetricReader, metric: str) -> list[Any]:
    data = reader.get_metrics_data()
    if data is None:
        return []
    return [
        p
        for rm in data.resource_metrics
        for sm in rm.scope_metrics
        for m in sm.metrics
        if m.name == metric
        for p in m.data.data_points
    ]


def test_shadow_runs_are_recorded_under_the_shadow_version_with_the_agreed_bounds() -> None:
    reader = InMemoryMetricReader()
    metrics = FleetMetrics(MeterProvider(metric_readers=[reader]))
    assert all(not _points(reader, m) for m in (SHADOW_RUNS, SHADOW_AGREEMENT, SHADOW_LATENCY))  # nothing yet
    metrics.shadow_run("lm", "2", "fp32", OK, Comparison(0.75, 0.002, 4), 0.010, 0.004)
    metrics.shadow_run("lm", "2", "fp32", OK, Comparison(1.0, 0.0, 4), 0.020, 0.006)
    metrics.shadow_run("lm", "2", "fp32", SHED)
    metrics.shadow_run("lm", "2", "fp32", ERROR)
    metrics.shadow_run("lm", "2", "fp32", SHED)
    model = {MODEL_NAME: "lm", MODEL_VERSION: "2", MODEL_VARIANT: "fp32"}
    runs = {p.attributes[OUTCOME]: p.value for p in _points(reader, SHADOW_RUNS)}
    assert runs == {OK: 2, SHED: 2, ERROR: 1}
    assert all(dict(p.attributes) == {**model, OUTCOME: p.attributes[OUTCOME]} for p in _points(reader, SHADOW_RUNS))
    for name, bounds, total in (
        (SHADOW_AGREEMENT, AGREEMENT_BOUNDS, 1.75),
        (SHADOW_DIFFERENCE, DIFFERENCE_BOUNDS, 0.002),
        (SHADOW_LATENCY, LATENCY_BOUNDS_MS, 30.0),
        (SHADOW_SERVING_LATENCY, LATENCY_BOUNDS_MS, 10.0),
    ):
        [point] = _points(reader, name)
        assert dict(point.attributes) == model
        assert tuple(point.explicit_bounds) == bounds
        assert point.count == 2 and point.sum == pytest.approx(total)


def test_a_removed_shadows_run_series_are_dropped() -> None:
    reader = InMemoryMetricReader()
    metrics = FleetMetrics(MeterProvider(metric_readers=[reader]))
    for version in ("2", "3", "4"):
        metrics.shadow_run("lm", version, "fp32", OK, Comparison(1.0, 0.0, 1), 0.01, 0.01)
        metrics.shadow_run("lm", version, "fp32", SHED)
    metrics.shadow_run("other", "7", "fp32", ERROR)
    metrics.forget_shadow("lm", "4")  # versions 2 and 3 were removed; 4 is the shadow now
    assert {(k[0], k[1]) for k in metrics._shadow_runs} == {("lm", "4"), ("other", "7")}
    assert {(k[0], k[1]) for k in metrics._shadow_models} == {("lm", "4"), ("other", "7")}
    metrics.forget_shadow("other")
    assert {(k[0], k[1]) for k in metrics._shadow_runs} == {("lm", "4")}
    runs = {(p.attributes[MODEL_VERSION], p.attributes[OUTCOME]) for p in _points(reader, SHADOW_RUNS)}
    assert runs == {("4", OK), ("4", SHED)}
