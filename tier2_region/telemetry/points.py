"""What the region receives from its nodes' telemetry, as plain data.

The receiver converts OTLP into these (:class:`ResourceMetrics`,
:class:`ResourceLogs`); :mod:`~tier2_region.telemetry.admission` turns what it
accepts into :class:`Sample`, :class:`Anomaly` and :class:`HardExample` records filed under their
node, model, version and variant, which the store writes in batches
(:class:`MetricsBatch`, :class:`LogsBatch`) stamped with the time they were
received.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass, field

# An attribute's value as received: scalars as themselves; arrays and maps as their
# serialized bytes (they only ever tell series apart, nothing reads inside them).
AttributeValue = str | bool | int | float | bytes | None
Attributes = tuple[tuple[str, AttributeValue], ...]


class Temporality(enum.Enum):
    """What a sum's or histogram's value covers."""

    DELTA = "delta"  # the change since the previous report
    CUMULATIVE = "cumulative"  # everything since start_ns
    UNSPECIFIED = "unspecified"


@dataclass(frozen=True, slots=True)
class SumPoint:
    """One point of a sum (a counter)."""

    metric: str
    attributes: Attributes
    start_ns: int
    time_ns: int
    value: float | None  # None: the point carries no value
    temporality: Temporality
    monotonic: bool
    no_recorded_value: bool = False  # the exporter marked it empty on purpose


@dataclass(frozen=True, slots=True)
class HistogramPoint:
    """One point of an explicit-bucket histogram."""

    metric: str
    attributes: Attributes
    start_ns: int
    time_ns: int
    temporality: Temporality
    count: int
    sum: float | None
    bounds: tuple[float, ...]
    counts: tuple[int, ...]
    min: float | None = None
    max: float | None = None
    no_recorded_value: bool = False


MetricPoint = SumPoint | HistogramPoint


@dataclass(frozen=True)
class ResourceMetrics:
    """The points of one OTLP resource (one node), as converted.

    Attributes:
        attributes: The resource's attributes.
        points: The points of the metrics the store keeps.
        rejected: Points the conversion already refused, by reason.
        ignored: Points of metrics the store does not keep (accepted, not stored).
        problem: Why the whole resource is refused (its attributes could not be read), or "".
    """

    attributes: Attributes
    points: tuple[MetricPoint, ...] = ()
    rejected: Mapping[str, int] = field(default_factory=dict)
    ignored: int = 0
    problem: str = ""

    @property
    def total(self) -> int:
        """Every data point the resource carried."""
        return len(self.points) + sum(self.rejected.values()) + self.ignored


@dataclass(frozen=True, slots=True)
class LogEntry:
    """One OTLP log record, as converted (its body already cut to size)."""

    attributes: Attributes
    time_ns: int
    severity_number: int
    severity_text: str
    body: str
    trace_id: bytes
    span_id: bytes


@dataclass(frozen=True)
class ResourceLogs:
    """The log records of one OTLP resource (one node), as converted (``problem`` as for metrics)."""

    attributes: Attributes
    records: tuple[LogEntry, ...] = ()
    rejected: Mapping[str, int] = field(default_factory=dict)
    problem: str = ""

    @property
    def total(self) -> int:
        """Every log record the resource carried."""
        return len(self.records) + sum(self.rejected.values())


@dataclass(frozen=True, slots=True)
class Sample:
    """An accepted metric point, filed under what the store keeps it by.

    Attributes:
        series: Identifies the point's series (node, metric and every point attribute):
            successive cumulative reports of one series are folded against each other.
        label: The outcome of a request, or the state of an update ("" for histograms).
        reason: The fallback reason of a forwarded request ("" otherwise).
    """

    node_id: str
    model: str
    version: str
    variant: str
    label: str
    reason: str
    series: str
    point: MetricPoint


@dataclass(frozen=True, slots=True)
class Anomaly:
    """A log record the region keeps: a warning or worse, or one a node marked as an anomaly."""

    node_id: str
    received_at: float
    time_ns: int
    severity_number: int
    severity_text: str
    body: str
    trace_id: str  # hex, "" if none
    span_id: str
    model: str = ""
    version: str = ""


@dataclass(frozen=True, slots=True)
class HardExample:
    """A hard example a node sent for retraining (:mod:`~tier2_region.telemetry.hard_examples`).

    Attributes:
        kind: ``request`` or ``generation``.
        confidence, threshold: The node's confidence and the threshold it was under (None if not sent).
        body: The example as the node built it (a JSON object).
    """

    node_id: str
    received_at: float
    time_ns: int
    trace_id: str  # hex, "" if none
    span_id: str
    kind: str
    model: str
    version: str
    upstream_model: str
    upstream_version: str
    confidence: float | None
    threshold: float | None
    body: str


@dataclass(frozen=True)
class MetricsBatch:
    """Samples received together, at ``received_at`` (Unix seconds): they fall in that time's window."""

    received_at: float
    samples: tuple[Sample, ...]


@dataclass(frozen=True)
class LogsBatch:
    """Anomalies (and hard examples) received together."""

    received_at: float
    anomalies: tuple[Anomaly, ...]
    hard_examples: tuple[HardExample, ...] = ()


Batch = MetricsBatch | LogsBatch
