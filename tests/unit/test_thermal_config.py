"""The device's [thermal] section: defaults, TOML (lists included), environment, and messages a person can act on."""

from __future__ import annotations

from pathlib import Path

import pytest

from services.config import load_config
from services.errors import ConfigError
from tier0_device.config import DeviceConfig
from tier0_device.thermal.config import ThermalSection
from tier0_device.thermal.energy import PowerProfile


def test_the_defaults_are_on_and_read_every_zone_under_sys() -> None:
    thermal = load_config(DeviceConfig, env={}).thermal
    assert thermal == ThermalSection()
    assert (thermal.enabled, thermal.sysfs_root, thermal.period_s, thermal.zone_types) == (True, "/sys", 1.0, ())
    limits = thermal.limits()
    assert (limits.soft_limit_c, limits.hard_limit_c, limits.hysteresis_c) == (80.0, 95.0, 5.0)
    assert thermal.power_profile() == PowerProfile(2.0, 6.0)


def test_a_file_sets_the_device_class_and_zone_types_as_a_list(tmp_path: Path) -> None:
    path = tmp_path / "device.toml"
    path.write_text(
        "[thermal]\n"
        'device_class = "rpi4"\n'
        'sysfs_root = "/host/sys"\n'
        'zone_types = ["cpu-thermal", "soc_thermal"]\n'
        "soft_limit_c = 70\n"
        "hard_limit_c = 82.5\n"
        "hysteresis_c = 3\n"
        "idle_watts = 2.7\n"
        "busy_watts = 6.4\n"
        "batch_floor = 2\n"
        "stale_periods = 0\n"
    )
    thermal = load_config(DeviceConfig, path, env={}).thermal
    assert thermal.device_class == "rpi4"
    assert thermal.sysfs_root == "/host/sys"
    assert thermal.zone_types == ("cpu-thermal", "soc_thermal")
    limits = thermal.limits()
    assert (limits.soft_limit_c, limits.hard_limit_c, limits.hysteresis_c) == (70.0, 82.5, 3.0)
    assert (limits.batch_floor, limits.stale_periods) == (2, 0)
    assert thermal.power_profile() == PowerProfile(2.7, 6.4)


def test_the_environment_sets_zone_types_comma_separated() -> None:
    env = {
        "EDGECASCADE_THERMAL__ZONE_TYPES": "x86_pkg_temp, acpitz",
        "EDGECASCADE_THERMAL__ENABLED": "false",
        "EDGECASCADE_THERMAL__PERIOD_S": "0.5",
    }
    thermal = load_config(DeviceConfig, env=env).thermal
    assert thermal.zone_types == ("x86_pkg_temp", "acpitz")
    assert thermal.enabled is False
    assert thermal.period_s == 0.5


@pytest.mark.parametrize(
    ("toml", "message"),
    [
        ("soft_limit_c = 95", "[thermal] the limits must rise"),
        ("hard_limit_c = 70", "[thermal] the limits must rise"),
        ("hysteresis_c = 0", "[thermal] hysteresis_c must be above 0"),
        ("hysteresis_c = 125", "lower hysteresis_c"),
        ("max_plausible_c = 90", "hard_limit_c < max_plausible_c"),
        ("period_s = 0.01", "[thermal] period_s must be from 0.05 to 60"),
        ("period_s = 120", "[thermal] period_s must be from 0.05 to 60"),
        ("period_s = nan", "[thermal] period_s must be from 0.05 to 60"),
        ("idle_watts = 8", "[thermal] busy_watts (6.0) must be at least idle_watts (8.0)"),
        ("busy_watts = 900", "must not exceed max_plausible_watts"),
        ("max_plausible_watts = 0", "[thermal] max_plausible_watts must be above 0"),
        ("batch_floor = 0", "[thermal] batch_floor must be from 1"),
        ("thread_floor = 0", "[thermal] thread_floor must be from 1"),
        ("stale_periods = -1", "[thermal] stale_periods must be from 0"),
        ('sysfs_root = ""', "[thermal] sysfs_root must name a directory"),
        ('device_class = ""', "[thermal] device_class must be 1 to 64 characters"),
        ('zone_types = ["cpu/thermal"]', "[thermal] zone_types: 'cpu/thermal' is not a zone type"),
        ('zone_types = [""]', "is not a zone type"),
        ("zone_types = 5", "expected a list"),
        ('soft_limit_c = "hot"', "expected a number"),
        ("enabled = 1", "expected true or false"),
        ("fan_rpm = 3000", "unknown setting [thermal] fan_rpm"),
    ],
)
def test_bad_thermal_settings_stop_start_up_with_a_clear_message(tmp_path: Path, toml: str, message: str) -> None:
    path = tmp_path / "device.toml"
    path.write_text(f"[thermal]\n{toml}\n")
    with pytest.raises(ConfigError) as caught:
        load_config(DeviceConfig, path, env={})
    assert message in caught.value.message
