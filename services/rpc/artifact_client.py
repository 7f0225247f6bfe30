"""A synchronous client of the artifact service: the :class:`~services.updates.tuf_client.ArtifactSource` over gRPC.

python-tuf's ngclient is synchronous, so its fetcher runs in worker threads;
this client uses gRPC's blocking channel there instead of reaching back into
the event loop. Failed calls become domain errors through the status table
(NOT_FOUND → ``ArtifactNotFoundError``, which the fetcher turns into the 404
ngclient expects). Every chunk must sit at the next byte expected (the
requested offset plus what arrived before); one that does not ends the
transfer with an ``IntegrityError`` before its bytes reach the caller.
"""

from __future__ import annotations

from collections.abc import Iterator

import grpc

from protos.edgecascade.v1 import artifacts_pb2 as pb
from protos.edgecascade.v1 import artifacts_pb2_grpc as pb_grpc
from services.errors import ArtifactNotFoundError, EdgecascadeError, IntegrityError, NotFoundError
from services.rpc.channels import RECONNECT_BACKOFF_MS
from services.rpc.status_table import error_from_rpc


class GrpcArtifactSource:
    """Streams repository files from one tier's artifact service.

    Args:
        address: ``host:port`` of the region or an edge.
        max_message_bytes: Largest message received.
        timeout_s: Deadline of one file's transfer.
    """

    def __init__(self, address: str, max_message_bytes: int = 64 * 1024 * 1024, timeout_s: float = 300.0) -> None:
        self.address = address
        self._timeout = timeout_s
        self._channel = grpc.insecure_channel(
            address,
            options=[
                ("grpc.max_receive_message_length", max_message_bytes),
                ("grpc.max_send_message_length", max_message_bytes),
                ("grpc.enable_retries", 0),
                ("grpc.initial_reconnect_backoff_ms", RECONNECT_BACKOFF_MS[0]),
                ("grpc.max_reconnect_backoff_ms", RECONNECT_BACKOFF_MS[1]),
            ],
        )
        self._stub = pb_grpc.ArtifactServiceStub(self._channel)
        self._what = f"artifact service {address}"

    def close(self) -> None:
        """Closes the channel."""
        self._channel.close()

    def fetch(self, path: str, offset: int = 0) -> Iterator[bytes]:
        """Yields the file's bytes from ``offset``.

        Raises:
            ArtifactNotFoundError: Nothing exists at the path.
            IntegrityError: A chunk is not at the next expected offset (a resumed
                file would be corrupted by it); its bytes are not yielded.
            EdgecascadeError: The domain error for any other failed status.
        """
        call = self._stub.Fetch(pb.FetchRequest(path=path, offset=offset), timeout=self._timeout)
        expected = offset
        try:
            for response in call:
                if response.offset != expected:
                    raise IntegrityError(
                        f"{self._what} sent bytes of {path} at offset {response.offset}, expected {expected}; "
                        "the transfer was stopped"
                    )
                expected += len(response.data)
                yield response.data
        except grpc.RpcError as exc:
            raise _domain_error(exc, self._what) from None
        finally:
            call.cancel()


def _domain_error(exc: grpc.RpcError, what: str) -> EdgecascadeError:
    error = error_from_rpc(exc, what)
    if isinstance(error, NotFoundError) and not isinstance(error, ArtifactNotFoundError):
        # Any NOT_FOUND from the artifact service means "no such file".
        return ArtifactNotFoundError(error.message)
    return error
