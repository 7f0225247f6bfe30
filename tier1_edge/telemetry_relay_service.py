"""The edge's relay of its devices' OTLP metrics and logs to the region (a node component).

The edge serves ``opentelemetry.proto.collector.metrics.v1.MetricsService`` and
``…logs.v1.LogsService`` so a device's stock OTLP exporters can send to it as to any
collector. Each request is checked to be an ``ExportMetricsServiceRequest`` (or
``ExportLogsServiceRequest``), held as the bytes that arrived in a bounded
:class:`~tier1_edge.telemetry_buffer.TelemetryBuffer` — one per signal, each of the
``relay_*`` bounds, so a flood of metrics never evicts a device's anomalies — and
answered at once; a sender forwards the held requests, oldest first, to where the edge's own
metrics go (``[telemetry] endpoint``, else the ``[upstream]`` address). The bytes
go up untouched, so the region sees each device's resource attributes (node id,
tier, hardware class) exactly as the device sent them, and the edge never has to
understand a newer OTLP than its own.

While the region is unreachable the edge keeps accepting; the buffer drops its
oldest requests beyond ``relay_max_requests`` or ``relay_max_bytes``, and every
drop is counted. A request the region refuses for good (malformed, a node it does
not know) is dropped and counted as rejected, not retried; anything the OTLP
specification calls retryable is sent again after a backoff. The counts are the
edge's own metrics (``edgecascade.telemetry.relay.*``, by ``edgecascade.relay.signal``),
which reach the region with the rest of the edge's telemetry.

Without a target (no endpoint and no upstream) the service is not served.
"""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import grpc
from google.protobuf.message import DecodeError  # type: ignore[import-untyped]
from grpc import aio
from opentelemetry.metrics import CallbackOptions, Meter, Observation
from opentelemetry.proto.collector.logs.v1 import logs_service_pb2 as otlp_logs
from opentelemetry.proto.collector.metrics.v1 import metrics_service_pb2 as otlp

from services.errors import ConfigError, InvalidArgumentError
from services.rpc.channels import open_channel
from services.rpc.components import NodeContext
from services.rpc.server import ServiceBinding
from tier1_edge.config import EdgeTelemetrySection
from tier1_edge.telemetry_buffer import TelemetryBuffer

log = logging.getLogger("edgecascade.telemetry")

# How long a stopping edge keeps forwarding what it holds (the region may be reachable).
STOP_FLUSH_S = 1.0

METRICS_SERVICE = otlp.DESCRIPTOR.services_by_name["MetricsService"].full_name
LOGS_SERVICE = otlp_logs.DESCRIPTOR.services_by_name["LogsService"].full_name
# What the OTLP specification lets a client retry (RESOURCE_EXHAUSTED too: the region sheds load with it).
RETRYABLE = frozenset(
    {
        grpc.StatusCode.CANCELLED,
        grpc.StatusCode.DEADLINE_EXCEEDED,
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        grpc.StatusCode.ABORTED,
        grpc.StatusCode.OUT_OF_RANGE,
        grpc.StatusCode.UNAVAILABLE,
        grpc.StatusCode.DATA_LOSS,
    }
)
BACKOFF_S = (0.1, 5.0)  # first and longest wait between attempts while the upstream fails
RESULT = "edgecascade.relay.result"
SIGNAL = "edgecascade.relay.signal"  # metrics or logs
_EMPTY_RESPONSE = b""  # an Export…ServiceResponse with nothing refused


@dataclass(frozen=True)
class _Signal:
    """One OTLP signal the relay carries: its service, how a request is checked, its buffer."""

    name: str  # "metrics" or "logs"
    service: str
    request_type: Any
    rejected: Callable[[bytes], int]  # items the upstream refused within an accepted request
    buffer: TelemetryBuffer

    @property
    def method(self) -> str:
        return f"/{self.service}/Export"


