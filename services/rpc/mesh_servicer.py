"""The ``edgecascade.v1.MeshService`` servicer: who this node is and what it holds.

A part of the node (a tier's component) adds what it holds to the answer by
having a ``tier_info(response)`` method (:class:`TierInfoContributor`); the
node passes its parts, and those that have one are asked at each call. This
servicer names no tier.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol, runtime_checkable

from grpc import aio

from protos.edgecascade.v1 import mesh_pb2 as pb
from protos.edgecascade.v1 import mesh_pb2_grpc as pb_grpc
from services import __version__
from services.dataplane import Dataplane
from services.rpc.guarded_upstream import GuardedUpstream

TIERS = {"tier0": pb.TIER_DEVICE, "tier1": pb.TIER_EDGE, "tier2": pb.TIER_REGION}


@runtime_checkable
class TierInfoContributor(Protocol):
    """A part of the node that adds to ``GetTierInfo``."""

    def tier_info(self, response: pb.GetTierInfoResponse) -> None:
        """Sets its own fields of ``response`` (quickly, on the event loop; it must not raise)."""
        ...


class MeshServicer(pb_grpc.MeshServiceServicer):
    """Serves the mesh control plane of one node.

    Args:
        dataplane: The node's data plane (identity and models).
        upstream: ``host:port`` of the next tier, empty at the top.
        parts: The node's parts (read at each call, so the node may add them after building this); each
            that is a :class:`TierInfoContributor` adds its own fields to the answer, in order.
    """

    def __init__(self, dataplane: Dataplane, upstream: str, parts: Sequence[object] = ()) -> None:
        self._dp = dataplane
        self._upstream = upstream
        self._parts = parts

    async def GetTierInfo(
        self, request: pb.GetTierInfoRequest, context: aio.ServicerContext[object, object]
    ) -> pb.GetTierInfoResponse:
        identity = self._dp.identity
        cache = self._dp.cache
        loaded = {(m.name, m.version): m for m in cache.loaded()}
        models = []
        for row in cache.index():
            held = pb.HeldModel(name=row.name, version=row.version, state=row.state.value, reason=row.reason)
            model = loaded.get((row.name, row.version))
            if model is not None:
                held.footprint_bytes = model.footprint_bytes
                held.footprint_measured = model.measured
                held.queue_depth = model.batcher.queue_depth
                held.shed.update(model.stats.shed)
            models.append(held)
        stats = cache.stats
        response = pb.GetTierInfoResponse(
            tier=TIERS.get(identity.tier, pb.TIER_UNSPECIFIED),
            tier_name=identity.tier,
            node_id=identity.node_id,
            version=__version__,
            upstream=self._upstream,
            models=models,
            cache=pb.CacheStatus(
                budget_bytes=cache.budget,
                used_bytes=cache.used_bytes,
                hits=stats.hits,
                misses=stats.misses,
                loads=stats.loads,
                evictions=stats.evictions,
                refusals=stats.refusals,
            ),
        )
        guarded = self._dp.upstream
        if isinstance(guarded, GuardedUpstream):
            u = guarded.status()
            response.upstream_status.CopyFrom(
                pb.UpstreamStatus(
                    address=u.address,
                    breaker_state=u.breaker_state.value,
                    breaker_opened=u.breaker_opened,
                    breaker_rejected=u.breaker_rejected,
                    breaker_failures=u.breaker_failures,
                    breaker_successes=u.breaker_successes,
                    breaker_retry_in_s=u.breaker_retry_in_s,
                    last_failure=u.last_failure,
                    retries=u.retries,
                    retries_refused=u.retries_refused,
                    cache_hits=u.cache_hits,
                    cache_misses=u.cache_misses,
                    cache_bytes=u.cache_bytes,
                    cache_entries=u.cache_entries,
                )
            )
        for part in self._parts:
            if isinstance(part, TierInfoContributor):
                part.tier_info(response)
        return response
