"""The OTLP ``MetricsService`` and ``LogsService`` of the region: protobuf in, :mod:`.points` out.

The services are bound by :func:`metrics_binding` and :func:`logs_binding`,
which take the request's bytes and parse them here: a payload that is not OTLP
is INVALID_ARGUMENT (counted) rather than gRPC's UNKNOWN with the parser's
words, and a large payload is parsed on a worker thread. Each servicer then
bounds what it reads before reading it — data points (or records) per request,
and as many resources, scopes and metrics, attributes per
resource, point or record, the length of keys and values, buckets per
histogram — converts the rest to plain data for :class:`~.ingest.Ingest`, and
converts its :class:`~.admission.Receipt` back: ``partial_success`` when some of
it was refused. A full queue is RESOURCE_EXHAUSTED with a ``RetryInfo``, which
the OTLP specification makes retryable. Large requests are converted on a worker
thread so the event loop keeps serving the others.

A copy of what was accepted (the resources of enrolled nodes, as received) is
handed to ``forward`` when a collector is configured.
"""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

import grpc
from google.protobuf.duration_pb2 import Duration  # type: ignore[import-untyped]
from google.protobuf.message import DecodeError  # type: ignore[import-untyped]
from google.rpc.error_details_pb2 import RetryInfo  # type: ignore[import-untyped]
from grpc import aio
from opentelemetry.proto.collector.logs.v1 import logs_service_pb2 as logs_pb
from opentelemetry.proto.collector.logs.v1 import logs_service_pb2_grpc as logs_grpc
from opentelemetry.proto.collector.metrics.v1 import metrics_service_pb2 as metrics_pb
from opentelemetry.proto.collector.metrics.v1 import metrics_service_pb2_grpc as metrics_grpc
from opentelemetry.proto.common.v1 import common_pb2
from opentelemetry.proto.logs.v1 import logs_pb2
from opentelemetry.proto.metrics.v1 import metrics_pb2

from services.errors import CapacityError, InvalidArgumentError
from services.rpc.server import ServiceBinding
from services.rpc.status_table import ERROR_CLASS_KEY, status_for
from tier2_region.telemetry import hard_examples
from tier2_region.telemetry.admission import KEPT, Limits
from tier2_region.telemetry.ingest import Ingest
from tier2_region.telemetry.points import (
    Attributes,
    AttributeValue,
    HistogramPoint,
    LogEntry,
    MetricPoint,
    ResourceLogs,
    ResourceMetrics,
    SumPoint,
    Temporality,
)

METRICS_SERVICE = metrics_pb.DESCRIPTOR.services_by_name["MetricsService"].full_name
LOGS_SERVICE = logs_pb.DESCRIPTOR.services_by_name["LogsService"].full_name
# Requests with more items (or bytes) than this are converted (or parsed) on a worker thread.
INLINE_ITEMS = 512
INLINE_BYTES = 256 * 1024
RETRY_AFTER_S = 1
# The trailer the OTLP exporters read a RetryInfo from.
RETRY_INFO_KEY = "google.rpc.retryinfo-bin"

_TEMPORALITY = {
    metrics_pb2.AGGREGATION_TEMPORALITY_DELTA: Temporality.DELTA,
    metrics_pb2.AGGREGATION_TEMPORALITY_CUMULATIVE: Temporality.CUMULATIVE,
}
_NO_RECORDED_VALUE = metrics_pb2.DATA_POINT_FLAGS_NO_RECORDED_VALUE_MASK


def _value(value: common_pb2.AnyValue) -> tuple[AttributeValue, int]:
    """An attribute's value and its size (characters or bytes)."""
    kind = value.WhichOneof("value")
    if kind == "string_value":
        return value.string_value, len(value.string_value)
    if kind in ("bool_value", "int_value", "double_value"):
        return getattr(value, kind), 0
    if kind == "bytes_value":
        return value.bytes_value, len(value.bytes_value)
    if kind is None:
        return None, 0
    # Arrays and maps only tell series apart; their bytes do.
    raw = value.SerializeToString(deterministic=True)
    return raw, len(raw)


