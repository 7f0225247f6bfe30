"""OpenTelemetry set-up for one node.

Each node builds its own :class:`TracerProvider` (nothing global), so several
nodes can share a process in tests and still report their own
``service.name``. Spans are exported by OTLP/gRPC only when the standard
``OTEL_EXPORTER_OTLP_ENDPOINT`` (or ``OTEL_EXPORTER_OTLP_TRACES_ENDPOINT``) is
set and ``OTEL_SDK_DISABLED`` is not true; otherwise spans are still created
(trace context still propagates across tiers) but go nowhere. The exporter reads
the rest of the standard ``OTEL_EXPORTER_OTLP_*`` variables itself.
"""

from __future__ import annotations

import os
from collections.abc import Mapping

from opentelemetry import trace
from opentelemetry.sdk.resources import SERVICE_INSTANCE_ID, SERVICE_NAME, SERVICE_VERSION, Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor

from services.inference import NodeIdentity

ATTR_NODE_ID = "edgecascade.node_id"
ATTR_TIER = "edgecascade.tier"
ATTR_MODEL_NAME = "edgecascade.model.name"
ATTR_MODEL_VERSION = "edgecascade.model.version"
ATTR_FALLBACK_REASON = "edgecascade.fallback_reason"


def export_enabled(env: Mapping[str, str] | None = None) -> bool:
    """Whether spans should be exported by OTLP according to the standard variables."""
    env = os.environ if env is None else env
    if env.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
        return False
    return bool(env.get("OTEL_EXPORTER_OTLP_ENDPOINT") or env.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"))


def build_tracer_provider(identity: NodeIdentity, service_name: str, version: str) -> TracerProvider:
    """Returns a tracer provider for one node, exporting by OTLP when configured."""
    resource = Resource.create(
        {
            SERVICE_NAME: service_name,
            SERVICE_INSTANCE_ID: identity.node_id,
            SERVICE_VERSION: version,
            ATTR_TIER: identity.tier,
        }
    )
    provider = TracerProvider(resource=resource)
    if export_enabled():
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
