"""The region's telemetry store in SQLite: the nodes' metrics folded into windows, and their anomalies.

Tables::

    counters    per window, model, version, node, variant, metric, label (outcome or update state) and
                fallback reason: how much the sums grew (requests, update outcomes, shadow runs)
    histograms  per window, model, version, node, variant, metric and bucket bounds (JSON): the
                merged histograms (durations, confidences, shadow agreements, differences and
                durations): count, sum, min, max and bucket counts (packed 64-bit integers)
    series      per series (node, metric, point attributes): the last report folded, so the next
                cumulative report is stored as its change (:mod:`~tier2_region.telemetry.folding`)
    anomalies   the warnings, errors and marked anomalies nodes logged, the last
                ``max_anomalies_per_node`` received per node
    hard_examples, hard_example_counts
                the newest ``hard_examples_max_rows`` hard examples nodes sent for retraining,
                and how many arrived and were pruned (:mod:`~tier2_region.telemetry.hard_example_table`)

A window is ``window_s`` wide and holds what the region *received* in it (the
region's clock, not the nodes'). A query from ``since`` reads every window that
overlaps it, so its resolution is one window. What is older than
``retention_s`` goes at each :meth:`TelemetryStore.prune`, and so do the
oldest windows beyond ``max_rows`` rows per table and the least recently
updated series beyond ``max_series`` (a series whose state is gone starts
afresh, see :func:`~tier2_region.telemetry.folding.fold`).

Indexes are few on purpose (each is rewritten at every commit): the primary keys
lead with model and version (a rollout's query) and each table has one on age
(pruning, and the fleet view's scan of recent windows).

Writes come from one writer (:class:`~tier2_region.telemetry.write_queue.WriteQueue`)
in one transaction per group of requests; reads have a connection of their own,
so a rollout's query never waits for a write (the journal is a write-ahead log).
Telemetry is not precious: ``synchronous=NORMAL`` can lose the last commits at a
power cut, never corrupt the file. Times are Unix seconds.
"""

from __future__ import annotations

import functools
import json
import math
import os
import sqlite3
import threading
from array import array
from collections import Counter
from collections.abc import Collection, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tier2_region.config import TelemetrySection
from tier2_region.fleet.figures import (
    CONFIDENCE,
    LATENCY,
    REQUESTS,
    SHADOW_AGREEMENT,
    SHADOW_DIFFERENCE,
    SHADOW_LATENCY,
    SHADOW_RUNS,
    SHADOW_SERVING_LATENCY,
    UPDATE_OUTCOMES,
    ShadowFigures,
    VersionFigures,
)
from tier2_region.telemetry import hard_example_table
from tier2_region.telemetry.folding import Increment, SeriesState, fold
from tier2_region.telemetry.hard_example_table import HardExampleStats
from tier2_region.telemetry.points import Anomaly, Batch, HardExample, LogsBatch, MetricsBatch, Sample, SumPoint
from tier2_region.telemetry.quantiles import BucketHistogram, quantiles

BUSY_TIMEOUT_S = 10.0
QUANTILES = (0.5, 0.99, 0.999)

_SCHEMA = """
CREATE TABLE IF NOT EXISTS counters (
    model TEXT NOT NULL,
    version TEXT NOT NULL,
    window_start REAL NOT NULL,
    node_id TEXT NOT NULL,
    variant TEXT NOT NULL,
    metric TEXT NOT NULL,
    label TEXT NOT NULL,
    reason TEXT NOT NULL,
    value REAL NOT NULL,
    PRIMARY KEY (model, version, window_start, node_id, variant, metric, label, reason)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS counters_age ON counters (window_start);
CREATE TABLE IF NOT EXISTS histograms (
    model TEXT NOT NULL,
    version TEXT NOT NULL,
    window_start REAL NOT NULL,
    node_id TEXT NOT NULL,
    variant TEXT NOT NULL,
    metric TEXT NOT NULL,
    bounds TEXT NOT NULL,
    count INTEGER NOT NULL,
    sum REAL,
    min REAL,
    max REAL,
    counts BLOB NOT NULL,
    PRIMARY KEY (model, version, window_start, node_id, variant, metric, bounds)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS histograms_age ON histograms (window_start);
CREATE TABLE IF NOT EXISTS series (
    series_id TEXT PRIMARY KEY,
    start_ns INTEGER NOT NULL,
    time_ns INTEGER NOT NULL,
    value REAL NOT NULL,
    count INTEGER NOT NULL,
    sum REAL,
    bounds TEXT NOT NULL,
    counts BLOB NOT NULL,
    updated_at REAL NOT NULL
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS series_age ON series (updated_at);
CREATE TABLE IF NOT EXISTS anomalies (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    node_id TEXT NOT NULL,
    received_at REAL NOT NULL,
    time_ns INTEGER NOT NULL,
    severity_number INTEGER NOT NULL,
    severity_text TEXT NOT NULL,
    body TEXT NOT NULL,
    trace_id TEXT NOT NULL,
    span_id TEXT NOT NULL,
    model TEXT NOT NULL,
    version TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS anomalies_node ON anomalies (node_id, received_at);
CREATE INDEX IF NOT EXISTS anomalies_age ON anomalies (received_at);
"""

