"""What the region accepts of its nodes' telemetry, and what it answers.

A resource must name its node (:data:`~tier2_region.fleet.figures.NODE_ID`), an
enrolled one. Of its metrics the store keeps those of
:mod:`tier2_region.fleet.figures` (:data:`KEPT`); any other metric is accepted
and not stored (a collector that gets a copy may want it). A kept metric must
have its type (requests, update outcomes and shadow runs are monotonic sums;
durations, confidences and the shadow's agreements and differences
explicit-bucket histograms), a temporality, finite and non-negative
values, consistent buckets, and the attributes the store files it under. Each
refused point or record is counted under one reason of :data:`REASONS`.

The answer follows the OTLP specification: all accepted → success; some
refused → success with ``partial_success`` (the count and why), which the
client must not retry; all refused → a not-retryable error
(:func:`settle`): PERMISSION_DENIED when no sender is enrolled, else
INVALID_ARGUMENT.
"""

from __future__ import annotations

import hashlib
import math
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field

from services.errors import ConfigError, InvalidArgumentError, PermissionDeniedError
from services.tier_config import check_node_id
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
)
from tier2_region.telemetry import hard_examples
from tier2_region.telemetry.points import (
    Anomaly,
    Attributes,
    AttributeValue,
    HardExample,
    HistogramPoint,
    LogEntry,
    MetricPoint,
    ResourceLogs,
    ResourceMetrics,
    Sample,
    SumPoint,
    Temporality,
)

# The update-outcome attribute figures.py names in prose (UPDATE_OUTCOMES is "by … edgecascade.update.state").
UPDATE_STATE = "edgecascade.update.state"
# A log record a node marks as an anomaly whatever its severity (a bool true, or the string "true").
ANOMALY = "edgecascade.anomaly"
# OTLP SeverityNumber: 13-16 are WARN, 17-20 ERROR, 21-24 FATAL.
SEVERITY_WARN = 13
SEVERITY_MAX = 24
MAX_TEXT = 256  # model names, versions, variants, outcomes, reasons
# Counts and values beyond this (10^12) are absurd for one report, and enough of them would overflow
# the store's 64-bit sums of a window: refused, not stored.
MAX_VALUE = 2.0**40

SUM = "sum"
HISTOGRAM = "histogram"
# The metrics the store keeps: their OTLP type, and the attribute a sum is counted by.
KEPT: Mapping[str, str] = {
    REQUESTS: SUM,
    UPDATE_OUTCOMES: SUM,
    LATENCY: HISTOGRAM,
    CONFIDENCE: HISTOGRAM,
    SHADOW_RUNS: SUM,
    SHADOW_AGREEMENT: HISTOGRAM,
    SHADOW_DIFFERENCE: HISTOGRAM,
    SHADOW_LATENCY: HISTOGRAM,
    SHADOW_SERVING_LATENCY: HISTOGRAM,
}
# The attribute a kept sum is counted by (its label in the store).
_LABEL = {REQUESTS: OUTCOME, UPDATE_OUTCOMES: UPDATE_STATE, SHADOW_RUNS: OUTCOME}
# Histograms of shares, whose values lie in [0, 1]: their sum lies in [0, count].
_SHARES = frozenset({CONFIDENCE, SHADOW_AGREEMENT})
# Histograms whose mean a gate reads: their sum must agree with their count, min and max.
_MEANS = frozenset({*_SHARES, SHADOW_DIFFERENCE})
# A sum of floats may drift from count × min or count × max by this share of it (and a little absolutely).
_SUM_SLACK = 1e-6

REASONS: Mapping[str, str] = {
    "no_node_id": f"the resource has no {NODE_ID} attribute",
    "bad_node_id": f"{NODE_ID} is not 1-128 ASCII letters, digits, '_', '.' or '-'",
    "unknown_node": "the node is not enrolled in this region's fleet",
    "too_many_attributes": "a resource, point or record has more attributes than the region takes",
    "attribute_too_long": "an attribute's key or value is longer than the region takes",
    "wrong_type": "a metric the region reads has another type (requests, update outcomes and shadow runs are "
    "monotonic sums; durations, confidences and shadow agreements and differences explicit-bucket histograms)",
    "bad_temporality": "a sum or histogram has no aggregation temporality (delta or cumulative)",
    "missing_value": "a point carries no value",
    "not_finite": "a value is NaN or infinite",
    "negative": "a count, sum or recorded value is negative",
    "out_of_range": "a count or value is beyond 2^40, or a confidence or shadow agreement outside [0, 1] "
    "(its sum beyond its count)",
    "bad_histogram": "a histogram's bucket counts do not match its bounds or its count, its bounds do not increase, "
    "or the sum of a confidence, shadow agreement or difference lies outside count × min to count × max",
    "bad_attribute": "a point lacks the model name, version, outcome or update state as a short string",
    "bad_severity": "a record's severity number is outside 0-24",
    "bad_trace_id": "a record's trace id is not 16 bytes or its span id not 8",
    hard_examples.TOO_LARGE: "a hard example's body is larger than the region's [telemetry] hard_examples_max_bytes",
    hard_examples.BAD: "a hard example lacks its kind or model, or its body is not a JSON object of its kind",
}


