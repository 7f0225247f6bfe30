"""Quantiles of merged explicit-bucket histograms.

Each bucket's values are taken as spread evenly between its edges (linear
interpolation within a bucket). Histograms with different bounds merge
exactly under that assumption: the merged cumulative distribution is the sum of
each histogram's, which is linear between consecutive edges of all of them, so
it is inverted one segment at a time, without resampling onto common bounds.

The open-ended first and last buckets are closed by the histogram's recorded
``min`` and ``max`` when it has them; otherwise the first starts at 0 (the
figures read here — durations, confidences — are not negative) and the last is
taken to hold its values at its lower bound, so a quantile that lands there is
a lower bound rather than a guess.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class BucketHistogram:
    """An explicit-bucket histogram: ``counts[i]`` values in ``(bounds[i-1], bounds[i]]``.

    ``counts`` has one more element than ``bounds`` (the last bucket is above
    every bound); an empty ``bounds`` with one count is a histogram of a single
    bucket, usable only with ``min`` and ``max``.
    """

    bounds: tuple[float, ...]
    counts: tuple[float, ...]
    min: float | None = None
    max: float | None = None

    @property
    def total(self) -> float:
        """How many values it holds."""
        return sum(self.counts)


@dataclass(frozen=True, slots=True)
class _Segment:
    lo: float
    hi: float
    mass: float


def _edges(histogram: BucketHistogram, i: int) -> tuple[float, float]:
    """Where bucket ``i``'s values lie, before ``min`` and ``max`` tighten it."""
    bounds = histogram.bounds
    if i == 0:
        lo = min(0.0, bounds[0]) if bounds else (histogram.min if histogram.min is not None else 0.0)
    else:
        lo = bounds[i - 1]
    if i < len(bounds):
        return lo, bounds[i]
    # The open last bucket: up to the recorded max, else at its lower bound.
    return lo, lo if histogram.max is None else histogram.max


def _segments(histogram: BucketHistogram) -> list[_Segment]:
    """The histogram's non-empty buckets as closed segments (a point mass where lo == hi)."""
    if len(histogram.counts) != len(histogram.bounds) + 1:
        return []
    out: list[_Segment] = []
    for i, mass in enumerate(histogram.counts):
        if mass <= 0:
            continue
        lo, hi = _edges(histogram, i)
        # Every value lies within [min, max]: they tighten whichever edges they fall inside.
        if histogram.min is not None:
            lo = max(lo, min(histogram.min, hi))
        if histogram.max is not None:
            hi = min(hi, max(histogram.max, lo))
        out.append(_Segment(lo, max(hi, lo), mass))
    return out


def _cdf(segments: Sequence[_Segment], x: float) -> tuple[float, float]:
    """The merged distribution at ``x``: (mass ≤ x, mass < x)."""
    at_or_below = 0.0
    below = 0.0
    for s in segments:
        if x >= s.hi:
            at_or_below += s.mass
            below += s.mass if x > s.hi or s.hi > s.lo else 0.0
        elif x > s.lo:
            share = s.mass * (x - s.lo) / (s.hi - s.lo)
            at_or_below += share
            below += share
    return at_or_below, below


def quantiles(histograms: Sequence[BucketHistogram], qs: Sequence[float]) -> list[float | None]:
    """The ``qs`` quantiles (each in [0, 1]) of the values of all ``histograms`` together.

    Returns:
        One estimate per quantile, or None for each when the histograms hold no
        value (or none whose buckets can be placed).
    """
    segments = [s for h in histograms for s in _segments(h)]
    total = sum(s.mass for s in segments)
    if total <= 0:
        return [None for _ in qs]
    edges = sorted({e for s in segments for e in (s.lo, s.hi)})
    # The distribution at each edge, computed once for all quantiles.
    at_edges = [_cdf(segments, e) for e in edges]
    return [_invert(edges, at_edges, q * total) for q in qs]


def _invert(edges: Sequence[float], at_edges: Sequence[tuple[float, float]], target: float) -> float:
    previous_edge = edges[0]
    previous_mass = 0.0
    for edge, (at_or_below, below) in zip(edges, at_edges, strict=True):
        if at_or_below >= target:
            # Between the previous edge and this one the distribution is linear up to `below`;
            # the rest is a point mass sitting exactly at this edge.
            if below > previous_mass and target <= below:
                return previous_edge + (edge - previous_edge) * (target - previous_mass) / (below - previous_mass)
            return edge
        previous_edge, previous_mass = edge, at_or_below
    return edges[-1]
