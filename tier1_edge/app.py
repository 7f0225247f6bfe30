"""Composition root of the edge tier.

Everything is built inside the running event loop by :class:`services.rpc.node.Node`;
this module only states what makes a edge a edge.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from typing import Any

from services.rpc.node import Node, TierSpec, serve
from services.tier_config import TierConfig

SPEC = TierSpec(tier="tier1", role="edge", service_name="edgecascade-tier1", top_of_chain=False)

# Defaults of this tier that differ from the shared ones.
DEFAULTS: Mapping[str, Mapping[str, Any]] = {
    "server": {"port": 8002},
    "repository": {"path": "edge-models"},
}


def build(config: TierConfig) -> Node:
    """Returns a edge node for ``config`` (not started)."""
    return Node(SPEC, config)


async def run(config: TierConfig, stop: asyncio.Event) -> None:
    """Runs a edge node until ``stop`` is set."""
    await serve(SPEC, config, stop)
