"""The thermal monitor over a real temporary sysfs tree: policy, energy (measured or estimated), faults, survival."""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path

import pytest

from tier0_device.thermal.config import ThermalSection
from tier0_device.thermal.monitor import ThermalMonitor
from tier0_device.thermal.policy import ThermalDecision, ThermalState
from tier0_device.thermal.sensors import PlatformSample, ProcessCpu, SensorReading, Source


class Clock:
    """A monotonic clock the test steps."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class CpuTime:
    """The process's CPU seconds, as the test sets them."""

    def __init__(self) -> None:
        self.seconds = 0.0

    def __call__(self) -> float:
        return self.seconds


def zone_temp(root: Path, millidegrees: str) -> None:
    path = root / "class" / "thermal" / "thermal_zone0"
    path.mkdir(parents=True, exist_ok=True)
    (path / "type").write_text("x86_pkg_temp\n")
    (path / "temp").write_text(f"{millidegrees}\n")


def package_energy(root: Path, energy_uj: int | str) -> None:
    path = root / "class" / "powercap" / "intel-rapl:0"
    path.mkdir(parents=True, exist_ok=True)
    (path / "name").write_text("package-0\n")
    (path / "max_energy_range_uj").write_text("262143328850\n")
    (path / "energy_uj").write_text(f"{energy_uj}\n")


def monitor_on(root: Path, **settings: float | int) -> tuple[ThermalMonitor, Clock, CpuTime]:
    section = ThermalSection(sysfs_root=str(root), idle_watts=2.0, busy_watts=6.0, **settings)  # type: ignore[arg-type]
    clock, cpu_time = Clock(), CpuTime()
    monitor = ThermalMonitor(section, cpu=ProcessCpu(cores=2, cpu_seconds=cpu_time), clock=clock)
    return monitor, clock, cpu_time


async def test_temperature_drives_the_decisions_listeners_get(tmp_path: Path) -> None:
    monitor, clock, _ = monitor_on(tmp_path)
    seen: list[ThermalDecision] = []
    monitor.add_listener(seen.append)
    states = []
    for millidegrees in ("60000", "85000", "86000", "97000", "88000", "74000"):
        zone_temp(tmp_path, millidegrees)
        clock.now += 1
        snap = await monitor.poll()
        states.append(snap.state)
    assert states == [
        ThermalState.NORMAL,
        ThermalState.SOFT,
        ThermalState.SOFT,
        ThermalState.HARD,
        ThermalState.SOFT,
        ThermalState.NORMAL,
    ]
    # The current decision at once, then one call per change: hot, hotter, critical, hot, normal.
    assert [(d.state, d.batch_cap(32)) for d in seen] == [
        (ThermalState.NORMAL, 32),
        (ThermalState.SOFT, 16),
        (ThermalState.SOFT, 8),
        (ThermalState.HARD, 1),
        (ThermalState.SOFT, 1),
        (ThermalState.NORMAL, 32),
    ]
    assert seen[3].forward_new_work
    snap = monitor.snapshot()
    assert snap.temperature is not None
    assert (snap.temperature.value, snap.temperature.origin) == (74.0, "x86_pkg_temp")
    assert snap.transitions == {"normal->hot": 1, "hot->critical": 1, "critical->hot": 1, "hot->normal": 1}
    assert snap.polls == 6


