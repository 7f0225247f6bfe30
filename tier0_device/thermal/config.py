"""The device's ``[thermal]`` section: sensors, the power profile and the thermal limits of its device class.

``enabled`` (default true) runs the thermal monitor; ``sysfs_root`` (``/sys``) is where sensors are read
and ``period_s`` (1.0; 0.05 to 60) how often. ``zone_types`` lists the thermal zone types to read
(``x86_pkg_temp``, ``cpu-thermal``, ``soc_thermal``; empty = every zone, the hottest counts; in the
environment comma-separated: ``EDGECASCADE_THERMAL__ZONE_TYPES=x86_pkg_temp,cpu-thermal``).
``min_plausible_c`` and ``max_plausible_c`` (-40, 150) bound a believable temperature; anything
outside is an absurd reading, counted and ignored. ``device_class`` names the class whose figures
follow: ``soft_limit_c`` (80; above it the device shrinks batches and threads and prefers int8),
``hard_limit_c`` (95; above it new work goes upstream), ``hysteresis_c`` (5; normal again only below
the soft limit minus this), ``batch_floor`` and ``thread_floor`` (1; the least the caps shrink to),
``stale_periods`` (30; periods without a valid reading before a hot node relaxes one level; 0 =
never), ``idle_watts`` and ``busy_watts`` (2, 6; the power profile that estimates energy where no
RAPL counter exists) and ``max_plausible_watts`` (500; an energy delta implying more is absurd).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from services.errors import ConfigError
from tier0_device.thermal.energy import PowerProfile
from tier0_device.thermal.policy import ThermalLimits

MIN_PERIOD_S = 0.05
MAX_PERIOD_S = 60.0


@dataclass(frozen=True)
class ThermalSection:
    """Thermal- and power-aware serving (see the module docstring).

    Raises:
        ConfigError: A value is out of range or the limits are out of order; the message names the key.
    """

    enabled: bool = True
    sysfs_root: str = "/sys"
    period_s: float = 1.0
    zone_types: tuple[str, ...] = ()
    min_plausible_c: float = -40.0
    max_plausible_c: float = 150.0
    device_class: str = "generic"
    soft_limit_c: float = 80.0
    hard_limit_c: float = 95.0
    hysteresis_c: float = 5.0
    batch_floor: int = 1
    thread_floor: int = 1
    stale_periods: int = 30
    idle_watts: float = 2.0
    busy_watts: float = 6.0
    max_plausible_watts: float = 500.0

    def __post_init__(self) -> None:
        if not self.sysfs_root:
            raise ConfigError('[thermal] sysfs_root must name a directory (default "/sys")')
        if not (math.isfinite(self.period_s) and MIN_PERIOD_S <= self.period_s <= MAX_PERIOD_S):
            raise ConfigError(
                f"[thermal] period_s must be from {MIN_PERIOD_S} to {MAX_PERIOD_S} seconds, got {self.period_s}"
            )
        for zone_type in self.zone_types:
            if not zone_type or "/" in zone_type or zone_type != zone_type.strip():
                raise ConfigError(
                    f"[thermal] zone_types: {zone_type!r} is not a zone type; use the text of a zone's "
                    "type file, e.g. x86_pkg_temp or cpu-thermal"
                )
        if not self.device_class or len(self.device_class) > 64:
            raise ConfigError(f"[thermal] device_class must be 1 to 64 characters, got {self.device_class!r}")
        if not (math.isfinite(self.max_plausible_watts) and 0 < self.max_plausible_watts <= 100_000):
            raise ConfigError(
                f"[thermal] max_plausible_watts must be above 0 and at most 100000, got {self.max_plausible_watts}"
            )
        for build in (self.limits, self.power_profile):
            try:
                build()
            except ConfigError as exc:
                raise ConfigError(f"[thermal] {exc.message}") from None
        if self.busy_watts > self.max_plausible_watts:
            raise ConfigError(
                f"[thermal] busy_watts ({self.busy_watts}) must not exceed max_plausible_watts "
                f"({self.max_plausible_watts}), or the profile's own estimate would be absurd"
            )

    def limits(self) -> ThermalLimits:
        """The thermal policy's settings."""
        return ThermalLimits(
            soft_limit_c=self.soft_limit_c,
            hard_limit_c=self.hard_limit_c,
            hysteresis_c=self.hysteresis_c,
            min_plausible_c=self.min_plausible_c,
            max_plausible_c=self.max_plausible_c,
            batch_floor=self.batch_floor,
            thread_floor=self.thread_floor,
            stale_periods=self.stale_periods,
        )

    def power_profile(self) -> PowerProfile:
        """The device class's power profile."""
        return PowerProfile(idle_watts=self.idle_watts, busy_watts=self.busy_watts)
