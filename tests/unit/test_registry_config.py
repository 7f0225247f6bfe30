"""[registry] metadata lifetimes against the re-sign margin and check interval (issue 7 #11a)."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

import pytest

from services.config import load_config
from services.errors import ConfigError
from tier2_region.config import RegionConfig
from tier2_region.registry.tuf_repository import ExpiryPolicy


def _registry(**values: Any) -> RegionConfig:
    return load_config(RegionConfig, env={}, overrides={"registry": values})


@pytest.mark.parametrize(
    ("values", "message"),
    [
        # Snapshot re-signed on every check, or expiring between two checks.
        (
            {"snapshot_expiry_s": 6 * 3600, "resign_margin_s": 6 * 3600 - 1},
            r"\[registry\] snapshot_expiry_s \(21600 s\) must be longer than resign_margin_s \+ resign_check_s "
            r"\(21659 s\)",
        ),
        # A margin shorter than the check interval: the role can expire between two checks.
        (
            {"resign_margin_s": 0},
            r"\[registry\] resign_margin_s \(0 s\) must be longer than resign_check_s \(60 s\)",
        ),
        (
            {"resign_margin_s": 30, "resign_check_s": 60},
            r"\[registry\] resign_margin_s \(30 s\) must be longer than resign_check_s \(60 s\)",
        ),
        # A region that renews targets itself does so in their last third: that must be longer than a check.
        (
            {
                "targets_expiry_s": 120,
                "resign_check_s": 50,
                "resign_margin_s": 100,
                "resign_targets": True,
                "path": "registry",
                "key_dir": "keys",
            },
            r"\[registry\] targets_expiry_s \(120 s\) must be longer than 3 × resign_check_s",
        ),
        # A negative margin is refused by the rule that matters (longer than a check), not "at least 0".
        (
            {"resign_margin_s": -5},
            r"\[registry\] resign_margin_s \(-5 s\) must be longer than resign_check_s \(60 s\)",
        ),
        (
            {"resign_margin_s": 86400},
            r"\[registry\] resign_margin_s \(86400 s\) must be shorter than timestamp_expiry_s \(86400 s\)",
        ),
    ],
)
def test_lifetimes_too_short_for_the_re_signer_stop_start_up(values: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        _registry(**values)


def test_defaults_and_short_test_lifetimes_are_accepted() -> None:
    assert _registry().registry.expiry == ExpiryPolicy()
    short = _registry(timestamp_expiry_s=4, resign_margin_s=3, resign_check_s=0.1).registry
    assert short.expiry.timestamp == timedelta(seconds=4)


def test_short_targets_are_fine_when_the_region_does_not_renew_them() -> None:
    """Without resign_targets the check interval never touches targets: an operator re-signs them."""
    config = _registry(targets_expiry_s=120, resign_check_s=50, resign_margin_s=100).registry
    assert config.targets_expiry_s == 120


def test_the_expiry_policy_refuses_a_snapshot_inside_the_margin() -> None:
    with pytest.raises(ConfigError, match="must be shorter than the snapshot expiry"):
        ExpiryPolicy(snapshot=timedelta(hours=6), timestamp=timedelta(hours=12), resign_margin=timedelta(hours=6))
