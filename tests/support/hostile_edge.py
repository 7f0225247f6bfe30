"""A hostile edge for tests: a gRPC man in the middle between a device and its real edge, on loopback.

The device takes it for its upstream. Every call passes through to the real
edge as raw bytes (inference, health, enrollment …) except two, which it can
tamper with on demand:

* ``ArtifactService.Fetch``: a rule chosen by path decides what the device gets
  — the real edge's answer untouched, or anything built from it or instead of
  it (another blob, endless bytes, a trickle, older or foreign metadata, a stall).
  Every transfer is recorded: path, requested offset, bytes sent, how it ended.
* ``FleetService.CheckIn``: the region's answer (unsigned; the edge relays it)
  can be rewritten before the device sees it.

It holds no keys: what it serves instead of the real thing is made up, or
handed to it by the test as what an attacker could have (files kept from an
earlier day, another registry, a root signed with one stolen root key, the key
grant another node received).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
from grpc import aio

from protos.edgecascade.v1 import artifacts_pb2 as pb
from protos.edgecascade.v1 import artifacts_pb2_grpc as pb_grpc
from protos.edgecascade.v1 import fleet_pb2

FETCH = "/edgecascade.v1.ArtifactService/Fetch"
CHECK_IN = "/edgecascade.v1.FleetService/CheckIn"
CHUNK = 4096

Genuine = Callable[[], AsyncIterator[pb.FetchResponse]]
"""The real edge's answer to the request being tampered with (opened when called)."""

Tamper = Callable[[pb.FetchRequest, Genuine], AsyncIterator[pb.FetchResponse]]
"""What the device gets for one Fetch, given the request and the real edge's answer."""

Rewrite = Callable[[fleet_pb2.CheckInResponse], None]


class RefusedError(Exception):
    """Raised by a tamper to end the call with a status (e.g. NOT_FOUND for a file it will not serve)."""

    def __init__(self, code: grpc.StatusCode, details: str) -> None:
        super().__init__(details)
        self.code = code
        self.details = details


@dataclass
class Transfer:
    """One Fetch the device made through the hostile edge."""

    path: str
    offset: int
    sent: int = 0
    ended: str = ""  # "complete", "cancelled", or the status code's name
    done: asyncio.Event = field(default_factory=asyncio.Event)


def _chunks(data: bytes, offset: int, size: int = CHUNK) -> list[pb.FetchResponse]:
    return [
        pb.FetchResponse(data=data[at : at + size], offset=at, total_length=len(data))
        for at in range(offset, len(data), size)
    ]


async def _rechunked(genuine: Genuine, size: int) -> AsyncIterator[pb.FetchResponse]:
    async for response in genuine():
        for at in range(0, len(response.data), size):
            yield pb.FetchResponse(
                data=response.data[at : at + size], offset=response.offset + at, total_length=response.total_length
            )


def serve(data: bytes | None) -> Tamper:
    """Serves ``data`` in place of the file (NOT_FOUND for None), from the requested offset."""

    async def tamper(request: pb.FetchRequest, genuine: Genuine) -> AsyncIterator[pb.FetchResponse]:
        if data is None:
            raise RefusedError(grpc.StatusCode.NOT_FOUND, f"no artifact at {request.path}")
        for response in _chunks(data, request.offset):
            yield response

    return tamper


def serve_from(repository: Path) -> Tamper:
    """Serves the files of another TUF repository directory at the same paths (NOT_FOUND where it has none)."""

    async def tamper(request: pb.FetchRequest, genuine: Genuine) -> AsyncIterator[pb.FetchResponse]:
        file = repository / request.path
        async for response in serve(file.read_bytes() if file.is_file() else None)(request, genuine):
            yield response

    return tamper


def then_endless(filler: bytes = b"\0" * CHUNK) -> Tamper:
    """The genuine file, then ``filler`` again and again, each chunk at its right offset: it never ends."""

    async def tamper(request: pb.FetchRequest, genuine: Genuine) -> AsyncIterator[pb.FetchResponse]:
        offset = request.offset
        async for response in genuine():
            offset = response.offset + len(response.data)
            yield response
        while True:
            yield pb.FetchResponse(data=filler, offset=offset, total_length=0)
            offset += len(filler)
            await asyncio.sleep(0)  # the loop stays free for the real nodes in this process

    return tamper


