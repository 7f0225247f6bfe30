"""Composition root of the region tier.

Everything is built inside the running event loop by :class:`services.rpc.node.Node`;
this module only states what makes a region a region.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from typing import Any

from services.rpc.node import Node, TierSpec, serve
from services.tier_config import TierConfig

SPEC = TierSpec(tier="tier2", role="region", service_name="edgecascade-tier2", top_of_chain=True)

# Defaults of this tier that differ from the shared ones.
DEFAULTS: Mapping[str, Mapping[str, Any]] = {
    "server": {"port": 8003},
    "repository": {"path": "region-models"},
}


def build(config: TierConfig) -> Node:
    """Returns a region node for ``config`` (not started)."""
    return Node(SPEC, config)


async def run(config: TierConfig, stop: asyncio.Event) -> None:
    """Runs a region node until ``stop`` is set."""
    await serve(SPEC, config, stop)
