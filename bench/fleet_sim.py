"""A fleet of simulated nodes on the real protocol: enrollment, signed check-ins and OTLP metrics against a real region.

Each :class:`SimNode` is a device as the region sees it, with none of a device's work:

* **keys and enrollment** — its own :class:`~services.updates.identity.NodeKeys` (Ed25519 and X25519,
  in memory) and a one-time token from the region's inventory; it enrolls with
  :class:`~services.rpc.fleet_client.FleetClient` like a device does;
* **check-ins** — every interval the region names (or one given), with ± ``jitter``, a report
  signed over its bytes (``FleetClient.check_in``) listing what it runs the way the updater does
  (``version``/``variant`` what serves, ``state`` that of the latest assignment);
* **installs** — a desired version it does not run is "installed" after the version's
  ``install_delay_s`` (``assigned`` → ``committed``), or refused by a share ``refuse_share`` of
  the nodes (chosen by a hash of node and version, so the same nodes refuse each time); a refused
  node keeps serving what it served and reports ``refused``;
* **traffic** — while it serves a version, requests arrive as a Poisson stream at the version's
  ``requests_per_s``, end in error or are forwarded upstream in the version's shares, and take a
  log-normal latency with the version's p50 and p99 (:class:`VersionProfile`), bucketed as real
  nodes bucket it (``services.telemetry_names.LATENCY_BOUNDS_MS``);
* **telemetry** — the metrics of :mod:`tier2_region.fleet.figures` (requests by outcome and
  fallback reason, the latency histogram in ms, update outcomes by ``edgecascade.update.state``)
  under the node's resource attributes, cumulative, sent every ``export_interval_s`` (± jitter)
  with the stock :class:`OTLPMetricExporter` (insecure) to the region;
* **shadows** — a shadow assignment (a rollout's shadow stage) is installed the same way beside
  what serves (refused by the same share of nodes) and never serves; once installed it runs on its
  ``shadow_share`` of the requests the node answered itself, failing in the shadow version's
  ``error_share``, agreeing with the serving answer in its ``agreement`` share of the runs, differing
  by its ``difference`` on average and taking its own latency, and the node exports the shadow
  metrics (runs by outcome, agreement, difference, the shadow's and the serving run's latency);
  it reports shadows at check-in as a device does, i.e. not at all (the updater keys by model);
* **offline** — :meth:`FleetSim.set_offline` switches a node off: no traffic, no check-in, no export
  until it is switched on again.

How metrics are aggregated (``SimSettings.metrics``):

``sdk``
    One stock :class:`MeterProvider` per node (its resource is the node: the region reads the
    node id from the resource, so nodes cannot share one), with an in-memory reader; every
    simulated request is recorded through the SDK's instruments and each export sends what the
    reader collects. The most faithful; the SDK costs ~20 µs per recorded latency and ~17 KB per
    provider, so it is for tens to hundreds of nodes (the tests).
``direct``
    Each node keeps its cumulative counts and histogram buckets itself (numpy, per traffic step)
    and builds the SDK's own ``MetricsData`` from them at each export. The request on the wire is
    the same; only the SDK's aggregation is skipped. For thousands of nodes (the benchmark).

Either way the export is the stock exporter's ``export()`` (its encoder, its gRPC stub, its retries),
run on a small thread pool because it blocks; a few exporters (gRPC channels) and a few
``FleetClient`` channels are shared by all nodes — the region sees a few connections instead of one
per node. Every check-in and export is timed (:class:`CallLog`), with how late it started against
its schedule, so a region (or a simulator) that falls behind shows as growing lateness.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import math
import random
import time
from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from opentelemetry.exporter.otlp.proto.grpc.metric_exporter import OTLPMetricExporter
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import (
    AggregationTemporality,
    Histogram,
    HistogramDataPoint,
    InMemoryMetricReader,
    Metric,
    MetricExportResult,
    MetricsData,
    NumberDataPoint,
    ResourceMetrics,
    ScopeMetrics,
    Sum,
)
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.util.instrumentation import InstrumentationScope

from services.errors import EdgecascadeError
from services.rpc.fleet_client import FleetClient
from services.telemetry_names import AGREEMENT_BOUNDS, DIFFERENCE_BOUNDS, LATENCY_BOUNDS_MS
from services.updates.checkin import AssignedVariant, DesiredState, InstalledModel, NodeFacts, machine_hardware_class
from services.updates.identity import NodeKeys
from tier2_region.fleet.figures import (
    FALLBACK_REASON,
    HARDWARE_CLASS,
    LATENCY,
    MODEL_NAME,
    MODEL_VARIANT,
    MODEL_VERSION,
    NODE_ID,
    NODE_TIER,
    OUTCOME,
    REQUESTS,
    SHADOW_AGREEMENT,
    SHADOW_DIFFERENCE,
    SHADOW_LATENCY,
    SHADOW_RUNS,
    SHADOW_SERVING_LATENCY,
    UPDATE_OUTCOMES,
)
from tier2_region.telemetry.admission import UPDATE_STATE

log = logging.getLogger("edgecascade.fleet_sim")

_BOUNDS = np.asarray(LATENCY_BOUNDS_MS)
# The standard normal's 99th percentile: a log-normal's p99 / p50 = exp(Z99 × sigma).
Z99 = 2.3263478740408408
OUTCOMES = ("ok", "error", "forwarded")
SHADOW_OUTCOMES = ("ok", "error", "shed")
# The shadow's histograms: metric → bucket bounds.
SHADOW_HISTOGRAMS: Mapping[str, tuple[float, ...]] = {
    SHADOW_AGREEMENT: AGREEMENT_BOUNDS,
    SHADOW_DIFFERENCE: DIFFERENCE_BOUNDS,
    SHADOW_LATENCY: LATENCY_BOUNDS_MS,
    SHADOW_SERVING_LATENCY: LATENCY_BOUNDS_MS,
}
FALLBACK = "queue_full"  # the reason a simulated node gives for what it forwards
SCOPE = InstrumentationScope("edgecascade.fleet_sim")
# A node's desired state is followed whatever its models are called; these are what it reports when none is.
STATE_COMMITTED = "committed"
STATE_ASSIGNED = "assigned"
STATE_REFUSED = "refused"


@dataclass(frozen=True)
class VersionProfile:
    """How a node behaves while it serves one model version, and how its install goes.

    Attributes:
        requests_per_s: Mean request rate per node (Poisson arrivals); 0 = no traffic.
        p50_ms: Median latency.
        p99_ms: 99th-percentile latency (log-normal between the two).
        error_share: Share of requests that end in an error.
        fallback_share: Share of requests forwarded upstream.
        refuse_share: Share of nodes whose install of this version is refused.
        install_delay_s: From the check-in that assigns it to serving it (or refusing it).
        agreement: As a shadow: the share of its compared runs whose top-1 answer is the serving version's.
        difference: As a shadow: the mean absolute difference of its outputs from the serving version's.
    """

    requests_per_s: float = 20.0
    p50_ms: float = 10.0
    p99_ms: float = 14.0
    error_share: float = 0.0
    fallback_share: float = 0.0
    refuse_share: float = 0.0
    install_delay_s: float = 0.2
    agreement: float = 1.0
    difference: float = 0.0

    def __post_init__(self) -> None:
        if not (self.requests_per_s >= 0 and math.isfinite(self.requests_per_s)):
            raise ValueError(f"requests_per_s must be 0 or more, got {self.requests_per_s}")
        if not 0 < self.p50_ms <= self.p99_ms:
            raise ValueError(f"latencies must satisfy 0 < p50_ms <= p99_ms, got {self.p50_ms}, {self.p99_ms}")
        for what in ("error_share", "fallback_share", "refuse_share", "agreement"):
            if not 0 <= getattr(self, what) <= 1:
                raise ValueError(f"{what} is a share between 0 and 1, got {getattr(self, what)}")
        if self.error_share + self.fallback_share > 1:
            raise ValueError("error_share + fallback_share must be at most 1")
        if self.install_delay_s < 0:
            raise ValueError(f"install_delay_s must be 0 or more, got {self.install_delay_s}")
        if not self.difference >= 0:
            raise ValueError(f"difference must be 0 or more, got {self.difference}")

    @property
    def sigma(self) -> float:
        """The log-normal's shape (0 when p50 = p99: every request takes p50)."""
        return math.log(self.p99_ms / self.p50_ms) / Z99


