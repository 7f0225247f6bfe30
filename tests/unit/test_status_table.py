"""One table maps the error tree to gRPC status codes, both ways."""

from __future__ import annotations

import inspect

import grpc
import pytest

from services import errors
from services.rpc.status_table import STATUS_TABLE, error_from_rpc, error_from_status, status_for

ERROR_CLASSES = [
    cls
    for _, cls in inspect.getmembers(errors, inspect.isclass)
    if issubclass(cls, errors.EdgecascadeError) and cls is not errors.EdgecascadeError
]

EXPECTED = {
    errors.ModelNotFoundError: grpc.StatusCode.NOT_FOUND,
    errors.InvalidArgumentError: grpc.StatusCode.INVALID_ARGUMENT,
    errors.CapacityError: grpc.StatusCode.RESOURCE_EXHAUSTED,
    errors.ModelNotReadyError: grpc.StatusCode.UNAVAILABLE,
    errors.UpstreamUnavailableError: grpc.StatusCode.UNAVAILABLE,
    errors.DeadlineExceededError: grpc.StatusCode.DEADLINE_EXCEEDED,
    errors.RequestCancelledError: grpc.StatusCode.CANCELLED,
    errors.IntegrityError: grpc.StatusCode.DATA_LOSS,
    errors.StaleVersionError: grpc.StatusCode.FAILED_PRECONDITION,
    errors.UnauthenticatedError: grpc.StatusCode.UNAUTHENTICATED,
    errors.PermissionDeniedError: grpc.StatusCode.PERMISSION_DENIED,
}


def test_every_error_class_has_a_row() -> None:
    assert len(ERROR_CLASSES) >= 15
    for cls in ERROR_CLASSES:
        assert cls.__name__.endswith("Error")
        assert any(issubclass(cls, row) for row, _ in STATUS_TABLE), f"{cls.__name__} has no status"


@pytest.mark.parametrize(("cls", "code"), list(EXPECTED.items()), ids=lambda v: getattr(v, "__name__", str(v)))
def test_design_mapping(cls: type[errors.EdgecascadeError], code: grpc.StatusCode) -> None:
    assert status_for(cls("x")) == code


@pytest.mark.parametrize("code", [c for c in grpc.StatusCode if c != grpc.StatusCode.OK])
def test_every_status_maps_back_to_a_domain_error(code: grpc.StatusCode) -> None:
    error = error_from_status(code, "peer said so", None, "upstream 127.0.0.1:1")
    assert isinstance(error, errors.EdgecascadeError)
    assert error.message


def test_round_trip_keeps_class_family_and_message() -> None:
    back = error_from_status(grpc.StatusCode.NOT_FOUND, "model 'm' is not here", None, "upstream")
    assert isinstance(back, errors.NotFoundError)
    assert back.message == "model 'm' is not here"
    unavailable = error_from_status(
        grpc.StatusCode.UNAVAILABLE, "failed to connect to all addresses", None, "upstream 127.0.0.1:9"
    )
    assert isinstance(unavailable, errors.UpstreamUnavailableError)
    assert unavailable.message == "upstream 127.0.0.1:9 is unavailable"


def test_a_peer_named_class_survives_the_hop() -> None:
    trailing = [("edgecascade-error", "ModelNotReadyError")]
    back = error_from_status(grpc.StatusCode.UNAVAILABLE, "model 'm' failed its warm-up run", trailing, "upstream")
    assert type(back) is errors.ModelNotReadyError
    assert back.message == "model 'm' failed its warm-up run"
    # A class name that does not fit the status is ignored, not trusted.
    forged = [("edgecascade-error", "ModelNotFoundError")]
    assert (
        type(error_from_status(grpc.StatusCode.UNAVAILABLE, "x", forged, "upstream")) is errors.UpstreamUnavailableError
    )


async def test_a_real_failed_call_of_either_api_maps_through_the_same_table() -> None:
    # Nothing listens on this port: both APIs fail with UNAVAILABLE, a transport failure.
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    from protos.inference import grpc_service_pb2 as pb
    from protos.inference import grpc_service_pb2_grpc as pb_grpc

    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        with pytest.raises(grpc.aio.AioRpcError) as aio_failure:
            await pb_grpc.GRPCInferenceServiceStub(channel).ServerLive(pb.ServerLiveRequest(), timeout=2)
    with grpc.insecure_channel(f"127.0.0.1:{port}") as blocking, pytest.raises(grpc.RpcError) as sync_failure:
        pb_grpc.GRPCInferenceServiceStub(blocking).ServerLive(pb.ServerLiveRequest(), timeout=2)
    for failure in (aio_failure.value, sync_failure.value):
        back = error_from_rpc(failure, f"upstream 127.0.0.1:{port}")
        assert type(back) is errors.UpstreamUnavailableError
        assert back.message == f"upstream 127.0.0.1:{port} is unavailable"


class _LeavingContext:
    """A servicer context whose caller leaves while the status is being sent (gRPC then fails the send)."""

    def __init__(self, left: bool) -> None:
        self.left = left
        self.checks = 0

    def done(self) -> bool:
        # Still there at the first check; gone by the time the send failed (when ``left``).
        self.checks += 1
        return self.left and self.checks > 1

    async def abort(self, code: grpc.StatusCode, details: str = "", trailing_metadata: object = ()) -> None:
        raise RuntimeError("execute_batch failed")  # what grpc's ExecuteBatchError looks like from here


async def test_a_caller_that_leaves_while_its_error_is_sent_is_not_a_servicer_failure() -> None:
    from services.rpc.status_table import abort_for

    # Under overload a caller's 50 ms deadline passes between the done() check and the send: before the fix,
    # gRPC's send failure escaped and was logged with a traceback per call (and a bench node blocked on its log).
    await abort_for(_LeavingContext(left=True), errors.DeadlineExceededError("late"), "/m")  # type: ignore[arg-type]
    with pytest.raises(RuntimeError):  # a send that fails while the caller is still there is a real failure
        await abort_for(_LeavingContext(left=False), errors.DeadlineExceededError("late"), "/m")  # type: ignore[arg-type]


class _RecordingContext:
    """A servicer context that records the status it was asked to send."""

    def __init__(self) -> None:
        self.sent: tuple[grpc.StatusCode, str, tuple[tuple[str, str], ...]] | None = None

    def done(self) -> bool:
        return False

    async def abort(
        self, code: grpc.StatusCode, details: str = "", trailing_metadata: tuple[tuple[str, str], ...] = ()
    ) -> None:
        self.sent = (code, details, tuple(trailing_metadata))


async def test_an_error_relayed_from_the_upstream_call_is_flagged_as_beyond_the_sender() -> None:
    from services.rpc.status_table import BEYOND_KEY, abort_for

    own = _RecordingContext()
    await abort_for(own, errors.ModelNotReadyError("model 'm' failed to load"), "/m")  # type: ignore[arg-type]
    assert own.sent is not None
    back = error_from_status(own.sent[0], own.sent[1], own.sent[2], "upstream")
    assert type(back) is errors.ModelNotReadyError and back.from_peer and not back.beyond

    relayed = errors.QueueFullError("the region's queue of 'm' is full")
    relayed.relayed = True  # what the guarded upstream marks on an error of its call
    through = _RecordingContext()
    await abort_for(through, relayed, "/m")  # type: ignore[arg-type]
    assert through.sent is not None and (BEYOND_KEY, "1") in through.sent[2]
    back = error_from_status(through.sent[0], through.sent[1], through.sent[2], "upstream")
    assert type(back) is errors.QueueFullError and back.from_peer and back.beyond
