"""The ``edgecascade.v1.MeshService`` servicer: who this node is and what it holds."""

from __future__ import annotations

from grpc import aio

from protos.edgecascade.v1 import mesh_pb2 as pb
from protos.edgecascade.v1 import mesh_pb2_grpc as pb_grpc
from services import __version__
from services.dataplane import Dataplane

TIERS = {"tier0": pb.TIER_DEVICE, "tier1": pb.TIER_EDGE, "tier2": pb.TIER_REGION}


class MeshServicer(pb_grpc.MeshServiceServicer):
    """Serves the mesh control plane of one node.

    Args:
        dataplane: The node's data plane (identity and models).
        upstream: ``host:port`` of the next tier, empty at the top.
    """

    def __init__(self, dataplane: Dataplane, upstream: str) -> None:
        self._dp = dataplane
        self._upstream = upstream

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
        return pb.GetTierInfoResponse(
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
