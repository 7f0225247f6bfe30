"""Composition root of the device tier.

Everything is built inside the running event loop by :class:`services.rpc.node.Node`
from ``SPEC`` and the configuration; this module states what makes a device a device:
its configuration (the shared sections plus ``[updates]``, ``[thermal]`` and the others of
:mod:`tier0_device.config`) and its components — enrollment and check-in with the region
through its edge, and thermal- and power-aware serving (the node's limits follow the
device's temperature; energy is accounted per model version).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from services.rpc.node import TierSpec
from services.rpc.updates_service import NodeUpdatesService
from tier0_device.config import DeviceConfig
from tier0_device.thermal.thermal_service import ThermalService

SPEC = TierSpec(
    tier="tier0",
    role="device",
    service_name="edgecascade-tier0",
    top_of_chain=False,
    config_type=DeviceConfig,
    components=(NodeUpdatesService, ThermalService),
)

# Defaults of this tier that differ from the shared ones.
DEFAULTS: Mapping[str, Mapping[str, Any]] = {
    "server": {"port": 8001},
    "repository": {"path": "device-models"},
}
