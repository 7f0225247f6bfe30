"""Energy per model version: the device's joules of each period shared among the versions that ran in it.

The engine reports every run (model, version, compute seconds, inferences, tokens) with
:meth:`EnergyAccountant.record_run`; the monitor closes each period with the device's energy over
it, measured by RAPL or estimated from the :class:`PowerProfile` and the process's CPU utilization
(:meth:`EnergyAccountant.close_period`). The period's joules go to the versions that ran in it in
proportion to their compute time — all of them, idle power included, so inferences per joule says
what serving costs the device, not only the marginal cost of the arithmetic. A period in which
nothing ran is counted as idle energy. A version's runs count towards its inferences and tokens when
their period is closed, so its ratios always pair counts with the joules of the same periods.

Pure bookkeeping, safe to call from any thread: no clock, no I/O, no metrics SDK; a later phase
exports :meth:`EnergyAccountant.snapshot` as OpenTelemetry metrics and in the node's status.
"""

from __future__ import annotations

import math
import threading
from dataclasses import dataclass

from services.errors import ConfigError
from tier0_device.thermal.sensors import SensorReading, Source


@dataclass(frozen=True)
class PowerProfile:
    """What a device class draws, for devices without an energy counter.

    Attributes:
        idle_watts: Power with no work.
        busy_watts: Power with every core busy; in between, linear in the process's CPU utilization.
    """

    idle_watts: float = 2.0
    busy_watts: float = 6.0

    def __post_init__(self) -> None:
        if not (math.isfinite(self.idle_watts) and self.idle_watts >= 0):
            raise ConfigError(f"idle_watts must be a number of watts, at least 0, got {self.idle_watts}")
        if not (math.isfinite(self.busy_watts) and self.busy_watts >= self.idle_watts):
            raise ConfigError(
                f"busy_watts ({self.busy_watts}) must be at least idle_watts ({self.idle_watts}): "
                "a busy device draws no less than an idle one"
            )

    def watts(self, utilization: float) -> float:
        """Estimated power at ``utilization`` (0 to 1 of all cores; clamped)."""
        share = min(1.0, max(0.0, utilization))
        return self.idle_watts + (self.busy_watts - self.idle_watts) * share

    def estimate(self, utilization: SensorReading) -> SensorReading:
        """The energy estimated over a measured utilization's window, labelled estimated."""
        joules = self.watts(utilization.value) * utilization.window_s
        return SensorReading(joules, "joules", Source.ESTIMATED, "profile", utilization.window_s)


@dataclass(frozen=True)
class VersionEnergy:
    """What one model version ran and the energy it was given.

    Attributes:
        model: The model's name.
        version: Its version.
        joules: Energy apportioned to it (``measured_joules + estimated_joules``).
        measured_joules: The part from periods measured by a sensor.
        estimated_joules: The part from periods estimated from the power profile.
        compute_s: Compute seconds of its runs.
        inferences: Inferences (rows) it answered.
        tokens: Tokens it generated.
    """

    model: str
    version: str
    joules: float
    measured_joules: float
    estimated_joules: float
    compute_s: float
    inferences: int
    tokens: int

    @property
    def inferences_per_joule(self) -> float | None:
        """Inferences per joule, or None before any energy was apportioned."""
        return self.inferences / self.joules if self.joules > 0 else None

    @property
    def joules_per_token(self) -> float | None:
        """Joules per generated token, or None for a version that generated none."""
        return self.joules / self.tokens if self.tokens > 0 else None

    @property
    def source(self) -> Source | None:
        """Measured when no part of its energy was estimated; None before any energy."""
        if self.joules <= 0:
            return None
        return Source.ESTIMATED if self.estimated_joules > 0 else Source.MEASURED


@dataclass(frozen=True)
class EnergySnapshot:
    """The device's energy so far.

    Attributes:
        joules: All energy of the closed periods (``measured_joules + estimated_joules``).
        measured_joules: The part measured by a sensor.
        estimated_joules: The part estimated from the power profile.
        idle_joules: Energy of periods in which nothing ran (apportioned to no version).
        periods: Periods closed.
        power: The latest period's mean power, labelled measured or estimated; None before the first.
        versions: Every version that was given energy, by model and version.
    """

    joules: float
    measured_joules: float
    estimated_joules: float
    idle_joules: float
    periods: int
    power: SensorReading | None
    versions: tuple[VersionEnergy, ...]

    def version(self, model: str, version: str) -> VersionEnergy | None:
        """One version's figures, or None when it was given no energy yet."""
        return next((v for v in self.versions if v.model == model and v.version == version), None)