def trickle(every_s: float, size: int = 64) -> Tamper:
    """The genuine bytes, ``size`` at a time, one piece every ``every_s`` seconds: correct, and far too slow."""

    async def tamper(request: pb.FetchRequest, genuine: Genuine) -> AsyncIterator[pb.FetchResponse]:
        async for response in _rechunked(genuine, size):
            yield response
            await asyncio.sleep(every_s)

    return tamper


def stall_after(limit: int, size: int = CHUNK) -> Tamper:
    """The genuine bytes in ``size`` pieces until ``limit`` or more were sent, then nothing, until the caller leaves."""

    async def tamper(request: pb.FetchRequest, genuine: Genuine) -> AsyncIterator[pb.FetchResponse]:
        sent = 0
        async for response in _rechunked(genuine, size):
            yield response
            sent += len(response.data)
            if sent >= limit:
                await asyncio.Event().wait()

    return tamper


def cut_after(limit: int, size: int = CHUNK) -> Tamper:
    """The genuine bytes in ``size`` pieces until ``limit`` or more were sent, then UNAVAILABLE (a dropped transfer)."""

    async def tamper(request: pb.FetchRequest, genuine: Genuine) -> AsyncIterator[pb.FetchResponse]:
        sent = 0
        async for response in _rechunked(genuine, size):
            yield response
            sent += len(response.data)
            if sent >= limit:
                raise RefusedError(grpc.StatusCode.UNAVAILABLE, "the edge dropped the transfer")

    return tamper


def rechunk(size: int) -> Tamper:
    """The genuine file, untouched, in pieces of ``size`` bytes."""

    async def tamper(request: pb.FetchRequest, genuine: Genuine) -> AsyncIterator[pb.FetchResponse]:
        async for response in _rechunked(genuine, size):
            yield response

    return tamper


def _forwarded(context: aio.ServicerContext[Any, Any]) -> tuple[tuple[str, str | bytes], ...]:
    # gRPC sets its own transport headers on the next hop.
    return tuple(
        (key, value)
        for key, value in context.invocation_metadata() or ()
        if not key.startswith((":", "grpc-")) and key != "user-agent"
    )


async def relay_raw(
    channel: aio.Channel, method: str, requests: AsyncIterator[bytes], context: aio.ServicerContext[Any, Any]
) -> AsyncIterator[bytes]:
    """Passes one call of any kind through to ``channel`` as raw messages, with the caller's metadata and deadline;
    the real edge's failure reaches the caller with its status, details and trailing metadata (test proxies' core)."""
    method_call: aio.StreamStreamMultiCallable[bytes, bytes] = channel.stream_stream(method)
    call = method_call(requests, metadata=_forwarded(context), timeout=context.time_remaining())
    try:
        async for response in call:
            yield response
    except aio.AioRpcError as exc:
        await context.abort(exc.code(), exc.details() or "", tuple(exc.trailing_metadata() or ()))
    finally:
        call.cancel()


