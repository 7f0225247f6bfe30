"""A copy of what the region accepted, sent on to an external OTLP/gRPC collector.

Operators keep their own tools (a Collector in front of Prometheus, Jaeger,
Grafana) while the region keeps only what rollouts and fleet status need. The
copy never holds up ingest: requests wait in a bounded queue for one sender
task, which calls the collector's stock OTLP ``Export`` once per request with a
deadline; a full queue, a failed call and the points the collector itself
rejects are counted, never retried (the nodes' own exporters already retry
towards the region, and cumulative metrics carry on in the next report).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import Counter

import grpc
from grpc import aio
from opentelemetry.proto.collector.logs.v1 import logs_service_pb2 as logs_pb
from opentelemetry.proto.collector.logs.v1 import logs_service_pb2_grpc as logs_grpc
from opentelemetry.proto.collector.metrics.v1 import metrics_service_pb2 as metrics_pb
from opentelemetry.proto.collector.metrics.v1 import metrics_service_pb2_grpc as metrics_grpc

log = logging.getLogger("edgecascade.telemetry")

EXPORT_TIMEOUT_S = 10.0

Copy = metrics_pb.ExportMetricsServiceRequest | logs_pb.ExportLogsServiceRequest


class OtlpForwarder:
    """Sends copies to ``endpoint`` (``host:port``; plaintext: a collector beside the region).

    Args:
        endpoint: The collector's OTLP/gRPC address.
        queue_size: Requests waiting to be sent; more are dropped and counted.
        max_message_bytes: The largest request sent (the region's own receive limit).
    """

    def __init__(self, endpoint: str, queue_size: int, max_message_bytes: int) -> None:
        self.endpoint = endpoint
        self._queue: asyncio.Queue[Copy] = asyncio.Queue(queue_size)
        self._max_message_bytes = max_message_bytes
        self._task: asyncio.Task[None] | None = None
        self._channel: aio.Channel | None = None
        self.counts: Counter[str] = Counter()

    def metrics(self, request: metrics_pb.ExportMetricsServiceRequest) -> None:
        """Queues a copy of a metrics request (dropped and counted when the queue is full)."""
        self._offer(request, "metrics")

    def logs(self, request: logs_pb.ExportLogsServiceRequest) -> None:
        """Queues a copy of a logs request (dropped and counted when the queue is full)."""
        self._offer(request, "logs")

    def _offer(self, request: Copy, signal: str) -> None:
        try:
            self._queue.put_nowait(request)
        except asyncio.QueueFull:
            self.counts[f"forward.{signal}.dropped"] += 1

    def start(self) -> None:
        """Opens the channel and starts sending (inside the running event loop)."""
        if self._task is not None:
            return
        self._channel = aio.insecure_channel(
            self.endpoint, options=[("grpc.max_send_message_length", self._max_message_bytes)]
        )
        self._task = asyncio.create_task(self._run(self._channel), name="otlp forwarder")

    async def _run(self, channel: aio.Channel) -> None:
        metrics = metrics_grpc.MetricsServiceStub(channel)
        logs = logs_grpc.LogsServiceStub(channel)
        while True:
            request = await self._queue.get()
            signal = "metrics" if isinstance(request, metrics_pb.ExportMetricsServiceRequest) else "logs"
            try:
                if isinstance(request, metrics_pb.ExportMetricsServiceRequest):
                    answer = await metrics.Export(request, timeout=EXPORT_TIMEOUT_S)
                    rejected = answer.partial_success.rejected_data_points
                else:
                    logs_answer = await logs.Export(request, timeout=EXPORT_TIMEOUT_S)
                    rejected = logs_answer.partial_success.rejected_log_records
            except grpc.RpcError as exc:
                self.counts[f"forward.{signal}.failed"] += 1
                if self.counts[f"forward.{signal}.failed"] == 1:
                    # Once: a collector that is down would otherwise fill the log.
                    log.warning("forwarding telemetry to %s failed (%s); failures are counted", self.endpoint, exc)
                continue
            self.counts[f"forward.{signal}.sent"] += 1
            self.counts[f"forward.{signal}.rejected_by_collector"] += rejected

    async def stop(self) -> None:
        """Stops sending; what is still queued is dropped and counted."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        while not self._queue.empty():
            request = self._queue.get_nowait()
            signal = "metrics" if isinstance(request, metrics_pb.ExportMetricsServiceRequest) else "logs"
            self.counts[f"forward.{signal}.dropped"] += 1
        if self._channel is not None:
            await self._channel.close()