@dataclass(frozen=True)
class SimSettings:
    """How the simulated fleet talks to the region.

    Attributes:
        region: ``host:port`` of the region (fleet service and OTLP receiver).
        export_interval_s: Between a node's OTLP exports.
        check_interval_s: Between a node's check-ins; None = what the region answers.
        jitter: Each interval is drawn from ± this share around its value.
        metrics: ``sdk`` (a MeterProvider per node) or ``direct`` (see the module docs).
        exporters: Stock OTLP exporters (gRPC channels) the nodes share.
        channels: Fleet-service channels the nodes share.
        export_threads: Threads that run the (blocking) exports.
        timeout_s: Deadline of one check-in, and of one export (its retries included).
        hardware_class: What every node states (the registry's variants must fit it).
        memory_budget_bytes: Ditto.
        onnxruntime_version: Ditto.
        id_prefix: Node ids are ``{id_prefix}-00000`` …
        seed: Of the traffic's random numbers.
    """

    region: str
    export_interval_s: float = 1.0
    check_interval_s: float | None = None
    jitter: float = 0.2
    metrics: str = "sdk"
    exporters: int = 2
    channels: int = 2
    export_threads: int = 4
    timeout_s: float = 5.0
    hardware_class: str = field(default_factory=machine_hardware_class)
    memory_budget_bytes: int = 1 << 30
    onnxruntime_version: str = "1.32.0"
    id_prefix: str = "sim"
    seed: int = 0

    def __post_init__(self) -> None:
        if self.metrics not in ("sdk", "direct"):
            raise ValueError(f"metrics is 'sdk' or 'direct', got {self.metrics!r}")
        if not 0 <= self.jitter < 1:
            raise ValueError(f"jitter is a share in [0, 1), got {self.jitter}")
        for what in ("exporters", "channels", "export_threads"):
            if getattr(self, what) < 1:
                raise ValueError(f"{what} must be at least 1")


