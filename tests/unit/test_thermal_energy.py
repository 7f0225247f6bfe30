"""Energy accounting: joules apportioned to model versions by compute time, inferences per joule, joules per token."""

from __future__ import annotations

import pytest

from services.errors import ConfigError
from tier0_device.thermal.energy import EnergyAccountant, PowerProfile
from tier0_device.thermal.sensors import SensorReading, Source


def measured(joules: float, window_s: float = 1.0) -> SensorReading:
    return SensorReading(joules, "joules", Source.MEASURED, "intel-rapl:0", window_s)


def estimated(joules: float, window_s: float = 1.0) -> SensorReading:
    return SensorReading(joules, "joules", Source.ESTIMATED, "profile", window_s)


def test_a_period_is_shared_by_compute_time() -> None:
    accountant = EnergyAccountant()
    accountant.record_run("resnet", "2", compute_s=0.25, inferences=8)
    accountant.record_run("resnet", "2", compute_s=0.05, inferences=2)
    accountant.record_run("charlm", "1", compute_s=0.1, inferences=1, tokens=40)
    accountant.close_period(measured(8.0, window_s=2.0))
    snap = accountant.snapshot()
    resnet = snap.version("resnet", "2")
    charlm = snap.version("charlm", "1")
    assert resnet is not None
    assert charlm is not None
    assert resnet.joules == pytest.approx(6.0)  # 0.3 of 0.4 compute seconds
    assert charlm.joules == pytest.approx(2.0)
    assert resnet.inferences == 10
    assert resnet.compute_s == pytest.approx(0.3)
    assert resnet.inferences_per_joule == pytest.approx(10 / 6)
    assert resnet.joules_per_token is None
    assert charlm.joules_per_token == pytest.approx(2.0 / 40)
    assert snap.joules == pytest.approx(8.0)
    assert snap.periods == 1
    assert snap.power is not None
    assert snap.power.value == pytest.approx(4.0)
    assert (snap.power.unit, snap.power.source) == ("watts", Source.MEASURED)


def test_measured_and_estimated_energy_are_kept_apart() -> None:
    accountant = EnergyAccountant()
    accountant.record_run("lin", "1", 0.5, 10)
    accountant.close_period(measured(3.0))
    accountant.record_run("lin", "1", 0.5, 10)
    accountant.close_period(estimated(5.0))
    snap = accountant.snapshot()
    lin = snap.version("lin", "1")
    assert lin is not None
    assert (lin.measured_joules, lin.estimated_joules, lin.joules) == (3.0, 5.0, 8.0)
    assert lin.source is Source.ESTIMATED  # any estimated part makes the figure an estimate
    assert lin.inferences_per_joule == pytest.approx(20 / 8)
    assert (snap.measured_joules, snap.estimated_joules) == (3.0, 5.0)
    assert snap.power is not None
    assert snap.power.source is Source.ESTIMATED


def test_a_period_without_runs_is_idle_energy() -> None:
    accountant = EnergyAccountant()
    accountant.close_period(measured(2.0))
    accountant.record_run("lin", "1", 0.1, 1)
    accountant.close_period(measured(3.0))
    snap = accountant.snapshot()
    assert snap.idle_joules == 2.0
    lin = snap.version("lin", "1")
    assert lin is not None
    assert lin.joules == 3.0
    assert lin.source is Source.MEASURED


def test_runs_count_only_once_their_period_is_closed() -> None:
    accountant = EnergyAccountant()
    accountant.record_run("lin", "1", 0.1, 5)
    assert accountant.snapshot().versions == ()
    accountant.close_period(measured(1.0))
    accountant.record_run("lin", "1", 0.1, 5)
    lin = accountant.snapshot().version("lin", "1")
    assert lin is not None
    assert lin.inferences == 5  # the open period's runs wait for its joules


def test_runs_too_short_to_time_are_shared_by_inferences() -> None:
    accountant = EnergyAccountant()
    accountant.record_run("a", "1", 0.0, 3)
    accountant.record_run("b", "1", 0.0, 1)
    accountant.close_period(measured(4.0))
    snap = accountant.snapshot()
    a, b = snap.version("a", "1"), snap.version("b", "1")
    assert a is not None
    assert b is not None
    assert (a.joules, b.joules) == (3.0, 1.0)


def test_versions_of_one_model_are_apart() -> None:
    accountant = EnergyAccountant()
    accountant.record_run("lin", "1", 0.3, 3)
    accountant.record_run("lin", "2", 0.1, 1)
    accountant.close_period(measured(4.0))
    snap = accountant.snapshot()
    assert [(v.model, v.version) for v in snap.versions] == [("lin", "1"), ("lin", "2")]
    assert [v.joules for v in snap.versions] == pytest.approx([3.0, 1.0])


@pytest.mark.parametrize(
    ("compute_s", "inferences", "tokens"), [(-0.1, 1, 0), (float("nan"), 1, 0), (0.1, -1, 0), (0.1, 1, -5)]
)
def test_impossible_runs_are_refused(compute_s: float, inferences: int, tokens: int) -> None:
    with pytest.raises(ValueError, match="none may be negative"):
        EnergyAccountant().record_run("lin", "1", compute_s, inferences, tokens)


@pytest.mark.parametrize(
    "energy",
    [
        SensorReading(-1.0, "joules", Source.MEASURED, "x", 1.0),
        SensorReading(float("inf"), "joules", Source.MEASURED, "x", 1.0),
        SensorReading(3.0, "watts", Source.MEASURED, "x", 1.0),
    ],
)
def test_impossible_energy_is_refused(energy: SensorReading) -> None:
    accountant = EnergyAccountant()
    with pytest.raises(ValueError, match="finite number of joules"):
        accountant.close_period(energy)
    assert accountant.snapshot().periods == 0


def test_the_profile_estimates_from_utilization_and_says_so() -> None:
    profile = PowerProfile(idle_watts=2.0, busy_watts=6.0)
    assert profile.watts(0.0) == 2.0
    assert profile.watts(0.5) == 4.0
    assert profile.watts(3.0) == 6.0  # clamped
    got = profile.estimate(SensorReading(0.25, "utilization", Source.MEASURED, "process", 2.0))
    assert got == SensorReading(6.0, "joules", Source.ESTIMATED, "profile", 2.0)


@pytest.mark.parametrize(
    ("idle", "busy", "message"),
    [(-1.0, 6.0, "idle_watts must be"), (5.0, 4.0, "busy_watts (4.0) must be at least idle_watts")],
)
def test_an_impossible_profile_is_a_config_error(idle: float, busy: float, message: str) -> None:
    with pytest.raises(ConfigError) as caught:
        PowerProfile(idle, busy)
    assert message in caught.value.message
