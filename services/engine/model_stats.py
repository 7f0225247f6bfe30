"""Cumulative statistics of one model version (what ModelStatistics reports) and the batcher observer counting them."""

from __future__ import annotations

import time
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
    being computed, by reason: ``queue_full``, ``overloaded``, ``expired``, ``cancelled``.
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


class StatsObserver:
    """Counts the events of a batcher into :class:`ModelStats` (a ``BatchEvents`` observer).

    Args:
        stats: Where to count.
    """

    def __init__(self, stats: ModelStats) -> None:
        self.stats = stats

    def queued(self, seconds: float) -> None:
        """A request waited ``seconds`` before its batch started."""
        self.stats.queue.add(int(seconds * 1e9))

    def ran(self, rows: int, seconds: float) -> None:
        """A batch of ``rows`` rows ran for ``seconds``."""
        stats = self.stats
        ns = int(seconds * 1e9)
        stats.execution_count += 1
        stats.compute_infer.add(ns)
        stats.batch(rows, ns)
        stats.last_inference_ms = time.time_ns() // 1_000_000

    def answered(self, seconds: float) -> None:
        """A request was answered ``seconds`` after it was queued."""
        stats = self.stats
        stats.inference_count += 1
        stats.success.add(int(seconds * 1e9))

    def failed(self, seconds: float) -> None:
        """A request failed ``seconds`` after it was queued."""
        self.stats.fail.add(int(seconds * 1e9))

    def shed(self, reason: str) -> None:
        """A request was answered without being computed, for ``reason``."""
        self.stats.shed[reason] += 1