async def test_without_sensors_energy_is_estimated_from_the_profile_and_labelled(tmp_path: Path) -> None:
    monitor, clock, cpu_time = monitor_on(tmp_path)
    await monitor.poll()  # sets the CPU baseline: no energy yet
    monitor.record_run("lin", "1", compute_s=0.3, inferences=30)
    monitor.record_run("lm", "2", compute_s=0.1, inferences=1, tokens=20)
    clock.now += 2.0
    cpu_time.seconds += 2.0  # 2 CPU seconds in 2 s on 2 cores: half busy, 4 W
    snap = await monitor.poll()
    assert snap.temperature is None
    assert snap.utilization is not None
    assert snap.utilization.value == pytest.approx(0.5)
    energy = snap.energy
    assert energy.power is not None
    assert energy.power.value == pytest.approx(4.0)
    assert energy.power.source is Source.ESTIMATED
    assert energy.estimated_joules == pytest.approx(8.0)
    assert energy.measured_joules == 0.0
    lin, lm = energy.version("lin", "1"), energy.version("lm", "2")
    assert lin is not None
    assert lm is not None
    assert lin.joules == pytest.approx(6.0)
    assert lin.source is Source.ESTIMATED
    assert lin.inferences_per_joule == pytest.approx(5.0)
    assert lm.joules_per_token == pytest.approx(0.1)
    assert sum(snap.faults.values()) == 0  # a platform without sensors is not at fault
    assert snap.state is ThermalState.NORMAL


async def test_rapl_energy_is_measured_and_a_bad_period_falls_back_to_the_estimate(tmp_path: Path) -> None:
    monitor, clock, _ = monitor_on(tmp_path)
    package_energy(tmp_path, 1_000_000)
    await monitor.poll()
    monitor.record_run("lin", "1", 0.2, 10)
    package_energy(tmp_path, 4_000_000)
    clock.now += 1.0
    measured = await monitor.poll()
    assert measured.energy.power is not None
    assert measured.energy.power.value == pytest.approx(3.0)
    assert measured.energy.power.source is Source.MEASURED
    monitor.record_run("lin", "1", 0.2, 10)
    package_energy(tmp_path, 1_000)  # backwards, far from a wrap
    clock.now += 1.0
    fallen_back = await monitor.poll()
    assert fallen_back.faults["backwards"] == 1
    assert fallen_back.faults_by_sensor == {"energy.backwards": 1}
    assert fallen_back.energy.power is not None
    assert (fallen_back.energy.power.value, fallen_back.energy.power.source) == (2.0, Source.ESTIMATED)  # idle
    lin = fallen_back.energy.version("lin", "1")
    assert lin is not None
    assert lin.measured_joules == pytest.approx(3.0)
    assert lin.estimated_joules == pytest.approx(2.0)
    assert lin.source is Source.ESTIMATED


async def test_bad_temperatures_are_counted_and_never_trigger_the_policy(tmp_path: Path) -> None:
    monitor, clock, _ = monitor_on(tmp_path)
    for bad in ("abc", "-273000", "500000"):
        zone_temp(tmp_path, bad)
        clock.now += 1
        await monitor.poll()
    (tmp_path / "class" / "thermal" / "thermal_zone0" / "temp").unlink()
    await monitor.poll()
    snap = monitor.snapshot()
    assert snap.state is ThermalState.NORMAL
    assert snap.transitions == {}
    assert snap.temperature is None
    assert snap.faults == {"missing": 1, "unreadable": 0, "non_numeric": 1, "absurd": 2, "backwards": 0}
    assert snap.ignored_readings == 4


