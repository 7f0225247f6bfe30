"""The edge relays its devices' enrollment and check-ins to the region, unchanged.

The edge cannot read or forge what it relays in any way that matters: a
check-in is signed by the device's identity key over the exact report bytes,
and the key grants in the answer open only for that device. The call goes up
with the caller's remaining deadline; the region's refusal comes back with its
own status and message.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from grpc import aio

from protos.edgecascade.v1 import fleet_pb2 as pb
from protos.edgecascade.v1 import fleet_pb2_grpc as pb_grpc
from services.errors import DeadlineExceededError
from services.rpc.channels import open_channel
from services.rpc.components import NodeContext
from services.rpc.server import ServiceBinding
from services.rpc.status_table import error_from_rpc

FLEET_SERVICE = pb.DESCRIPTOR.services_by_name["FleetService"].full_name
# A caller without a deadline still gets an answer in bounded time.
DEFAULT_RELAY_TIMEOUT_S = 30.0

Context = aio.ServicerContext[Any, Any]


class _Relay(pb_grpc.FleetServiceServicer):
    def __init__(self, stub: pb_grpc.FleetServiceStub, what: str) -> None:
        self._stub = stub
        self._what = what

    @staticmethod
    def _timeout(context: Context) -> float:
        remaining = context.time_remaining()
        if remaining is not None and remaining <= 0:
            raise DeadlineExceededError("deadline passed before the call could be relayed to the region")
        return DEFAULT_RELAY_TIMEOUT_S if remaining is None else min(remaining, DEFAULT_RELAY_TIMEOUT_S)

    async def Enroll(self, request: pb.EnrollRequest, context: Context) -> pb.EnrollResponse:
        try:
            response: pb.EnrollResponse = await self._stub.Enroll(request, timeout=self._timeout(context))
        except aio.AioRpcError as exc:
            raise error_from_rpc(exc, self._what) from None
        return response

    async def CheckIn(self, request: pb.CheckInRequest, context: Context) -> pb.CheckInResponse:
        try:
            response: pb.CheckInResponse = await self._stub.CheckIn(request, timeout=self._timeout(context))
        except aio.AioRpcError as exc:
            raise error_from_rpc(exc, self._what) from None
        return response


class FleetRelayService:
    """Serves FleetService on the edge by relaying to the region (its upstream).

    Args:
        context: The node's context (without an upstream it relays nothing).
    """

    def __init__(self, context: NodeContext) -> None:
        config = context.config
        self._channel: aio.Channel | None = None
        self._relay: _Relay | None = None
        if not config.upstream.address:
            return
        self._channel = open_channel(config.upstream.address, context.tracer_provider, config.server.max_message_bytes)
        self._relay = _Relay(pb_grpc.FleetServiceStub(self._channel), f"the region at {config.upstream.address}")

    @property
    def bindings(self) -> Sequence[ServiceBinding]:
        """FleetService, when there is a region to relay to."""
        relay = self._relay
        if relay is None:
            return []
        return [ServiceBinding(FLEET_SERVICE, lambda s: pb_grpc.add_FleetServiceServicer_to_server(relay, s))]

    async def start(self) -> None:
        """Nothing to start: calls are relayed as they come."""

    async def stop(self) -> None:
        """Closes the channel to the region."""
        if self._channel is not None:
            await self._channel.close()
