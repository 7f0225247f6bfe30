"""Composition root of the device tier.

Everything is built inside the running event loop by :class:`services.rpc.node.Node`;
this module only states what makes a device a device.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from typing import Any

from services.rpc.node import Node, TierSpec, serve
from services.tier_config import TierConfig

SPEC = TierSpec(tier="tier0", role="device", service_name="edgecascade-tier0", top_of_chain=False)

# Defaults of this tier that differ from the shared ones.
DEFAULTS: Mapping[str, Mapping[str, Any]] = {
    "server": {"port": 8001},
    "repository": {"path": "device-models"},
}


def build(config: TierConfig) -> Node:
    """Returns a device node for ``config`` (not started)."""
    return Node(SPEC, config)


async def run(config: TierConfig, stop: asyncio.Event) -> None:
    """Runs a device node until ``stop`` is set."""
    await serve(SPEC, config, stop)
