"""The device's configuration: the shared sections plus ``[updates]`` (enrollment and check-in), ``[telemetry]``,
``[cascade]`` (the confidence cascade), ``[token_cascade]`` (generators' token-level cascade and speculative
decoding) and ``[thermal]`` (sensors, power profile and thermal limits of the device class:
:mod:`tier0_device.thermal.config`); see :mod:`services.tier_config`."""

from __future__ import annotations

from dataclasses import dataclass, field

from services.tier_config import CascadeSection, TelemetrySection, TierConfig, TokenCascadeSection, UpdatesSection
from tier0_device.thermal.config import ThermalSection


@dataclass(frozen=True)
class DeviceConfig(TierConfig):
    """The whole configuration of a device process."""

    updates: UpdatesSection = field(default_factory=UpdatesSection)
    telemetry: TelemetrySection = field(default_factory=TelemetrySection)
    cascade: CascadeSection = field(default_factory=CascadeSection)
    token_cascade: TokenCascadeSection = field(default_factory=TokenCascadeSection)
    thermal: ThermalSection = field(default_factory=ThermalSection)