@dataclass(frozen=True)
class Limits:
    """How much of a request the receiver reads (from ``[telemetry]``)."""

    max_points_per_request: int = 10_000
    max_attributes: int = 128
    max_key_chars: int = 256
    max_value_chars: int = 4096
    max_buckets: int = 512
    max_body_chars: int = 1024
    max_hard_example_bytes: int = 64 * 1024  # a hard example's body is taken whole up to this, else refused


@dataclass(frozen=True)
class Receipt:
    """What became of a request's data points (or log records).

    Attributes:
        what: "data points" or "log records".
        accepted: Stored (anomalies, points of kept metrics).
        ignored: Accepted and not stored (other metrics, routine logs, points marked empty).
        rejected: Refused, by reason.
        accepted_resources: Indexes of the request's resources whose node was accepted (what a
            collector may get a copy of).
    """

    what: str
    accepted: int = 0
    ignored: int = 0
    rejected: Mapping[str, int] = field(default_factory=dict)
    accepted_resources: tuple[int, ...] = ()

    @property
    def rejected_total(self) -> int:
        """How many were refused."""
        return sum(self.rejected.values())

    def message(self) -> str:
        """Why some were refused, for ``partial_success.error_message`` ("" when none was)."""
        if not self.rejected_total:
            return ""
        total = self.accepted + self.ignored + self.rejected_total
        reasons = "; ".join(
            f"{reason}: {count} ({REASONS.get(reason, reason)})" for reason, count in sorted(self.rejected.items())
        )
        return f"rejected {self.rejected_total} of {total} {self.what}: {reasons}"


def settle(receipt: Receipt) -> Receipt:
    """Returns the receipt of a request that was at least partly accepted (or empty).

    Raises:
        PermissionDeniedError: Everything came from nodes that are not enrolled.
        InvalidArgumentError: Everything was refused, for any other reason.
    """
    if not receipt.rejected_total or receipt.accepted or receipt.ignored:
        return receipt
    if set(receipt.rejected) == {"unknown_node"}:
        raise PermissionDeniedError(
            f"{receipt.message()}; enroll the node (edgecascade fleet token) before it sends telemetry"
        )
    raise InvalidArgumentError(receipt.message())


def check_request_size(points: int, containers: int, limits: Limits) -> None:
    """Refuses a request with more data points (or log records) than the limit, or more resources,
    scopes and metrics holding them (each costs reading, even empty).

    Raises:
        InvalidArgumentError: It holds more than ``limits.max_points_per_request`` of either.
    """
    if points > limits.max_points_per_request:
        raise InvalidArgumentError(
            f"the request holds more than {limits.max_points_per_request} data points or log records; "
            "export smaller batches (the exporter's max_export_batch_size)"
        )
    if containers > limits.max_points_per_request:
        raise InvalidArgumentError(
            f"the request holds more than {limits.max_points_per_request} resources, scopes and metrics"
        )


def node_of(resource: ResourceMetrics | ResourceLogs) -> tuple[str, str]:
    """The node a resource names: (node id, "") or ("", the reason it is refused whole)."""
    if resource.problem:
        return "", resource.problem
    value = dict(resource.attributes).get(NODE_ID)
    if value is None or value == "":
        return "", "no_node_id"
    if not isinstance(value, str):
        return "", "bad_node_id"
    try:
        return check_node_id(value), ""
    except ConfigError:
        return "", "bad_node_id"


def series_id(node_id: str, metric: str, attributes: Attributes) -> str:
    """Identifies a series: the same node, metric and point attributes (hex, 32 characters)."""
    return hashlib.blake2b(repr((node_id, metric, attributes)).encode(), digest_size=16).hexdigest()


def admit_points(node_id: str, resource: ResourceMetrics) -> tuple[list[Sample], Counter[str], int]:
    """The samples of an enrolled node's resource: (accepted, refused by reason, ignored)."""
    resource_attributes = dict(resource.attributes)
    accepted: list[Sample] = []
    rejected: Counter[str] = Counter(resource.rejected)
    ignored = resource.ignored
    for point in resource.points:
        if point.no_recorded_value:
            ignored += 1
            continue
        reason = _check_sum(point) if isinstance(point, SumPoint) else _check_histogram(point)
        sample = None if reason else _sample(node_id, point, resource_attributes)
        if sample is None:
            rejected[reason or "bad_attribute"] += 1
        else:
            accepted.append(sample)
    return accepted, rejected, ignored


def _finite(*values: float | None) -> bool:
    return all(v is None or math.isfinite(v) for v in values)


def _check_sum(point: SumPoint) -> str:
    if not point.monotonic:
        return "wrong_type"
    if point.temporality is Temporality.UNSPECIFIED:
        return "bad_temporality"
    if point.value is None:
        return "missing_value"
    if not math.isfinite(point.value):
        return "not_finite"
    if point.value < 0:
        return "negative"
    return "out_of_range" if point.value > MAX_VALUE else ""