# -- timing -----------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class CallSummary:
    """One kind of call over a span of time: how many, how many failed, how long they took and how late they began."""

    calls: int
    failed: int
    p50_ms: float | None
    p99_ms: float | None
    max_ms: float | None
    late_p99_ms: float | None
    late_max_ms: float | None
    failures: Mapping[str, int]


def _quantile(values: Sequence[float], q: float) -> float | None:
    return float(np.quantile(np.asarray(values), q)) * 1000 if values else None


class CallLog:
    """Every call of one kind: when it started (monotonic s), how long it took, how late it began, how it ended."""

    def __init__(self) -> None:
        self.starts: list[float] = []
        self.durations: list[float] = []
        self.lateness: list[float] = []
        self.failures: list[str] = []  # "" for a call that succeeded

    def record(self, started: float, duration: float, late: float, failure: str = "") -> None:
        """Notes one call (``failure`` names why it failed; "" when it succeeded)."""
        self.starts.append(started)
        self.durations.append(duration)
        self.lateness.append(max(late, 0.0))
        self.failures.append(failure)

    def summary(self, since: float = -math.inf, until: float = math.inf) -> CallSummary:
        """The calls that started in [since, until); durations of the successful ones only."""
        picked = [i for i, s in enumerate(self.starts) if since <= s < until]
        good = [self.durations[i] for i in picked if not self.failures[i]]
        late = [self.lateness[i] for i in picked]
        failures = Counter(self.failures[i] for i in picked if self.failures[i])
        return CallSummary(
            calls=len(picked),
            failed=sum(failures.values()),
            p50_ms=_quantile(good, 0.5),
            p99_ms=_quantile(good, 0.99),
            max_ms=max(good) * 1000 if good else None,
            late_p99_ms=_quantile(late, 0.99),
            late_max_ms=max(late) * 1000 if late else None,
            failures=dict(failures),
        )


# -- telemetry --------------------------------------------------------------------------------------------------


class NodeTelemetry(Protocol):
    """A node's metrics: recorded on the event loop, collected for export."""

    def serve(self, model: str, version: str, variant: str, outcomes: Sequence[int], latencies: np.ndarray) -> None:
        """Records requests served: counts by outcome (:data:`OUTCOMES`) and the latency of each (ms)."""
        ...

    def update(self, model: str, version: str, variant: str, state: str) -> None:
        """Records an update reaching ``state``."""
        ...

    def shadow(self, model: str, version: str, variant: str, runs: Sequence[int], values: ShadowValues) -> None:
        """Records a shadow's runs: counts by outcome (:data:`SHADOW_OUTCOMES`) and each compared run's values."""
        ...

    def collect(self) -> MetricsData | None:
        """Everything recorded so far (cumulative), or None when there is nothing yet (may run on any thread)."""
        ...


@dataclass(frozen=True)
class ShadowValues:
    """What a shadow's compared runs recorded: metric (of :data:`SHADOW_HISTOGRAMS`) → one value per run."""

    by_metric: Mapping[str, np.ndarray]


def _model_attributes(model: str, version: str, variant: str) -> dict[str, str]:
    return {MODEL_NAME: model, MODEL_VERSION: version, MODEL_VARIANT: variant}


def _outcome_attributes(base: Mapping[str, str], outcome: str) -> dict[str, str]:
    attributes = {**base, OUTCOME: outcome}
    if outcome == "forwarded":
        attributes[FALLBACK_REASON] = FALLBACK
    return attributes


class SdkTelemetry:
    """A node's own stock :class:`MeterProvider`; every request goes through its instruments."""

    def __init__(self, resource: Resource) -> None:
        self._reader = InMemoryMetricReader()
        self._provider = MeterProvider(metric_readers=[self._reader], resource=resource, shutdown_on_exit=False)
        meter = self._provider.get_meter(SCOPE.name)
        self._requests = meter.create_counter(REQUESTS, unit="{request}")
        self._latency = meter.create_histogram(
            LATENCY, unit="ms", explicit_bucket_boundaries_advisory=list(LATENCY_BOUNDS_MS)
        )
        self._updates = meter.create_counter(UPDATE_OUTCOMES, unit="{update}")
        self._shadow_runs = meter.create_counter(SHADOW_RUNS, unit="{run}")
        self._shadow = {
            metric: meter.create_histogram(metric, explicit_bucket_boundaries_advisory=list(bounds))
            for metric, bounds in SHADOW_HISTOGRAMS.items()
        }
        self._empty = True

    def serve(self, model: str, version: str, variant: str, outcomes: Sequence[int], latencies: np.ndarray) -> None:
        """Records requests served through the SDK's counter and histogram."""
        base = _model_attributes(model, version, variant)
        for outcome, count in zip(OUTCOMES, outcomes, strict=True):
            if count:
                self._requests.add(int(count), _outcome_attributes(base, outcome))
        for ms in latencies.tolist():
            self._latency.record(ms, base)
        self._empty = self._empty and not len(latencies)

    def update(self, model: str, version: str, variant: str, state: str) -> None:
        """Records an update outcome through the SDK's counter."""
        self._updates.add(1, {**_model_attributes(model, version, variant), UPDATE_STATE: state})
        self._empty = False

    def shadow(self, model: str, version: str, variant: str, runs: Sequence[int], values: ShadowValues) -> None:
        """Records a shadow's runs through the SDK's counter and histograms."""
        base = _model_attributes(model, version, variant)
        for outcome, count in zip(SHADOW_OUTCOMES, runs, strict=True):
            if count:
                self._shadow_runs.add(int(count), {**base, OUTCOME: outcome})
        for metric, recorded in values.by_metric.items():
            for value in recorded.tolist():
                self._shadow[metric].record(value, base)
        self._empty = self._empty and not any(runs)

    def collect(self) -> MetricsData | None:
        """What the SDK's reader collects."""
        return None if self._empty else self._reader.get_metrics_data()


