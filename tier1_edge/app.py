"""Composition root of the edge tier.

Everything is built inside the running event loop by :class:`services.rpc.node.Node`
from ``SPEC`` and the configuration; this module states what makes an edge an
edge: its configuration (the shared sections plus ``[artifacts]``) and its
components — the verifying pull-through artifact cache it serves its devices, the
relay of their enrollment and check-ins to the region, its own check-ins, and the
relay of their metrics to the region.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from services.rpc.node import TierSpec
from services.rpc.updates_service import NodeUpdatesService
from tier1_edge.cache_service import ArtifactCacheService
from tier1_edge.config import EdgeConfig
from tier1_edge.fleet_relay_service import FleetRelayService
from tier1_edge.telemetry_relay_service import TelemetryRelayService

SPEC = TierSpec(
    tier="tier1",
    role="edge",
    service_name="edgecascade-tier1",
    top_of_chain=False,
    config_type=EdgeConfig,
    components=(ArtifactCacheService, FleetRelayService, NodeUpdatesService, TelemetryRelayService),
)

# Defaults of this tier that differ from the shared ones.
DEFAULTS: Mapping[str, Mapping[str, Any]] = {
    "server": {"port": 8002},
    "repository": {"path": "edge-models"},
}
