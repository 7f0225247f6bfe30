"""The device's sensors, read from sysfs under a configurable root, and its own CPU time.

* **Temperature**: Linux thermal zones, ``<root>/class/thermal/thermal_zone<N>/temp`` in millidegrees
  Celsius, each named by its ``type`` file. Only the configured zone types are read (all zones when
  none is configured); the hottest valid zone is the device's temperature.
* **Energy**: RAPL powercap counters, ``<root>/class/powercap/<control>:<N>/energy_uj``, which wrap at
  ``max_energy_range_uj``. Only top-level *package* domains count: subzones (``intel-rapl:0:0``,
  the cores and uncore inside a package) and ``psys``/``dram`` are parts or supersets of a package,
  and adding them would count the same joules twice.
* **Frequency**: ``<root>/devices/system/cpu/cpu<N>/cpufreq/scaling_cur_freq`` (kHz), averaged.
* **CPU time** of this process (:class:`ProcessCpu`), from which the power profile estimates energy
  where no counter exists.

Readers never raise for what they find on disk: a missing, unreadable, non-numeric or absurd value,
or a counter that ran backwards, becomes a :class:`SensorFault` of its kind and is left out of the
reading. A platform that exposes no such files at all (a container) is not at fault: its readings are
simply None. Reads touch the filesystem; the monitor runs them off the event loop.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Callable
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import Protocol

TEMPERATURE = "temperature"
ENERGY = "energy"
FREQUENCY = "frequency"

# A sysfs attribute is one short line; reading more of a file that is not one would only cost memory.
_MAX_ATTRIBUTE_BYTES = 256
# sysfs writes plain decimal integers; int() alone would also take "1_000" or non-ASCII digits.
_INTEGER = re.compile(r"-?[0-9]+")
_ZONE = re.compile(r"thermal_zone[0-9]+")
_CPU = re.compile(r"cpu[0-9]+")
# A top-level powercap zone is "<control type>:<index>"; its subzones add another ":<index>".
_TOP_LEVEL_ZONE = re.compile(r"[a-z0-9_-]+:[0-9]+")
# No CPU clocks above this; a larger figure is a broken driver, not a fast core.
MAX_PLAUSIBLE_KHZ = 10_000_000


class Source(StrEnum):
    """Whether a figure was read from a sensor or estimated from the power profile."""

    MEASURED = "measured"
    ESTIMATED = "estimated"


class FaultKind(StrEnum):
    """Why a sensor value was left out (the value is its counter's label)."""

    MISSING = "missing"
    UNREADABLE = "unreadable"
    NON_NUMERIC = "non_numeric"
    ABSURD = "absurd"
    BACKWARDS = "backwards"


@dataclass(frozen=True)
class SensorFault:
    """One value left out of a reading.

    Attributes:
        sensor: ``temperature``, ``energy`` or ``frequency``.
        kind: Why.
        path: The file at fault.
    """

    sensor: str
    kind: FaultKind
    path: str


@dataclass(frozen=True)
class SensorReading:
    """One figure and where it came from.

    Attributes:
        value: The figure, in ``unit``.
        unit: ``celsius``, ``joules``, ``watts``, ``mhz`` or ``utilization`` (0 to 1 of all cores).
        source: Measured by a sensor, or estimated from the power profile.
        origin: What produced it: the zone type, the RAPL domains, ``profile`` or ``process``.
        window_s: For an amount over time (energy, utilization), the seconds it covers; else 0.
    """

    value: float
    unit: str
    source: Source
    origin: str
    window_s: float = 0.0


@dataclass(frozen=True)
class Measurement:
    """What one reader found: its reading (None when nothing valid was read) and the values it left out."""

    reading: SensorReading | None
    faults: tuple[SensorFault, ...] = ()


@dataclass(frozen=True)
class PlatformSample:
    """One read of every platform sensor.

    Attributes:
        temperature: The hottest valid zone, or None.
        energy: Joules since the previous read (``window_s``), or None: no counters, the first read, or
            a fault in any domain (a partial sum would under-count; the caller estimates instead).
        frequency: The mean current frequency of the cores that expose one, or None.
        faults: Every value left out of this read.
    """

    temperature: SensorReading | None
    energy: SensorReading | None
    frequency: SensorReading | None
    faults: tuple[SensorFault, ...] = ()


class Sensors(Protocol):
    """The platform's sensors as the monitor sees them."""

    def read(self, now: float) -> PlatformSample:
        """Reads every sensor; ``now`` is the monotonic time of the read, for rates."""
        ...


def read_text(path: Path) -> str | FaultKind:
    """Returns a sysfs attribute's text, stripped, or why it cannot be had."""
    try:
        with path.open("rb") as fh:
            raw = fh.read(_MAX_ATTRIBUTE_BYTES)
    except FileNotFoundError:
        return FaultKind.MISSING
    except OSError:
        return FaultKind.UNREADABLE
    return raw.decode("ascii", errors="replace").strip()


def read_integer(path: Path) -> int | FaultKind:
    """Returns a sysfs attribute as an integer, or why it cannot be had."""
    text = read_text(path)
    if isinstance(text, FaultKind):
        return text
    if not _INTEGER.fullmatch(text):
        return FaultKind.NON_NUMERIC
    return int(text)


# Zones whose last valid value is kept (a tree can be large; real devices have a handful).
MAX_ZONES = 256


class ThermalZoneReader:
    """Reads the hottest of the device's thermal zones.

    Args:
        root: The sysfs root (``/sys``).
        zone_types: The zone types to read (``x86_pkg_temp``, ``cpu-thermal``, ...); empty = every zone.
        min_c: The coldest plausible reading; below it the value is absurd.
        max_c: The hottest plausible reading; above it the value is absurd.
        hold_reads: How many reads a zone's last valid value stands in for a bad one.
    """

    def __init__(
        self,
        root: Path,
        zone_types: tuple[str, ...] = (),
        min_c: float = -40.0,
        max_c: float = 150.0,
        hold_reads: int = 30,
    ):
        self.base = root / "class" / "thermal"
        self.zone_types = frozenset(zone_types)
        self.min_c = min_c
        self.max_c = max_c
        self.hold_reads = hold_reads
        self._reads = 0
        self._last: dict[str, tuple[float, int]] = {}  # zone → its last valid °C and the read it came from

    def read(self) -> Measurement:
        """Reads every selected zone; the reading is the hottest valid one.

        None (no valid reading) when a zone whose value is bad this time was hotter, within
        the last ``hold_reads`` reads, than every zone read well: otherwise one bad value from
        the hot zone would make a cooler zone the device's temperature, and a critical device
        would pass for a cool one.
        """
        self._reads += 1
        faults: list[SensorFault] = []
        hottest: SensorReading | None = None
        hidden = -math.inf  # the hottest recent value of a zone that failed this time
        for zone in sorted(p for p in self.base.glob("thermal_zone*") if _ZONE.fullmatch(p.name)):
            zone_type = self._zone_type(zone, faults)
            if zone_type is None:
                continue
            celsius = self._celsius(zone / "temp", faults)
            key = zone.name
            if celsius is None:
                continue
            if key in self._last or len(self._last) < MAX_ZONES:
                self._last[key] = (celsius, self._reads)
            if hottest is None or celsius > hottest.value:
                hottest = SensorReading(celsius, "celsius", Source.MEASURED, zone_type)
        for celsius, read in self._last.values():
            # A zone read well before but not now (bad value, unreadable type, gone for a driver reload).
            if read != self._reads and self._reads - read <= self.hold_reads:
                hidden = max(hidden, celsius)
        if hottest is not None and hidden > hottest.value:
            return Measurement(None, tuple(faults))  # the zone that matters could not be read
        return Measurement(hottest, tuple(faults))

    def _zone_type(self, zone: Path, faults: list[SensorFault]) -> str | None:
        """The zone's type, or None when the zone is not to be read."""
        zone_type = read_text(zone / "type")
        if isinstance(zone_type, FaultKind):
            faults.append(SensorFault(TEMPERATURE, zone_type, str(zone / "type")))
            # Unfiltered, the temperature still counts; filtered, a zone of unknown type cannot be chosen.
            return None if self.zone_types else zone.name
        if self.zone_types and zone_type not in self.zone_types:
            return None
        return zone_type

    def _celsius(self, path: Path, faults: list[SensorFault]) -> float | None:
        millidegrees = read_integer(path)
        if isinstance(millidegrees, FaultKind):
            faults.append(SensorFault(TEMPERATURE, millidegrees, str(path)))
            return None
        celsius = millidegrees / 1000
        if not self.min_c <= celsius <= self.max_c:
            faults.append(SensorFault(TEMPERATURE, FaultKind.ABSURD, str(path)))
            return None
        return celsius


class RaplReader:
    """Turns RAPL package energy counters into joules per read.

    A counter smaller than its previous value has wrapped at ``max_energy_range_uj``, unless the
    energy that wrap implies exceeds ``max_plausible_watts`` over the window: then it ran backwards
    (a reset, a broken driver), and the window is not measured. The first read, and any read with a
    fault in any domain, only sets the baseline of the next.

    Args:
        root: The sysfs root (``/sys``).
        max_plausible_watts: The most the device can draw; a delta implying more is absurd.
    """

    def __init__(self, root: Path, max_plausible_watts: float = 500.0) -> None:
        self.base = root / "class" / "powercap"
        self.max_plausible_watts = max_plausible_watts
        self._ranges: dict[Path, int] = {}
        self._baseline: dict[str, int] = {}
        self._at: float | None = None

    def read(self, now: float) -> Measurement:
        """Reads the counters at monotonic time ``now``; the reading is the joules since the previous read."""
        faults: list[SensorFault] = []
        counters: dict[str, int] = {}
        for domain in self._domains(faults):
            counter = self._counter(domain, faults)
            if counter is not None:
                counters[domain.name] = counter
        previous, since = self._baseline, self._at
        self._baseline, self._at = counters, now
        if not counters or faults or since is None or previous.keys() != counters.keys() or now <= since:
            return Measurement(None, tuple(faults))
        window = now - since
        microjoules = 0
        for name, counter in counters.items():
            delta = self._delta(self.base / name, previous[name], counter, window, faults)
            microjoules += delta or 0
        if faults:
            return Measurement(None, tuple(faults))
        origin = "+".join(sorted(counters))
        return Measurement(SensorReading(microjoules / 1e6, "joules", Source.MEASURED, origin, window))

    def _domains(self, faults: list[SensorFault]) -> list[Path]:
        top_level = [p for p in self.base.glob("*:*") if _TOP_LEVEL_ZONE.fullmatch(p.name)]
        # Some Intel parts expose a package both as intel-rapl:N (MSR) and intel-rapl-mmio:N; the shorter
        # control type sorts first, so the MSR domain is kept and its MMIO twin is dropped by name below.
        top_level.sort(key=lambda p: (len(p.name.partition(":")[0]), p.name))
        chosen: list[Path] = []
        names: set[str] = set()
        for domain in top_level:
            name = read_text(domain / "name")
            if isinstance(name, FaultKind):
                faults.append(SensorFault(ENERGY, name, str(domain / "name")))
            elif name.startswith("package") and name not in names:
                names.add(name)
                chosen.append(domain)
        return chosen

    def _counter(self, domain: Path, faults: list[SensorFault]) -> int | None:
        limit = self._ranges.get(domain)
        if limit is None:
            found = read_integer(domain / "max_energy_range_uj")
            if isinstance(found, FaultKind) or found <= 0:
                kind = found if isinstance(found, FaultKind) else FaultKind.ABSURD
                faults.append(SensorFault(ENERGY, kind, str(domain / "max_energy_range_uj")))
                return None
            limit = self._ranges[domain] = found
        counter = read_integer(domain / "energy_uj")
        if isinstance(counter, FaultKind):
            faults.append(SensorFault(ENERGY, counter, str(domain / "energy_uj")))
            return None
        if not 0 <= counter <= limit:
            faults.append(SensorFault(ENERGY, FaultKind.ABSURD, str(domain / "energy_uj")))
            return None
        return counter

    def _delta(self, domain: Path, before: int, after: int, window: float, faults: list[SensorFault]) -> int | None:
        most = self.max_plausible_watts * window * 1e6
        path = str(domain / "energy_uj")
        if after >= before:
            if after - before > most:
                faults.append(SensorFault(ENERGY, FaultKind.ABSURD, path))
                return None
            return after - before
        wrapped = self._ranges[domain] - before + after
        if wrapped > most:
            faults.append(SensorFault(ENERGY, FaultKind.BACKWARDS, path))
            return None
        return wrapped


class CpuFreqReader:
    """Reads the mean current frequency of the cores that expose cpufreq.

    Args:
        root: The sysfs root (``/sys``).
    """

    def __init__(self, root: Path) -> None:
        self.base = root / "devices" / "system" / "cpu"

    def read(self) -> Measurement:
        """Reads every core's ``scaling_cur_freq``; the reading is their mean in MHz."""
        faults: list[SensorFault] = []
        khz: list[int] = []
        for cpu in sorted(p for p in self.base.glob("cpu*") if _CPU.fullmatch(p.name)):
            if not (cpu / "cpufreq").is_dir():
                continue  # this core (or platform) exposes no frequency: nothing is wrong
            path = cpu / "cpufreq" / "scaling_cur_freq"
            value = read_integer(path)
            if isinstance(value, FaultKind):
                faults.append(SensorFault(FREQUENCY, value, str(path)))
            elif not 0 < value <= MAX_PLAUSIBLE_KHZ:
                faults.append(SensorFault(FREQUENCY, FaultKind.ABSURD, str(path)))
            else:
                khz.append(value)
        if not khz:
            return Measurement(None, tuple(faults))
        mean_mhz = sum(khz) / len(khz) / 1000
        return Measurement(SensorReading(mean_mhz, "mhz", Source.MEASURED, f"{len(khz)} cores"), tuple(faults))


class SysfsSensors:
    """Every platform sensor under one sysfs root (the :class:`Sensors` of a real device).

    Args:
        root: The sysfs root (``/sys``; a temporary tree in tests).
        zone_types: Thermal zone types to read; empty = every zone.
        min_c: The coldest plausible temperature.
        max_c: The hottest plausible temperature.
        max_plausible_watts: The most the device can draw.
        hold_reads: How many reads a thermal zone's last valid value stands in for a bad one.
    """

    def __init__(
        self,
        root: Path,
        zone_types: tuple[str, ...] = (),
        min_c: float = -40.0,
        max_c: float = 150.0,
        max_plausible_watts: float = 500.0,
        hold_reads: int = 30,
    ) -> None:
        self.zones = ThermalZoneReader(root, zone_types, min_c, max_c, hold_reads)
        self.rapl = RaplReader(root, max_plausible_watts)
        self.frequency = CpuFreqReader(root)

    def read(self, now: float) -> PlatformSample:
        """Reads temperature, energy and frequency."""
        temperature = self.zones.read()
        energy = self.rapl.read(now)
        frequency = self.frequency.read()
        return PlatformSample(
            temperature.reading,
            energy.reading,
            frequency.reading,
            temperature.faults + energy.faults + frequency.faults,
        )


def own_cpu_seconds() -> float:
    """CPU seconds (user and system, every thread) this process has used."""
    times = os.times()
    return times.user + times.system


def usable_cores() -> int:
    """The cores this process may run on (its affinity, which a container or taskset may narrow)."""
    try:
        return len(os.sched_getaffinity(0)) or 1
    except AttributeError:  # not on every platform
        return os.cpu_count() or 1


class ProcessCpu:
    """Measures this process's CPU utilization between reads.

    Args:
        cores: The cores the utilization is a share of (default: those this process may run on).
        cpu_seconds: The process's CPU time so far (default :func:`own_cpu_seconds`).
    """

    def __init__(self, cores: int | None = None, cpu_seconds: Callable[[], float] = own_cpu_seconds) -> None:
        self.cores = cores or usable_cores()
        self._cpu_seconds = cpu_seconds
        self._last: tuple[float, float] | None = None

    def read(self, now: float) -> SensorReading | None:
        """The share of all cores used since the previous read (0 to 1), or None on the first read."""
        used = self._cpu_seconds()
        last, self._last = self._last, (now, used)
        if last is None or now <= last[0] or not math.isfinite(used):
            return None
        window = now - last[0]
        utilization = min(1.0, max(0.0, (used - last[1]) / window / self.cores))
        return SensorReading(utilization, "utilization", Source.MEASURED, "process", window)