class _Buckets:
    """One cumulative histogram (latency bounds unless told)."""

    __slots__ = ("bounds", "count", "counts", "max", "min", "sum")

    def __init__(self, bounds: tuple[float, ...] = LATENCY_BOUNDS_MS) -> None:
        self.bounds = bounds
        self.count = 0
        self.sum = 0.0
        self.min = math.inf
        self.max = -math.inf
        self.counts = np.zeros(len(bounds) + 1, dtype=np.int64)

    def add(self, values: np.ndarray) -> None:
        """Adds values (at least one)."""
        # OTLP buckets hold (bound[i-1], bound[i]]: a value equal to a bound belongs to the bucket it closes.
        edges = np.asarray(self.bounds)
        self.counts += np.bincount(np.searchsorted(edges, values, side="left"), minlength=len(edges) + 1)
        self.count += len(values)
        self.sum += float(values.sum())
        self.min = min(self.min, float(values.min()))
        self.max = max(self.max, float(values.max()))

    def point(self, attributes: Mapping[str, str], start: int, now: int) -> HistogramDataPoint:
        """As the SDK's cumulative point."""
        return HistogramDataPoint(
            dict(attributes), start, now, self.count, self.sum, self.counts.tolist(), self.bounds, self.min, self.max
        )


class DirectTelemetry:
    """A node's cumulative counts and buckets kept in numpy, turned into the SDK's ``MetricsData`` at export."""

    def __init__(self, resource: Resource) -> None:
        self._resource = resource
        self._start_ns = time.time_ns()
        self._requests: dict[tuple[str, str, str, str], int] = {}
        self._latency: dict[tuple[str, str, str], _Buckets] = {}
        self._updates: dict[tuple[str, str, str, str], int] = {}
        self._shadow_runs: dict[tuple[str, str, str, str], int] = {}
        self._shadow: dict[tuple[str, str, str, str], _Buckets] = {}  # (metric, model, version, variant)

    def serve(self, model: str, version: str, variant: str, outcomes: Sequence[int], latencies: np.ndarray) -> None:
        """Adds requests served to the cumulative counts and buckets."""
        for outcome, count in zip(OUTCOMES, outcomes, strict=True):
            if count:
                key = (model, version, variant, outcome)
                self._requests[key] = self._requests.get(key, 0) + int(count)
        if not len(latencies):
            return
        buckets = self._latency.setdefault((model, version, variant), _Buckets())
        # OTLP buckets hold (bound[i-1], bound[i]]: a value equal to a bound belongs to the bucket it closes.
        buckets.counts += np.bincount(np.searchsorted(_BOUNDS, latencies, side="left"), minlength=len(_BOUNDS) + 1)
        buckets.count += len(latencies)
        buckets.sum += float(latencies.sum())
        buckets.min = min(buckets.min, float(latencies.min()))
        buckets.max = max(buckets.max, float(latencies.max()))

    def update(self, model: str, version: str, variant: str, state: str) -> None:
        """Adds an update outcome."""
        key = (model, version, variant, state)
        self._updates[key] = self._updates.get(key, 0) + 1

    def shadow(self, model: str, version: str, variant: str, runs: Sequence[int], values: ShadowValues) -> None:
        """Adds a shadow's runs to the cumulative counts and buckets."""
        for outcome, count in zip(SHADOW_OUTCOMES, runs, strict=True):
            if count:
                key = (model, version, variant, outcome)
                self._shadow_runs[key] = self._shadow_runs.get(key, 0) + int(count)
        for metric, recorded in values.by_metric.items():
            if len(recorded):
                buckets = self._shadow.setdefault(
                    (metric, model, version, variant), _Buckets(SHADOW_HISTOGRAMS[metric])
                )
                buckets.add(recorded)

    def collect(self) -> MetricsData | None:
        """The cumulative points as the SDK would have collected them."""
        if not (self._requests or self._latency or self._updates or self._shadow_runs):
            return None
        now = time.time_ns()
        start = self._start_ns
        metrics = []
        if self._requests:
            points = [
                NumberDataPoint(_outcome_attributes(_model_attributes(m, v, w), o), start, now, count)
                for (m, v, w, o), count in self._requests.items()
            ]
            metrics.append(Metric(REQUESTS, None, "{request}", Sum(points, AggregationTemporality.CUMULATIVE, True)))
        if self._latency:
            histograms = [
                HistogramDataPoint(
                    _model_attributes(m, v, w),
                    start,
                    now,
                    b.count,
                    b.sum,
                    b.counts.tolist(),
                    LATENCY_BOUNDS_MS,
                    b.min,
                    b.max,
                )
                for (m, v, w), b in self._latency.items()
            ]
            metrics.append(Metric(LATENCY, None, "ms", Histogram(histograms, AggregationTemporality.CUMULATIVE)))
        if self._updates:
            points = [
                NumberDataPoint({**_model_attributes(m, v, w), UPDATE_STATE: s}, start, now, count)
                for (m, v, w, s), count in self._updates.items()
            ]
            metrics.append(
                Metric(UPDATE_OUTCOMES, None, "{update}", Sum(points, AggregationTemporality.CUMULATIVE, True))
            )
        if self._shadow_runs:
            points = [
                NumberDataPoint({**_model_attributes(m, v, w), OUTCOME: o}, start, now, count)
                for (m, v, w, o), count in self._shadow_runs.items()
            ]
            metrics.append(Metric(SHADOW_RUNS, None, "{run}", Sum(points, AggregationTemporality.CUMULATIVE, True)))
        for metric in SHADOW_HISTOGRAMS:
            histograms = [
                b.point(_model_attributes(m, v, w), start, now)
                for (kind, m, v, w), b in self._shadow.items()
                if kind == metric
            ]
            if histograms:
                metrics.append(Metric(metric, None, "", Histogram(histograms, AggregationTemporality.CUMULATIVE)))
        return MetricsData([ResourceMetrics(self._resource, [ScopeMetrics(SCOPE, metrics, "")], "")])


