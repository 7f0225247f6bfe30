"""The region's telemetry store: folding cumulative and delta points into windows, quantiles of merged
histograms, the figures rollouts read, per-node summaries, anomalies and retention (issue 10 #2)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from tier2_region.config import TelemetrySection
from tier2_region.fleet.figures import (
    CONFIDENCE,
    FALLBACK_REASON,
    LATENCY,
    MODEL_NAME,
    MODEL_VARIANT,
    MODEL_VERSION,
    NODE_ID,
    OUTCOME,
    REQUESTS,
    SHADOW_AGREEMENT,
    SHADOW_DIFFERENCE,
    SHADOW_LATENCY,
    SHADOW_RUNS,
    SHADOW_SERVING_LATENCY,
    UPDATE_OUTCOMES,
    FiguresSource,
    ShadowFigures,
    VersionFigures,
)
from tier2_region.telemetry.admission import ANOMALY, UPDATE_STATE, admit_logs, admit_points
from tier2_region.telemetry.points import (
    Anomaly,
    HistogramPoint,
    LogEntry,
    LogsBatch,
    MetricPoint,
    MetricsBatch,
    ResourceLogs,
    ResourceMetrics,
    SumPoint,
    Temporality,
)
from tier2_region.telemetry.quantiles import BucketHistogram, quantiles
from tier2_region.telemetry.store import TelemetryStore

NS = 1_000_000_000
WINDOW = 60
RETENTION = 3600
T0 = 1_899_999_960.0  # the start of a window
CUMULATIVE = Temporality.CUMULATIVE
DELTA = Temporality.DELTA


def _settings(**overrides: int) -> TelemetrySection:
    values = {"path": "unused", "window_s": WINDOW, "retention_s": RETENTION, **overrides}
    return TelemetrySection(**values)  # type: ignore[arg-type]


@pytest.fixture
def store(tmp_path: Path) -> Iterator[TelemetryStore]:
    opened = TelemetryStore(tmp_path / "telemetry.sqlite", _settings())
    yield opened
    opened.close()


def _attributes(version: str, **more: str) -> tuple[tuple[str, str], ...]:
    return tuple(sorted({MODEL_NAME: "lm", MODEL_VERSION: version, MODEL_VARIANT: "int8", **more}.items()))


def requests(
    value: float,
    outcome: str = "ok",
    *,
    at: float,
    start: float = T0 - 5,
    temporality: Temporality = CUMULATIVE,
    version: str = "1",
    reason: str = "",
) -> SumPoint:
    more = {OUTCOME: outcome, **({FALLBACK_REASON: reason} if reason else {})}
    return SumPoint(
        REQUESTS, _attributes(version, **more), int(start * NS), int(at * NS), float(value), temporality, True
    )


def histogram(
    counts: tuple[int, ...],
    bounds: tuple[float, ...],
    *,
    at: float,
    start: float = T0 - 5,
    temporality: Temporality = CUMULATIVE,
    version: str = "1",
    metric: str = LATENCY,
    total: float | None = None,
    low: float | None = None,
    high: float | None = None,
) -> HistogramPoint:
    return HistogramPoint(
        metric,
        _attributes(version),
        int(start * NS),
        int(at * NS),
        temporality,
        sum(counts),
        total,
        bounds,
        counts,
        low,
        high,
    )


def send(store: TelemetryStore, node_id: str, received_at: float, *points: MetricPoint) -> None:
    """Admits the points as the receiver would and writes them as one batch."""
    samples, rejected, ignored = admit_points(node_id, ResourceMetrics(((NODE_ID, node_id),), points))
    assert not rejected
    assert not ignored
    store.write([MetricsBatch(received_at, tuple(samples))])


def test_the_store_is_a_figures_source(store: TelemetryStore) -> None:
    source: FiguresSource = store
    assert source.figures("lm", "1", T0) == VersionFigures("lm", "1")
    assert source.shadow("lm", "2", T0) == ShadowFigures("lm", "2")


def test_cumulative_sums_are_stored_as_their_changes_between_reports(store: TelemetryStore) -> None:
    send(store, "d1", T0 + 1, requests(10, at=T0 + 1))
    send(store, "d1", T0 + 61, requests(15, at=T0 + 61))
    send(store, "d1", T0 + 121, requests(22, at=T0 + 121))
    assert store.figures("lm", "1", T0).requests == 22
    # Windows after the first hold only what was added after it.
    assert store.figures("lm", "1", T0 + 60).requests == 12
    # A window that began before `since` is left out whole: a stage is judged only on what came after it began.
    assert store.figures("lm", "1", T0 + 90).requests == 7
    assert store.figures("lm", "1", T0 + 120).requests == 7
    assert store.figures("lm", "1", T0 + 121).requests == 0
    assert store.stats["first"] == 1
    assert store.stats["counted"] == 2


def test_delta_sums_add_up_and_a_retried_delta_is_not_counted_twice(store: TelemetryStore) -> None:
    send(store, "d1", T0 + 1, requests(3, at=T0 + 1, start=T0 - 9, temporality=DELTA))
    send(store, "d1", T0 + 11, requests(4, at=T0 + 11, start=T0 + 1, temporality=DELTA))
    send(store, "d1", T0 + 12, requests(4, at=T0 + 11, start=T0 + 1, temporality=DELTA))  # the same export again
    send(store, "d1", T0 + 21, requests(5, at=T0 + 21, start=T0 + 11, temporality=DELTA))
    assert store.figures("lm", "1", T0).requests == 12
    assert store.stats["stale"] == 1


def test_a_counter_that_goes_back_or_restarts_counts_its_new_value_whole(store: TelemetryStore) -> None:
    send(store, "d1", T0 + 1, requests(10, at=T0 + 1))
    send(store, "d1", T0 + 2, requests(15, at=T0 + 2))
    # Lower than before with the same start: the process restarted without saying so.
    send(store, "d1", T0 + 3, requests(4, at=T0 + 3))
    # A new start time: a new run; its value is all new even though it is higher.
    send(store, "d1", T0 + 4, requests(30, at=T0 + 4, start=T0 + 3.5))
    assert store.figures("lm", "1", T0).requests == 15 + 4 + 30
    assert store.stats["reset"] == 2


def test_a_late_report_of_an_earlier_run_or_an_older_report_is_dropped(store: TelemetryStore) -> None:
    send(store, "d1", T0 + 1, requests(10, at=T0 + 1))
    send(store, "d1", T0 + 2, requests(3, at=T0 + 2, start=T0 + 1.5))  # restarted
    send(store, "d1", T0 + 3, requests(12, at=T0 + 1.8))  # the earlier run's last report, late
    send(store, "d1", T0 + 4, requests(2, at=T0 + 1.9, start=T0 + 1.5))  # older than the last folded
    assert store.figures("lm", "1", T0).requests == 13
    assert store.stats["stale"] == 2


def test_the_first_report_of_a_series_older_than_the_retention_is_only_a_baseline(store: TelemetryStore) -> None:
    old = T0 - 2 * RETENTION
    send(store, "d1", T0 + 1, requests(1000, at=T0 + 1, start=old))
    first = store.figures("lm", "1", T0)
    assert (first.requests, first.nodes) == (0, 0)  # its history is not news, and no requests is no report
    send(store, "d1", T0 + 2, requests(1010, at=T0 + 2, start=old))
    assert store.figures("lm", "1", T0).requests == 10
    assert store.stats["baseline"] == 1


def test_several_reports_of_a_series_in_one_batch_are_folded_in_time_order(store: TelemetryStore) -> None:
    # A relay delivering buffered reports out of order must not look like resets.
    send(store, "d1", T0 + 30, requests(20, at=T0 + 20), requests(5, at=T0 + 1), requests(9, at=T0 + 10))
    assert store.figures("lm", "1", T0).requests == 20
    assert store.stats.get("reset", 0) == 0


def test_cumulative_histograms_are_stored_as_their_changes(store: TelemetryStore) -> None:
    bounds = (10.0, 100.0, 200.0)
    send(store, "d1", T0 + 1, histogram((0, 100, 0, 0), bounds, at=T0 + 1, total=5000.0))
    send(store, "d1", T0 + 61, histogram((0, 100, 100, 0), bounds, at=T0 + 61, total=20000.0))
    later = store.figures("lm", "1", T0 + 60)
    # Only the second report's new values (all in (100, 200]) are in the later window.
    assert later.p50_ms == pytest.approx(150.0)
    both = store.figures("lm", "1", T0)
    assert both.p50_ms == pytest.approx(100.0)
    assert both.p99_ms == pytest.approx(198.0)


def test_a_histogram_whose_buckets_go_down_restarted(store: TelemetryStore) -> None:
    bounds = (10.0, 20.0)
    send(store, "d1", T0 + 1, histogram((5, 5, 0), bounds, at=T0 + 1))
    send(store, "d1", T0 + 2, histogram((0, 0, 3), bounds, at=T0 + 2, high=30.0))
    assert store.stats["reset"] == 1
    # All 13 values: 5 in (0, 10], 5 in (10, 20], 3 in (20, 30].
    assert store.figures("lm", "1", T0).p50_ms == pytest.approx(13.0)


def test_delta_histograms_add_up(store: TelemetryStore) -> None:
    bounds = (10.0, 20.0)
    send(store, "d1", T0 + 1, histogram((10, 0, 0), bounds, at=T0 + 1, start=T0, temporality=DELTA))
    send(store, "d1", T0 + 2, histogram((0, 10, 0), bounds, at=T0 + 2, start=T0 + 1, temporality=DELTA))
    assert store.figures("lm", "1", T0).p50_ms == pytest.approx(10.0)


def test_quantiles_interpolate_within_a_bucket() -> None:
    one = BucketHistogram((10.0, 20.0), (0, 10, 0))
    assert quantiles([one], [0.5, 0.0, 1.0]) == [pytest.approx(15.0), 10.0, 20.0]
    # The open last bucket: at its lower bound without a max, up to the max with one.
    over = BucketHistogram((10.0,), (0, 4))
    assert quantiles([over], [0.5]) == [10.0]
    assert quantiles([BucketHistogram((10.0,), (0, 4), max=30.0)], [0.5]) == [pytest.approx(20.0)]
    # min and max tighten the buckets they fall in.
    assert quantiles([BucketHistogram((100.0,), (4, 0), min=50.0, max=60.0)], [0.5]) == [pytest.approx(55.0)]
    assert quantiles([], [0.5]) == [None]
    assert quantiles([BucketHistogram((10.0,), (0, 0))], [0.5, 0.99]) == [None, None]


def _histogram_of(values: np.ndarray, bounds: tuple[float, ...]) -> BucketHistogram:
    counts = np.bincount(np.searchsorted(np.asarray(bounds), values, side="left"), minlength=len(bounds) + 1)
    return BucketHistogram(bounds, tuple(float(c) for c in counts), float(values.min()), float(values.max()))


@pytest.mark.parametrize(
    ("name", "draw", "bounds"),
    [
        ("uniform", lambda r: r.uniform(0, 1000, 20_000), tuple(float(b) for b in range(50, 1000, 50))),
        (
            "exponential",
            lambda r: r.exponential(40, 20_000),
            (0.0, 5.0, 10.0, 25.0, 50.0, 75.0, 100.0, 250.0, 500.0, 750.0, 1000.0, 2500.0),  # the SDK's defaults
        ),
        ("lognormal", lambda r: r.lognormal(3, 0.5, 20_000), tuple(float(b) for b in np.geomspace(1, 500, 40))),
    ],
)
def test_quantiles_of_known_distributions_land_within_their_bucket(
    name: str, draw: object, bounds: tuple[float, ...]
) -> None:
    values = draw(np.random.default_rng(7))  # type: ignore[operator]
    got = quantiles([_histogram_of(values, bounds)], [0.5, 0.9, 0.99])
    edges = np.asarray((0.0, *bounds, float(values.max())))
    for q, estimate in zip((0.5, 0.9, 0.99), got, strict=True):
        true = float(np.quantile(values, q))
        i = int(np.searchsorted(edges, true))
        assert estimate is not None
        assert edges[max(i - 1, 0)] <= estimate <= edges[min(i, len(edges) - 1)], (name, q, true, estimate)
    if name == "uniform":  # where values really are spread evenly, interpolation is close to exact
        assert got[0] == pytest.approx(np.quantile(values, 0.5), rel=0.02)


def test_histograms_with_different_bounds_merge() -> None:
    rng = np.random.default_rng(3)
    low = _histogram_of(rng.uniform(0, 100, 10_000), tuple(float(b) for b in range(10, 100, 10)))
    high = _histogram_of(rng.uniform(100, 200, 10_000), tuple(float(b) for b in range(100, 200, 25)))
    p25, p50, p75 = quantiles([low, high], [0.25, 0.5, 0.75])
    assert p25 == pytest.approx(50, abs=2)
    assert p50 == pytest.approx(100, abs=2)
    assert p75 == pytest.approx(150, abs=2)


def test_errors_fallbacks_and_failed_installs(store: TelemetryStore) -> None:
    send(
        store,
        "d1",
        T0 + 1,
        requests(90, "ok", at=T0 + 1),
        requests(5, "error", at=T0 + 1),
        requests(3, "forwarded", at=T0 + 1, reason="queue_full"),
        requests(2, "forwarded", at=T0 + 1, reason="confidence"),
    )
    for node, state in (("d1", "refused"), ("d2", "refused"), ("d3", "committed")):
        update = SumPoint(
            UPDATE_OUTCOMES,
            _attributes("1", **{UPDATE_STATE: state}),
            int((T0 - 5) * NS),
            int(T0 * NS),
            1.0,
            CUMULATIVE,
            True,
        )
        send(store, node, T0 + 2, update)
    figures = store.figures("lm", "1", T0)
    assert (figures.requests, figures.errors, figures.fallbacks) == (100, 5, 5)
    assert (figures.error_rate, figures.fallback_rate) == (0.05, 0.05)
    assert figures.failed_installs == 2
    assert store.failed_installs("lm", "1", T0) == 2 and store.failed_installs("lm", "1", T0, ["d2", "d3"]) == 1
    assert figures.nodes == 1  # the nodes that only reported their installs answered no request on it
    assert store.figures("lm", "2", T0).failed_installs == 0


def test_mean_confidence_is_the_sum_over_the_count_of_every_node(store: TelemetryStore) -> None:
    bounds = (0.5, 0.9)
    send(store, "d1", T0 + 1, histogram((10, 40, 50), bounds, at=T0 + 1, metric=CONFIDENCE, total=80.0, high=1.0))
    send(store, "d2", T0 + 1, histogram((40, 10, 0), bounds, at=T0 + 1, metric=CONFIDENCE, total=20.0, high=0.8))
    assert store.figures("lm", "1", T0).mean_confidence == pytest.approx(100 / 150)


def test_the_node_filter_keeps_a_cohort(store: TelemetryStore) -> None:
    for node, errors in (("d1", 1), ("d2", 2), ("d3", 4)):
        send(store, node, T0 + 1, requests(10, at=T0 + 1), requests(errors, "error", at=T0 + 1))
    assert store.figures("lm", "1", T0, ["d1", "d3"]).errors == 5
    assert store.figures("lm", "1", T0, ["d1", "d3"]).nodes == 2
    assert store.figures("lm", "1", T0, ["nobody"]) == VersionFigures("lm", "1")
    assert store.figures("lm", "1", T0, []) == VersionFigures("lm", "1")
    assert store.figures("lm", "1", T0).requests == 37


def test_no_data_is_none_never_zero(store: TelemetryStore) -> None:
    send(store, "d1", T0 + 1, requests(10, at=T0 + 1, version="1"))
    figures = store.figures("lm", "2", T0)
    assert figures == VersionFigures("lm", "2")
    assert (figures.p50_ms, figures.p99_ms, figures.p999_ms, figures.mean_confidence) == (None, None, None, None)
    assert (figures.error_rate, figures.fallback_rate) == (None, None)
    # Requests without latency points: the counts are known, the quantiles are not.
    assert store.figures("lm", "1", T0).p99_ms is None
    # Nothing received after `since` is nothing.
    assert store.figures("lm", "1", T0 + 10 * WINDOW).requests == 0


def test_every_version_that_reported_has_figures(store: TelemetryStore) -> None:
    send(store, "d1", T0 + 1, requests(10, at=T0 + 1, version="1"), requests(4, at=T0 + 1, version="2"))
    assert [(f.version, f.requests) for f in store.versions(T0)] == [("1", 10), ("2", 4)]


def test_retention_by_age_drops_old_windows_series_and_anomalies(tmp_path: Path) -> None:
    store = TelemetryStore(tmp_path / "t.sqlite", _settings())
    try:
        send(store, "d1", T0 + 1, requests(10, at=T0 + 1))
        _log(store, "d1", T0 + 1, severity=17)
        later = T0 + RETENTION + 2 * WINDOW
        send(store, "d2", later, requests(7, at=later, start=later - 5))
        assert store.prune(later) > 0
        assert store.figures("lm", "1", T0).requests == 7
        assert store.last_anomaly("d1") is None
        # d1's series state went too: its next report (of a run older than the retention) is a baseline.
        send(store, "d1", later + 1, requests(20, at=later + 1))
        assert store.figures("lm", "1", T0, ["d1"]).requests == 0
    finally:
        store.close()


def test_retention_by_rows_drops_the_oldest_windows(tmp_path: Path) -> None:
    store = TelemetryStore(tmp_path / "t.sqlite", _settings(max_rows=3))
    try:
        for i in range(5):
            send(store, "d1", T0 + i * WINDOW + 1, requests(10 * (i + 1), at=T0 + i * WINDOW + 1))
        store.prune(T0 + 5 * WINDOW)
        # The three newest windows, 10 each.
        assert store.figures("lm", "1", T0).requests == 30
    finally:
        store.close()


def _log(
    store: TelemetryStore,
    node_id: str,
    received_at: float,
    severity: int,
    body: str = "slow",
    marked: bool = False,
    trace_id: bytes = b"",
) -> int:
    attributes = ((ANOMALY, True),) if marked else ()
    record = LogEntry(attributes, int(received_at * NS), severity, "", body, trace_id, b"")
    kept, rejected, _ = admit_logs(node_id, ResourceLogs(((NODE_ID, node_id),), (record,)), received_at)
    assert not rejected
    store.write([LogsBatch(received_at, tuple(k for k in kept if isinstance(k, Anomaly)))])
    return len(kept)


def test_anomalies_are_kept_per_node_newest_first_and_bounded(tmp_path: Path) -> None:
    store = TelemetryStore(tmp_path / "t.sqlite", _settings(max_anomalies_per_node=2))
    try:
        assert _log(store, "d1", T0 + 1, severity=9) == 0  # INFO: routine
        assert _log(store, "d1", T0 + 2, severity=13, body="slow answer") == 1  # WARN
        trace = bytes(range(16))
        assert _log(store, "d1", T0 + 3, severity=9, body="fallback", marked=True, trace_id=trace) == 1
        assert _log(store, "d1", T0 + 4, severity=17, body="update refused") == 1  # ERROR
        assert _log(store, "d2", T0 + 5, severity=21, body="crash") == 1
        kept = store.anomalies("d1")
        assert [a.body for a in kept] == ["update refused", "fallback"]
        assert kept[1].trace_id == trace.hex()
        last = store.last_anomaly("d1")
        assert last is not None
        assert (last.body, last.received_at, last.severity_number) == ("update refused", T0 + 4, 17)
        assert store.stats["anomalies"] == 4
    finally:
        store.close()


def test_node_summaries_give_each_node_its_rates_latency_and_last_anomaly(store: TelemetryStore) -> None:
    bounds = (10.0, 20.0, 50.0)
    send(
        store,
        "d1",
        T0 + 1,
        requests(80, at=T0 + 1),
        requests(20, "forwarded", at=T0 + 1, reason="memory"),
        histogram((0, 100, 0, 0), bounds, at=T0 + 1),
    )
    send(store, "d2", T0 + 1, requests(45, at=T0 + 1), requests(5, "error", at=T0 + 1))
    _log(store, "d3", T0 + 2, severity=17, body="cannot load")
    summaries = {s.node_id: s for s in store.node_summaries(T0)}
    assert set(summaries) == {"d1", "d2", "d3"}
    d1, d2, d3 = summaries["d1"], summaries["d2"], summaries["d3"]
    assert (d1.requests, d1.fallback_rate, d1.error_rate) == (100, 0.2, 0.0)
    assert d1.p50_ms == pytest.approx(15.0)
    assert d1.p999_ms == pytest.approx(19.99)
    assert (d2.requests, d2.error_rate, d2.p99_ms) == (50, 0.1, None)
    assert d3.requests == 0
    assert d3.error_rate is None
    assert d3.last_anomaly is not None
    assert d3.last_anomaly.body == "cannot load"
    # Asked for by id: listed even without data.
    assert [s.node_id for s in store.node_summaries(T0, ["d2", "d9"])] == ["d2", "d9"]


def test_the_store_survives_reopening(tmp_path: Path) -> None:
    path = tmp_path / "t.sqlite"
    first = TelemetryStore(path, _settings())
    send(first, "d1", T0 + 1, requests(10, at=T0 + 1))
    first.close()
    again = TelemetryStore(path, _settings())
    try:
        # The series' state came back with it: the next report is stored as its change, not whole.
        send(again, "d1", T0 + 2, requests(12, at=T0 + 2))
        assert again.figures("lm", "1", T0).requests == 12
    finally:
        again.close()


def test_the_callers_own_mistakes_are_neither_requests_nor_errors_of_the_version(store: TelemetryStore) -> None:
    send(store, "d1", T0 + 1, requests(10, "ok", at=T0 + 1), requests(5, "rejected", at=T0 + 1))
    figures = store.figures("lm", "1", T0)
    assert (figures.requests, figures.errors, figures.error_rate) == (10, 0, 0.0)


def test_a_stage_is_never_judged_on_the_window_it_began_in(store: TelemetryStore) -> None:
    # What the previous stage's cohort sent at T0 + 10 must not count for a stage that began at T0 + 30.
    send(store, "d1", T0 + 10, requests(500, at=T0 + 10))
    assert store.figures("lm", "1", T0 + 30) == VersionFigures("lm", "1")
    send(store, "d2", T0 + 70, requests(7, at=T0 + 70))
    assert (store.figures("lm", "1", T0 + 30).requests, store.figures("lm", "1", T0 + 30).nodes) == (7, 1)


# A rollout's shadow stage


def shadow_runs(value: float, outcome: str, *, at: float, version: str = "2") -> SumPoint:
    return SumPoint(
        SHADOW_RUNS, _attributes(version, **{OUTCOME: outcome}), int((T0 - 5) * NS), int(at * NS), value, DELTA, True
    )


def shadow_points(
    at: float,
    *,
    ok: int,
    errors: int = 0,
    shed: int = 0,
    agreement: float = 0.95,
    difference: float = 0.02,
    latency_ms: float = 15.0,
    serving_ms: float = 10.0,
) -> list[MetricPoint]:
    """What a node reports of ``ok`` compared runs (each at the given agreement, difference and latencies)."""
    latency_bounds = (5.0, 10.0, 20.0, 50.0)

    def bucket(ms: float) -> tuple[int, ...]:
        index = next((i for i, b in enumerate(latency_bounds) if ms <= b), len(latency_bounds))
        return tuple(ok if i == index else 0 for i in range(len(latency_bounds) + 1))

    def per_run(metric: str, value: float, bounds: tuple[float, ...], counts: tuple[int, ...]) -> HistogramPoint:
        return histogram(
            counts,
            bounds,
            at=at,
            version="2",
            metric=metric,
            total=value * ok,
            low=value,
            high=value,
            temporality=DELTA,
            start=at - 1,
        )

    points: list[MetricPoint] = [
        shadow_runs(ok, "ok", at=at),
        shadow_runs(errors, "error", at=at),
        shadow_runs(shed, "shed", at=at),
        per_run(SHADOW_AGREEMENT, agreement, (0.5, 0.9), (0, 0, ok) if agreement > 0.9 else (0, ok, 0)),
        per_run(SHADOW_DIFFERENCE, difference, (0.1,), (ok, 0)),
        per_run(SHADOW_LATENCY, latency_ms, latency_bounds, bucket(latency_ms)),
        per_run(SHADOW_SERVING_LATENCY, serving_ms, latency_bounds, bucket(serving_ms)),
    ]
    return points


def test_shadow_metrics_are_kept_and_answer_the_shadow_s_figures(store: TelemetryStore) -> None:
    send(store, "d1", T0 + 1, *shadow_points(T0 + 1, ok=60, errors=2, shed=5, agreement=1.0, difference=0.01))
    send(store, "d2", T0 + 2, *shadow_points(T0 + 2, ok=40, shed=1, agreement=0.75, difference=0.04))
    seen = store.shadow("lm", "2", T0)
    assert (seen.nodes, seen.ok, seen.errors, seen.shed, seen.compared) == (2, 100, 2, 6, 100)
    assert seen.agreement == pytest.approx((60 * 1.0 + 40 * 0.75) / 100)
    assert seen.mean_difference == pytest.approx((60 * 0.01 + 40 * 0.04) / 100)
    assert seen.error_rate == pytest.approx(2 / 102)  # shed runs did not run
    assert seen.p99_ms is not None and 10 < seen.p99_ms <= 20  # every shadow run took 15 ms
    assert seen.serving_p99_ms is not None and 5 < seen.serving_p99_ms <= 10
    # The cohort filter, the window, and the version: shadow points are filed under the shadow's version.
    only = store.shadow("lm", "2", T0, ["d2"])
    assert (only.nodes, only.ok, only.compared) == (1, 40, 40) and only.agreement == pytest.approx(0.75)
    assert store.shadow("lm", "2", T0, []) == ShadowFigures("lm", "2")
    assert store.shadow("lm", "2", T0 + 10 * WINDOW) == ShadowFigures("lm", "2")
    assert store.shadow("lm", "1", T0) == ShadowFigures("lm", "1")
    # The shadow's runs are not requests the version answered: its serving figures stay empty.
    assert store.figures("lm", "2", T0).requests == 0 and store.figures("lm", "2", T0).nodes == 0


def test_a_shadow_that_only_failed_or_was_shed_compared_nothing(store: TelemetryStore) -> None:
    send(store, "d1", T0 + 1, shadow_runs(7, "error", at=T0 + 1), shadow_runs(3, "shed", at=T0 + 1))
    seen = store.shadow("lm", "2", T0)
    assert (seen.nodes, seen.ok, seen.errors, seen.shed, seen.compared) == (0, 0, 7, 3, 0)
    assert (seen.agreement, seen.mean_difference, seen.p99_ms, seen.serving_p99_ms) == (None, None, None, None)
    assert seen.error_rate == 1.0


def test_a_shadow_without_a_top_1_is_counted_from_its_differences(store: TelemetryStore) -> None:
    # A regressor's (or an [N, 1] score's) compared runs record a difference each and no agreement.
    def no_top1(at: float, ok: int) -> list[MetricPoint]:
        return [p for p in shadow_points(at, ok=ok, difference=0.05) if p.metric != SHADOW_AGREEMENT]

    send(store, "d1", T0 + 1, *no_top1(T0 + 1, 70))
    send(store, "d2", T0 + 2, *no_top1(T0 + 2, 50))
    seen = store.shadow("lm", "2", T0)
    assert (seen.nodes, seen.ok, seen.compared) == (2, 120, 120)
    assert seen.agreement is None and seen.mean_difference == pytest.approx(0.05)
    only = store.shadow("lm", "2", T0, ["d2"])
    assert (only.nodes, only.compared, only.agreement) == (1, 50, None)
    # A node whose outputs have a top-1 beside one whose do not: both compared, the agreement is the first's.
    send(store, "d3", T0 + 3, *shadow_points(T0 + 3, ok=30, agreement=1.0))
    mixed = store.shadow("lm", "2", T0)
    assert (mixed.nodes, mixed.compared) == (3, 150) and mixed.agreement == pytest.approx(1.0)
