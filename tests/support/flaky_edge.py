"""A flaky edge for tests: a programmable proxy between a device and its real edge, on loopback.

Every call (inference, health …) passes through to the real edge as raw bytes,
untouched, unless the test says otherwise:

* :meth:`FlakyEdge.drop`: every call fails at once with UNAVAILABLE (an edge
  that refuses work); :meth:`FlakyEdge.refuse` with the status code given;
* :meth:`FlakyEdge.delay`: every call waits ``seconds`` before it is forwarded
  (an edge slower than the callers' deadlines);
* :meth:`FlakyEdge.flap`: calls fail with UNAVAILABLE during every other
  ``period_s`` and pass in between (an edge that keeps coming and going);
* :meth:`FlakyEdge.kill` and :meth:`FlakyEdge.revive`: stops listening
  (connections are refused, as when the edge process died) and listens again on
  the same port.

It counts the calls it saw, forwarded and dropped.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from typing import Any

import grpc
from grpc import aio

from tests.support.hostile_edge import relay_raw


class FlakyEdge:
    """The proxy (see the module docstring).

    Args:
        upstream: ``host:port`` of the real edge.
    """

    def __init__(self, upstream: str) -> None:
        self.upstream = upstream
        self.address = ""
        self.port = 0
        self.seen = 0
        self.forwarded = 0
        self.dropped = 0
        self._delay_s = 0.0
        self._drop = False
        self._code = grpc.StatusCode.UNAVAILABLE
        self._flap_s = 0.0
        self._channel: aio.Channel | None = None
        self._server: aio.Server | None = None

    async def start(self) -> str:
        """Listens on a free loopback port (or the one it had, after :meth:`kill`); returns its address."""
        if self._channel is None:
            self._channel = aio.insecure_channel(self.upstream)
        self._server = aio.server()
        self._server.add_generic_rpc_handlers((_Handlers(self),))
        self.port = self._server.add_insecure_port(f"127.0.0.1:{self.port}")
        await self._server.start()
        self.address = f"127.0.0.1:{self.port}"
        return self.address

    async def kill(self) -> None:
        """Stops listening: calls in flight are cut, new connections are refused."""
        if self._server is not None:
            await self._server.stop(0)
            self._server = None

    async def revive(self) -> None:
        """Listens again on the same port, passing calls through."""
        self.honest()
        await self.start()

    async def stop(self) -> None:
        """Stops listening and closes the channel to the real edge."""
        await self.kill()
        if self._channel is not None:
            await self._channel.close()
            self._channel = None

    # -- what to do ------------------------------------------------------------------------------------------

    def honest(self) -> None:
        """Passes every call through at once."""
        self._drop, self._delay_s, self._flap_s = False, 0.0, 0.0
        self._code = grpc.StatusCode.UNAVAILABLE

    def drop(self) -> None:
        """Fails every call at once with UNAVAILABLE."""
        self.honest()
        self._drop = True

    def refuse(self, code: grpc.StatusCode) -> None:
        """Fails every call at once with ``code`` (and no error class of ours)."""
        self.drop()
        self._code = code

    def delay(self, seconds: float) -> None:
        """Holds every call ``seconds`` before forwarding it."""
        self.honest()
        self._delay_s = seconds

    def flap(self, period_s: float) -> None:
        """Fails calls with UNAVAILABLE during every other ``period_s`` seconds, passes them in between."""
        self.honest()
        self._flap_s = period_s

    def _dropping(self) -> bool:
        if self._flap_s:
            return int(time.monotonic() / self._flap_s) % 2 == 0
        return self._drop

    # -- the calls -------------------------------------------------------------------------------------------

    async def forward(
        self, method: str, requests: AsyncIterator[bytes], context: aio.ServicerContext[Any, Any]
    ) -> AsyncIterator[bytes]:
        """Any call, as raw messages in both directions, after the behaviour chosen."""
        self.seen += 1
        if self._dropping():
            self.dropped += 1
            await context.abort(self._code, "the flaky edge dropped the call")
        if self._delay_s:
            await asyncio.sleep(self._delay_s)
        assert self._channel is not None
        self.forwarded += 1
        async for response in relay_raw(self._channel, method, requests, context):
            yield response


class _Handlers(grpc.GenericRpcHandler):
    def __init__(self, edge: FlakyEdge) -> None:
        self._edge = edge

    def service(self, handler_call_details: grpc.HandlerCallDetails) -> grpc.RpcMethodHandler[Any, Any] | None:
        edge = self._edge
        method: str = handler_call_details.method

        async def forward(
            requests: AsyncIterator[bytes], context: aio.ServicerContext[Any, Any]
        ) -> AsyncIterator[bytes]:
            async for response in edge.forward(method, requests, context):
                yield response

        return grpc.stream_stream_rpc_method_handler(forward)