_NODES_IN = " AND node_id IN (SELECT value FROM json_each(?))"
# A histogram row takes a later part in place; a part without a sum leaves the row without one
# (NULL + x is NULL), as a mean over part of the values would mislead.
_MERGE_HISTOGRAM = """
INSERT INTO histograms VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT DO UPDATE SET
    count = count + excluded.count,
    sum = sum + excluded.sum,
    min = CASE WHEN min IS NULL THEN excluded.min WHEN excluded.min IS NULL THEN min ELSE MIN(min, excluded.min) END,
    max = CASE WHEN max IS NULL THEN excluded.max WHEN excluded.max IS NULL THEN max ELSE MAX(max, excluded.max) END,
    counts = add_counts(counts, excluded.counts)
"""
_ANOMALY_COLUMNS = (
    "node_id, received_at, time_ns, severity_number, severity_text, body, trace_id, span_id, model, version"
)


@dataclass(frozen=True)
class NodeSummary:
    """One node's serving over a window, every model together (for ``edgecascade fleet``).

    Attributes:
        requests: Requests answered or forwarded.
        errors: Requests that ended in an error.
        fallbacks: Requests forwarded upstream.
        p50_ms, p99_ms, p999_ms: Latency quantiles (None without data).
        last_anomaly: The newest anomaly the node logged (whenever it was), or None.
    """

    node_id: str
    requests: int = 0
    errors: int = 0
    fallbacks: int = 0
    p50_ms: float | None = None
    p99_ms: float | None = None
    p999_ms: float | None = None
    last_anomaly: Anomaly | None = None

    @property
    def error_rate(self) -> float | None:
        """Errors per request, or None without requests."""
        return self.errors / self.requests if self.requests else None

    @property
    def fallback_rate(self) -> float | None:
        """Forwarded requests per request, or None without requests."""
        return self.fallbacks / self.requests if self.requests else None


class _Merged:
    """Histogram rows added together (same bounds)."""

    __slots__ = ("count", "counts", "max", "min", "sum")

    def __init__(self, buckets: int) -> None:
        self.count = 0
        self.sum: float | None = 0.0
        self.min: float | None = None
        self.max: float | None = None
        self.counts = [0] * buckets

    def add(
        self, count: int, total: float | None, low: float | None, high: float | None, counts: Sequence[int]
    ) -> None:
        self.count += count
        # A part without a sum leaves the whole without one (a mean of a part would mislead).
        self.sum = None if self.sum is None or total is None else self.sum + total
        self.min = low if self.min is None else (self.min if low is None else min(self.min, low))
        self.max = high if self.max is None else (self.max if high is None else max(self.max, high))
        for i, c in enumerate(counts[: len(self.counts)]):
            self.counts[i] += c

    def histogram(self, bounds: tuple[float, ...]) -> BucketHistogram:
        return BucketHistogram(bounds, tuple(float(c) for c in self.counts), self.min, self.max)


@functools.lru_cache(maxsize=256)
def _bounds_text(bounds: tuple[float, ...]) -> str:
    # Every node of a version exports the same few bound sets: each is encoded (and decoded) once.
    return json.dumps(list(bounds))


@functools.lru_cache(maxsize=256)
def _bounds_of(text: str) -> tuple[float, ...]:
    return tuple(json.loads(text))


