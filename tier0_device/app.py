"""Composition root of the device tier.

Everything is built inside the running event loop by :class:`services.rpc.node.Node`
from ``SPEC`` and the configuration; this module states what makes a device a device.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from services.rpc.node import TierSpec

SPEC = TierSpec(tier="tier0", role="device", service_name="edgecascade-tier0", top_of_chain=False)

# Defaults of this tier that differ from the shared ones.
DEFAULTS: Mapping[str, Mapping[str, Any]] = {
    "server": {"port": 8001},
    "repository": {"path": "device-models"},
}
