"""An Open Inference Protocol client for the next tier up.

Every failed call is turned back into a domain error through the status table,
so the data plane and the servicers never handle ``grpc`` errors themselves.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Sequence
from typing import TypeVar

from grpc import aio
from opentelemetry.sdk.trace import TracerProvider

from protos.inference import grpc_service_pb2 as pb
from protos.inference import grpc_service_pb2_grpc as pb_grpc
from services.rpc.channels import open_channel
from services.rpc.status_table import error_from_rpc

R = TypeVar("R")

# Invocation metadata naming the nodes that forwarded a request so far, nearest
# the client first (`tier0:device-1 > tier1:edge-1`), so a node can refuse a loop.
ROUTE_HEADER = "edgecascade-route"
_ROUTE_SEPARATOR = " > "


def route_from_metadata(metadata: Iterable[tuple[str, str | bytes]] | None) -> tuple[str, ...]:
    """Reads the forwarding route a request arrived with (empty from a client)."""
    for key, value in metadata or ():
        if key == ROUTE_HEADER and isinstance(value, str):
            return tuple(hop.strip() for hop in value.split(_ROUTE_SEPARATOR) if hop.strip())
    return ()


def _route_metadata(route: Sequence[str]) -> tuple[tuple[str, str], ...]:
    return ((ROUTE_HEADER, _ROUTE_SEPARATOR.join(route)),) if route else ()


class InferenceClient:
    """Calls one upstream tier.

    Args:
        address: ``host:port`` of the upstream tier.
        tracer_provider: Provider of the calling node (trace context is propagated).
        max_message_bytes: Message size limit of the channel.
    """

    def __init__(self, address: str, tracer_provider: TracerProvider | None, max_message_bytes: int) -> None:
        self.address = address
        self._channel = open_channel(address, tracer_provider, max_message_bytes)
        self._stub = pb_grpc.GRPCInferenceServiceStub(self._channel)
        self._what = f"upstream {address}"

    async def close(self) -> None:
        """Closes the channel; calls in flight are cancelled."""
        await self._channel.close()

    async def _unary(
        self, method: Callable[..., Awaitable[R]], request: object, timeout: float, route: Sequence[str]
    ) -> R:
        try:
            return await method(request, timeout=timeout, metadata=_route_metadata(route))
        except aio.AioRpcError as exc:
            raise error_from_rpc(exc, self._what) from None

    async def model_infer(
        self, request: pb.ModelInferRequest, timeout: float, route: Sequence[str] = ()
    ) -> pb.ModelInferResponse:
        """Forwards ModelInfer.

        Args:
            request: The request, untouched.
            timeout: Seconds left of the request's deadline.
            route: The nodes that forwarded it so far, this one last (sent as :data:`ROUTE_HEADER`).

        Raises:
            EdgecascadeError: The domain error for the upstream's status.
        """
        return await self._unary(self._stub.ModelInfer, request, timeout, route)

    async def model_stream_infer(
        self, request: pb.ModelInferRequest, timeout: float, route: Sequence[str] = ()
    ) -> AsyncIterator[pb.ModelStreamInferResponse]:
        """Forwards one request over ModelStreamInfer and yields every response until the upstream ends the stream.

        Raises:
            EdgecascadeError: The domain error for the upstream's status.
        """

        async def one() -> AsyncIterator[pb.ModelInferRequest]:
            yield request

        call = self._stub.ModelStreamInfer(one(), timeout=timeout, metadata=_route_metadata(route))
        try:
            async for response in call:
                yield response
        except aio.AioRpcError as exc:
            raise error_from_rpc(exc, self._what) from None
        finally:
            call.cancel()

    async def model_ready(
        self, request: pb.ModelReadyRequest, timeout: float, route: Sequence[str] = ()
    ) -> pb.ModelReadyResponse:
        """Forwards ModelReady (same error mapping as :meth:`model_infer`)."""
        return await self._unary(self._stub.ModelReady, request, timeout, route)

    async def model_metadata(
        self, request: pb.ModelMetadataRequest, timeout: float, route: Sequence[str] = ()
    ) -> pb.ModelMetadataResponse:
        """Forwards ModelMetadata (same error mapping as :meth:`model_infer`)."""
        return await self._unary(self._stub.ModelMetadata, request, timeout, route)

    async def model_config(
        self, request: pb.ModelConfigRequest, timeout: float, route: Sequence[str] = ()
    ) -> pb.ModelConfigResponse:
        """Forwards ModelConfig (same error mapping as :meth:`model_infer`)."""
        return await self._unary(self._stub.ModelConfig, request, timeout, route)