# -- a node -----------------------------------------------------------------------------------------------------


def _share_draw(node_id: str, version: str) -> float:
    """A number in [0, 1) fixed for a node and version: the nodes below a refuse_share refuse it."""
    digest = hashlib.sha256(f"refuse\0{node_id}\0{version}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


@dataclass
class Model:
    """One model on a node: what serves, and where its latest assignment stands."""

    version: str = ""
    variant: str = ""
    state: str = ""
    last_error: str = ""
    target: tuple[str, str] | None = None  # (version, variant) being installed
    ready_at: float = math.inf
    refuses: bool = False


@dataclass
class Shadow:
    """A shadow of one model on a node: the version it runs beside what serves, and its install."""

    version: str
    variant: str
    share: float
    installed: bool = False
    ready_at: float = math.inf
    refuses: bool = False


class SimNode:
    """One simulated node (see the module docs)."""

    def __init__(self, node_id: str, facts: NodeFacts, keys: NodeKeys, telemetry: NodeTelemetry) -> None:
        self.node_id = node_id
        self.facts = facts
        self.keys = keys
        self.telemetry = telemetry
        self.models: dict[str, Model] = {}
        self.shadows: dict[str, Shadow] = {}
        self.offline = False
        self.enrolled = False
        self.check_interval_s = 0.0
        self.next_check = 0.0
        self.next_export = 0.0
        self.served_until = 0.0
        self.exporting = False
        # (Unix time, model, version) each time what serves changed: read beside the region's own times.
        self.history: list[tuple[float, str, str]] = []
        self.refusals: list[tuple[float, str, str]] = []  # (Unix time, model, version) of each refused install

    def serving(self, model: str) -> str:
        """The version of ``model`` it serves ("" when none)."""
        held = self.models.get(model)
        return held.version if held else ""

    def installed(self) -> list[InstalledModel]:
        """What it reports at check-in, as the updater does: what serves, and the latest assignment's state."""
        return [
            InstalledModel(name, m.version, m.variant, m.state or STATE_COMMITTED, m.last_error)
            for name, m in sorted(self.models.items())
        ]

    def shadowing(self, model: str) -> str:
        """The version of ``model`` it runs as an installed shadow ("" when none)."""
        held = self.shadows.get(model)
        return held.version if held is not None and held.installed else ""

    def next_install(self) -> float:
        """When its next pending install finishes (inf when none is pending)."""
        pending = [m.ready_at for m in self.models.values()] + [s.ready_at for s in self.shadows.values()]
        return min(pending, default=math.inf)


# -- the fleet --------------------------------------------------------------------------------------------------


class FleetSim:
    """Simulated nodes against one region (see the module docs); built inside the running event loop (its channels).

    Args:
        settings: How they talk to the region.
        profiles: Behaviour per model version; versions not named behave as ``default``.
        default: The behaviour of any other version.
    """

    def __init__(
        self,
        settings: SimSettings,
        profiles: Mapping[str, VersionProfile] | None = None,
        default: VersionProfile | None = None,
    ) -> None:
        self.settings = settings
        self.profiles: dict[str, VersionProfile] = dict(profiles or {})
        self.default = default or VersionProfile()
        self.nodes: list[SimNode] = []
        self.checkins = CallLog()
        self.exports = CallLog()
        self.enrollments = CallLog()
        self.loop_lag = CallLog()
        self.export_results: Counter[str] = Counter()
        self.errors = 0
        self._rng = np.random.default_rng(settings.seed)
        # Scalar draws (jitter) from the stdlib: numpy's per-call overhead is ten times larger.
        self._draw = random.Random(settings.seed)
        self._clients = [FleetClient(settings.region, None, 4 * 1024 * 1024) for _ in range(settings.channels)]
        self._exporters = [
            OTLPMetricExporter(endpoint=settings.region, insecure=True, timeout=settings.timeout_s)
            for _ in range(settings.exporters)
        ]
        self._pool = ThreadPoolExecutor(settings.export_threads, thread_name_prefix="sim-export")
        self._tasks: list[asyncio.Task[None]] = []
        self._pending_exports: set[asyncio.Future[tuple[float, float, str]]] = set()

    # Building the fleet

    def profile(self, version: str) -> VersionProfile:
        """How a node behaves on ``version``."""
        return self.profiles.get(version, self.default)

    def set_profile(self, version: str, profile: VersionProfile) -> None:
        """Changes the behaviour of ``version`` from now on (traffic served later, installs assigned later)."""
        self.profiles[version] = profile

    def add_nodes(self, count: int) -> list[SimNode]:
        """Creates ``count`` more nodes (keys made here; not enrolled yet)."""
        s = self.settings
        made = []
        for i in range(len(self.nodes), len(self.nodes) + count):
            node_id = f"{s.id_prefix}-{i:05d}"
            facts = NodeFacts(
                node_id, "device", s.hardware_class, s.memory_budget_bytes, s.onnxruntime_version, 1 << 34
            )
            keys = NodeKeys(Ed25519PrivateKey.generate(), X25519PrivateKey.generate())
            resource = Resource.create({NODE_ID: node_id, NODE_TIER: "tier0", HARDWARE_CLASS: s.hardware_class})
            telemetry: NodeTelemetry = SdkTelemetry(resource) if s.metrics == "sdk" else DirectTelemetry(resource)
            made.append(SimNode(node_id, facts, keys, telemetry))
        self.nodes.extend(made)
        return made

    def _client(self, node: SimNode) -> FleetClient:
        return self._clients[hash(node.node_id) % len(self._clients)]

    def _exporter(self, node: SimNode) -> OTLPMetricExporter:
        return self._exporters[hash(node.node_id) % len(self._exporters)]

    async def enroll(self, nodes: Sequence[SimNode], tokens: Sequence[str], concurrency: int = 32) -> None:
        """Enrolls each node with its own one-time token.

        Raises:
            EdgecascadeError: The region refused one (the first refusal).
        """
        if len(tokens) < len(nodes):
            raise ValueError(f"{len(nodes)} nodes need as many tokens, got {len(tokens)}")
        gate = asyncio.Semaphore(concurrency)
        loop = asyncio.get_running_loop()

        async def one(node: SimNode, token: str) -> None:
            async with gate:
                started = loop.time()
                interval = await self._client(node).enroll(token, node.facts, node.keys, self.settings.timeout_s)
                self.enrollments.record(started, loop.time() - started, 0.0)
                node.enrolled = True
                node.check_interval_s = float(interval)

        await asyncio.gather(*(one(n, t) for n, t in zip(nodes, tokens, strict=False)))

    # Running

    def start(self) -> None:
        """Starts every enrolled node's loop (first check-in and export at a random moment within an interval)."""
        now = asyncio.get_running_loop().time()
        for node in self.nodes:
            if not node.enrolled:
                continue
            # Spread the first calls over one interval, as a fleet that has been running would be.
            node.next_check = now + self._draw.uniform(0, self._check_interval(node))
            node.next_export = now + self._draw.uniform(0, self.settings.export_interval_s)
            node.served_until = now
            self._tasks.append(asyncio.create_task(self._run(node), name=f"sim {node.node_id}"))
        self._tasks.append(asyncio.create_task(self._watch_loop(), name="sim loop lag"))

    async def stop(self) -> None:
        """Stops every node, waits for exports in flight and closes the channels."""
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._tasks.clear()
        if self._pending_exports:
            await asyncio.wait(self._pending_exports, timeout=self.settings.timeout_s + 5)
        for exporter in self._exporters:
            exporter.shutdown()
        await asyncio.to_thread(self._pool.shutdown, wait=True, cancel_futures=True)
        for client in self._clients:
            await client.close()

    def set_offline(self, node_ids: Iterable[str], offline: bool = True) -> None:
        """Switches nodes off (no traffic, check-ins or exports) or on again (they check in within an interval)."""
        wanted = set(node_ids)
        loop = asyncio.get_running_loop()
        for node in self.nodes:
            if node.node_id in wanted and node.offline != offline:
                node.offline = offline
                if not offline:
                    now = loop.time()
                    node.served_until = now  # it served nothing while off
                    node.next_check = now
                    node.next_export = now + self.settings.export_interval_s

    def _check_interval(self, node: SimNode) -> float:
        return self.settings.check_interval_s or node.check_interval_s or 30.0

    def _jittered(self, interval: float) -> float:
        j = self.settings.jitter
        return interval * self._draw.uniform(1 - j, 1 + j) if j else interval

    async def _run(self, node: SimNode) -> None:
        loop = asyncio.get_running_loop()
        while True:
            if node.offline:
                # Switched off: it looks again at its next check-in time, as a device that powers up would.
                await asyncio.sleep(self._check_interval(node))
                continue
            wake = min(node.next_check, node.next_export, node.next_install())
            delay = wake - loop.time()
            if delay > 0:
                await asyncio.sleep(delay)
            if node.offline:
                continue
            try:
                await self._step(node, loop.time())
            except Exception:
                # A bug here must not silently stop one node: counted (the tests require none) and logged.
                self.errors += 1
                log.exception("simulated node %s failed a step", node.node_id)
                await asyncio.sleep(self._check_interval(node))

    async def _step(self, node: SimNode, now: float) -> None:
        if node.next_install() <= now:
            self._finish_installs(node, now)
        if node.next_export <= now:
            self._export(node, now)
            node.next_export = max(node.next_export + self._jittered(self.settings.export_interval_s), now)
        if node.next_check <= now:
            await self._check_in(node, now)
            node.next_check = asyncio.get_running_loop().time() + self._jittered(self._check_interval(node))

    # Traffic and installs

    def serve_until(self, node: SimNode, now: float) -> None:
        """Generates the traffic a node served since it last did, on what it served meanwhile."""
        elapsed = now - node.served_until
        node.served_until = now
        if elapsed <= 0:
            return
        for name, model in node.models.items():
            if not model.version:
                continue
            profile = self.profile(model.version)
            n = int(self._rng.poisson(profile.requests_per_s * elapsed)) if profile.requests_per_s else 0
            if not n:
                continue
            ok_share = 1.0 - profile.error_share - profile.fallback_share
            outcomes = self._rng.multinomial(n, [max(ok_share, 0.0), profile.error_share, profile.fallback_share])
            latencies = self._rng.lognormal(math.log(profile.p50_ms), profile.sigma, n)
            node.telemetry.serve(name, model.version, model.variant, outcomes.tolist(), latencies)
            shadow = node.shadows.get(name)
            if shadow is not None and shadow.installed:
                # It runs on its share of what the node answered itself (not what went upward).
                sampled = int(self._rng.binomial(int(outcomes[0] + outcomes[1]), shadow.share))
                if sampled:
                    self._run_shadow(node, name, shadow, profile, sampled)

    def _run_shadow(self, node: SimNode, name: str, shadow: Shadow, serving: VersionProfile, sampled: int) -> None:
        profile = self.profile(shadow.version)
        errors = int(self._rng.binomial(sampled, profile.error_share))
        ok = sampled - errors
        rng = self._rng
        values = {
            SHADOW_AGREEMENT: (rng.random(ok) < profile.agreement).astype(np.float64),
            SHADOW_DIFFERENCE: rng.exponential(profile.difference, ok) if profile.difference else np.zeros(ok),
            SHADOW_LATENCY: rng.lognormal(math.log(profile.p50_ms), profile.sigma, ok),
            SHADOW_SERVING_LATENCY: rng.lognormal(math.log(serving.p50_ms), serving.sigma, ok),
        }
        node.telemetry.shadow(name, shadow.version, shadow.variant, (ok, errors, 0), ShadowValues(values))

    def _apply(self, node: SimNode, desired: DesiredState, now: float) -> None:
        self._apply_shadows(node, {a.name: a for a in desired.assignments if a.shadow}, now)
        for assignment in desired.assignments:
            if assignment.shadow:
                continue
            model = node.models.setdefault(assignment.name, Model())
            wanted = (assignment.version, assignment.variant)
            if (model.version, model.variant) == wanted:
                # Back on what it serves (a rollback to it, or a refused version withdrawn).
                model.target, model.ready_at, model.state, model.last_error = None, math.inf, STATE_COMMITTED, ""
                continue
            if model.target == wanted:
                continue  # installing it already, or refused it already
            profile = self.profile(assignment.version)
            model.target = wanted
            model.ready_at = now + profile.install_delay_s
            model.refuses = _share_draw(node.node_id, assignment.version) < profile.refuse_share
            model.state, model.last_error = STATE_ASSIGNED, ""
            node.telemetry.update(assignment.name, assignment.version, assignment.variant, STATE_ASSIGNED)

    def _apply_shadows(self, node: SimNode, wanted: Mapping[str, AssignedVariant], now: float) -> None:
        """Removes the shadows no longer assigned and starts installing the new ones."""
        if set(node.shadows) - set(wanted):
            self.serve_until(node, now)  # what ran up to now ran with its shadow
            for name in set(node.shadows) - set(wanted):
                del node.shadows[name]
        for name, assignment in wanted.items():
            held = node.shadows.get(name)
            if held is not None and (held.version, held.variant) == (assignment.version, assignment.variant):
                held.share = assignment.shadow_share
                continue  # installed, installing, or refused already
            profile = self.profile(assignment.version)
            node.shadows[name] = Shadow(
                assignment.version,
                assignment.variant,
                assignment.shadow_share,
                ready_at=now + profile.install_delay_s,
                refuses=_share_draw(node.node_id, assignment.version) < profile.refuse_share,
            )
            node.telemetry.update(name, assignment.version, assignment.variant, STATE_ASSIGNED)

    def _finish_installs(self, node: SimNode, now: float) -> None:
        self.serve_until(node, now)  # what was served up to now was served by the old version
        for name, shadow in node.shadows.items():
            if shadow.ready_at > now:
                continue
            shadow.ready_at = math.inf
            if shadow.refuses:
                node.telemetry.update(name, shadow.version, shadow.variant, STATE_REFUSED)
                node.refusals.append((time.time(), name, shadow.version))
            else:
                shadow.installed = True
                node.telemetry.update(name, shadow.version, shadow.variant, STATE_COMMITTED)
        for name, model in node.models.items():
            if model.target is None or model.ready_at > now:
                continue
            version, variant = model.target
            model.ready_at = math.inf
            if model.refuses:
                # It keeps the assignment (and keeps reporting it refused) but serves what it served.
                model.state, model.last_error = STATE_REFUSED, f"simulated refusal of version {version}"
                node.telemetry.update(name, version, variant, STATE_REFUSED)
                node.refusals.append((time.time(), name, version))
                continue
            model.version, model.variant, model.target = version, variant, None
            model.state, model.last_error = STATE_COMMITTED, ""
            node.telemetry.update(name, version, variant, STATE_COMMITTED)
            node.history.append((time.time(), name, version))

    # Calls

    async def _check_in(self, node: SimNode, scheduled: float) -> None:
        loop = asyncio.get_running_loop()
        started = loop.time()
        try:
            desired = await self._client(node).check_in(
                node.facts, node.installed(), node.keys, self.settings.timeout_s
            )
        except EdgecascadeError as exc:
            self.checkins.record(started, loop.time() - started, started - scheduled, type(exc).__name__)
            return
        self.checkins.record(started, loop.time() - started, started - scheduled)
        if desired.check_interval_s:
            node.check_interval_s = float(desired.check_interval_s)
        self._apply(node, desired, loop.time())

    def _export(self, node: SimNode, scheduled: float) -> None:
        if node.exporting:
            self.export_results["skipped_busy"] += 1  # the previous export is still running: the node is behind
            return
        self.serve_until(node, scheduled)
        # Collected here, on the loop that records: the direct aggregates are not guarded against a second thread.
        data = node.telemetry.collect()
        if data is None:
            return
        node.exporting = True
        exporter = self._exporter(node)
        timeout_ms = self.settings.timeout_s * 1000

        def run() -> tuple[float, float, str]:
            sent = time.monotonic()
            result = exporter.export(data, timeout_millis=timeout_ms)
            return sent, time.monotonic() - sent, "" if result is MetricExportResult.SUCCESS else "failed"

        future = asyncio.get_running_loop().run_in_executor(self._pool, run)

        def done(f: asyncio.Future[tuple[float, float, str]]) -> None:
            node.exporting = False
            self._pending_exports.discard(f)
            if f.cancelled():
                return
            error = f.exception()
            if error is not None:
                self.export_results["raised"] += 1
                log.warning("an export of %s raised: %r", node.node_id, error)
                return
            started, duration, failure = f.result()
            self.export_results[failure or "ok"] += 1
            self.exports.record(started, duration, started - scheduled, failure)

        self._pending_exports.add(future)
        future.add_done_callback(done)

    async def _watch_loop(self, period_s: float = 0.1) -> None:
        """Records how late the event loop wakes: a busy simulator shows here before it shows in the region."""
        loop = asyncio.get_running_loop()
        while True:
            due = loop.time() + period_s
            await asyncio.sleep(period_s)
            now = loop.time()
            self.loop_lag.record(due, 0.0, now - due)

    # Reading it

    def serving(self, model: str, online_only: bool = False) -> dict[str, str]:
        """Each node's version of ``model`` ("" when none), optionally only the online nodes'."""
        return {n.node_id: n.serving(model) for n in self.nodes if not (online_only and n.offline)}

    def node(self, node_id: str) -> SimNode:
        """The node with this id."""
        return next(n for n in self.nodes if n.node_id == node_id)

    def first_served(self, model: str, version: str, since: float = 0.0) -> float | None:
        """When the first node started serving ``version`` at or after Unix time ``since``, or None."""
        times = [t for n in self.nodes for t, m, v in n.history if m == model and v == version and t >= since]
        return min(times) if times else None

    def first_refused(self, model: str, version: str, since: float = 0.0) -> float | None:
        """When the first node refused to install ``version`` at or after Unix time ``since``, or None."""
        times = [t for n in self.nodes for t, m, v in n.refusals if m == model and v == version and t >= since]
        return min(times) if times else None


async def wait_for(condition: Callable[[], bool], timeout_s: float, what: str, poll_s: float = 0.1) -> None:
    """Polls ``condition`` (on the event loop, so simulated nodes keep running) until it holds.

    Raises:
        TimeoutError: It did not within ``timeout_s``.
    """
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout_s} s waiting for: {what}")
        await asyncio.sleep(poll_s)
