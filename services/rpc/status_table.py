"""The one table between domain errors and gRPC status codes, and how a failed handler ends its call.

Servers: every handler is wrapped (:mod:`services.rpc.served_methods`) so that
:func:`abort_for` ends a failed call: a domain error becomes its status code with
its message; anything else becomes INTERNAL with a fixed message that carries
only the trace id, and the traceback goes to the log.
Clients: :func:`error_from_status` turns a failed call's status code, details
and trailers back into the domain error (:func:`error_from_rpc` reads them off
either gRPC API's error), so cores never see ``grpc`` types.
"""

from __future__ import annotations

import logging
import secrets
from collections.abc import Iterable
from typing import Any

import grpc
from grpc import aio
from opentelemetry import trace

from services import errors

log = logging.getLogger("edgecascade.rpc")

# Trailing metadata key naming the domain error class a node raised, so that a
# client one tier down can tell a peer's own UNAVAILABLE from a broken connection.
ERROR_CLASS_KEY = "edgecascade-error"
# Trailing metadata flag ("1") on an error a node relays from its own upstream call: the error says
# nothing about the node that sent it, so its caller neither retries it nor counts it against that node.
BEYOND_KEY = "edgecascade-beyond"

# Most specific first: the first matching row wins. A subclass that shares its
# parent's code has no row of its own (ArtifactNotFoundError is NOT_FOUND through
# NotFoundError, DigestMismatchError and MetadataSignatureError are DATA_LOSS through
# IntegrityError, MetadataExpiredError and QuantizationGateError FAILED_PRECONDITION
# through PreconditionError, InvalidModelError and SignatureMismatchError
# INVALID_ARGUMENT): the first row of each code is also the class a client gets
# back for it, unless the peer named a more specific one.
STATUS_TABLE: tuple[tuple[type[errors.EdgecascadeError], grpc.StatusCode], ...] = (
    (errors.NotFoundError, grpc.StatusCode.NOT_FOUND),
    (errors.InvalidArgumentError, grpc.StatusCode.INVALID_ARGUMENT),
    (errors.CapacityError, grpc.StatusCode.RESOURCE_EXHAUSTED),
    (errors.UnavailableError, grpc.StatusCode.UNAVAILABLE),
    (errors.DeadlineExceededError, grpc.StatusCode.DEADLINE_EXCEEDED),
    (errors.RequestCancelledError, grpc.StatusCode.CANCELLED),
    (errors.IntegrityError, grpc.StatusCode.DATA_LOSS),
    # Published variants are immutable: a second publish of one is a conflict, not a bad state.
    (errors.DuplicateVariantError, grpc.StatusCode.ALREADY_EXISTS),
    (errors.PreconditionError, grpc.StatusCode.FAILED_PRECONDITION),
    (errors.UnauthenticatedError, grpc.StatusCode.UNAUTHENTICATED),
    (errors.PermissionDeniedError, grpc.StatusCode.PERMISSION_DENIED),
    (errors.UnimplementedError, grpc.StatusCode.UNIMPLEMENTED),
    (errors.InternalError, grpc.StatusCode.INTERNAL),
    (errors.ConfigError, grpc.StatusCode.INTERNAL),
)

# Status codes a client may see that have no row of their own above.
_EXTRA_CODES: dict[grpc.StatusCode, type[errors.EdgecascadeError]] = {
    grpc.StatusCode.OUT_OF_RANGE: errors.InvalidArgumentError,
    grpc.StatusCode.ABORTED: errors.UnavailableError,
    grpc.StatusCode.ALREADY_EXISTS: errors.PreconditionError,
    grpc.StatusCode.UNKNOWN: errors.InternalError,
}

_ERROR_FOR_CODE: dict[grpc.StatusCode, type[errors.EdgecascadeError]] = {
    **_EXTRA_CODES,
    **{code: cls for cls, code in reversed(STATUS_TABLE)},
}


def status_for(exc: errors.EdgecascadeError) -> grpc.StatusCode:
    """Returns the status code of a domain error (INTERNAL if no row matches)."""
    for cls, code in STATUS_TABLE:
        if isinstance(exc, cls):
            return code
    return grpc.StatusCode.INTERNAL


