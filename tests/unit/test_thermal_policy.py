"""The thermal policy: states, step-by-step shrinking, hysteresis, bad readings and transition logs."""

from __future__ import annotations

import logging

import pytest

from services.errors import ConfigError
from tier0_device.thermal.policy import (
    MAX_SHRINK_STEPS,
    ThermalLimits,
    ThermalPolicy,
    ThermalState,
    TransitionReason,
)

NORMAL, SOFT, HARD = ThermalState.NORMAL, ThermalState.SOFT, ThermalState.HARD
LIMITS = ThermalLimits(soft_limit_c=80.0, hard_limit_c=95.0, hysteresis_c=5.0, stale_periods=3)


def drive(policy: ThermalPolicy, temperatures: list[float | None]) -> list[ThermalState]:
    return [policy.update(t).decision.state for t in temperatures]


def test_up_through_soft_and_hard_and_back_only_past_the_hysteresis() -> None:
    policy = ThermalPolicy(LIMITS)
    temperatures: list[float | None] = [60, 80, 80.5, 90, 95, 95.5, 92, 90.5, 89.9, 79, 75.1, 75, 74.9, 80]
    expected = [NORMAL, NORMAL, SOFT, SOFT, SOFT, HARD, HARD, HARD, SOFT, SOFT, SOFT, SOFT, NORMAL, NORMAL]
    assert drive(policy, temperatures) == expected
    assert policy.transitions == {"normal->hot": 1, "hot->critical": 1, "critical->hot": 1, "hot->normal": 1}


def test_each_period_above_soft_halves_batch_and_threads_down_to_their_floors() -> None:
    policy = ThermalPolicy(LIMITS)
    caps = []
    for _ in range(7):
        decision = policy.update(85.0).decision
        caps.append((decision.batch_cap(32), decision.thread_cap(4)))
    assert caps == [(16, 2), (8, 1), (4, 1), (2, 1), (1, 1), (1, 1), (1, 1)]
    assert policy.decision.prefer_int8
    assert not policy.decision.forward_new_work
    # Within the hysteresis band the caps hold: cooling, but not yet cool.
    held = policy.update(77.0).decision
    assert held.state is SOFT
    assert held.shrink_steps == 7
    # Normal again: the configured caps return at once.
    normal = policy.update(70.0).decision
    assert (normal.batch_cap(32), normal.thread_cap(4), normal.prefer_int8, normal.batch_factor) == (32, 4, False, 1)


def test_the_caps_honour_configured_floors_and_never_exceed_the_configuration() -> None:
    policy = ThermalPolicy(ThermalLimits(batch_floor=4, thread_floor=2))
    for _ in range(5):
        policy.update(90.0)
    decision = policy.decision
    assert decision.batch_cap(64) == 4
    assert decision.thread_cap(8) == 2
    assert decision.batch_cap(2) == 2  # a floor above the model's own cap does not raise it
    assert decision.thread_cap(1) == 1


def test_critical_forwards_new_work_at_the_floors() -> None:
    policy = ThermalPolicy(LIMITS)
    update = policy.update(99.0)  # straight from normal
    assert update.transition is not None
    assert (update.transition.previous, update.transition.state) == (NORMAL, HARD)
    assert update.transition.temperature_c == 99.0
    decision = update.decision
    assert decision.forward_new_work
    assert decision.prefer_int8
    assert decision.shrink_steps == MAX_SHRINK_STEPS
    assert (decision.batch_cap(4096), decision.thread_cap(8)) == (1, 1)
    # Back to hot, the caps stay at the floors until the device is normal again.
    hot = policy.update(89.0).decision
    assert (hot.state, hot.forward_new_work, hot.batch_cap(32)) == (SOFT, False, 1)


@pytest.mark.parametrize("bad", [None, float("nan"), float("inf"), -273.0, 500.0])
def test_a_bad_reading_never_moves_the_state(bad: float | None) -> None:
    policy = ThermalPolicy(ThermalLimits(stale_periods=0))
    assert drive(policy, [bad, bad]) == [NORMAL, NORMAL]
    policy.update(85.0)
    before = policy.decision
    for _ in range(5):
        update = policy.update(bad)
        assert update.transition is None
    assert policy.decision == before  # nor shrinks further
    assert policy.ignored_readings == 7


def test_a_node_without_readings_relaxes_one_level_per_stale_periods() -> None:
    policy = ThermalPolicy(LIMITS)  # stale_periods = 3
    policy.update(99.0)
    states = drive(policy, [None, None, None, None, None, None, None])
    assert states == [HARD, HARD, SOFT, SOFT, SOFT, NORMAL, NORMAL]
    assert policy.decision.shrink_steps == 0
    assert policy.transitions["critical->hot"] == 1
    assert policy.transitions["hot->normal"] == 1


def test_a_valid_reading_restarts_the_stale_count() -> None:
    policy = ThermalPolicy(LIMITS)
    states = drive(policy, [85.0, None, None, 78.0, None, None, 78.0, None, None, None])
    assert states == [SOFT, SOFT, SOFT, SOFT, SOFT, SOFT, SOFT, SOFT, SOFT, NORMAL]


def test_every_transition_is_logged_once(caplog: pytest.LogCaptureFixture) -> None:
    policy = ThermalPolicy(LIMITS)
    with caplog.at_level(logging.INFO, logger="edgecascade.thermal"):
        drive(policy, [85.0, 86.0, 87.0, 70.0, 70.0, 85.0, None, None, None])
    records = [r for r in caplog.records if r.name == "edgecascade.thermal"]
    assert [r.getMessage().split(":")[0].split(" at ")[0] for r in records] == [
        "thermal state normal -> hot",
        "thermal state hot -> normal",
        "thermal state normal -> hot",
        "thermal state hot -> normal",
    ]
    assert [r.levelno for r in records] == [logging.WARNING, logging.INFO, logging.WARNING, logging.INFO]
    assert "85.0 °C" in records[0].getMessage()
    assert "no valid temperature for 3 periods" in records[3].getMessage()
    assert policy.transitions == {"normal->hot": 2, "hot->normal": 2}


def test_the_transition_says_what_moved_it() -> None:
    policy = ThermalPolicy(LIMITS)
    assert policy.update(70.0).transition is None
    moved = policy.update(85.0).transition
    assert moved is not None
    assert (moved.reason, moved.label) == (TransitionReason.TEMPERATURE, "normal->hot")
    assert policy.update(86.0).transition is None  # a new step is not a transition
    drive(policy, [None, None])
    stale = policy.update(None).transition
    assert stale is not None
    assert (stale.reason, stale.temperature_c) == (TransitionReason.NO_READING, None)


@pytest.mark.parametrize(
    ("limits", "message"),
    [
        ({"soft_limit_c": 95.0, "hard_limit_c": 95.0}, "soft_limit_c < hard_limit_c"),
        ({"hard_limit_c": 200.0}, "hard_limit_c < max_plausible_c"),
        ({"hysteresis_c": 0.0}, "hysteresis_c must be above 0"),
        ({"hysteresis_c": 130.0}, "lower hysteresis_c"),
        ({"soft_limit_c": float("nan")}, "soft_limit_c must be a finite number"),
        ({"batch_floor": 0}, "batch_floor must be from 1"),
        ({"thread_floor": 0}, "thread_floor must be from 1"),
        ({"stale_periods": -1}, "stale_periods must be from 0"),
    ],
)
def test_impossible_limits_are_config_errors(limits: dict[str, float], message: str) -> None:
    with pytest.raises(ConfigError) as caught:
        ThermalLimits(**limits)  # type: ignore[arg-type]
    assert message in caught.value.message
