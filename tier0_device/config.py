"""The device's configuration: the shared sections plus ``[updates]`` (enrollment and check-in) and ``[telemetry]``."""

from __future__ import annotations

from dataclasses import dataclass, field

from services.tier_config import TelemetrySection, TierConfig, UpdatesSection


@dataclass(frozen=True)
class DeviceConfig(TierConfig):
    """The whole configuration of a device process."""

    updates: UpdatesSection = field(default_factory=UpdatesSection)
    telemetry: TelemetrySection = field(default_factory=TelemetrySection)