async def test_a_faulty_file_is_logged_once(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    monitor, clock, _ = monitor_on(tmp_path)
    zone_temp(tmp_path, "abc")
    with caplog.at_level(logging.WARNING, logger="edgecascade.thermal"):
        for _ in range(3):
            clock.now += 1
            await monitor.poll()
    warnings = [r.getMessage() for r in caplog.records if "is non_numeric" in r.getMessage()]
    assert len(warnings) == 1
    assert "thermal_zone0/temp" in warnings[0]
    assert monitor.snapshot().faults["non_numeric"] == 3


class FlakySensors:
    """Platform sensors that raise on the reads the test chooses (a fake at the edge: the hardware)."""

    def __init__(self, temperatures: list[float | Exception]) -> None:
        self.temperatures = temperatures

    def read(self, now: float) -> PlatformSample:
        value = self.temperatures.pop(0)
        if isinstance(value, Exception):
            raise value
        return PlatformSample(SensorReading(value, "celsius", Source.MEASURED, "fake"), None, None)


async def test_the_monitor_survives_a_sensor_raising(tmp_path: Path) -> None:
    sensors = FlakySensors([85.0, OSError("EIO"), RuntimeError("driver bug"), 86.0])
    section = ThermalSection(sysfs_root=str(tmp_path))
    monitor = ThermalMonitor(section, sensors=sensors, cpu=ProcessCpu(cores=1, cpu_seconds=CpuTime()))
    states = [(await monitor.poll()).state for _ in range(4)]
    assert states == [ThermalState.SOFT] * 4
    snap = monitor.snapshot()
    assert snap.sensor_errors == 2
    assert snap.decision.shrink_steps == 2  # the failed reads neither shrank nor relaxed anything
    assert snap.polls == 4


async def test_a_failing_listener_is_counted_and_the_others_still_hear(tmp_path: Path) -> None:
    monitor, clock, _ = monitor_on(tmp_path)
    heard: list[ThermalState] = []

    def broken(decision: ThermalDecision) -> None:
        raise RuntimeError("listener bug")

    monitor.add_listener(broken)
    monitor.add_listener(lambda d: heard.append(d.state))
    zone_temp(tmp_path, "99000")
    clock.now += 1
    snap = await monitor.poll()
    assert heard == [ThermalState.NORMAL, ThermalState.HARD]
    assert snap.listener_errors == 2  # at subscription and at the change


async def test_start_polls_periodically_until_stopped(tmp_path: Path) -> None:
    zone_temp(tmp_path, "85000")
    monitor, _, _ = monitor_on(tmp_path, period_s=0.05)
    decisions: list[ThermalDecision] = []
    second_step = asyncio.Event()

    def listen(decision: ThermalDecision) -> None:
        decisions.append(decision)
        if decision.shrink_steps == 2:
            second_step.set()

    monitor.add_listener(listen)
    await monitor.start()
    await asyncio.wait_for(second_step.wait(), 5)  # two periods above the soft limit: two halvings
    await monitor.stop()
    assert [d.shrink_steps for d in decisions[:3]] == [0, 1, 2]
    stopped_at = monitor.snapshot().polls
    assert monitor.snapshot().state is ThermalState.SOFT
    await asyncio.sleep(0.15)
    assert monitor.snapshot().polls == stopped_at


async def test_a_disabled_monitor_does_not_poll(tmp_path: Path) -> None:
    zone_temp(tmp_path, "99000")
    monitor, _, _ = monitor_on(tmp_path, enabled=False, period_s=0.05)
    await monitor.start()
    await asyncio.sleep(0.15)
    await monitor.stop()
    snap = monitor.snapshot()
    assert (snap.enabled, snap.polls, snap.state) == (False, 0, ThermalState.NORMAL)


class StuckSensors:
    """A read that blocks until released (a wedged controller), then reads 97 °C."""

    def __init__(self) -> None:
        import threading

        self.release = threading.Event()
        self.reads = 0

    def read(self, now: float) -> PlatformSample:
        self.reads += 1
        self.release.wait(10)
        return PlatformSample(SensorReading(97.0, "celsius", Source.MEASURED, "x86_pkg_temp"), None, None)


async def test_a_read_that_never_returns_does_not_freeze_the_policy(tmp_path: Path) -> None:
    sensors = StuckSensors()
    section = ThermalSection(sysfs_root=str(tmp_path), period_s=0.05, stale_periods=2)
    monitor = ThermalMonitor(section, sensors=sensors, cpu=ProcessCpu(cores=1, cpu_seconds=CpuTime()))
    try:
        for _ in range(4):  # each poll gives up after a period; no second read starts behind the stuck one
            snap = await monitor.poll()
        assert sensors.reads == 1 and snap.sensor_errors == 4 and snap.polls == 4
        assert snap.ignored_readings == 4
    finally:
        sensors.release.set()
    for _ in range(200):  # once it returns, reads go on
        snap = await monitor.poll()
        if snap.temperature is not None:
            break
        await asyncio.sleep(0.01)
    assert snap.temperature is not None and snap.state is ThermalState.HARD and sensors.reads >= 2
