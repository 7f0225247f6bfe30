"""A node's adaptive logging by OTLP: anomalies at once (rate-limited), routine records sampled.

With ``[telemetry] export`` and ``logs`` a device or edge sends log records with the
stock SDK (:class:`LoggerProvider`, :class:`BatchLogRecordProcessor`,
:class:`OTLPLogExporter`) to where its metrics go. The region keeps each record
marked :data:`~services.telemetry_names.ANOMALY` with its trace id; routine records
are for a collector that gets a copy (the region counts and ignores them).

What is sent (the decisions are :mod:`services.adaptive_logging`'s):

- an **anomaly** — a request that ended in an error, one sent upward (with its
  fallback reason), a local answer slower than ``slow_factor`` × its model version's
  running p99, an update refused or failed unexpectedly — as a WARN or ERROR record
  with ``edgecascade.anomaly = true``, its kind and the model's name, version and
  variant, under the request's trace and span (the current context when it is
  recorded); at most ``anomalies_per_s`` (``anomaly_burst`` at once), the rest
  dropped and counted;
- a **routine** record (INFO) for a sampled share of ordinary answers: the share is
  ``routine_sample_rate``, raised to ``elevated_sample_rate`` for ``elevated_s`` after
  each anomaly (each raise and lowering is logged and counted once).

A **hard example** (:meth:`AnomalyLog.hard_example`, sampled and built by
:mod:`services.rpc.hard_example_log`) is an INFO record marked
``edgecascade.hard_example = true`` whose body is the example as JSON. It takes
this same export path with bounds of its own: its token bucket
(``hard_examples_per_s``, ``hard_examples_burst``), a share of the queue
(:data:`HARD_EXAMPLE_SHARE`) and of its bytes (:data:`HARD_EXAMPLE_QUEUE_BYTES`,
so an export request stays a few MiB), and its drop counts.

Nothing blocks serving: deciding is a few attribute reads (about 1 µs for an ordinary
answer, see ``bench/anomaly_log_overhead.py``) and, for the rare record sent, the
SDK's ``emit`` (some 40 µs, then a queue append); export runs in the processor's own
thread.
The queue is bounded (:data:`MAX_QUEUE`): a record that would overflow it is dropped
before it is built, and counted; routine records may fill only half of it, so a flood
of them never crowds out an anomaly. Counts are :attr:`AnomalyLog.stats` and the
node's ``edgecascade.telemetry.logs.*`` metrics.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from opentelemetry._logs import SeverityNumber
from opentelemetry.exporter.otlp.proto.grpc._log_exporter import OTLPLogExporter
from opentelemetry.metrics import CallbackOptions, Observation
from opentelemetry.sdk._logs import LoggerProvider, ReadableLogRecord
from opentelemetry.sdk._logs.export import BatchLogRecordProcessor, LogRecordExportResult
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.resources import Resource

from services.adaptive_logging import DetailLevel, SlowOutliers, TokenBucket
from services.telemetry_names import (
    ANOMALY,
    ANOMALY_ERROR,
    ANOMALY_FALLBACK,
    ANOMALY_KIND,
    ANOMALY_SLOW,
    ANOMALY_UPDATE,
    ERROR,
    ERROR_TYPE,
    FALLBACK_REASON,
    FORWARDED,
    HARD_EXAMPLE,
    LATENCY_MS,
    MODEL_NAME,
    MODEL_VARIANT,
    MODEL_VERSION,
    OK,
    OUTCOME,
    P99_MS,
    REJECTED,
)
from services.tier_config import TelemetrySection

log = logging.getLogger("edgecascade.telemetry")

SCHEDULE_DELAY_MS = 200  # "at once": an anomaly waits at most this long for its batch
MAX_QUEUE = 2048
MAX_EXPORT_BATCH = 512
ROUTINE_SHARE = 0.5  # of the queue routine records may fill; the rest is kept for anomalies
DROP_REASON = "edgecascade.drop.reason"  # attribute of edgecascade.telemetry.logs.dropped
RECORD_KIND = "edgecascade.record.kind"  # attribute of edgecascade.telemetry.logs.records: an anomaly kind or routine
ROUTINE = "routine"
DIRECTION = "edgecascade.detail.direction"  # attribute of edgecascade.telemetry.logs.detail: raised or lowered
HARD_EXAMPLE_RECORD = "hard_example"  # the RECORD_KIND of a hard example
HARD_EXAMPLE_SHARE = 0.25  # of the queue hard examples may fill (anomalies keep the rest)
HARD_EXAMPLE_QUEUE_BYTES = 4 * 1024 * 1024  # of hard-example bodies queued at once (bounds an export's size)


@dataclass
class LogStats:
    """What the node's adaptive logging did, since it started.

    Attributes:
        emitted: Records handed to the SDK, by kind (an anomaly kind or ``routine``).
        rate_limited: Anomalies over ``anomalies_per_s`` (dropped).
        queue_full: Records dropped because the export queue was full (routine ones: half full).
        exported, export_failed: Records the receiver took, and records in exports that failed.
        hard_examples_rate_limited: Sampled hard examples over ``hard_examples_per_s`` (dropped).
        hard_examples_queue_full: Sampled hard examples dropped for the queue's share (count or bytes).
        hard_examples_too_large: Sampled hard examples larger than ``hard_examples_max_bytes`` (dropped).
    """

    emitted: dict[str, int] = field(default_factory=dict)
    rate_limited: int = 0
    queue_full: int = 0
    exported: int = 0
    export_failed: int = 0
    hard_examples_rate_limited: int = 0
    hard_examples_queue_full: int = 0
    hard_examples_too_large: int = 0

    @property
    def dropped(self) -> int:
        """Records dropped on this node, for any reason."""
        return self.rate_limited + self.queue_full + self.hard_examples_dropped

    @property
    def hard_examples_dropped(self) -> int:
        """Sampled hard examples dropped on this node, for any reason."""
        return self.hard_examples_rate_limited + self.hard_examples_queue_full + self.hard_examples_too_large


class CountedLogExporter(OTLPLogExporter):
    """The stock OTLP/gRPC log exporter, counting what it was handed and what it delivered, never raising."""

    def __init__(self, endpoint: str, timeout_s: float, stats: LogStats) -> None:
        super().__init__(endpoint=f"http://{endpoint}", insecure=True, timeout=timeout_s)
        self.target = endpoint
        self.handed = 0  # records taken out of the processor's queue (read on the loop to know its length)
        self.handed_bytes = 0  # of hard-example bodies among them
        self._stats = stats
        self._failing = False

    def export(self, batch: Sequence[ReadableLogRecord]) -> LogRecordExportResult:
        """Exports one batch; a failure is counted and logged once per streak."""
        self.handed += len(batch)
        self.handed_bytes += sum(_hard_example_size(r) for r in batch)
        try:
            result = super().export(batch)
        except Exception:
            # The processor's thread would only log it; a bug here must not stop later exports either.
            log.exception("log export to %s raised", self.target)
            result = LogRecordExportResult.FAILURE
        if result is LogRecordExportResult.SUCCESS:
            self._stats.exported += len(batch)
            if self._failing:
                log.info("log export to %s works again", self.target)
            self._failing = False
        else:
            self._stats.export_failed += len(batch)
            if not self._failing:
                log.warning("log export to %s failed; counting failures until it works again", self.target)
            self._failing = True
        return result


def _hard_example_size(record: ReadableLogRecord) -> int:
    """The body's length of a hard-example record, else 0."""
    body, attributes = record.log_record.body, record.log_record.attributes
    return len(body) if attributes and attributes.get(HARD_EXAMPLE) and isinstance(body, str) else 0