def _attributes(pairs: Sequence[common_pb2.KeyValue], limits: Limits) -> tuple[Attributes, str]:
    """The attributes, sorted by key, or the reason they are refused."""
    if len(pairs) > limits.max_attributes:
        return (), "too_many_attributes"
    out: list[tuple[str, AttributeValue]] = []
    for pair in pairs:
        value, size = _value(pair.value)
        if len(pair.key) > limits.max_key_chars or size > limits.max_value_chars:
            return (), "attribute_too_long"
        out.append((pair.key, value))
    out.sort(key=lambda kv: kv[0])
    return tuple(out), ""


def metrics_items(request: metrics_pb.ExportMetricsServiceRequest, limit: int) -> tuple[int, int]:
    """The request's data points and the resources, scopes and metrics holding them.

    Counting stops once either passes ``limit``, so a hostile request costs at most that many steps.
    """
    points = 0
    containers = len(request.resource_metrics)
    for resource in request.resource_metrics:
        if containers > limit or points > limit:
            break
        containers += len(resource.scope_metrics)
        for scope in resource.scope_metrics:
            containers += len(scope.metrics)
            if containers > limit:
                break
            for metric in scope.metrics:
                kind = metric.WhichOneof("data")
                if kind is not None:
                    points += len(getattr(metric, kind).data_points)
    return points, containers


def logs_items(request: logs_pb.ExportLogsServiceRequest, limit: int) -> tuple[int, int]:
    """The request's log records and the resources and scopes holding them (counted as :func:`metrics_items`)."""
    records = 0
    containers = len(request.resource_logs)
    for resource in request.resource_logs:
        if containers > limit or records > limit:
            break
        containers += len(resource.scope_logs)
        for scope in resource.scope_logs:
            records += len(scope.log_records)
    return records, containers


def _points_of(metric: metrics_pb2.Metric) -> Any:
    kind = metric.WhichOneof("data")
    return getattr(metric, kind).data_points if kind is not None else ()


def resource_metrics(resource: metrics_pb2.ResourceMetrics, limits: Limits) -> ResourceMetrics:
    """Converts one resource's metrics: the kept ones' points, the rest counted."""
    attributes, problem = _attributes(resource.resource.attributes, limits)
    if problem:
        total = sum(len(_points_of(m)) for s in resource.scope_metrics for m in s.metrics)
        return ResourceMetrics((), rejected={problem: total}, problem=problem)
    points: list[MetricPoint] = []
    rejected: Counter[str] = Counter()
    ignored = 0
    for scope in resource.scope_metrics:
        for metric in scope.metrics:
            kind = metric.WhichOneof("data")
            data_points = _points_of(metric)
            expected = KEPT.get(metric.name)
            if expected is None:
                ignored += len(data_points)
            elif kind != expected:
                rejected["wrong_type"] += len(data_points)
            elif kind == "sum":
                _sum_points(metric, limits, points, rejected)
            else:
                _histogram_points(metric, limits, points, rejected)
    return ResourceMetrics(attributes, tuple(points), dict(rejected), ignored)


def _sum_points(metric: metrics_pb2.Metric, limits: Limits, points: list[MetricPoint], rejected: Counter[str]) -> None:
    data = metric.sum
    temporality = _TEMPORALITY.get(data.aggregation_temporality, Temporality.UNSPECIFIED)
    for dp in data.data_points:
        attributes, problem = _attributes(dp.attributes, limits)
        if problem:
            rejected[problem] += 1
            continue
        kind = dp.WhichOneof("value")
        points.append(
            SumPoint(
                metric=metric.name,
                attributes=attributes,
                start_ns=dp.start_time_unix_nano,
                time_ns=dp.time_unix_nano,
                value=None if kind is None else float(getattr(dp, kind)),
                temporality=temporality,
                monotonic=data.is_monotonic,
                no_recorded_value=bool(dp.flags & _NO_RECORDED_VALUE),
            )
        )