@dataclass
class _Runs:
    compute_s: float = 0.0
    inferences: int = 0
    tokens: int = 0


@dataclass
class _Totals:
    measured_j: float = 0.0
    estimated_j: float = 0.0
    compute_s: float = 0.0
    inferences: int = 0
    tokens: int = 0

    def add(self, joules: float, source: Source, runs: _Runs) -> None:
        if source is Source.MEASURED:
            self.measured_j += joules
        else:
            self.estimated_j += joules
        self.compute_s += runs.compute_s
        self.inferences += runs.inferences
        self.tokens += runs.tokens


class EnergyAccountant:
    """Apportions the device's energy to model versions by compute time (see the module docstring)."""

    def __init__(self) -> None:
        # The engine reports runs from wherever they finish while the monitor closes periods on the loop.
        self._lock = threading.Lock()
        self._open: dict[tuple[str, str], _Runs] = {}
        self._versions: dict[tuple[str, str], _Totals] = {}
        self._measured_j = 0.0
        self._estimated_j = 0.0
        self._idle_j = 0.0
        self._periods = 0
        self._power: SensorReading | None = None

    def record_run(self, model: str, version: str, compute_s: float, inferences: int, tokens: int = 0) -> None:
        """Counts one run of a model version in the open period.

        Args:
            model: The model's name.
            version: Its version.
            compute_s: Seconds the run computed (the session's run time, not the queueing).
            inferences: Inferences (rows) it answered.
            tokens: Tokens it generated (0 for a model that generates none).

        Raises:
            ValueError: A negative or non-finite figure (a bug of the caller, not a fact about the device).
        """
        if not (math.isfinite(compute_s) and compute_s >= 0) or inferences < 0 or tokens < 0:
            raise ValueError(
                f"a run of {model} {version} reported compute_s={compute_s}, inferences={inferences}, "
                f"tokens={tokens}; none may be negative"
            )
        with self._lock:
            runs = self._open.setdefault((model, version), _Runs())
            runs.compute_s += compute_s
            runs.inferences += inferences
            runs.tokens += tokens

    def close_period(self, energy: SensorReading) -> None:
        """Closes the open period with the device's energy over it and shares it among the runs in it.

        Args:
            energy: Joules over ``energy.window_s`` seconds, measured or estimated.

        Raises:
            ValueError: The energy is not a finite number of joules at least 0.
        """
        if energy.unit != "joules" or not (math.isfinite(energy.value) and energy.value >= 0):
            raise ValueError(f"a period's energy must be a finite number of joules, got {energy}")
        with self._lock:
            runs, self._open = self._open, {}
            self._periods += 1
            if energy.source is Source.MEASURED:
                self._measured_j += energy.value
            else:
                self._estimated_j += energy.value
            if energy.window_s > 0:
                watts = energy.value / energy.window_s
                self._power = SensorReading(watts, "watts", energy.source, energy.origin, energy.window_s)
            self._apportion(energy, runs)

    def _apportion(self, energy: SensorReading, runs: dict[tuple[str, str], _Runs]) -> None:
        compute = sum(r.compute_s for r in runs.values())
        inferences = sum(r.inferences for r in runs.values())
        if compute <= 0 and inferences <= 0:
            self._idle_j += energy.value
            return
        for key, run in runs.items():
            # Runs too short for the clock to see still ran: share by inferences then.
            share = run.compute_s / compute if compute > 0 else run.inferences / inferences
            self._versions.setdefault(key, _Totals()).add(energy.value * share, energy.source, run)

    def snapshot(self) -> EnergySnapshot:
        """The energy so far (the open period's runs are not in it until it closes)."""
        with self._lock:
            versions = tuple(
                VersionEnergy(
                    model=model,
                    version=version,
                    joules=t.measured_j + t.estimated_j,
                    measured_joules=t.measured_j,
                    estimated_joules=t.estimated_j,
                    compute_s=t.compute_s,
                    inferences=t.inferences,
                    tokens=t.tokens,
                )
                for (model, version), t in sorted(self._versions.items())
            )
            return EnergySnapshot(
                joules=self._measured_j + self._estimated_j,
                measured_joules=self._measured_j,
                estimated_joules=self._estimated_j,
                idle_joules=self._idle_j,
                periods=self._periods,
                power=self._power,
                versions=versions,
            )
