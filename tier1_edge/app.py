"""Composition root of the edge tier.

Everything is built inside the running event loop by :class:`services.rpc.node.Node`
from ``SPEC`` and the configuration; this module states what makes an edge an edge.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from services.rpc.node import TierSpec

SPEC = TierSpec(
    tier="tier1",
    role="edge",
    service_name="edgecascade-tier1",
    top_of_chain=False,
    artifact_role="cache",
)

# Defaults of this tier that differ from the shared ones.
DEFAULTS: Mapping[str, Mapping[str, Any]] = {
    "server": {"port": 8002},
    "repository": {"path": "edge-models"},
}