class AnomalyLog:
    """Decides and sends the node's log records (see the module docstring).

    Built on the node's event loop thread; :meth:`request` and :meth:`update_failed`
    are called there too.

    Args:
        settings: The node's ``[telemetry]`` section.
        target: ``host:port`` of the receiver (the node's metrics' target).
        resource: The node's resource (every record carries it).
        meter_provider: Where the counts are reported (None: only :attr:`stats`).
        clock: Monotonic seconds (tests pass a fake one).
        max_queue: Records the export queue holds.
    """

    def __init__(
        self,
        settings: TelemetrySection,
        target: str,
        resource: Resource,
        meter_provider: MeterProvider | None = None,
        clock: Callable[[], float] = time.monotonic,
        max_queue: int = MAX_QUEUE,
    ) -> None:
        self.stats = LogStats()
        self._max_queue = max_queue
        self.exporter = CountedLogExporter(target, settings.timeout_s, self.stats)
        self.provider = LoggerProvider(resource=resource)
        self.provider.add_log_record_processor(
            BatchLogRecordProcessor(
                self.exporter,
                schedule_delay_millis=SCHEDULE_DELAY_MS,
                max_export_batch_size=min(MAX_EXPORT_BATCH, max_queue),
                max_queue_size=max_queue,
            )
        )
        self._logger = self.provider.get_logger("edgecascade.anomalies")
        self._clock = clock
        self.bucket = TokenBucket(settings.anomalies_per_s, settings.anomaly_burst, clock())
        self.detail = DetailLevel(settings.routine_sample_rate, settings.elevated_sample_rate, settings.elevated_s)
        self._slow_factor = settings.slow_factor
        self._slow: dict[tuple[str, str], SlowOutliers] = {}
        self._emitted = 0
        self._hard_bytes = 0  # of hard-example bodies emitted
        self.hard_bucket = TokenBucket(settings.hard_examples_per_s, settings.hard_examples_burst, clock())
        self._settling: asyncio.TimerHandle | None = None
        self._random = random.random
        if meter_provider is not None:
            self._observe(meter_provider)

    def request(
        self, name: str, version: str, model: dict[str, str], outcome: str, reason: str, seconds: float, error: str
    ) -> None:
        """Judges one request as :class:`~services.rpc.fleet_metrics.FleetMetrics` recorded it (in its context).

        Args:
            name, version: The model version as recorded (local answers: this node's own).
            model: The model's name, version and variant attributes.
            outcome: ``ok``, ``error`` or ``forwarded``.
            reason: The fallback reason, if the call went upward.
            seconds: From its arrival to its answer.
            error: The class of the error it ended in ("" if none).
        """
        if outcome == OK:
            ms = seconds * 1000.0
            if self._slow_factor:
                slow = self._slow.get((name, version))
                if slow is None:
                    slow = self._slow[(name, version)] = SlowOutliers(self._slow_factor)
                if slow.observe(ms):
                    self._anomaly(
                        ANOMALY_SLOW,
                        SeverityNumber.WARN,
                        f"{name} version {version} answered in {ms:.1f} ms, over {self._slow_factor:g} x its "
                        f"running p99 of {slow.p99_ms:.1f} ms",
                        {**model, OUTCOME: outcome, LATENCY_MS: round(ms, 3), P99_MS: round(slow.p99_ms, 3)},
                    )
                    return
            rate = self.detail.rate
            if rate and self._random() < rate:
                self._routine(model, ms)
        elif outcome == FORWARDED:
            self._anomaly(
                ANOMALY_FALLBACK,
                SeverityNumber.WARN,
                f"request for {name} sent upward ({reason or 'no reason given'})",
                {**model, OUTCOME: outcome, FALLBACK_REASON: reason, LATENCY_MS: round(seconds * 1000.0, 3)},
            )
        elif outcome in (ERROR, REJECTED):  # a caller's mistake is worth a look too, though no gate counts it
            attributes = {**model, OUTCOME: outcome, ERROR_TYPE: error or "unknown"}
            if reason:
                attributes[FALLBACK_REASON] = reason
            where = f" after it was sent upward ({reason})" if reason else ""
            self._anomaly(
                ANOMALY_ERROR, SeverityNumber.ERROR, f"request for {name} failed{where}: {error or 'error'}", attributes
            )

    def update_failed(self, name: str, version: str, variant: str, kind: str, reason: str) -> None:
        """Reports an update refused (``kind`` ``refused``) or failed unexpectedly (``internal_error``)."""
        self._anomaly(
            ANOMALY_UPDATE,
            SeverityNumber.ERROR,
            f"update of {name} to version {version} ({variant}) {kind.replace('_', ' ')}: {reason}",
            {MODEL_NAME: name, MODEL_VERSION: version, MODEL_VARIANT: variant, ERROR_TYPE: kind},
        )

    def hard_example(self, attributes: dict[str, Any], build: Callable[[], str | None]) -> bool:
        """Sends a sampled hard example unless a bound says no (each no is counted); True if it was emitted.

        Args:
            attributes: The record's attributes (the hard-example mark is added here).
            build: Builds the body (JSON), or None when it is larger than ``hard_examples_max_bytes``;
                called only once the rate and the queue allow the record, so a dropped example costs nothing.
        """
        if not self.hard_bucket.take(self._clock()):
            self.stats.hard_examples_rate_limited += 1
            return False
        queued_bytes = self._hard_bytes - self.exporter.handed_bytes
        if self._queued() >= self._max_queue * HARD_EXAMPLE_SHARE or queued_bytes >= HARD_EXAMPLE_QUEUE_BYTES:
            self.stats.hard_examples_queue_full += 1
            return False
        body = build()
        if body is None:
            self.stats.hard_examples_too_large += 1
            return False
        if queued_bytes + len(body) > HARD_EXAMPLE_QUEUE_BYTES:
            self.stats.hard_examples_queue_full += 1
            return False
        attributes[HARD_EXAMPLE] = True
        self._emit(HARD_EXAMPLE_RECORD, SeverityNumber.INFO, body, attributes)
        self._hard_bytes += len(body)
        return True

    def _anomaly(self, kind: str, severity: SeverityNumber, body: str, attributes: dict[str, Any]) -> None:
        now = self._clock()
        if self.detail.anomaly(now):
            log.info(
                "a %s anomaly raised the log detail to a sample rate of %g for %g s",
                kind,
                self.detail.elevated_rate,
                self.detail.elevated_s,
            )
            self._schedule_settle(self.detail.elevated_s)
        if not self.bucket.take(now):
            self.stats.rate_limited += 1
            return
        if self._queued() >= self._max_queue:
            self.stats.queue_full += 1
            return
        attributes[ANOMALY] = True
        attributes[ANOMALY_KIND] = kind
        self._emit(kind, severity, body, attributes)

    def _routine(self, model: dict[str, str], ms: float) -> None:
        if self._queued() >= self._max_queue * ROUTINE_SHARE:
            self.stats.queue_full += 1
            return
        self._emit(ROUTINE, SeverityNumber.INFO, "request answered", {**model, OUTCOME: OK, LATENCY_MS: round(ms, 3)})

    def _emit(self, kind: str, severity: SeverityNumber, body: str, attributes: dict[str, Any]) -> None:
        # The current context is the request's: the SDK takes its trace and span ids from it.
        self._logger.emit(
            timestamp=time.time_ns(),
            severity_number=severity,
            severity_text=severity.name,
            body=body,
            attributes=attributes,
        )
        self._emitted += 1
        self.stats.emitted[kind] = self.stats.emitted.get(kind, 0) + 1

    def _queued(self) -> int:
        """Records in the processor's queue: emitted here less those its thread took out (never less than now)."""
        return self._emitted - self.exporter.handed

    def _schedule_settle(self, delay_s: float) -> None:
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return  # no loop (a unit test): settle() is then up to the caller
        self._settling = loop.call_later(delay_s, self.settle)

    def settle(self) -> None:
        """Lowers the detail when its time is up, else looks again when it will be (the loop's timer calls it)."""
        self._settling = None
        lowered = self.detail.lowered
        left = self.detail.settle(self._clock())
        if left > 0:
            self._schedule_settle(left)
        elif self.detail.lowered != lowered:
            log.info("the log detail is back to a sample rate of %g", self.detail.routine_rate)

    async def flush(self, timeout_s: float = 10.0) -> None:
        """Exports what is queued now, in a worker thread (the exporter blocks; the loop serves)."""
        await asyncio.to_thread(self.provider.force_flush, int(timeout_s * 1000))

    async def shutdown(self) -> None:
        """Stops the detail timer, exports what is queued and stops the processor's thread."""
        if self._settling is not None:
            self._settling.cancel()
            self._settling = None
        await asyncio.to_thread(self.provider.shutdown)

    def _observe(self, provider: MeterProvider) -> None:
        stats, detail = self.stats, self.detail
        meter = provider.get_meter("edgecascade.telemetry")

        def records(options: CallbackOptions) -> list[Observation]:
            return [Observation(n, {RECORD_KIND: kind}) for kind, n in list(stats.emitted.items())]

        def dropped(options: CallbackOptions) -> list[Observation]:
            return [
                Observation(stats.rate_limited, {DROP_REASON: "rate_limited"}),
                Observation(stats.queue_full, {DROP_REASON: "queue_full"}),
                Observation(stats.export_failed, {DROP_REASON: "export_failed"}),
                Observation(stats.hard_examples_rate_limited, {DROP_REASON: "hard_example_rate_limited"}),
                Observation(stats.hard_examples_queue_full, {DROP_REASON: "hard_example_queue_full"}),
                Observation(stats.hard_examples_too_large, {DROP_REASON: "hard_example_too_large"}),
            ]

        def transitions(options: CallbackOptions) -> list[Observation]:
            return [
                Observation(detail.raised, {DIRECTION: "raised"}),
                Observation(detail.lowered, {DIRECTION: "lowered"}),
            ]

        meter.create_observable_counter(
            "edgecascade.telemetry.logs.records", [records], unit="{record}", description="Log records sent, by kind"
        )
        meter.create_observable_counter(
            "edgecascade.telemetry.logs.dropped",
            [dropped],
            unit="{record}",
            description="Log records dropped, by reason",
        )
        meter.create_observable_counter(
            "edgecascade.telemetry.logs.detail",
            [transitions],
            unit="{change}",
            description="Changes of the log detail after anomalies",
        )