def _histogram_points(
    metric: metrics_pb2.Metric, limits: Limits, points: list[MetricPoint], rejected: Counter[str]
) -> None:
    data = metric.histogram
    temporality = _TEMPORALITY.get(data.aggregation_temporality, Temporality.UNSPECIFIED)
    for dp in data.data_points:
        attributes, problem = _attributes(dp.attributes, limits)
        if not problem and len(dp.explicit_bounds) > limits.max_buckets:
            problem = "bad_histogram"
        if problem:
            rejected[problem] += 1
            continue
        points.append(
            HistogramPoint(
                metric=metric.name,
                attributes=attributes,
                start_ns=dp.start_time_unix_nano,
                time_ns=dp.time_unix_nano,
                temporality=temporality,
                count=dp.count,
                sum=dp.sum if dp.HasField("sum") else None,
                bounds=tuple(dp.explicit_bounds),
                # One more count than bounds is all a histogram may have; more is refused by admission.
                counts=tuple(dp.bucket_counts[: limits.max_buckets + 2]),
                min=dp.min if dp.HasField("min") else None,
                max=dp.max if dp.HasField("max") else None,
                no_recorded_value=bool(dp.flags & _NO_RECORDED_VALUE),
            )
        )


def _body(value: common_pb2.AnyValue, limit: int) -> str:
    kind = value.WhichOneof("value")
    if kind == "string_value":
        return value.string_value[:limit]
    if kind in ("bool_value", "int_value", "double_value"):
        return str(getattr(value, kind))[:limit]
    if kind == "bytes_value":
        return value.bytes_value[: limit // 2].hex()
    return "" if kind is None else f"({kind.removesuffix('_value')})"


def resource_logs(resource: logs_pb2.ResourceLogs, limits: Limits) -> ResourceLogs:
    """Converts one resource's log records."""
    attributes, problem = _attributes(resource.resource.attributes, limits)
    if problem:
        total = sum(len(s.log_records) for s in resource.scope_logs)
        return ResourceLogs((), rejected={problem: total}, problem=problem)
    records: list[LogEntry] = []
    rejected: Counter[str] = Counter()
    for scope in resource.scope_logs:
        for record in scope.log_records:
            own, problem = _attributes(record.attributes, limits)
            body_limit = limits.max_body_chars
            if not problem and hard_examples.is_hard_example(dict(own)):
                # Taken whole or not at all: a training job cannot read half an example.
                body_limit = limits.max_hard_example_bytes
                if record.body.WhichOneof("value") != "string_value":
                    problem = hard_examples.BAD
                elif len(record.body.string_value.encode("utf-8")) > body_limit:
                    problem = hard_examples.TOO_LARGE
            if problem:
                rejected[problem] += 1
                continue
            records.append(
                LogEntry(
                    attributes=own,
                    time_ns=record.time_unix_nano or record.observed_time_unix_nano,
                    severity_number=record.severity_number,
                    severity_text=record.severity_text[: limits.max_key_chars],
                    body=_body(record.body, body_limit),
                    trace_id=record.trace_id,
                    span_id=record.span_id,
                )
            )
    return ResourceLogs(attributes, tuple(records), dict(rejected))


async def _convert(items: int, convert: Callable[[], Any]) -> Any:
    return convert() if items <= INLINE_ITEMS else await asyncio.to_thread(convert)


async def _retry_later(context: aio.ServicerContext[Any, Any], exc: CapacityError) -> None:
    """Refuses with the error's status and a RetryInfo: OTLP clients retry RESOURCE_EXHAUSTED only with one."""
    info = RetryInfo(retry_delay=Duration(seconds=RETRY_AFTER_S)).SerializeToString()
    await context.abort(
        status_for(exc), exc.message, trailing_metadata=((ERROR_CLASS_KEY, type(exc).__name__), (RETRY_INFO_KEY, info))
    )


class MetricsServicer(metrics_grpc.MetricsServiceServicer):
    """The OTLP metrics service.

    Args:
        ingest: Where converted requests go.
        forward: Takes a copy of what was accepted (None: no collector is configured).
    """

    def __init__(
        self,
        ingest: Ingest,
        forward: Callable[[metrics_pb.ExportMetricsServiceRequest], None] | None = None,
    ) -> None:
        self.ingest = ingest
        self._forward = forward

    async def Export(
        self, request: metrics_pb.ExportMetricsServiceRequest, context: aio.ServicerContext[Any, Any]
    ) -> metrics_pb.ExportMetricsServiceResponse:
        limits = self.ingest.limits
        points, containers = metrics_items(request, limits.max_points_per_request)
        self.ingest.check_size("metrics", points, containers)
        resources = await _convert(
            points + containers, lambda: [resource_metrics(r, limits) for r in request.resource_metrics]
        )
        try:
            receipt = await self.ingest.metrics(resources)
        except CapacityError as exc:
            await _retry_later(context, exc)
            raise
        if self._forward is not None and receipt.accepted_resources:
            self._forward(_accepted_part(request, "resource_metrics", receipt.accepted_resources))
        response = metrics_pb.ExportMetricsServiceResponse()
        if receipt.rejected_total:
            response.partial_success.rejected_data_points = receipt.rejected_total
            response.partial_success.error_message = receipt.message()
        return response


class LogsServicer(logs_grpc.LogsServiceServicer):
    """The OTLP logs service (the region keeps the anomalies).

    Args:
        ingest: Where converted requests go.
        forward: Takes a copy of what was accepted (None: no collector is configured).
    """

    def __init__(
        self, ingest: Ingest, forward: Callable[[logs_pb.ExportLogsServiceRequest], None] | None = None
    ) -> None:
        self.ingest = ingest
        self._forward = forward

    async def Export(
        self, request: logs_pb.ExportLogsServiceRequest, context: aio.ServicerContext[Any, Any]
    ) -> logs_pb.ExportLogsServiceResponse:
        limits = self.ingest.limits
        records, containers = logs_items(request, limits.max_points_per_request)
        self.ingest.check_size("logs", records, containers)
        # Hard examples make few records large: a request of many bytes is converted off the loop too.
        items = records + containers if request.ByteSize() <= INLINE_BYTES else INLINE_ITEMS + 1
        resources = await _convert(items, lambda: [resource_logs(r, limits) for r in request.resource_logs])
        try:
            receipt = await self.ingest.logs(resources)
        except CapacityError as exc:
            await _retry_later(context, exc)
            raise
        if self._forward is not None and receipt.accepted_resources:
            self._forward(_accepted_part(request, "resource_logs", receipt.accepted_resources))
        response = logs_pb.ExportLogsServiceResponse()
        if receipt.rejected_total:
            response.partial_success.rejected_log_records = receipt.rejected_total
            response.partial_success.error_message = receipt.message()
        return response


_Request = TypeVar("_Request", metrics_pb.ExportMetricsServiceRequest, logs_pb.ExportLogsServiceRequest)


def _accepted_part(request: _Request, field: str, accepted: Sequence[int]) -> _Request:
    """The request with only its accepted resources (the request itself when all were): what is forwarded."""
    resources = getattr(request, field)
    if len(accepted) == len(resources):
        return request
    return type(request)(**{field: [resources[i] for i in accepted]})


async def _parse(cls: Any, raw: bytes, ingest: Ingest, signal: str) -> Any:
    try:
        return cls.FromString(raw) if len(raw) <= INLINE_BYTES else await asyncio.to_thread(cls.FromString, raw)
    except DecodeError:
        ingest.count_unreadable(signal)
        raise InvalidArgumentError(f"the request is not a serialized {cls.DESCRIPTOR.name}") from None


def _binding(service: str, signal: str, servicer: Any, request_type: Any, response_type: Any) -> ServiceBinding:
    ingest: Ingest = servicer.ingest

    async def export(raw: bytes, context: aio.ServicerContext[Any, Any]) -> Any:
        return await servicer.Export(await _parse(request_type, raw, ingest, signal), context)

    handler = grpc.method_handlers_generic_handler(
        service,
        {"Export": grpc.unary_unary_rpc_method_handler(export, response_serializer=response_type.SerializeToString)},
    )
    return ServiceBinding(service, lambda server: server.add_generic_rpc_handlers((handler,)))


def metrics_binding(servicer: MetricsServicer) -> ServiceBinding:
    """The OTLP metrics service as the region's server binds it (requests parsed by :func:`_parse`)."""
    return _binding(
        METRICS_SERVICE,
        "metrics",
        servicer,
        metrics_pb.ExportMetricsServiceRequest,
        metrics_pb.ExportMetricsServiceResponse,
    )


def logs_binding(servicer: LogsServicer) -> ServiceBinding:
    """The OTLP logs service as the region's server binds it."""
    return _binding(LOGS_SERVICE, "logs", servicer, logs_pb.ExportLogsServiceRequest, logs_pb.ExportLogsServiceResponse)