def _counts_blob(counts: Sequence[int]) -> bytes:
    # Packed 64-bit integers: decoding them is the store's most frequent work (admission bounds them).
    return array("q", counts).tobytes()


def _counts_of(blob: bytes) -> list[int]:
    packed = array("q")
    packed.frombytes(blob)
    return packed.tolist()


def _add_counts(stored: bytes, more: bytes) -> bytes:
    """SQL ``add_counts``: two rows' bucket counts added (rows of one key have the same bounds)."""
    total = _counts_of(stored)
    for i, c in enumerate(_counts_of(more)[: len(total)]):
        total[i] += c
    return _counts_blob(total)


def _connect(path: Path) -> sqlite3.Connection:
    db = sqlite3.connect(path, isolation_level=None, check_same_thread=False, timeout=BUSY_TIMEOUT_S)
    db.execute("PRAGMA journal_mode=WAL")
    db.execute("PRAGMA synchronous=NORMAL")
    return db


class TelemetryStore:
    """Opens (and creates) the telemetry store; answers :class:`~tier2_region.fleet.figures.FiguresSource`.

    Args:
        path: The SQLite file (created with mode 0600, in a directory created if needed).
        settings: The ``[telemetry]`` section (windows, retention and bounds).
    """

    def __init__(self, path: Path, settings: TelemetrySection) -> None:
        self.path = path
        self._settings = settings
        self._window = float(settings.window_s)
        path.parent.mkdir(parents=True, exist_ok=True)
        if not path.exists():
            os.close(os.open(path, os.O_WRONLY | os.O_CREAT, 0o600))
        self._write_lock = threading.Lock()
        self._read_lock = threading.Lock()
        self._stats_lock = threading.Lock()
        self._stats: Counter[str] = Counter()
        self._db = _connect(path)
        self._db.create_function("add_counts", 2, _add_counts, deterministic=True)
        self._db.executescript(_SCHEMA)
        self._db.executescript(hard_example_table.SCHEMA)
        self._reader = _connect(path)

    def close(self) -> None:
        """Closes both connections."""
        with self._write_lock:
            self._db.close()
        with self._read_lock:
            self._reader.close()

    @property
    def stats(self) -> dict[str, int]:
        """What folding made of the points written so far (counted, first, baseline, reset, stale) and
        how many anomalies, hard examples (stored, and pruned beyond their bound) and pruned rows there were."""
        with self._stats_lock:
            return dict(self._stats)

    def _count(self, counts: Counter[str]) -> None:
        with self._stats_lock:
            self._stats.update(counts)

    @contextmanager
    def _transaction(self) -> Iterator[sqlite3.Connection]:
        with self._write_lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                yield self._db
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")

    def window_of(self, t: float) -> float:
        """The start of the window holding time ``t``."""
        return math.floor(t / self._window) * self._window

    # Writing

    def write(self, batches: Sequence[Batch]) -> None:
        """Folds the batches' samples into their windows and keeps their anomalies, in one transaction."""
        samples = [(b.received_at, s) for b in batches if isinstance(b, MetricsBatch) for s in b.samples]
        anomalies = [a for b in batches if isinstance(b, LogsBatch) for a in b.anomalies]
        examples = [e for b in batches if isinstance(b, LogsBatch) for e in b.hard_examples]
        pruned = 0
        with self._transaction() as db:
            outcomes = self._fold(db, samples) if samples else Counter()
            if anomalies:
                self._keep_anomalies(db, anomalies)
            if examples:
                pruned = hard_example_table.keep(db, examples, self._settings.hard_examples_max_rows)
        outcomes["anomalies"] += len(anomalies)
        if examples:
            outcomes["hard_examples"] += len(examples)
            outcomes["hard_examples_pruned"] += pruned
        self._count(outcomes)

    def _fold(self, db: sqlite3.Connection, samples: list[tuple[float, Sample]]) -> Counter[str]:
        states = self._states(db, {s.series for _, s in samples})
        fresh_ns = self._settings.retention_s * 1_000_000_000
        counters: dict[tuple[Any, ...], float] = {}
        histograms: dict[tuple[Any, ...], tuple[tuple[float, ...], _Merged]] = {}
        changed: dict[str, tuple[SeriesState, float]] = {}
        outcomes: Counter[str] = Counter()
        # A relay may deliver several reports of one series at once: fold each series in time order.
        for received_at, sample in sorted(samples, key=lambda rs: (rs[1].series, rs[1].point.time_ns)):
            folded = fold(sample.point, states.get(sample.series), fresh_ns)
            outcomes[folded.outcome.value] += 1
            if folded.state is not None:
                states[sample.series] = folded.state
                changed[sample.series] = (folded.state, received_at)
            if folded.increment is not None:
                self._add(sample, self.window_of(received_at), folded.increment, counters, histograms)
        db.executemany(
            "INSERT OR REPLACE INTO series VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
            [
                (
                    series,
                    s.start_ns,
                    s.time_ns,
                    s.value,
                    s.count,
                    s.sum,
                    _bounds_text(s.bounds),
                    _counts_blob(s.counts),
                    at,
                )
                for series, (s, at) in changed.items()
            ],
        )
        db.executemany(
            "INSERT INTO counters VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT DO UPDATE SET value = value + "
            "excluded.value",
            [(*key, value) for key, value in counters.items()],
        )
        db.executemany(
            _MERGE_HISTOGRAM,
            [(*key, m.count, m.sum, m.min, m.max, _counts_blob(m.counts)) for key, (_, m) in histograms.items()],
        )
        return outcomes

    @staticmethod
    def _add(
        sample: Sample,
        window: float,
        increment: Increment,
        counters: dict[tuple[Any, ...], float],
        histograms: dict[tuple[Any, ...], tuple[tuple[float, ...], _Merged]],
    ) -> None:
        where = (sample.model, sample.version, window, sample.node_id, sample.variant, sample.point.metric)
        if isinstance(sample.point, SumPoint):
            counter = (*where, sample.label, sample.reason)
            counters[counter] = counters.get(counter, 0.0) + increment.value
            return
        key = (*where, _bounds_text(increment.bounds))
        if key not in histograms:
            histograms[key] = (increment.bounds, _Merged(len(increment.counts)))
        histograms[key][1].add(increment.count, increment.sum, increment.min, increment.max, increment.counts)

    @staticmethod
    def _states(db: sqlite3.Connection, series: Iterable[str]) -> dict[str, SeriesState]:
        rows = db.execute(
            "SELECT series_id, start_ns, time_ns, value, count, sum, bounds, counts FROM series "
            "WHERE series_id IN (SELECT value FROM json_each(?))",
            (json.dumps(sorted(series)),),
        ).fetchall()
        return {
            r[0]: SeriesState(r[1], r[2], r[3], r[4], r[5], _bounds_of(r[6]), tuple(_counts_of(r[7]))) for r in rows
        }

    def _keep_anomalies(self, db: sqlite3.Connection, anomalies: Sequence[Anomaly]) -> None:
        db.executemany(
            "INSERT INTO anomalies (node_id, received_at, time_ns, severity_number, severity_text, body, "
            "trace_id, span_id, model, version) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            [
                (
                    a.node_id,
                    a.received_at,
                    a.time_ns,
                    a.severity_number,
                    a.severity_text,
                    a.body,
                    a.trace_id,
                    a.span_id,
                    a.model,
                    a.version,
                )
                for a in anomalies
            ],
        )
        keep = self._settings.max_anomalies_per_node
        for node_id in {a.node_id for a in anomalies}:
            db.execute(
                "DELETE FROM anomalies WHERE node_id = ? AND id NOT IN "
                "(SELECT id FROM anomalies WHERE node_id = ? ORDER BY id DESC LIMIT ?)",
                (node_id, node_id, keep),
            )

    def prune(self, now: float) -> int:
        """Drops what is older than the retention and what is beyond the row bounds; returns the rows dropped."""
        settings = self._settings
        cutoff = now - settings.retention_s
        dropped = 0
        with self._transaction() as db:
            for table in ("counters", "histograms"):
                # A window goes once all of it is older than the retention.
                dropped += db.execute(f"DELETE FROM {table} WHERE window_start <= ?", (cutoff - self._window,)).rowcount
                dropped += self._bound(db, table, "window_start", settings.max_rows)
            dropped += db.execute("DELETE FROM series WHERE updated_at < ?", (cutoff,)).rowcount
            dropped += self._bound(db, "series", "updated_at", settings.max_series)
            dropped += db.execute("DELETE FROM anomalies WHERE received_at < ?", (cutoff,)).rowcount
        self._count(Counter({"pruned_rows": dropped}))
        return dropped

    @staticmethod
    def _bound(db: sqlite3.Connection, table: str, column: str, rows: int) -> int:
        """Drops the oldest rows of ``table`` beyond ``rows``, whole windows (or instants) at a time."""
        row = db.execute(f"SELECT {column} FROM {table} ORDER BY {column} DESC LIMIT 1 OFFSET ?", (rows,)).fetchone()
        if row is None:
            return 0
        return int(db.execute(f"DELETE FROM {table} WHERE {column} <= ?", (row[0],)).rowcount)

    # Reading

    def _rows(self, query: str, args: Sequence[Any]) -> list[tuple[Any, ...]]:
        with self._read_lock:
            return self._reader.execute(query, tuple(args)).fetchall()

    def _since(self, since: float) -> float:
        """The ``window_start`` bound for windows that start at or after ``since``.

        A window that began before ``since`` is left out whole, even its part after it: a
        rollout stage must be judged only on what arrived once it began, never on the last one's.
        """
        return math.ceil(since / self._window) * self._window

    def failed_installs(self, name: str, version: str, since: float, node_ids: Collection[str] | None = None) -> int:
        """Nodes whose update to the version was refused in the windows from ``since`` on (one indexed count)."""
        if node_ids is not None and not node_ids:
            return 0
        where = "model = ? AND version = ? AND window_start >= ? AND metric = ? AND label = 'refused' AND value > 0"
        args: list[Any] = [name, version, self._since(since), UPDATE_OUTCOMES]
        if node_ids is not None:
            where += _NODES_IN
            args.append(json.dumps(sorted(node_ids)))
        return int(self._rows(f"SELECT COUNT(DISTINCT node_id) FROM counters WHERE {where}", args)[0][0])

    def figures(self, name: str, version: str, since: float, node_ids: Collection[str] | None = None) -> VersionFigures:
        """The version's figures from the windows that overlap ``since`` or come after it.

        Args:
            name: Model name.
            version: Model version.
            since: Start of the window (Unix seconds, the region's clock; resolution ``window_s``).
            node_ids: Only these nodes (a rollout's cohort); None for every node.
        """
        if node_ids is not None and not node_ids:
            return VersionFigures(name, version)
        where = "model = ? AND version = ? AND window_start >= ?"
        args: list[Any] = [name, version, self._since(since)]
        if node_ids is not None:
            where += _NODES_IN
            args.append(json.dumps(sorted(node_ids)))
        by_label = dict(
            self._rows(
                f"SELECT label, SUM(value) FROM counters WHERE {where} AND metric = ? GROUP BY label",
                [*args, REQUESTS],
            )
        )
        failed = self._rows(
            f"SELECT COUNT(DISTINCT node_id) FROM counters WHERE {where} AND metric = ? AND label = 'refused' "
            "AND value > 0",
            [*args, UPDATE_OUTCOMES],
        )[0][0]
        # A node counts once it answered requests on the version: a refused install or a zero is no report.
        nodes = self._rows(
            f"SELECT COUNT(DISTINCT node_id) FROM counters WHERE {where} AND metric = ? AND value > 0",
            [*args, REQUESTS],
        )[0][0]
        histograms = self._merged(
            self._rows(
                f"SELECT metric, bounds, count, sum, min, max, counts FROM histograms WHERE {where} "
                "AND metric IN (?, ?)",
                [*args, LATENCY, CONFIDENCE],
            )
        )
        p50, p99, p999 = quantiles(
            [m.histogram(bounds) for (metric, bounds), m in histograms.items() if metric == LATENCY], QUANTILES
        )
        return VersionFigures(
            name=name,
            version=version,
            nodes=int(nodes),
            # What the version answered or sent up; the callers' own mistakes ("rejected") are not its doing.
            requests=round(sum(by_label.get(label, 0.0) for label in ("ok", "error", "forwarded"))),
            errors=round(by_label.get("error", 0.0)),
            fallbacks=round(by_label.get("forwarded", 0.0)),
            p50_ms=p50,
            p99_ms=p99,
            p999_ms=p999,
            mean_confidence=_mean([m for (metric, _), m in histograms.items() if metric == CONFIDENCE]),
            failed_installs=int(failed),
        )

    def shadow(self, name: str, version: str, since: float, node_ids: Collection[str] | None = None) -> ShadowFigures:
        """The version's shadow runs from the windows that overlap ``since`` or come after it.

        Args:
            name: Model name.
            version: The shadow's version (every shadow point carries it).
            since: Start of the window (Unix seconds, the region's clock; resolution ``window_s``).
            node_ids: Only these nodes (a rollout's shadow cohort); None for every node.
        """
        if node_ids is not None and not node_ids:
            return ShadowFigures(name, version)
        where = "model = ? AND version = ? AND window_start >= ?"
        args: list[Any] = [name, version, self._since(since)]
        if node_ids is not None:
            where += _NODES_IN
            args.append(json.dumps(sorted(node_ids)))
        runs = dict(
            self._rows(
                f"SELECT label, SUM(value) FROM counters WHERE {where} AND metric = ? GROUP BY label",
                [*args, SHADOW_RUNS],
            )
        )
        # A node counts once it compared answers: a shadow that only failed or was shed compared nothing.
        # Every compared run records a difference; only outputs with a top-1 record an agreement too
        # (a regressor's or a single score's do not), so both histograms name comparing nodes.
        nodes = self._rows(
            f"SELECT COUNT(DISTINCT node_id) FROM histograms WHERE {where} AND metric IN (?, ?) AND count > 0",
            [*args, SHADOW_AGREEMENT, SHADOW_DIFFERENCE],
        )[0][0]
        metrics = (SHADOW_AGREEMENT, SHADOW_DIFFERENCE, SHADOW_LATENCY, SHADOW_SERVING_LATENCY)
        histograms = self._merged(
            self._rows(
                f"SELECT metric, bounds, count, sum, min, max, counts FROM histograms WHERE {where} "
                "AND metric IN (?, ?, ?, ?)",
                [*args, *metrics],
            )
        )

        def parts(metric: str) -> list[_Merged]:
            return [m for (kind, _), m in histograms.items() if kind == metric]

        def p99(metric: str) -> float | None:
            found = [m.histogram(bounds) for (kind, bounds), m in histograms.items() if kind == metric]
            return quantiles(found, (0.99,))[0]

        return ShadowFigures(
            name=name,
            version=version,
            nodes=int(nodes),
            ok=round(runs.get("ok", 0.0)),
            errors=round(runs.get("error", 0.0)),
            shed=round(runs.get("shed", 0.0)),
            # Counted from the differences (one per compared run, with or without a top-1); the agreements
            # only if a node reported more of them (one that records no difference).
            compared=max(sum(m.count for m in parts(SHADOW_DIFFERENCE)), sum(m.count for m in parts(SHADOW_AGREEMENT))),
            agreement=_mean(parts(SHADOW_AGREEMENT)),
            mean_difference=_mean(parts(SHADOW_DIFFERENCE)),
            p99_ms=p99(SHADOW_LATENCY),
            serving_p99_ms=p99(SHADOW_SERVING_LATENCY),
        )

    @staticmethod
    def _merged(rows: Iterable[tuple[Any, ...]]) -> dict[tuple[str, tuple[float, ...]], _Merged]:
        """Histogram rows added up per metric and bounds."""
        merged: dict[tuple[str, tuple[float, ...]], _Merged] = {}
        for metric, bounds_text, count, total, low, high, counts_text in rows:
            bounds = _bounds_of(bounds_text)
            counts = _counts_of(counts_text)
            key = (metric, bounds)
            if key not in merged:
                merged[key] = _Merged(len(counts))
            merged[key].add(count, total, low, high, counts)
        return merged

    def versions(self, since: float) -> list[VersionFigures]:
        """The figures of every model version that reported since ``since``, by name and version."""
        low = self._since(since)
        pairs = self._rows(
            "SELECT model, version FROM counters WHERE window_start >= ? "
            "UNION SELECT model, version FROM histograms WHERE window_start >= ? ORDER BY 1, 2",
            [low, low],
        )
        return [self.figures(name, version, since) for name, version in pairs]

    def node_summaries(self, since: float, node_ids: Collection[str] | None = None) -> list[NodeSummary]:
        """Each node's requests, error and fallback rates and latency since ``since``, and its last anomaly.

        Args:
            since: Start of the window (Unix seconds).
            node_ids: These nodes (each listed, with or without data); None for every node that
                reported metrics or anomalies since ``since``.
        """
        where = "window_start >= ?"
        args: list[Any] = [self._since(since)]
        if node_ids is not None:
            where += _NODES_IN
            args.append(json.dumps(sorted(node_ids)))
        requests: dict[str, dict[str, float]] = {}
        for node_id, label, value in self._rows(
            f"SELECT node_id, label, SUM(value) FROM counters WHERE {where} AND metric = ? GROUP BY node_id, label",
            [*args, REQUESTS],
        ):
            requests.setdefault(node_id, {})[label] = value
        latency: dict[str, list[tuple[Any, ...]]] = {}
        for row in self._rows(
            f"SELECT node_id, metric, bounds, count, sum, min, max, counts FROM histograms WHERE {where} "
            "AND metric = ?",
            [*args, LATENCY],
        ):
            latency.setdefault(row[0], []).append(row[1:])
        last = self._last_anomalies(node_ids)
        if node_ids is not None:
            nodes = set(node_ids)
        else:
            reported = self._rows(
                f"SELECT DISTINCT node_id FROM counters WHERE {where} UNION "
                f"SELECT DISTINCT node_id FROM histograms WHERE {where} UNION "
                "SELECT DISTINCT node_id FROM anomalies WHERE received_at >= ?",
                [*args, *args, since],
            )
            nodes = {r[0] for r in reported}
        return [self._summary(n, requests.get(n, {}), latency.get(n, []), last.get(n)) for n in sorted(nodes)]

    def _summary(
        self, node_id: str, labels: dict[str, float], latency: list[tuple[Any, ...]], last: Anomaly | None
    ) -> NodeSummary:
        merged = self._merged(latency)
        p50, p99, p999 = quantiles([m.histogram(bounds) for (_, bounds), m in merged.items()], QUANTILES)
        return NodeSummary(
            node_id=node_id,
            requests=round(sum(labels.values())),
            errors=round(labels.get("error", 0.0)),
            fallbacks=round(labels.get("forwarded", 0.0)),
            p50_ms=p50,
            p99_ms=p99,
            p999_ms=p999,
            last_anomaly=last,
        )

    def _last_anomalies(self, node_ids: Collection[str] | None) -> dict[str, Anomaly]:
        # Newest is last received: the highest id (the region's clock may step back, arrival order does not).
        newest = "SELECT MAX(id) FROM anomalies"
        args: list[Any] = []
        if node_ids is not None:
            newest += " WHERE node_id IN (SELECT value FROM json_each(?))"
            args.append(json.dumps(sorted(node_ids)))
        rows = self._rows(f"SELECT {_ANOMALY_COLUMNS} FROM anomalies WHERE id IN ({newest} GROUP BY node_id)", args)
        return {r[0]: Anomaly(*r) for r in rows}

    def anomalies(self, node_id: str, limit: int = 100) -> list[Anomaly]:
        """The node's anomalies, newest first (at most ``limit``)."""
        rows = self._rows(
            f"SELECT {_ANOMALY_COLUMNS} FROM anomalies WHERE node_id = ? ORDER BY id DESC LIMIT ?", [node_id, limit]
        )
        return [Anomaly(*r) for r in rows]

    def last_anomaly(self, node_id: str) -> Anomaly | None:
        """The node's newest anomaly, or None."""
        found = self.anomalies(node_id, 1)
        return found[0] if found else None

    def hard_examples(
        self, model: str = "", since: float | None = None, limit: int | None = None, after: int = 0
    ) -> list[tuple[int, HardExample]]:
        """Held hard examples with their ids, oldest first: of ``model`` ("" = all), received from ``since`` on,
        with ids above ``after``."""
        with self._read_lock:
            return hard_example_table.read(self._reader, model, since, limit, after)

    def hard_example_stats(self) -> HardExampleStats:
        """What the hard-example table holds, and how many arrived and were pruned since the file was made."""
        with self._read_lock:
            return hard_example_table.stats(self._reader)


def _mean(parts: Sequence[_Merged]) -> float | None:
    """The mean value of histograms that carry their sum (None without values)."""
    count = sum(p.count for p in parts if p.sum is not None)
    total = sum(p.sum for p in parts if p.sum is not None)
    return total / count if count else None
