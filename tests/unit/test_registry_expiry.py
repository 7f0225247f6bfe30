"""Expiry warnings of `edgecascade status`: what is expired fails the command, remedies name both ways out."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from tier2_region.registry.metadata_expiry import expired_roles, expiry_warnings

NOW = datetime(2030, 1, 1, tzinfo=UTC)


def _expiries(**left: timedelta) -> dict[str, datetime]:
    base = {"root": timedelta(days=300), "targets": timedelta(days=80), "snapshot": timedelta(days=6)}
    base["timestamp"] = timedelta(hours=20)
    return {role: NOW + delta for role, delta in {**base, **left}.items()}


def test_only_expired_roles_are_expired() -> None:
    assert expired_roles(_expiries(), NOW) == []
    assert expired_roles(_expiries(targets=timedelta(days=3)), NOW) == []  # a warning, not a failure
    assert expired_roles(_expiries(timestamp=timedelta(0), root=-timedelta(days=1)), NOW) == ["root", "timestamp"]


def test_the_targets_warning_names_the_operator_verb_and_the_regions_own_renewal() -> None:
    (warning,) = expiry_warnings(_expiries(targets=timedelta(days=10)), NOW)
    assert warning.startswith("registry targets metadata expires in 10 days")
    assert "edgecascade model resign-targets" in warning and "[registry] resign_targets" in warning


def test_snapshot_and_timestamp_are_warned_about_an_hour_ahead() -> None:
    assert expiry_warnings(_expiries(timestamp=timedelta(minutes=61)), NOW) == []
    (warning,) = expiry_warnings(_expiries(timestamp=timedelta(minutes=59)), NOW)
    assert warning.startswith("registry timestamp metadata expires in 59 minutes")
