"""Each served method is wrapped once at registration: statuses from the table, spans only when wanted.

A real ``grpc.aio`` server on loopback; spans are read from an in-memory exporter.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import AsyncIterator
from typing import Any

import grpc
import pytest
from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, StatusCode

from services import errors
from services.rpc.served_methods import Tracing
from services.rpc.server import GrpcServer, ServiceBinding

SERVICE = "test.Probe"
CALLER_TRACE, CALLER_SPAN = f"{0xABC:032x}", f"{0xDEF:016x}"
TRACEPARENT = (("traceparent", f"00-{CALLER_TRACE}-{CALLER_SPAN}-01"),)


async def say(request: bytes, context: grpc.aio.ServicerContext[Any, Any]) -> bytes:
    if request == b"ids":  # what the handler's logs and records would carry
        current = trace.get_current_span().get_span_context()
        return f"{current.trace_id:032x} {int(current.trace_flags.sampled)}".encode()
    if request == b"missing":
        raise errors.ModelNotFoundError("model 'missing' is not here")
    if request == b"bug":
        raise ZeroDivisionError("a bug")
    return b"said " + request


async def count(request: bytes, context: grpc.aio.ServicerContext[Any, Any]) -> AsyncIterator[bytes]:
    yield b"1"
    raise errors.QueueFullError("the queue is full")


def binding() -> ServiceBinding:
    handlers: dict[str, grpc.RpcMethodHandler[Any, Any]] = {
        "Say": grpc.unary_unary_rpc_method_handler(say),
        "Count": grpc.unary_stream_rpc_method_handler(count),
    }

    def register(server: grpc.aio.Server) -> None:
        # As generated code does: the same handlers as a generic handler and as registered methods.
        server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE, handlers),))
        server.add_registered_method_handlers(SERVICE, handlers)

    return ServiceBinding(SERVICE, register)


@pytest.fixture
def exporter() -> InMemorySpanExporter:
    return InMemorySpanExporter()


async def serve(exporter: InMemorySpanExporter, every_call: bool) -> tuple[GrpcServer, str]:
    provider = TracerProvider()  # samples everything: a span that is started is exported
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    server = GrpcServer("127.0.0.1", 0, [binding()], 1 << 20, 0.1, Tracing(provider.get_tracer("t"), every_call))
    port = await server.start()
    return server, f"127.0.0.1:{port}"


async def test_an_untraced_call_starts_no_span_and_a_caller_s_trace_gets_a_child_span(
    exporter: InMemorySpanExporter,
) -> None:
    server, address = await serve(exporter, every_call=False)
    try:
        async with grpc.aio.insecure_channel(address) as channel:
            call: grpc.aio.UnaryUnaryMultiCallable[bytes, bytes] = channel.unary_unary(f"/{SERVICE}/Say")
            assert await call(b"hi") == b"said hi"
            # Untraced, a call still has ids of its own (unsampled): its records can be found together.
            first, second = (await call(b"ids")).split(), (await call(b"ids")).split()
            assert first[1] == b"0" and first[0] != second[0] and int(first[0], 16) != 0
            assert exporter.get_finished_spans() == ()
            assert await call(b"hi", metadata=TRACEPARENT) == b"said hi"
    finally:
        await server.stop()
    (span,) = exporter.get_finished_spans()
    assert span.name == f"/{SERVICE}/Say" and span.kind == SpanKind.SERVER
    assert f"{span.context.trace_id:032x}" == CALLER_TRACE
    assert span.parent is not None and f"{span.parent.span_id:016x}" == CALLER_SPAN
    assert dict(span.attributes or {}) == {
        "rpc.system": "grpc",
        "rpc.service": SERVICE,
        "rpc.method": "Say",
        "rpc.grpc.status_code": 0,
    }


async def test_with_spans_recorded_every_call_gets_one_with_its_status(exporter: InMemorySpanExporter) -> None:
    server, address = await serve(exporter, every_call=True)
    try:
        async with grpc.aio.insecure_channel(address) as channel:
            call: grpc.aio.UnaryUnaryMultiCallable[bytes, bytes] = channel.unary_unary(f"/{SERVICE}/Say")
            await call(b"a")
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await call(b"bug")
            assert caught.value.code() == grpc.StatusCode.INTERNAL
    finally:
        await server.stop()
    ok, failed = exporter.get_finished_spans()
    assert ok.parent is None and ok.attributes is not None and ok.attributes["rpc.grpc.status_code"] == 0
    assert (
        failed.attributes is not None and failed.attributes["rpc.grpc.status_code"] == grpc.StatusCode.INTERNAL.value[0]
    )
    assert failed.status.status_code == StatusCode.ERROR
    # The message names the failed call's own trace, so the log line can be found.
    assert (caught.value.details() or "").endswith(f"{failed.context.trace_id:032x}")


async def test_errors_become_the_table_s_statuses_without_an_interceptor(exporter: InMemorySpanExporter) -> None:
    server, address = await serve(exporter, every_call=False)
    try:
        async with grpc.aio.insecure_channel(address) as channel:
            say_call: grpc.aio.UnaryUnaryMultiCallable[bytes, bytes] = channel.unary_unary(f"/{SERVICE}/Say")
            with pytest.raises(grpc.aio.AioRpcError) as missing:
                await say_call(b"missing")
            assert missing.value.code() == grpc.StatusCode.NOT_FOUND
            assert missing.value.details() == "model 'missing' is not here"
            assert ("edgecascade-error", "ModelNotFoundError") in tuple(missing.value.trailing_metadata() or ())
            with pytest.raises(grpc.aio.AioRpcError) as bug:
                await say_call(b"bug")
            # An untraced call still gets an id to find its log line by.
            assert re.fullmatch(r"internal error; reported with trace id [0-9a-f]{32}", bug.value.details() or "")
            counting: grpc.aio.UnaryStreamMultiCallable[bytes, bytes] = channel.unary_stream(f"/{SERVICE}/Count")
            stream = counting(b"")
            assert await stream.read() == b"1"
            with pytest.raises(grpc.aio.AioRpcError) as full:
                await stream.read()
            assert full.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    finally:
        await server.stop()
    assert exporter.get_finished_spans() == ()


async def endless(request: bytes, context: grpc.aio.ServicerContext[Any, Any]) -> AsyncIterator[bytes]:
    while True:
        yield b"x" * 1024


async def test_a_traced_stream_its_caller_leaves_ends_cancelled_without_a_context_error(
    exporter: InMemorySpanExporter, caplog: pytest.LogCaptureFixture
) -> None:
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    handlers: dict[str, grpc.RpcMethodHandler[Any, Any]] = {"Endless": grpc.unary_stream_rpc_method_handler(endless)}
    stream_binding = ServiceBinding(
        SERVICE, lambda s: s.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE, handlers),))
    )
    server = GrpcServer("127.0.0.1", 0, [stream_binding], 1 << 20, 0.1, Tracing(provider.get_tracer("t"), True))
    port = await server.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            endless_call: grpc.aio.UnaryStreamMultiCallable[bytes, bytes] = channel.unary_stream(f"/{SERVICE}/Endless")
            call = endless_call(b"")
            for _ in range(5):
                await call.read()
            call.cancel()
        for _ in range(200):
            if exporter.get_finished_spans():
                break
            await asyncio.sleep(0.01)
    finally:
        await server.stop()
    (span,) = exporter.get_finished_spans()
    assert span.attributes is not None and span.attributes["rpc.grpc.status_code"] == grpc.StatusCode.CANCELLED.value[0]
    assert "Failed to detach context" not in caplog.text
