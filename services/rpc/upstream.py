"""The gRPC adapter of the data plane's :class:`~services.dataplane.Upstream` port.

It forwards the caller's own protobuf message, untouched, to the next tier with
the remaining deadline and the forwarding route, and marks what comes back with
this node's ``edgecascade.fallback_reason`` and ``edgecascade.route``.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from typing import Any

from services.dataplane import InferCall, ModelQuery, Relayed
from services.inference import FallbackReason, NodeIdentity
from services.rpc import converters
from services.rpc.inference_client import InferenceClient


class GrpcUpstream:
    """Forwards calls to the next tier over one :class:`InferenceClient`.

    Args:
        client: The channel to the next tier.
        identity: This node, named on every answer it relays.
    """

    def __init__(self, client: InferenceClient, identity: NodeIdentity) -> None:
        self._client = client
        self._identity = identity

    def available(self) -> bool:
        """Always True: there is a next tier (whether it answers is for the call to find out)."""
        return True

    async def infer(self, call: InferCall, reason: FallbackReason, timeout: float, route: Sequence[str]) -> Relayed:
        """Forwards ModelInfer and marks the answer as forwarded here."""
        response = await self._client.model_infer(call.wire, timeout, route)
        converters.mark_forwarded(response, reason, self._identity)
        return Relayed(response, reason)

    async def stream(
        self, call: InferCall, reason: FallbackReason, timeout: float, route: Sequence[str]
    ) -> AsyncIterator[Relayed]:
        """Forwards one request over ModelStreamInfer; every answer on it is marked as forwarded here."""
        async for response in self._client.model_stream_infer(call.wire, timeout, route):
            if response.HasField("infer_response"):
                converters.mark_forwarded(response.infer_response, reason, self._identity)
            yield Relayed(response, reason)

    async def query(self, query: ModelQuery, wire: Any, timeout: float, route: Sequence[str]) -> Any:
        """Forwards ModelReady, ModelMetadata or ModelConfig and returns the answer as it came."""
        if query is ModelQuery.READY:
            return await self._client.model_ready(wire, timeout, route)
        if query is ModelQuery.METADATA:
            return await self._client.model_metadata(wire, timeout, route)
        return await self._client.model_config(wire, timeout, route)

    async def close(self) -> None:
        """Closes the channel; calls in flight are cancelled."""
        await self._client.close()
