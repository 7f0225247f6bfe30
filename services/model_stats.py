"""Cumulative statistics of one model version (what ModelStatistics reports)."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field


@dataclass
class Duration:
    """A count and a cumulative duration in nanoseconds."""

    count: int = 0
    ns: int = 0

    def add(self, ns: int, count: int = 1) -> None:
        """Counts ``count`` events that took ``ns`` nanoseconds in all."""
        self.count += count
        self.ns += ns


@dataclass
class ModelStats:
    """Counters of one model version.

    ``inference_count`` counts answered requests, ``execution_count`` model runs;
    their ratio is the batch fill. ``shed`` counts requests answered without
    being computed, by reason: ``queue_full``, ``expired``, ``cancelled``.
    """

    success: Duration = field(default_factory=Duration)
    fail: Duration = field(default_factory=Duration)
    queue: Duration = field(default_factory=Duration)
    compute_infer: Duration = field(default_factory=Duration)
    batches: dict[int, Duration] = field(default_factory=dict)
    shed: Counter[str] = field(default_factory=Counter)
    inference_count: int = 0
    execution_count: int = 0
    last_inference_ms: int = 0

    def batch(self, size: int, ns: int) -> None:
        """Counts one execution of ``size`` rows that took ``ns``."""
        self.batches.setdefault(size, Duration()).add(ns)