class HostileEdge:
    """The man in the middle (see the module docstring).

    Args:
        upstream: ``host:port`` of the real edge.
    """

    def __init__(self, upstream: str) -> None:
        self.upstream = upstream
        self.address = ""
        self.transfers: list[Transfer] = []
        self._rules: list[tuple[Callable[[str], bool], Tamper]] = []
        self._rewrites: list[Rewrite] = []
        self._channel: aio.Channel | None = None
        self._server: aio.Server | None = None

    async def start(self) -> str:
        """Listens on a free loopback port; returns its address."""
        self._channel = aio.insecure_channel(self.upstream)
        self._server = aio.server()
        self._server.add_generic_rpc_handlers((_Handlers(self),))
        port = self._server.add_insecure_port("127.0.0.1:0")
        await self._server.start()
        self.address = f"127.0.0.1:{port}"
        return self.address

    async def stop(self) -> None:
        """Stops listening (calls in flight are cancelled) and closes the channel to the real edge."""
        if self._server is not None:
            await self._server.stop(0)
        if self._channel is not None:
            await self._channel.close()

    # -- what to do ------------------------------------------------------------------------------------------

    def on_fetch(self, match: str | Callable[[str], bool], tamper: Tamper) -> None:
        """Tampers with every Fetch of a path (or of paths ``match`` accepts); the latest matching rule wins."""
        test = (lambda path: path == match) if isinstance(match, str) else match
        self._rules.insert(0, (test, tamper))

    def rewrite_check_ins(self, rewrite: Rewrite) -> None:
        """Rewrites every check-in answer before the device sees it (after the rewrites given earlier)."""
        self._rewrites.append(rewrite)

    def honest(self) -> None:
        """Stops tampering with artifacts (check-in rewrites stay)."""
        self._rules.clear()

    def transfers_of(self, path: str) -> list[Transfer]:
        """The Fetches of one path so far, oldest first."""
        return [t for t in self.transfers if t.path == path]

    # -- the calls -------------------------------------------------------------------------------------------

    def _tamper_for(self, path: str) -> Tamper | None:
        return next((tamper for test, tamper in self._rules if test(path)), None)

    async def fetch(
        self, request: pb.FetchRequest, context: aio.ServicerContext[Any, Any]
    ) -> AsyncIterator[pb.FetchResponse]:
        transfer = Transfer(request.path, request.offset)
        self.transfers.append(transfer)
        assert self._channel is not None
        stub = pb_grpc.ArtifactServiceStub(self._channel)

        async def genuine() -> AsyncIterator[pb.FetchResponse]:
            call = stub.Fetch(request, timeout=context.time_remaining())
            try:
                async for response in call:
                    yield response
            finally:
                call.cancel()  # a tamper that stops reading must not leave the real edge sending

        tamper = self._tamper_for(request.path)
        try:
            async for response in (tamper or (lambda r, g: g()))(request, genuine):
                transfer.sent += len(response.data)
                yield response
            transfer.ended = "complete"
        except aio.AioRpcError as exc:  # the real edge refused: the device gets its status and trailers
            transfer.ended = exc.code().name
            await context.abort(exc.code(), exc.details() or "", tuple(exc.trailing_metadata() or ()))
        except RefusedError as refusal:
            transfer.ended = refusal.code.name
            await context.abort(refusal.code, refusal.details)
        except (asyncio.CancelledError, GeneratorExit):  # the device hung up, while we waited or while we sent
            transfer.ended = "cancelled"
            raise
        finally:
            transfer.done.set()

    async def check_in(self, request: bytes, context: aio.ServicerContext[Any, Any]) -> bytes:
        assert self._channel is not None
        call: aio.UnaryUnaryMultiCallable[bytes, bytes] = self._channel.unary_unary(CHECK_IN)
        try:
            answer = await call(request, metadata=_forwarded(context), timeout=context.time_remaining())
        except aio.AioRpcError as exc:
            await context.abort(exc.code(), exc.details() or "", tuple(exc.trailing_metadata() or ()))
        if not self._rewrites:
            return answer
        response = fleet_pb2.CheckInResponse.FromString(answer)
        for rewrite in self._rewrites:
            rewrite(response)
        rewritten: bytes = response.SerializeToString()
        return rewritten

    async def forward(
        self, method: str, requests: AsyncIterator[bytes], context: aio.ServicerContext[Any, Any]
    ) -> AsyncIterator[bytes]:
        """Any other call, as raw messages in both directions (the same bytes on the wire whatever its kind)."""
        assert self._channel is not None
        async for response in relay_raw(self._channel, method, requests, context):
            yield response


class _Handlers(grpc.GenericRpcHandler):
    def __init__(self, edge: HostileEdge) -> None:
        self._edge = edge

    def service(self, handler_call_details: grpc.HandlerCallDetails) -> grpc.RpcMethodHandler[Any, Any] | None:
        edge = self._edge
        method: str = handler_call_details.method
        if method == FETCH:
            return grpc.unary_stream_rpc_method_handler(
                edge.fetch, pb.FetchRequest.FromString, pb.FetchResponse.SerializeToString
            )
        if method == CHECK_IN:
            return grpc.unary_unary_rpc_method_handler(edge.check_in)

        async def forward(
            requests: AsyncIterator[bytes], context: aio.ServicerContext[Any, Any]
        ) -> AsyncIterator[bytes]:
            async for response in edge.forward(method, requests, context):
                yield response

        return grpc.stream_stream_rpc_method_handler(forward)
