"""Every method a node serves, wrapped once when its service is registered: status table and server spans.

gRPC's asyncio server runs server interceptors in Python on every call, before
the handler starts: an async ``intercept_service`` per interceptor, a fresh
handler object, and OpenTelemetry's span set-up even when nothing records it.
On a tiny model that was a tenth of the event loop's time per request. So the
node uses no interceptor: each handler of its own services is wrapped here, at
registration, with

* the status table (:mod:`services.rpc.status_table`): a domain error becomes its
  status code and message, anything else INTERNAL with an id to find it in the log;
* a SERVER span named ``/package.Service/Method`` (``rpc.system``, ``rpc.service``,
  ``rpc.method``, ``rpc.grpc.status_code``), started under the caller's W3C trace
  context, when spans are recorded here (an exporter or a sampler is configured)
  or the caller sent a ``traceparent`` — so a caller's trace stays whole and a
  forwarded call carries it upward. Without either, a call gets fresh trace and
  span ids (unsampled) and nothing else: its log records, hard examples and error
  messages share them, for a few microseconds instead of a span's hundred.

Health checks and reflection are registered as they are (they would bury the
traces that matter).
"""

from __future__ import annotations

import asyncio
import inspect
import random
from collections.abc import AsyncIterator, Callable, Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import grpc
from grpc import aio
from opentelemetry import context as context_api
from opentelemetry import propagate, trace
from opentelemetry.trace import NonRecordingSpan, SpanContext, SpanKind, Status, StatusCode

from services.rpc.status_table import abort_for, status_code_of

TRACEPARENT = "traceparent"

if TYPE_CHECKING:
    Handler = grpc.RpcMethodHandler[Any, Any]
Wrap = Callable[["Handler", str], "Handler"]


class Tracing:
    """How calls are traced on one server.

    Args:
        tracer: The node's tracer (None: no spans ever, context is not read).
        every_call: Spans are recorded here (an exporter or a sampler is configured): every call
            gets one. Otherwise only a call that arrives with a ``traceparent`` does.
    """

    def __init__(self, tracer: trace.Tracer | None, every_call: bool) -> None:
        self.tracer = tracer
        self.every_call = every_call and tracer is not None

    def wanted(self, metadata: Iterable[tuple[str, Any]] | None) -> bool:
        """Whether a call with this invocation metadata gets a span."""
        if self.tracer is None:
            return False
        if self.every_call:
            return True
        return any(key == TRACEPARENT for key, _ in metadata or ())


def wrap_handler(tracing: Tracing) -> Wrap:
    """Returns the function that wraps one method handler (of any of the four kinds) for ``tracing``."""

    def wrap(handler: Handler, method: str) -> Handler:
        service, _, name = method.lstrip("/").rpartition("/")
        attributes = {"rpc.system": "grpc", "rpc.service": service, "rpc.method": name}
        kinds: list[tuple[Callable[..., Any] | None, Callable[..., Handler]]] = [
            (handler.unary_unary, grpc.unary_unary_rpc_method_handler),
            (handler.unary_stream, grpc.unary_stream_rpc_method_handler),
            (handler.stream_unary, grpc.stream_unary_rpc_method_handler),
            (handler.stream_stream, grpc.stream_stream_rpc_method_handler),
        ]
        for behavior, build in kinds:
            if behavior is not None:
                return build(
                    _guarded(behavior, method, attributes, tracing),
                    handler.request_deserializer,
                    handler.response_serializer,
                )
        raise ValueError(f"method handler of {method} has no behaviour")

    return wrap


def _guarded(
    behavior: Callable[..., Any], method: str, attributes: Mapping[str, str], tracing: Tracing
) -> Callable[..., Any]:
    """``behavior`` with the status table applied and, when wanted, a span around it.

    ``asyncio.CancelledError`` (the caller left) is a ``BaseException`` and passes
    untouched; so does :class:`grpc.aio.AbortError` (the handler set its status itself).
    """
    if inspect.isasyncgenfunction(behavior):
        return _guarded_stream(behavior, method, attributes, tracing)

    async def call(request: Any, context: aio.ServicerContext[Any, Any]) -> Any:
        span = _start_span(tracing, method, attributes, context)
        token = context_api.attach(trace.set_span_in_context(span))
        code = grpc.StatusCode.OK
        try:
            return await behavior(request, context)
        except aio.AbortError:
            code = _code_of(context)
            raise
        except asyncio.CancelledError:
            code = grpc.StatusCode.CANCELLED
            raise
        except Exception as exc:
            code = status_code_of(exc)
            await abort_for(context, exc, method)
            return None
        finally:
            _end_span(span, token, code)

    return call