class TelemetryRelayService:
    """Accepts devices' OTLP metrics and logs and forwards them upstream through bounded buffers.

    Args:
        context: The edge's context (its configuration has an ``[telemetry]`` section with the relay's bounds).

    Raises:
        ConfigError: The tier's configuration has no relay settings.
    """

    def __init__(self, context: NodeContext) -> None:
        settings = getattr(context.config, "telemetry", None)
        if not isinstance(settings, EdgeTelemetrySection):
            raise ConfigError(f"the {context.identity.tier} configuration has no [telemetry] relay settings")
        self.target = settings.target(context.config.upstream.address)
        self.buffer = TelemetryBuffer(settings.relay_max_requests, settings.relay_max_bytes)
        self.logs_buffer = TelemetryBuffer(settings.relay_max_requests, settings.relay_max_bytes)
        self._signals = (
            _Signal("metrics", METRICS_SERVICE, otlp.ExportMetricsServiceRequest, _rejected_points, self.buffer),
            _Signal("logs", LOGS_SERVICE, otlp_logs.ExportLogsServiceRequest, _rejected_records, self.logs_buffer),
        )
        self._timeout_s = settings.timeout_s
        self._max_message_bytes = context.config.server.max_message_bytes
        self._channel: aio.Channel | None = None
        self._senders: list[asyncio.Task[None]] = []
        if self.target and context.meter_provider is not None:
            self._observe(context.meter_provider.get_meter("edgecascade.telemetry"))

    @property
    def bindings(self) -> Sequence[ServiceBinding]:
        """OTLP ``MetricsService`` and ``LogsService``, when there is somewhere to forward to."""
        if not self.target:
            return []
        return [ServiceBinding(signal.service, self._registration(signal)) for signal in self._signals]

    def _registration(self, signal: _Signal) -> Callable[[aio.Server], None]:
        async def handle(request: bytes, context: aio.ServicerContext[Any, Any]) -> bytes:
            return self._export(signal, request)

        def register(server: aio.Server) -> None:
            # No (de)serializers: the handler gets and returns bytes, so what it forwards is what arrived.
            export: grpc.RpcMethodHandler[bytes, bytes] = grpc.unary_unary_rpc_method_handler(handle)
            server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(signal.service, {"Export": export}),))

        return register

    async def start(self) -> None:
        """Starts forwarding what the buffer holds."""
        if not self.target:
            return
        self._channel = open_channel(self.target, None, self._max_message_bytes)
        self._senders = [
            asyncio.create_task(self._forward(self._channel, signal), name=f"telemetry relay ({signal.name})")
            for signal in self._signals
        ]

    async def stop(self) -> None:
        """Forwards what is held for up to :data:`STOP_FLUSH_S`, then stops; what is left is dropped and counted."""
        deadline = asyncio.get_running_loop().time() + STOP_FLUSH_S
        while self._senders and any(len(s.buffer) for s in self._signals):
            if asyncio.get_running_loop().time() >= deadline:
                break
            await asyncio.sleep(0.02)
        for sender in self._senders:
            sender.cancel()
        await asyncio.gather(*self._senders, return_exceptions=True)
        if self._channel is not None:
            await self._channel.close()
        for signal in self._signals:
            lost, size = signal.buffer.drop_all()  # the request a cancelled send held was put back first
            if lost:
                log.warning(
                    "%d telemetry %s requests (%d bytes) held for %s were not forwarded before the stop; dropped",
                    lost,
                    signal.name,
                    size,
                    self.target,
                )

    def _export(self, signal: _Signal, request: bytes) -> bytes:
        try:
            signal.request_type.FromString(request)
        except DecodeError:
            raise InvalidArgumentError(f"the request is not an OTLP {signal.request_type.DESCRIPTOR.name}") from None
        if not signal.buffer.put(request):
            # Not retryable: it would never fit. The exporter's max_export_batch_size makes requests smaller.
            raise InvalidArgumentError(
                f"an export request of {len(request)} bytes exceeds the edge's relay buffer "
                f"({signal.buffer.max_bytes} bytes); export smaller batches"
            )
        return _EMPTY_RESPONSE

    async def _forward(self, channel: aio.Channel, signal: _Signal) -> None:
        send: aio.UnaryUnaryMultiCallable[bytes, bytes] = channel.unary_unary(signal.method)
        buffer = signal.buffer
        stats = buffer.stats
        failures = 0
        refusing = False
        while True:
            request = await buffer.take()
            try:
                # Wait for the connection within the deadline: an upstream that restarts is reached as soon as it is up.
                answer = await send(request, timeout=self._timeout_s, wait_for_ready=True)
            except asyncio.CancelledError:
                buffer.put_back(request)  # the stop counts it with the rest, instead of losing it unseen
                raise
            except Exception as exc:
                code = exc.code() if isinstance(exc, aio.AioRpcError) else None
                if code is None:
                    # A bug must not end the relay: the devices' metrics would pile up unsent.
                    log.exception("telemetry relay to %s failed unexpectedly", self.target)
                if code is None or code in RETRYABLE:
                    buffer.put_back(request)
                    stats.retries += 1
                    failures += 1
                    if failures == 1 and code is not None:
                        log.warning(
                            "telemetry relay to %s failed (%s); holding devices' %s and retrying",
                            self.target,
                            code.name,
                            signal.name,
                        )
                    await asyncio.sleep(_backoff(failures))
                    continue
                stats.rejected += 1
                details = exc.details() if isinstance(exc, aio.AioRpcError) else ""
                (log.debug if refusing else log.warning)(
                    "%s refused a device's telemetry for good (%s: %s); dropped", self.target, code.name, details
                )
                refusing = True
                continue
            if failures:
                log.info(
                    "telemetry relay of %s to %s works again after %d failed attempts",
                    signal.name,
                    self.target,
                    failures,
                )
            failures = 0
            refusing = False
            stats.forwarded += 1
            stats.forwarded_bytes += len(request)
            stats.rejected_points += signal.rejected(answer)

    def _observe(self, meter: Meter) -> None:
        signals = self._signals

        def requests(options: CallbackOptions) -> list[Observation]:
            return [
                Observation(n, {RESULT: result, SIGNAL: signal.name})
                for signal in signals
                for result, n in (
                    ("accepted", signal.buffer.stats.accepted),
                    ("forwarded", signal.buffer.stats.forwarded),
                    ("dropped", signal.buffer.stats.dropped),
                    ("refused", signal.buffer.stats.refused),
                    ("rejected", signal.buffer.stats.rejected),
                    ("retried", signal.buffer.stats.retries),
                )
            ]

        def volume(options: CallbackOptions) -> list[Observation]:
            return [
                Observation(n, {RESULT: result, SIGNAL: signal.name})
                for signal in signals
                for result, n in (
                    ("accepted", signal.buffer.stats.accepted_bytes),
                    ("forwarded", signal.buffer.stats.forwarded_bytes),
                    ("dropped", signal.buffer.stats.dropped_bytes),
                )
            ]

        def held(options: CallbackOptions) -> list[Observation]:
            return [Observation(len(signal.buffer), {SIGNAL: signal.name}) for signal in signals]

        def held_bytes(options: CallbackOptions) -> list[Observation]:
            return [Observation(signal.buffer.held_bytes, {SIGNAL: signal.name}) for signal in signals]

        meter.create_observable_counter(
            "edgecascade.telemetry.relay.requests", [requests], unit="{request}", description="Devices' export requests"
        )
        meter.create_observable_counter(
            "edgecascade.telemetry.relay.bytes", [volume], unit="By", description="Bytes of devices' export requests"
        )
        meter.create_observable_gauge(
            "edgecascade.telemetry.relay.held",
            [held],
            unit="{request}",
            description="Requests held for the upstream",
        )
        meter.create_observable_gauge(
            "edgecascade.telemetry.relay.held_bytes",
            [held_bytes],
            unit="By",
            description="Bytes held for the upstream",
        )


def _backoff(failures: int) -> float:
    """Exponential with full jitter, so the edges of a region that comes back do not all retry at once."""
    ceiling = min(BACKOFF_S[1], BACKOFF_S[0] * 2 ** min(failures - 1, 16))
    return random.uniform(BACKOFF_S[0], max(BACKOFF_S[0], ceiling))


def _rejected_points(answer: bytes) -> int:
    try:
        return int(otlp.ExportMetricsServiceResponse.FromString(answer).partial_success.rejected_data_points)
    except DecodeError:
        return 0


def _rejected_records(answer: bytes) -> int:
    try:
        return int(otlp_logs.ExportLogsServiceResponse.FromString(answer).partial_success.rejected_log_records)
    except DecodeError:
        return 0
