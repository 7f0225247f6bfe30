"""Composition root of the region tier.

Everything is built inside the running event loop by :class:`services.rpc.node.Node`
from ``SPEC`` and the configuration; this module states what makes a region a region.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from services.rpc.node import TierSpec

SPEC = TierSpec(
    tier="tier2",
    role="region",
    service_name="edgecascade-tier2",
    top_of_chain=True,
    artifact_role="origin",
)

# Defaults of this tier that differ from the shared ones.
DEFAULTS: Mapping[str, Mapping[str, Any]] = {
    "server": {"port": 8003},
    "repository": {"path": "region-models"},
}