def _check_histogram(point: HistogramPoint) -> str:
    recorded = (point.sum, point.min, point.max)
    problems = (
        ("bad_temporality", point.temporality is Temporality.UNSPECIFIED),
        ("not_finite", not _finite(*recorded, *point.bounds)),
        ("negative", any(v is not None and v < 0 for v in recorded)),
        (
            "out_of_range",
            point.count > MAX_VALUE
            or any(v is not None and v > MAX_VALUE for v in recorded)
            or (point.metric in _SHARES and any(v is not None and v > 1 for v in recorded[1:]))
            or (point.metric in _SHARES and point.sum is not None and point.sum > point.count * (1 + _SUM_SLACK)),
        ),
        ("bad_histogram", not _buckets_consistent(point) or (point.metric in _MEANS and not _sum_consistent(point))),
    )
    return next((reason for reason, found in problems if found), "")


def _sum_consistent(point: HistogramPoint) -> bool:
    """Whether a histogram's sum can be that of its count values between its min and max (where it has them).

    Its verdict counts only once the point passed the finite and non-negative checks (those reasons come
    first). A gate reads such a histogram's mean (sum / count): a sum its own min, max and count
    contradict would move that mean where no recorded value puts it.
    """
    total = point.sum
    if total is None:
        return True
    if point.count == 0:
        return total == 0
    if point.min is not None and point.max is not None and point.min > point.max:
        return False
    slack = _SUM_SLACK * (abs(total) + 1e-3)
    low = point.count * point.min if point.min is not None else 0.0
    high = point.count * point.max if point.max is not None else math.inf
    return low - slack <= total <= high + slack


def _buckets_consistent(point: HistogramPoint) -> bool:
    if not point.counts and not point.bounds:
        return True  # a histogram of a count and a sum only
    return (
        len(point.counts) == len(point.bounds) + 1
        and sum(point.counts) == point.count
        and all(lower < upper for lower, upper in zip(point.bounds, point.bounds[1:], strict=False))
    )


def _text(value: AttributeValue, required: bool) -> str | None:
    """A short string attribute; None when it is missing (and required), not a string or too long."""
    if value is None or value == "":
        return None if required else ""
    if not isinstance(value, str) or len(value) > MAX_TEXT:
        return None
    return value


def _sample(node_id: str, point: MetricPoint, resource: Mapping[str, AttributeValue]) -> Sample | None:
    own = dict(point.attributes)

    def read(key: str, required: bool) -> str | None:
        # A node that serves one model may state it once, on its resource.
        return _text(own[key] if key in own else resource.get(key), required)

    model = read(MODEL_NAME, True)
    version = read(MODEL_VERSION, True)
    variant = read(MODEL_VARIANT, False)
    label_key = _LABEL.get(point.metric)
    label = read(label_key, True) if label_key else ""
    reason = read(FALLBACK_REASON, False) if point.metric == REQUESTS else ""
    if model is None or version is None or variant is None or label is None or reason is None:
        return None
    series = series_id(node_id, point.metric, point.attributes)
    return Sample(node_id, model, version, variant, label, reason, series, point)


def admit_logs(
    node_id: str, resource: ResourceLogs, received_at: float
) -> tuple[list[Anomaly | HardExample], Counter[str], int]:
    """The anomalies and hard examples of an enrolled node's log records: (kept, refused by reason, routine
    ones ignored)."""
    resource_attributes = dict(resource.attributes)
    kept: list[Anomaly | HardExample] = []
    rejected: Counter[str] = Counter(resource.rejected)
    ignored = 0
    for record in resource.records:
        reason = _check_record(record)
        if reason:
            rejected[reason] += 1
            continue
        attributes = dict(record.attributes)
        if hard_examples.is_hard_example(attributes):
            example = hard_examples.admit(node_id, record, attributes, resource_attributes, received_at)
            if example is None:
                rejected[hard_examples.BAD] += 1
            else:
                kept.append(example)
            continue
        flagged = attributes.get(ANOMALY)
        if record.severity_number < SEVERITY_WARN and flagged is not True and flagged != "true":
            ignored += 1
            continue
        kept.append(
            Anomaly(
                node_id=node_id,
                received_at=received_at,
                time_ns=record.time_ns,
                severity_number=record.severity_number,
                severity_text=record.severity_text[:MAX_TEXT],
                body=record.body,
                trace_id=record.trace_id.hex(),
                span_id=record.span_id.hex(),
                model=_label(MODEL_NAME, attributes, resource_attributes),
                version=_label(MODEL_VERSION, attributes, resource_attributes),
            )
        )
    return kept, rejected, ignored


def _label(key: str, own: Mapping[str, AttributeValue], resource: Mapping[str, AttributeValue]) -> str:
    """A record's short string attribute (or its resource's), else ""; a record is kept even without one."""
    value = own.get(key, resource.get(key))
    return value if isinstance(value, str) and len(value) <= MAX_TEXT else ""


def _check_record(record: LogEntry) -> str:
    if not 0 <= record.severity_number <= SEVERITY_MAX:
        return "bad_severity"
    if len(record.trace_id) not in (0, 16) or len(record.span_id) not in (0, 8):
        return "bad_trace_id"
    return ""
