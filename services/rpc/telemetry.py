"""OpenTelemetry set-up for one node: traces and metrics.

Each node builds its own :class:`TracerProvider` and :class:`MeterProvider`
(nothing global), so several nodes can share a process in tests and still
report their own ``service.name``. Spans and metrics are exported by OTLP/gRPC only when the standard
``OTEL_EXPORTER_OTLP_ENDPOINT`` (or ``OTEL_EXPORTER_OTLP_TRACES_ENDPOINT``) is
set and ``OTEL_SDK_DISABLED`` is not true; otherwise spans are still created
(trace context still propagates across tiers) but go nowhere. The exporter reads
the rest of the standard ``OTEL_EXPORTER_OTLP_*`` variables itself.

Besides, a device or edge with ``[telemetry] export`` sends its metrics to its
upstream (:mod:`services.rpc.metric_export`), and its anomalies as logs
(:mod:`services.rpc.anomaly_log`); the metrics the region reads of it are
:mod:`services.rpc.fleet_metrics`'. The resource names the node (id, tier,
hardware class), so every hop up to the region knows whose points they are.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Mapping, Sequence

from opentelemetry import trace
from opentelemetry.metrics import CallbackOptions, Observation
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import MetricReader, PeriodicExportingMetricReader
from opentelemetry.sdk.resources import SERVICE_INSTANCE_ID, SERVICE_NAME, SERVICE_VERSION, Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor
from opentelemetry.sdk.trace.sampling import ALWAYS_OFF, ParentBased

from services.engine.batcher import BatchObserver
from services.engine.model_cache import LoadedModel, ModelCache
from services.inference import NodeIdentity
from services.telemetry_names import FALLBACK_REASON, HARDWARE_CLASS, MODEL_NAME, MODEL_VERSION, NODE_ID, NODE_TIER
from services.tier_config import TierConfig, UpdatesSection
from services.updates.checkin import machine_hardware_class

ATTR_NODE_ID = NODE_ID
ATTR_TIER = NODE_TIER
ATTR_MODEL_NAME = MODEL_NAME
ATTR_MODEL_VERSION = MODEL_VERSION
ATTR_FALLBACK_REASON = FALLBACK_REASON


def export_enabled(env: Mapping[str, str] | None = None) -> bool:
    """Whether spans should be exported by OTLP according to the standard variables."""
    env = os.environ if env is None else env
    if env.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
        return False
    return bool(env.get("OTEL_EXPORTER_OTLP_ENDPOINT") or env.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"))


def node_hardware_class(config: TierConfig) -> str:
    """The node's hardware class: its ``[updates] hardware_class``, else this machine's (as check-ins report it)."""
    updates = getattr(config, "updates", None)
    configured = updates.hardware_class if isinstance(updates, UpdatesSection) else ""
    return configured or machine_hardware_class()


def node_resource(identity: NodeIdentity, service_name: str, version: str, hardware_class: str = "") -> Resource:
    """The OpenTelemetry resource describing one node: what every hop up to the region keeps with its telemetry."""
    attributes = {
        SERVICE_NAME: service_name,
        SERVICE_INSTANCE_ID: identity.node_id,
        SERVICE_VERSION: version,
        NODE_ID: identity.node_id,
        NODE_TIER: identity.tier,
    }
    if hardware_class:
        attributes[HARDWARE_CLASS] = hardware_class
    return Resource.create(attributes)


def traces_recorded(env: Mapping[str, str] | None = None) -> bool:
    """Whether this process records spans of its own accord: an exporter or a sampler is configured.

    Otherwise a call gets a span only when its caller sent trace context (see
    :mod:`services.rpc.served_methods`).
    """
    env = os.environ if env is None else env
    return export_enabled(env) or bool(env.get("OTEL_TRACES_SAMPLER"))


def build_tracer_provider(resource: Resource, env: Mapping[str, str] | None = None) -> TracerProvider:
    """Returns a tracer provider for one node, exporting by OTLP when configured.

    With no exporter configured (and no ``OTEL_TRACES_SAMPLER`` chosen), spans
    are not recorded: they would go nowhere, and recording costs about a third
    of a millisecond per request here. Trace context still propagates (with
    the sampled flag off), so a caller's own trace stays whole.
    """
    env = os.environ if env is None else env
    exporting = export_enabled(env)
    sampler = None if traces_recorded(env) else ParentBased(ALWAYS_OFF)
    provider = TracerProvider(resource=resource, sampler=sampler)
    if exporting:
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter

        provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))
    return provider


def annotate_span(identity: NodeIdentity, model_name: str, model_version: str = "", fallback_reason: str = "") -> None:
    """Adds node and model attributes to the span of the current RPC."""
    span = trace.get_current_span()
    if not span.is_recording():
        return
    span.set_attribute(ATTR_NODE_ID, identity.node_id)
    span.set_attribute(ATTR_TIER, identity.tier)
    if model_name:
        span.set_attribute(ATTR_MODEL_NAME, model_name)
    if model_version:
        span.set_attribute(ATTR_MODEL_VERSION, model_version)
    if fallback_reason:
        span.set_attribute(ATTR_FALLBACK_REASON, fallback_reason)


def build_meter_provider(resource: Resource, readers: Sequence[MetricReader] = ()) -> MeterProvider:
    """Returns a meter provider for one node, exporting by OTLP when configured.

    Args:
        resource: The node's resource.
        readers: Extra readers (tests read metrics in memory).
    """
    all_readers = list(readers)
    if export_enabled():
        from opentelemetry.exporter.otlp.proto.grpc.metric_exporter import OTLPMetricExporter

        all_readers.append(PeriodicExportingMetricReader(OTLPMetricExporter()))
    return MeterProvider(metric_readers=all_readers, resource=resource)


class _ModelTimings:
    """Records one model version's timings into the node's histograms."""

    def __init__(self, metrics: NodeMetrics, name: str, version: str) -> None:
        self._metrics = metrics
        self._attributes = {ATTR_MODEL_NAME: name, ATTR_MODEL_VERSION: version}

    def queued(self, seconds: float) -> None:
        self._metrics.queue_time.record(seconds, self._attributes)

    def ran(self, rows: int, seconds: float) -> None:
        self._metrics.compute_time.record(seconds, self._attributes)
        self._metrics.batch_size.record(rows, self._attributes)


class NodeMetrics:
    """The engine's metrics: timings recorded as they happen, counters and gauges read from the cache on collection.

    Instruments: ``edgecascade.queue.duration``, ``edgecascade.compute.duration``
    and ``edgecascade.batch.size`` (histograms per model version);
    ``edgecascade.queue.depth`` and ``edgecascade.model.memory`` (gauges);
    ``edgecascade.requests.shed`` (by reason) and ``edgecascade.cache.*``
    (hits, misses, loads, evictions, refusals) as counters.
    """

    def __init__(self, provider: MeterProvider) -> None:
        meter = provider.get_meter("edgecascade")
        self.queue_time = meter.create_histogram(
            "edgecascade.queue.duration", unit="s", description="Time a request waited for its batch"
        )
        self.compute_time = meter.create_histogram(
            "edgecascade.compute.duration", unit="s", description="Time one batch ran"
        )
        self.batch_size = meter.create_histogram(
            "edgecascade.batch.size", unit="{row}", description="Rows per model run"
        )
        self._cache: ModelCache | None = None
        meter.create_observable_gauge("edgecascade.queue.depth", [self._queue_depth], unit="{request}")
        meter.create_observable_gauge("edgecascade.model.memory", [self._model_memory], unit="By")
        meter.create_observable_counter("edgecascade.requests.shed", [self._shed], unit="{request}")
        for name in ("hits", "misses", "loads", "evictions", "refusals"):
            meter.create_observable_counter(f"edgecascade.cache.{name}", [self._cache_counter(name)])

    def attach(self, cache: ModelCache) -> None:
        """Reads counters and gauges from ``cache`` from now on."""
        self._cache = cache

    def for_model(self, name: str, version: str) -> BatchObserver:
        """The timing observer of one model version."""
        return _ModelTimings(self, name, version)

    def _queue_depth(self, options: CallbackOptions) -> Iterable[Observation]:
        return [Observation(m.batcher.queue_depth, a) for a, m in self._loaded_models()]

    def _model_memory(self, options: CallbackOptions) -> Iterable[Observation]:
        return [Observation(m.footprint_bytes, a) for a, m in self._loaded_models()]

    def _shed(self, options: CallbackOptions) -> Iterable[Observation]:
        return [
            Observation(count, {**a, "reason": reason})
            for a, m in self._loaded_models()
            for reason, count in m.stats.shed.items()
        ]

    def _loaded_models(self) -> list[tuple[dict[str, str], LoadedModel]]:
        if self._cache is None:
            return []
        return [({ATTR_MODEL_NAME: m.name, ATTR_MODEL_VERSION: m.version}, m) for m in self._cache.loaded()]

    def _cache_counter(self, name: str) -> Callable[[CallbackOptions], Iterable[Observation]]:
        def observe(options: CallbackOptions) -> Iterable[Observation]:
            return [] if self._cache is None else [Observation(getattr(self._cache.stats, name))]

        return observe
