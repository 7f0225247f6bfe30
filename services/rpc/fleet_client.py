"""A client of ``edgecascade.v1.FleetService``: enrollment and signed check-ins, for devices and edges.

Domain types in and out (:mod:`services.updates.checkin`); the report is
serialized once and exactly those bytes are signed with the node's identity key,
so the region (and no edge in between) can tell who sent it. Failed calls
become domain errors through the status table.
"""

from __future__ import annotations

import logging
import math
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

log = logging.getLogger("edgecascade.updates")

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
            name=m.name,
            version=m.version,
            variant=m.variant,
            state=m.state,
            last_error=m.last_error,
            shadow=m.shadow,
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
    A shadow assignment's share is checked the same way (:func:`_shadow_share`), and a model
    has at most one shadow (the first). A shadow the node could never run is dropped with a
    warning: one of a model without a serving assignment in the same answer (the shadow runs
    only beside a serving version, on its answered requests), or of the serving version itself.

    Raises:
        IntegrityError: More assignments or reasons than any region sends.
    """
    if len(response.assignments) > MAX_ASSIGNMENTS or len(response.unassigned) > MAX_ASSIGNMENTS:
        raise IntegrityError(
            f"the check-in answer holds {len(response.assignments)} assignments and {len(response.unassigned)} "
            f"unassigned models; at most {MAX_ASSIGNMENTS} of each are accepted"
        )
    interval = response.check_interval_s
    assignments: list[AssignedVariant] = []
    shadows: set[str] = set()
    serving: dict[str, set[str]] = {}  # model → its serving versions in this answer
    for a in response.assignments:
        if not a.shadow:
            serving.setdefault(a.name, set()).add(a.version)
    for a in response.assignments:
        share = 0.0  # a serving assignment has none, whatever the answer says
        if a.shadow:
            share = _shadow_share(a)
            if not share or not _runnable_shadow(a, serving.get(a.name, set())):
                continue
            if a.name in shadows:
                log.warning("check-in answer: a second shadow assignment of model %r ignored (one a model)", a.name)
                continue
            shadows.add(a.name)
        grant = KeyGrant(a.grant.key_id, a.grant.ephemeral_public_key, a.grant.salt, a.grant.nonce, a.grant.wrapped_key)
        assignments.append(
            AssignedVariant(a.name, a.version, a.variant, a.target_path, grant, shadow=a.shadow, shadow_share=share)
        )
    return DesiredState(
        assignments=tuple(assignments),
        unassigned=tuple(Unassigned(u.name, u.version, u.reason) for u in response.unassigned),
        check_interval_s=min(max(interval, MIN_CHECK_INTERVAL_S), MAX_CHECK_INTERVAL_S) if interval else 0,
    )


def _runnable_shadow(a: pb.Assignment, serving: set[str]) -> bool:
    """Whether a shadow assignment can ever run beside ``serving`` (the model's serving versions); logs why not."""
    if not serving:
        log.warning(
            "check-in answer: the shadow assignment of model %r version %r ignored: the model has no serving "
            "assignment to run beside",
            a.name,
            a.version,
        )
        return False
    if a.version in serving:
        log.warning(
            "check-in answer: the shadow assignment of model %r version %r ignored: it is the serving version",
            a.name,
            a.version,
        )
        return False
    return True


def _shadow_share(a: pb.Assignment) -> float:
    """A shadow assignment's share, in (0, 1]; 0 (the assignment is ignored) when it is not a positive number.

    Like the interval, the share comes through the untrusted edge: above 1 it is clamped to 1 (the shadow
    runs on every locally answered request, still shed first under load).
    """
    share = a.shadow_share
    if math.isnan(share) or share <= 0:
        log.warning(
            "check-in answer: the shadow assignment of model %r version %r has share %r, not in (0, 1]; ignored",
            a.name,
            a.version,
            share,
        )
        return 0.0
    if share > 1:
        log.warning(
            "check-in answer: the shadow assignment of model %r version %r has share %r; clamped to 1",
            a.name,
            a.version,
            share,
        )
        return 1.0
    return float(share)


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
