"""The thermal monitor: reads the sensors every period and feeds the policy and the energy accountant.

Each period (:meth:`ThermalMonitor.poll`) the platform sensors are read in a worker thread (sysfs
reads may block; the event loop must not), the process's CPU utilization is measured, the
temperature goes to the :class:`~tier0_device.thermal.policy.ThermalPolicy` and the period's energy
to the :class:`~tier0_device.thermal.energy.EnergyAccountant`: the RAPL measurement when there is a
valid one, else the power profile's estimate from the utilization, labelled as such. Listeners are
called on the event loop with every new :class:`~tier0_device.thermal.policy.ThermalDecision`.

Nothing a sensor does stops the monitor: an exception from a read is counted (``sensor_errors``),
logged at the first of a streak, and the period goes on without a reading; faults the readers found
are counted by kind, and each faulty file is logged once.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import threading
import time
from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

from services.ticker import Ticker
from tier0_device.thermal.config import ThermalSection
from tier0_device.thermal.energy import EnergyAccountant, EnergySnapshot
from tier0_device.thermal.policy import ThermalDecision, ThermalPolicy, ThermalState
from tier0_device.thermal.sensors import (
    ENERGY,
    FaultKind,
    PlatformSample,
    ProcessCpu,
    SensorFault,
    SensorReading,
    Sensors,
    SysfsSensors,
)

log = logging.getLogger("edgecascade.thermal")

DecisionListener = Callable[[ThermalDecision], None]


def _settle(read: asyncio.Future[PlatformSample], outcome: PlatformSample | BaseException) -> None:
    """Completes a read with what the sensor thread got (unless the read was given up and cancelled)."""
    if read.done():
        return
    if isinstance(outcome, BaseException):
        read.set_exception(outcome)
    else:
        read.set_result(outcome)


def _consume(read: asyncio.Future[PlatformSample]) -> None:
    """Retrieves the outcome of a read given up on, so that its error is not reported as never retrieved."""
    if not read.cancelled():
        read.exception()


# stale_periods = 0 keeps the last state for ever: a zone's last value then stands in for ever too.
HOLD_FOREVER = 1 << 62

# Faulty files are logged once each; past this many distinct ones, only counted (a broken tree can be large).
_MAX_LOGGED_FAULTS = 256


@dataclass(frozen=True)
class ThermalSnapshot:
    """The device's thermal and energy state, for status and metrics.

    Attributes:
        enabled: Whether the monitor runs (``[thermal] enabled``).
        device_class: The device class whose limits and profile apply.
        decision: The decision in force.
        temperature: The latest period's temperature, or None when it had no valid one.
        frequency: The latest period's mean CPU frequency, or None where not exposed.
        utilization: The latest period's process CPU utilization, or None before the second period.
        energy: Energy so far, per model version; its ``power`` is the latest period's, measured or estimated.
        faults: Values left out, by kind (every kind listed, 0 included).
        faults_by_sensor: Values left out, by ``<sensor>.<kind>``.
        sensor_errors: Sensor reads that raised.
        listener_errors: Decision listeners that raised.
        ignored_readings: Periods the policy had no valid temperature.
        transitions: State changes, by ``previous->state``.
        polls: Periods run.
    """

    enabled: bool
    device_class: str
    decision: ThermalDecision
    temperature: SensorReading | None
    frequency: SensorReading | None
    utilization: SensorReading | None
    energy: EnergySnapshot
    faults: Mapping[str, int]
    faults_by_sensor: Mapping[str, int]
    sensor_errors: int
    listener_errors: int
    ignored_readings: int
    transitions: Mapping[str, int]
    polls: int

    @property
    def state(self) -> ThermalState:
        """The thermal state in force."""
        return self.decision.state


class ThermalMonitor:
    """Runs the sensors, the policy and the accountant every ``[thermal] period_s``.

    Args:
        section: The ``[thermal]`` settings.
        sensors: The platform's sensors (default: sysfs under ``section.sysfs_root``).
        cpu: This process's CPU meter (default: its own CPU time over its usable cores).
        accountant: Where energy is accounted (default: a new one; see :attr:`accountant`).
        clock: The monotonic clock periods are measured with.
    """

    def __init__(
        self,
        section: ThermalSection,
        sensors: Sensors | None = None,
        cpu: ProcessCpu | None = None,
        accountant: EnergyAccountant | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.section = section
        self.sensors: Sensors = sensors or SysfsSensors(
            Path(section.sysfs_root),
            section.zone_types,
            section.min_plausible_c,
            section.max_plausible_c,
            section.max_plausible_watts,
            # A zone's last valid value stands in for a bad one as long as a missing reading would hold the state.
            section.stale_periods or HOLD_FOREVER,
        )
        self.cpu = cpu or ProcessCpu()
        self.accountant = accountant or EnergyAccountant()
        self.policy = ThermalPolicy(section.limits())
        self._profile = section.power_profile()
        self._clock = clock
        self._listeners: list[DecisionListener] = []
        self._ticker: Ticker | None = None
        self._stuck: asyncio.Future[PlatformSample] | None = None  # a read given up on that has not returned
        self._latest = PlatformSample(None, None, None)
        self._utilization: SensorReading | None = None
        self._faults: Counter[str] = Counter({kind.value: 0 for kind in FaultKind})
        self._faults_by_sensor: Counter[str] = Counter()
        self._logged_faults: set[tuple[FaultKind, str]] = set()
        self._sensor_errors = 0
        self._failing = False
        self._listener_errors = 0
        self._polls = 0

    @property
    def decision(self) -> ThermalDecision:
        """The decision in force."""
        return self.policy.decision

    def add_listener(self, listener: DecisionListener) -> None:
        """Calls ``listener`` with the decision in force now and with every new one (on the event loop)."""
        self._listeners.append(listener)
        self._notify((listener,), self.policy.decision)

    def record_run(self, model: str, version: str, compute_s: float, inferences: int, tokens: int = 0) -> None:
        """Counts one run of a model version (see :meth:`EnergyAccountant.record_run`)."""
        self.accountant.record_run(model, version, compute_s, inferences, tokens)

    async def start(self) -> None:
        """Starts polling every period (inside the running event loop); does nothing when disabled."""
        if self.section.enabled and self._ticker is None:
            self._ticker = Ticker("thermal monitor", self.section.period_s, self._tick)
            self._ticker.start()

    async def stop(self) -> None:
        """Stops polling and waits for a poll in progress to end."""
        if self._ticker is not None:
            await self._ticker.stop()

    async def _tick(self) -> None:
        await self.poll()

    async def _read(self, now: float) -> PlatformSample:
        """Reads the sensors in a daemon thread, waiting at most one period for it.

        A read that does not return (a wedged embedded controller, a FIFO where a file
        should be) must not freeze the policy: the period goes on without readings, and
        no second read starts while the first is still stuck. The thread is a daemon's,
        not the loop's default executor, so a stuck read cannot hold the process at exit.
        """
        if self._stuck is not None:
            if not self._stuck.done():
                raise TimeoutError("the previous sensor read has not returned")
            self._stuck = None
        loop = asyncio.get_running_loop()
        read: asyncio.Future[PlatformSample] = loop.create_future()

        def work() -> None:
            try:
                outcome: PlatformSample | BaseException = self.sensors.read(now)
            except BaseException as exc:  # handed to the loop, which counts it
                outcome = exc
            with contextlib.suppress(RuntimeError):  # the loop closed while this read was stuck
                loop.call_soon_threadsafe(_settle, read, outcome)

        threading.Thread(target=work, name="thermal-sensors", daemon=True).start()
        try:
            return await asyncio.wait_for(asyncio.shield(read), self.section.period_s)
        finally:
            if not read.done():
                self._stuck = read
                read.add_done_callback(_consume)

    async def poll(self) -> ThermalSnapshot:
        """Runs one period: reads, decides, accounts and notifies; returns the snapshot after it."""
        now = self._clock()
        try:
            sample = await self._read(now)
        except Exception:
            self._sensor_errors += 1
            if not self._failing:
                log.warning("reading the thermal sensors failed; periods go on without readings", exc_info=True)
            self._failing = True
            sample = PlatformSample(None, None, None)
        else:
            if self._failing:
                log.info("the thermal sensors are read again after %d failed reads", self._sensor_errors)
            self._failing = False
        self._polls += 1
        self._utilization = self.cpu.read(now)
        self._count(sample.faults)
        self._latest = sample
        energy = self._period_energy(sample.energy)
        if energy is not None:
            self.accountant.close_period(energy)
        before = self.policy.decision
        update = self.policy.update(sample.temperature.value if sample.temperature is not None else None)
        if update.decision != before:
            self._notify(tuple(self._listeners), update.decision)
        return self.snapshot()

    def _period_energy(self, measured: SensorReading | None) -> SensorReading | None:
        """The period's energy: the measurement when it is sound, else the profile's estimate (None on the first)."""
        if measured is not None:
            sound = measured.unit == "joules" and math.isfinite(measured.value) and measured.value >= 0
            if sound:
                return measured
            self._count((SensorFault(ENERGY, FaultKind.ABSURD, measured.origin),))
        if self._utilization is None:
            return None
        return self._profile.estimate(self._utilization)

    def _count(self, faults: tuple[SensorFault, ...]) -> None:
        for fault in faults:
            self._faults[fault.kind.value] += 1
            self._faults_by_sensor[f"{fault.sensor}.{fault.kind.value}"] += 1
            key = (fault.kind, fault.path)
            if key not in self._logged_faults and len(self._logged_faults) < _MAX_LOGGED_FAULTS:
                self._logged_faults.add(key)
                log.warning("%s sensor %s is %s; its values are ignored", fault.sensor, fault.path, fault.kind)

    def _notify(self, listeners: tuple[DecisionListener, ...], decision: ThermalDecision) -> None:
        for listener in listeners:
            try:
                listener(decision)
            except Exception:
                self._listener_errors += 1
                log.exception("a thermal decision listener failed")

    def snapshot(self) -> ThermalSnapshot:
        """The state after the latest period."""
        return ThermalSnapshot(
            enabled=self.section.enabled,
            device_class=self.section.device_class,
            decision=self.policy.decision,
            temperature=self._latest.temperature,
            frequency=self._latest.frequency,
            utilization=self._utilization,
            energy=self.accountant.snapshot(),
            faults=dict(self._faults),
            faults_by_sensor=dict(self._faults_by_sensor),
            sensor_errors=self._sensor_errors,
            listener_errors=self._listener_errors,
            ignored_readings=self.policy.ignored_readings,
            transitions=dict(self.policy.transitions),
            polls=self._polls,
        )
