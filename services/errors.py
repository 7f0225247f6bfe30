"""The one error tree of edgecascade.

Every failure that crosses a component boundary is one of these. Their messages
are written for the person who gets them: they name the model, input or
setting at fault and say what would be accepted instead, and they are safe to
send to a client. ``services.rpc.status_table`` maps each class to exactly one
gRPC status code (and back, for clients); nothing else in the code base decides
status codes.
"""

from __future__ import annotations


class EdgecascadeError(Exception):
    """Base of every error edgecascade raises on purpose.

    Attributes:
        message: For the person who gets it.
        from_peer: True when a peer of ours raised it and sent it over gRPC (it answered, with this
            error); False when it was raised here — including a call that failed in transport.
        relayed: True when this node's own call to its upstream failed with it (set by the guarded
            upstream): a node that sends it on marks it as coming from beyond itself.
        beyond: True when the peer that sent it said it came from *its* upstream call, not from the
            peer itself: it says nothing about that peer's health.
    """

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message
        self.from_peer = False
        self.relayed = False
        self.beyond = False


class NotFoundError(EdgecascadeError):
    """Something named in a request does not exist here."""


class ModelNotFoundError(NotFoundError):
    """No tier of the chain holds the requested model (or version)."""


class ArtifactNotFoundError(NotFoundError):
    """No TUF metadata file or target blob exists at the requested path."""


class InvalidArgumentError(EdgecascadeError):
    """The request itself is wrong: datatype, shape, size, parameter, encoding."""


class InvalidModelError(InvalidArgumentError):
    """A file offered for publishing is not a valid ONNX model."""


class SignatureMismatchError(InvalidArgumentError):
    """A model's inputs and outputs differ from what was declared for it."""


class CapacityError(EdgecascadeError):
    """The request is valid but this node lacks the capacity to take it now."""


class QueueFullError(CapacityError):
    """A model's queue is full; the request was refused without waiting."""


class MemoryBudgetError(CapacityError):
    """A model does not fit in the node's memory budget."""


class UnavailableError(EdgecascadeError):
    """A dependency is not reachable or not ready; retrying later may succeed."""


class ModelNotReadyError(UnavailableError):
    """The model exists here but is not loaded and ready."""


class UpstreamUnavailableError(UnavailableError):
    """The next tier up could not be reached."""


class CircuitOpenError(UpstreamUnavailableError):
    """The circuit breaker of the upstream is open: the call was not sent (it would only wait for a failure)."""


class DeadlineExceededError(EdgecascadeError):
    """The request's deadline passed before an answer was ready."""


class RequestCancelledError(EdgecascadeError):
    """The caller cancelled the request."""


class IntegrityError(EdgecascadeError):
    """Bytes do not match what was signed or declared (digest, length, signature)."""


class DigestMismatchError(IntegrityError):
    """A downloaded artifact's length or hash differs from its signed target info."""


class MetadataSignatureError(IntegrityError):
    """TUF metadata lacks a threshold of valid signatures from the keys root trusts."""


class PreconditionError(EdgecascadeError):
    """The system is not in a state that allows the operation."""


class ForwardingLoopError(PreconditionError):
    """A request came back to a node that already forwarded it, or was forwarded too many times."""


class StaleVersionError(PreconditionError):
    """A version older than (or equal to) the one already trusted was offered."""


class MetadataExpiredError(PreconditionError):
    """TUF metadata has passed its expiry date; nothing new may be installed from it."""


class DuplicateVariantError(PreconditionError):
    """A model name, version and variant is already in the registry; published variants are immutable."""


class QuantizationGateError(PreconditionError):
    """A variant lost more accuracy against its reference than the quantization gate allows."""


class UnauthenticatedError(EdgecascadeError):
    """The caller did not prove who it is."""


class PermissionDeniedError(EdgecascadeError):
    """The caller is known but not allowed to do this."""


class UnimplementedError(EdgecascadeError):
    """The operation is part of the protocol but not offered by this node."""


class InternalError(EdgecascadeError):
    """A bug or an unexpected failure; details go to the log, not to the caller."""


class ConfigError(EdgecascadeError):
    """A configuration value is missing or invalid; start-up stops."""
