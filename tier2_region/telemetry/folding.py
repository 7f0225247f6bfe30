"""Folds a series' successive points into increments: what each report adds to its window.

A delta point is its own increment. A cumulative point counts everything since
its ``start_ns``, so its increment is the change since the series' previous
report (:class:`SeriesState`, kept by the store):

* the first report of a series counts whole when the series started within
  ``fresh_ns`` (a new process, a new version: its counts are news); an older
  series is only remembered (a baseline), so the region never books days of a
  node's history into one window after it lost (or pruned) the series' state;
* a report with a later ``start_ns``, or whose value, count or any bucket went
  down, or whose bounds changed, means the series restarted: it counts whole;
* a report not newer than the last one folded (a retried export that had
  arrived, a relay's late duplicate) or from an earlier run is stale and
  dropped. Delta points are checked the same way by their time, so a retried
  delta is not counted twice.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

from tier2_region.telemetry.points import HistogramPoint, MetricPoint, SumPoint, Temporality


@dataclass(frozen=True, slots=True)
class SeriesState:
    """The last report folded for a series."""

    start_ns: int
    time_ns: int
    value: float = 0.0  # a sum's value
    count: int = 0  # a histogram's
    sum: float | None = None
    bounds: tuple[float, ...] = ()
    counts: tuple[int, ...] = ()


class Outcome(enum.Enum):
    """What folding made of a point."""

    COUNTED = "counted"  # a delta, or the change since the previous report
    FIRST = "first"  # the first report of a recent series, counted whole
    BASELINE = "baseline"  # the first report of an old series: remembered, adds nothing
    RESET = "reset"  # the series restarted: counted whole
    STALE = "stale"  # not newer than what was folded: dropped


@dataclass(frozen=True, slots=True)
class Increment:
    """What a point adds to its window (zero for a baseline: the node still reported)."""

    value: float = 0.0
    count: int = 0
    sum: float | None = None
    bounds: tuple[float, ...] = ()
    counts: tuple[int, ...] = ()
    min: float | None = None
    max: float | None = None


@dataclass(frozen=True, slots=True)
class Folded:
    """A point's increment (None when stale) and the series' state to remember (None: keep the prior one)."""

    outcome: Outcome
    increment: Increment | None
    state: SeriesState | None


def fold(point: MetricPoint, prior: SeriesState | None, fresh_ns: int) -> Folded:
    """Folds one point against the series' last state.

    Args:
        point: An admitted point (finite, non-negative, consistent buckets).
        prior: The series' state after its last folded report, or None if the store knows none.
        fresh_ns: How recently a series must have started for its first cumulative report to count whole.
    """
    if prior is not None and _stale(point, prior):
        return Folded(Outcome.STALE, None, None)
    state = _state_of(point)
    if point.temporality is Temporality.DELTA:
        return Folded(Outcome.COUNTED, _whole(point), state)
    if prior is None:
        if point.start_ns > 0 and 0 <= point.time_ns - point.start_ns <= fresh_ns:
            return Folded(Outcome.FIRST, _whole(point), state)
        return Folded(Outcome.BASELINE, _nothing(point), state)
    if point.start_ns != prior.start_ns or _went_back(point, prior):
        return Folded(Outcome.RESET, _whole(point), state)
    return Folded(Outcome.COUNTED, _change(point, prior), state)


def _stale(point: MetricPoint, prior: SeriesState) -> bool:
    if point.temporality is Temporality.CUMULATIVE and point.start_ns != prior.start_ns:
        # Another run of the series: a later one restarted it, an earlier one's report is late.
        return point.start_ns < prior.start_ns
    return 0 < point.time_ns <= prior.time_ns


def _state_of(point: MetricPoint) -> SeriesState:
    if isinstance(point, SumPoint):
        return SeriesState(point.start_ns, point.time_ns, value=point.value or 0.0)
    return SeriesState(
        point.start_ns, point.time_ns, count=point.count, sum=point.sum, bounds=point.bounds, counts=point.counts
    )


def _whole(point: MetricPoint) -> Increment:
    if isinstance(point, SumPoint):
        return Increment(value=point.value or 0.0)
    return Increment(
        count=point.count, sum=point.sum, bounds=point.bounds, counts=point.counts, min=point.min, max=point.max
    )


def _nothing(point: MetricPoint) -> Increment:
    if isinstance(point, SumPoint):
        return Increment()
    return Increment(sum=None if point.sum is None else 0.0, bounds=point.bounds, counts=tuple(0 for _ in point.counts))


def _went_back(point: MetricPoint, prior: SeriesState) -> bool:
    if isinstance(point, SumPoint):
        return (point.value or 0.0) < prior.value
    return (
        point.bounds != prior.bounds
        or point.count < prior.count
        or any(now < then for now, then in zip(point.counts, prior.counts, strict=False))
        or len(point.counts) != len(prior.counts)
    )


def _change(point: MetricPoint, prior: SeriesState) -> Increment:
    if isinstance(point, SumPoint):
        return Increment(value=(point.value or 0.0) - prior.value)
    return _histogram_change(point, prior)


def _histogram_change(point: HistogramPoint, prior: SeriesState) -> Increment:
    change = None if point.sum is None or prior.sum is None else max(point.sum - prior.sum, 0.0)
    return Increment(
        count=point.count - prior.count,
        sum=change,
        bounds=point.bounds,
        counts=tuple(now - then for now, then in zip(point.counts, prior.counts, strict=True)),
        # The series' lifetime extremes still bound this interval's values.
        min=point.min,
        max=point.max,
    )
