"""Composition root of the region tier.

Everything is built inside the running event loop by :class:`services.rpc.node.Node`
from ``SPEC`` and the configuration; this module states what makes a region a
region: the top of the chain, its configuration (the shared sections plus
``[registry]``, ``[fleet]`` and ``[telemetry]``) and its components — the model registry
served as the artifact origin and kept re-signed, the fleet service (enrollment,
check-in, assignment of variants with their keys), and the OTLP receiver that folds
the nodes' telemetry into the store rollouts read.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from services.rpc.node import TierSpec
from tier2_region.config import RegionConfig
from tier2_region.fleet_service import FleetControl
from tier2_region.origin_service import ArtifactOrigin
from tier2_region.telemetry.receiver_service import TelemetryReceiver

SPEC = TierSpec(
    tier="tier2",
    role="region",
    service_name="edgecascade-tier2",
    top_of_chain=True,
    config_type=RegionConfig,
    components=(ArtifactOrigin, FleetControl, TelemetryReceiver),
)

# Defaults of this tier that differ from the shared ones.
DEFAULTS: Mapping[str, Mapping[str, Any]] = {
    "server": {"port": 8003},
    "repository": {"path": "region-models"},
}
