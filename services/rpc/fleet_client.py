"""A client of ``edgecascade.v1.FleetService``: enrollment and signed check-ins, for devices and edges.

Domain types in and out (:mod:`services.updates.checkin`); the report is
serialized once and exactly those bytes are signed with the node's identity key,
so the region (and no edge in between) can tell who sent it. Failed calls
become domain errors through the status table.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Sequence

from grpc import aio
from opentelemetry.sdk.trace import TracerProvider

from protos.edgecascade.v1 import fleet_pb2 as pb
from protos.edgecascade.v1 import fleet_pb2_grpc as pb_grpc
from protos.edgecascade.v1 import mesh_pb2
from services.errors import IntegrityError
from services.rpc.channels import open_channel
from services.rpc.status_table import error_from_rpc
from services.updates.checkin import AssignedVariant, DesiredState, InstalledModel, NodeFacts, Unassigned
from services.updates.identity import NodeKeys
from services.updates.key_grants import KeyGrant

TIERS = {"device": mesh_pb2.TIER_DEVICE, "edge": mesh_pb2.TIER_EDGE, "region": mesh_pb2.TIER_REGION}
NONCE_BYTES = 16


def facts_to_proto(facts: NodeFacts) -> pb.NodeFacts:
    """A node's facts as the wire carries them."""
    return pb.NodeFacts(
        node_id=facts.node_id,
        tier=TIERS.get(facts.tier, mesh_pb2.TIER_UNSPECIFIED),
        hardware_class=facts.hardware_class,
        memory_budget_bytes=facts.memory_budget_bytes,
        onnxruntime_version=facts.onnxruntime_version,
        free_disk_bytes=facts.free_disk_bytes,
    )


# Bounds on what a check-in answer may say (it passes through the edge).
MAX_ASSIGNMENTS = 256
MIN_CHECK_INTERVAL_S = 1
MAX_CHECK_INTERVAL_S = 86_400


def installed_to_proto(installed: Sequence[InstalledModel]) -> list[mesh_pb2.InstalledModel]:
    """What a node runs, as it reports it at check-in and in ``GetTierInfo``."""
    return [
        mesh_pb2.InstalledModel(
            name=m.name, version=m.version, variant=m.variant, state=m.state, last_error=m.last_error
        )
        for m in installed
    ]


def signed_report(
    facts: NodeFacts, installed: Sequence[InstalledModel], keys: NodeKeys, now_ms: int, nonce: bytes
) -> pb.CheckInRequest:
    """A check-in: the serialized report and the identity key's signature of exactly those bytes."""
    report = pb.CheckInReport(
        facts=facts_to_proto(facts),
        timestamp_unix_ms=now_ms,
        nonce=nonce,
        installed=installed_to_proto(installed),
    )
    body = report.SerializeToString()
    return pb.CheckInRequest(report=body, signature=keys.sign(body))


def desired_state_from_proto(response: pb.CheckInResponse) -> DesiredState:
    """The region's answer as domain types.

    The answer comes through the edge, which the node does not trust: its size is bounded
    here and the interval is clamped to what a node accepts, so a hostile relay can neither
    flood the node's journal nor stop its check-ins (grants and blobs are verified anyway).

    Raises:
        IntegrityError: More assignments or reasons than any region sends.
    """
    if len(response.assignments) > MAX_ASSIGNMENTS or len(response.unassigned) > MAX_ASSIGNMENTS:
        raise IntegrityError(
            f"the check-in answer holds {len(response.assignments)} assignments and {len(response.unassigned)} "
            f"unassigned models; at most {MAX_ASSIGNMENTS} of each are accepted"
        )
    interval = response.check_interval_s
    return DesiredState(
        assignments=tuple(
            AssignedVariant(
                a.name,
                a.version,
                a.variant,
                a.target_path,
                KeyGrant(
                    a.grant.key_id, a.grant.ephemeral_public_key, a.grant.salt, a.grant.nonce, a.grant.wrapped_key
                ),
            )
            for a in response.assignments
        ),
        unassigned=tuple(Unassigned(u.name, u.version, u.reason) for u in response.unassigned),
        check_interval_s=min(max(interval, MIN_CHECK_INTERVAL_S), MAX_CHECK_INTERVAL_S) if interval else 0,
    )


class FleetClient:
    """Enrolls and checks in with the next tier up (an edge relays to the region).

    Args:
        address: ``host:port`` of the upstream tier.
        tracer_provider: Provider of the calling node, or None.
        max_message_bytes: Message size limit of the channel.
        clock_ms: Milliseconds since the epoch (tests pass a fake one).
    """

    def __init__(
        self,
        address: str,
        tracer_provider: TracerProvider | None,
        max_message_bytes: int,
        clock_ms: Callable[[], int] = lambda: time.time_ns() // 1_000_000,
    ) -> None:
        self._channel = open_channel(address, tracer_provider, max_message_bytes)
        self._stub = pb_grpc.FleetServiceStub(self._channel)
        self._what = f"fleet service at {address}"
        self._clock_ms = clock_ms

    async def close(self) -> None:
        """Closes the channel."""
        await self._channel.close()

    async def enroll(self, token: str, facts: NodeFacts, keys: NodeKeys, timeout: float) -> int:
        """Enrolls this node; returns the check interval the region asks for (0 = none given).

        Raises:
            UnauthenticatedError: The token is wrong, used or expired.
            PermissionDeniedError: The id is enrolled with other keys.
            EdgecascadeError: Any other refusal, or UpstreamUnavailableError.
        """
        request = pb.EnrollRequest(
            token=token,
            facts=facts_to_proto(facts),
            identity_public_key=keys.identity_public,
            agreement_public_key=keys.agreement_public,
        )
        try:
            response = await self._stub.Enroll(request, timeout=timeout)
        except aio.AioRpcError as exc:
            raise error_from_rpc(exc, self._what) from None
        interval = int(response.check_interval_s)  # through the edge: clamped like a check-in answer's
        return min(max(interval, MIN_CHECK_INTERVAL_S), MAX_CHECK_INTERVAL_S) if interval else 0

    async def check_in(
        self, facts: NodeFacts, installed: Sequence[InstalledModel], keys: NodeKeys, timeout: float
    ) -> DesiredState:
        """Reports, signed, and returns the desired state.

        Raises:
            UnauthenticatedError: The region does not know this node (or refused the signature).
            EdgecascadeError: Any other refusal, or UpstreamUnavailableError.
        """
        request = signed_report(facts, installed, keys, self._clock_ms(), os.urandom(NONCE_BYTES))
        try:
            response = await self._stub.CheckIn(request, timeout=timeout)
        except aio.AioRpcError as exc:
            raise error_from_rpc(exc, self._what) from None
        return desired_state_from_proto(response)