def _guarded_stream(
    behavior: Callable[..., Any], method: str, attributes: Mapping[str, str], tracing: Tracing
) -> Callable[..., Any]:
    """A streaming ``behavior`` with the status table applied and, when wanted, a span around it."""

    async def stream(request: Any, context: aio.ServicerContext[Any, Any]) -> AsyncIterator[Any]:
        span = _start_span(tracing, method, attributes, context)
        inner = behavior(request, context)
        code = grpc.StatusCode.OK
        try:
            while True:
                # The span is current only while the handler runs, never across a yield: the
                # stream may be closed from another task (its caller left), where a context
                # attached here could not be detached.
                token = context_api.attach(trace.set_span_in_context(span))
                try:
                    response = await inner.__anext__()
                except StopAsyncIteration:
                    break
                finally:
                    context_api.detach(token)
                yield response
        except aio.AbortError:
            code = _code_of(context)
            raise
        except (asyncio.CancelledError, GeneratorExit):
            code = grpc.StatusCode.CANCELLED
            raise
        except Exception as exc:
            code = status_code_of(exc)
            token = context_api.attach(trace.set_span_in_context(span))
            try:
                await abort_for(context, exc, method)  # its message names the span's trace
            finally:
                context_api.detach(token)
        finally:
            await inner.aclose()
            _end_span(span, None, code)

    return stream


def _start_span(
    tracing: Tracing, method: str, attributes: Mapping[str, str], context: aio.ServicerContext[Any, Any]
) -> trace.Span:
    """A SERVER span under the caller's trace context; for a call not traced, ids and nothing else.

    The ids of an untraced call are what its log records, hard examples and error
    messages carry, so that they can be found together; a forwarded call takes them
    upward, unsampled. They cost a few microseconds, a recorded span a hundred.
    """
    metadata = context.invocation_metadata()
    if not tracing.wanted(metadata):
        return NonRecordingSpan(SpanContext(_random_id(128), _random_id(64), is_remote=False))
    assert tracing.tracer is not None
    carrier = {key: value for key, value in metadata or () if isinstance(value, str)}
    return tracing.tracer.start_span(
        method, context=propagate.extract(carrier), kind=SpanKind.SERVER, attributes=attributes
    )


def _random_id(bits: int) -> int:
    """A random trace (128 bits) or span (64 bits) id; never 0, which means "none"."""
    return random.getrandbits(bits) or 1


def _end_span(span: trace.Span, token: object, code: grpc.StatusCode) -> None:
    if not span.is_recording():
        if token is not None:
            context_api.detach(token)  # type: ignore[arg-type]
        return
    span.set_attribute("rpc.grpc.status_code", code.value[0])
    if code in SERVER_FAULTS:
        span.set_status(Status(StatusCode.ERROR, code.name))
    span.end()
    if token is not None:
        context_api.detach(token)  # type: ignore[arg-type]


def _code_of(context: aio.ServicerContext[Any, Any]) -> grpc.StatusCode:
    code = context.code()
    return code if isinstance(code, grpc.StatusCode) else grpc.StatusCode.UNKNOWN


# The codes that are the server's fault (OpenTelemetry's semantic conventions for gRPC servers).
SERVER_FAULTS = frozenset(
    {
        grpc.StatusCode.UNKNOWN,
        grpc.StatusCode.DEADLINE_EXCEEDED,
        grpc.StatusCode.UNIMPLEMENTED,
        grpc.StatusCode.INTERNAL,
        grpc.StatusCode.UNAVAILABLE,
        grpc.StatusCode.DATA_LOSS,
    }
)


class WrappingServer:
    """Stands for the server while one service registers, wrapping each handler it adds.

    Generated ``add_*Servicer_to_server`` functions add the same handlers twice (as a
    generic handler and as registered methods); both are wrapped, once per method.
    """

    def __init__(self, server: aio.Server, wrap: Wrap) -> None:
        self._server = server
        self._wrap = wrap

    def add_registered_method_handlers(self, service: str, handlers: Mapping[str, Handler]) -> None:
        self._server.add_registered_method_handlers(
            service, {name: self._wrap(handler, f"/{service}/{name}") for name, handler in handlers.items()}
        )

    def add_generic_rpc_handlers(self, handlers: Sequence[grpc.GenericRpcHandler]) -> None:
        self._server.add_generic_rpc_handlers(tuple(_WrappedGeneric(h, self._wrap) for h in handlers))


class _WrappedGeneric(grpc.GenericRpcHandler):
    """A generic handler whose handlers come out wrapped (built once per method, then looked up)."""

    def __init__(self, inner: grpc.GenericRpcHandler, wrap: Wrap) -> None:
        self._inner = inner
        self._wrap = wrap
        self._wrapped: dict[str, tuple[Handler, Handler]] = {}

    def service(self, handler_call_details: grpc.HandlerCallDetails) -> Handler | None:
        handler = self._inner.service(handler_call_details)
        if handler is None:
            return None
        method = handler_call_details.method
        known = self._wrapped.get(method)
        if known is not None and known[0] is handler:
            return known[1]
        wrapped = self._wrap(handler, method)
        self._wrapped[method] = (handler, wrapped)
        return wrapped
