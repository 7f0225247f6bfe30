"""The device's configuration: the shared sections plus ``[updates]`` (enrollment and check-in), ``[telemetry]``,
``[cascade]`` (the confidence cascade) and ``[token_cascade]`` (generators' token-level cascade and speculative
decoding); see :mod:`services.tier_config`."""

from __future__ import annotations

from dataclasses import dataclass, field

from services.tier_config import CascadeSection, TelemetrySection, TierConfig, TokenCascadeSection, UpdatesSection


@dataclass(frozen=True)
class DeviceConfig(TierConfig):
    """The whole configuration of a device process."""

    updates: UpdatesSection = field(default_factory=UpdatesSection)
    telemetry: TelemetrySection = field(default_factory=TelemetrySection)
    cascade: CascadeSection = field(default_factory=CascadeSection)
    token_cascade: TokenCascadeSection = field(default_factory=TokenCascadeSection)
