"""An in-process OTLP/gRPC metrics receiver: what the region (or a Collector) would get from a node.

It keeps every request as the bytes that arrived, so a test can tell that a relay
forwarded them untouched, and it can be stopped and started again on the same
port to play a region that goes away and comes back.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import grpc
from opentelemetry.proto.collector.metrics.v1 import metrics_service_pb2 as otlp

SERVICE = otlp.DESCRIPTOR.services_by_name["MetricsService"].full_name


@dataclass(frozen=True)
class Point:
    """One received data point, flattened with its resource and metric."""

    resource: dict[str, Any]
    metric: str
    attributes: dict[str, Any]
    value: float | None = None  # a sum's or gauge's value
    count: int | None = None  # a histogram's count
    sum: float | None = None  # a histogram's sum
    bounds: tuple[float, ...] = ()
    bucket_counts: tuple[int, ...] = ()
    monotonic: bool | None = None


def _value(v: Any) -> Any:
    field = v.WhichOneof("value")
    return getattr(v, field) if field else None


def points(request: otlp.ExportMetricsServiceRequest) -> list[Point]:
    """Every data point of a request."""
    found: list[Point] = []
    for rm in request.resource_metrics:
        resource = {a.key: _value(a.value) for a in rm.resource.attributes}
        for sm in rm.scope_metrics:
            for metric in sm.metrics:
                kind = metric.WhichOneof("data")
                for p in getattr(metric, kind).data_points:
                    attributes = {a.key: _value(a.value) for a in p.attributes}
                    if kind == "histogram":
                        found.append(
                            Point(
                                resource,
                                metric.name,
                                attributes,
                                count=p.count,
                                sum=p.sum,
                                bounds=tuple(p.explicit_bounds),
                                bucket_counts=tuple(p.bucket_counts),
                            )
                        )
                    else:
                        number = p.as_double if p.WhichOneof("value") == "as_double" else p.as_int
                        monotonic = metric.sum.is_monotonic if kind == "sum" else None
                        found.append(Point(resource, metric.name, attributes, value=number, monotonic=monotonic))
    return found


class OtlpMetricsReceiver:
    """Collects every metrics export request sent to it (answers each with success)."""

    def __init__(self) -> None:
        self.raw: list[bytes] = []
        self.refused = 0
        self.refuse: grpc.StatusCode | None = None  # set: every request is refused with this status
        self.port = 0
        self._server: grpc.aio.Server | None = None
        self._arrived = asyncio.Condition()

    @property
    def address(self) -> str:
        """``host:port``, once started."""
        return f"127.0.0.1:{self.port}"

    @property
    def requests(self) -> list[otlp.ExportMetricsServiceRequest]:
        """What arrived, decoded."""
        return [otlp.ExportMetricsServiceRequest.FromString(r) for r in self.raw]

    def points(self) -> list[Point]:
        """Every data point received so far."""
        return [p for r in self.requests for p in points(r)]

    async def _export(self, request: bytes, context: Any) -> bytes:
        if self.refuse is not None:
            self.refused += 1
            await context.abort(self.refuse, "refused by the test")
        async with self._arrived:
            self.raw.append(request)
            self._arrived.notify_all()
        return b""

    async def start(self, port: int = 0) -> str:
        """Starts on a loopback port (a free one by default, or the one it had before); returns ``host:port``."""
        self._server = grpc.aio.server()
        handler: grpc.RpcMethodHandler[bytes, bytes] = grpc.unary_unary_rpc_method_handler(self._export)  # bytes
        self._server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE, {"Export": handler}),))
        self.port = self._server.add_insecure_port(f"127.0.0.1:{port}")
        assert self.port, f"cannot listen on 127.0.0.1:{port}"
        await self._server.start()
        return self.address

    async def stop(self) -> None:
        """Stops the receiver (it may be started again on the same port)."""
        if self._server is not None:
            await self._server.stop(0)
            self._server = None

    async def wait_for(self, done: Callable[[], bool], timeout_s: float = 20.0) -> None:
        """Waits until ``done()`` holds, checked whenever a request arrives.

        Raises:
            TimeoutError: It did not hold within ``timeout_s``.
        """
        async with self._arrived:
            await asyncio.wait_for(self._arrived.wait_for(done), timeout_s)
