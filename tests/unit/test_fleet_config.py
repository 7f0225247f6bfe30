"""The region's ``[fleet]`` section (issue 9 #1-2)."""

from __future__ import annotations

from pathlib import Path

import pytest

from services.config import load_config
from services.errors import ConfigError
from tier1_edge.config import EdgeConfig
from tier2_region.config import RegionConfig


def test_defaults_and_environment(tmp_path: Path) -> None:
    config = load_config(RegionConfig, env={})
    assert (config.fleet.path, config.fleet.check_interval_s, config.fleet.clock_skew_s) == ("", 30, 300)
    assert config.fleet.token_ttl_s == 86400
    env = {
        "EDGECASCADE_REGISTRY__PATH": str(tmp_path / "registry"),
        "EDGECASCADE_FLEET__PATH": str(tmp_path / "fleet.sqlite"),
        "EDGECASCADE_FLEET__CHECK_INTERVAL_S": "5",
        "EDGECASCADE_FLEET__CLOCK_SKEW_S": "60",
    }
    config = load_config(RegionConfig, env=env)
    assert (config.fleet.check_interval_s, config.fleet.clock_skew_s) == (5, 60)


@pytest.mark.parametrize(
    ("fleet", "message"),
    [
        ({"check_interval_s": 0}, "check_interval_s must be between 1 and 86400"),
        ({"check_interval_s": 86401}, "check_interval_s must be between 1 and 86400"),
        ({"clock_skew_s": 0}, "clock_skew_s must be a positive"),
        ({"token_ttl_s": -1}, "token_ttl_s must be a positive"),
    ],
)
def test_bad_values_stop_start_up(fleet: dict[str, int], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        load_config(RegionConfig, env={}, overrides={"fleet": fleet})


def test_a_fleet_needs_the_registry_it_assigns_from_and_only_a_region_has_one(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="\\[fleet\\] path is set but \\[registry\\] path is empty"):
        load_config(RegionConfig, env={}, overrides={"fleet": {"path": str(tmp_path / "fleet.sqlite")}})
    with pytest.raises(ConfigError, match="fleet"):
        load_config(EdgeConfig, env={}, overrides={"fleet": {"path": "x"}})