def status_code_of(exc: BaseException) -> grpc.StatusCode:
    """The status a handler's exception ends its call with: a domain error's own, INTERNAL for anything else."""
    return status_for(exc) if isinstance(exc, errors.EdgecascadeError) else grpc.StatusCode.INTERNAL


def error_from_status(
    code: grpc.StatusCode, details: str, trailing: Iterable[tuple[str, str | bytes]] | None, what: str
) -> errors.EdgecascadeError:
    """Returns the domain error for a failed call, from its status code, details and trailing metadata.

    Args:
        code: The call's status code.
        details: Its details ("" if none).
        trailing: Its trailing metadata (a peer of ours names the error class there).
        what: Who was called, e.g. ``upstream 127.0.0.1:8002``; used when the
            peer sent no message of its own and for transport failures.
    """
    cls = _ERROR_FOR_CODE.get(code, errors.InternalError)
    trailing = tuple(trailing or ())
    sent = _sent_error_class(trailing)
    if sent is not None and issubclass(sent, cls):
        # Our own peer named the exact class; its message is already meant for people.
        error = sent(details)
        error.from_peer = True
        error.beyond = (BEYOND_KEY, "1") in trailing
        return error
    if code == grpc.StatusCode.UNAVAILABLE:
        # Transport failures carry gRPC's own wording; say what was unreachable instead.
        return errors.UpstreamUnavailableError(f"{what} is unavailable")
    if code == grpc.StatusCode.RESOURCE_EXHAUSTED and "message larger than max" in details:
        return errors.CapacityError(f"{what} refused a message larger than its limit")
    return cls(details or f"{what} answered {code.name}")


def error_from_rpc(exc: grpc.RpcError, what: str) -> errors.EdgecascadeError:
    """Returns the domain error for a failed call of either gRPC API (``aio`` or blocking).

    An ``RpcError`` that is not a call (it carries no status) maps to INTERNAL's error.
    """
    if not isinstance(exc, grpc.Call | aio.AioRpcError):
        return error_from_status(grpc.StatusCode.UNKNOWN, "", None, what)
    return error_from_status(exc.code(), exc.details() or "", exc.trailing_metadata(), what)


def _sent_error_class(trailing: Iterable[tuple[str, str | bytes]] | None) -> type[errors.EdgecascadeError] | None:
    for key, value in trailing or ():
        if key == ERROR_CLASS_KEY and isinstance(value, str):
            cls = getattr(errors, value, None)
            if isinstance(cls, type) and issubclass(cls, errors.EdgecascadeError):
                return cls
    return None


def current_trace_id() -> str:
    """The trace id of the current span, for error messages that send people to the log.

    A call that is not traced here (no exporter, no caller's ``traceparent``) has no span; it gets
    a fresh random id of the same form, which the log line carries too.
    """
    context = trace.get_current_span().get_span_context()
    return f"{context.trace_id:032x}" if context.is_valid else secrets.token_hex(16)


async def abort_for(context: aio.ServicerContext[Any, Any], exc: BaseException, method: str) -> None:
    if context.done():
        # The caller already left (its deadline passed or it cancelled): there
        # is nobody to send a status to, and trying would fail inside gRPC.
        return
    if isinstance(exc, errors.EdgecascadeError):
        trailing: tuple[tuple[str, str], ...] = ((ERROR_CLASS_KEY, type(exc).__name__),)
        if exc.relayed:
            trailing += ((BEYOND_KEY, "1"),)
        await _send_status(context, status_for(exc), exc.message, trailing_metadata=trailing)
        return
    trace_id = current_trace_id()
    log.error("unexpected error in %s (trace id %s)", method, trace_id, exc_info=exc)
    await _send_status(context, grpc.StatusCode.INTERNAL, f"internal error; reported with trace id {trace_id}")


async def _send_status(
    context: aio.ServicerContext[Any, Any], code: grpc.StatusCode, message: str, **kwargs: Any
) -> None:
    """Ends the call with a status; a caller that left while it was being sent is nobody's error.

    ``context.done()`` is checked first, but the caller can leave between that check and the send
    (a 50 ms deadline under overload does); gRPC then fails the send with its own internal
    exception, which would otherwise be logged as a servicer failure with a traceback per call.
    """
    try:
        await context.abort(code, message, **kwargs)
    except aio.AbortError:
        raise
    except Exception:
        if not context.done():
            raise
