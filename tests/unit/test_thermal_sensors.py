"""The sysfs readers against a real temporary sysfs tree: thermal zones, RAPL (wrap, subzones), cpufreq, CPU time."""

from __future__ import annotations

import os
from collections import Counter
from pathlib import Path

import pytest

from tier0_device.thermal.sensors import (
    CpuFreqReader,
    FaultKind,
    Measurement,
    ProcessCpu,
    RaplReader,
    Source,
    SysfsSensors,
    ThermalZoneReader,
)

RANGE_UJ = 262_143_328_850  # a real package's max_energy_range_uj


def zone(root: Path, index: int, zone_type: str | None, temp: str | None) -> Path:
    path = root / "class" / "thermal" / f"thermal_zone{index}"
    path.mkdir(parents=True)
    if zone_type is not None:
        (path / "type").write_text(f"{zone_type}\n")
    if temp is not None:
        (path / "temp").write_text(f"{temp}\n")
    return path


def rapl(root: Path, domain: str, name: str, energy_uj: int, max_range_uj: int = RANGE_UJ) -> Path:
    path = root / "class" / "powercap" / domain
    path.mkdir(parents=True)
    (path / "name").write_text(f"{name}\n")
    (path / "max_energy_range_uj").write_text(f"{max_range_uj}\n")
    (path / "energy_uj").write_text(f"{energy_uj}\n")
    return path


def set_energy(path: Path, energy_uj: int | str) -> None:
    (path / "energy_uj").write_text(f"{energy_uj}\n")


def kinds(measurement: Measurement) -> Counter[FaultKind]:
    return Counter(f.kind for f in measurement.faults)


def test_the_hottest_zone_is_the_temperature(tmp_path: Path) -> None:
    zone(tmp_path, 0, "acpitz", "41000")
    zone(tmp_path, 1, "x86_pkg_temp", "67500")
    zone(tmp_path, 2, "iwlwifi_1", "45000")
    got = ThermalZoneReader(tmp_path).read()
    assert got.reading is not None
    assert got.reading.value == 67.5
    assert got.reading.unit == "celsius"
    assert got.reading.source is Source.MEASURED
    assert got.reading.origin == "x86_pkg_temp"
    assert got.faults == ()


def test_only_the_configured_zone_types_are_read(tmp_path: Path) -> None:
    zone(tmp_path, 0, "acpitz", "90000")
    zone(tmp_path, 1, "cpu-thermal", "55000")
    zone(tmp_path, 2, "soc_thermal", "58000")
    got = ThermalZoneReader(tmp_path, ("cpu-thermal", "soc_thermal")).read()
    assert got.reading is not None
    assert (got.reading.value, got.reading.origin) == (58.0, "soc_thermal")


def test_bad_temperatures_are_counted_by_kind_and_left_out(tmp_path: Path) -> None:
    zone(tmp_path, 0, "x86_pkg_temp", "52000")
    zone(tmp_path, 1, "missing", None)
    unreadable = zone(tmp_path, 2, "unreadable", None)
    (unreadable / "temp").mkdir()  # reading it fails with EISDIR, as a driver's EIO would
    zone(tmp_path, 3, "garbage", "abc")
    zone(tmp_path, 4, "frozen", "-273000")
    zone(tmp_path, 5, "molten", "500000")
    zone(tmp_path, 6, "empty", "")
    got = ThermalZoneReader(tmp_path).read()
    assert got.reading is not None
    assert got.reading.value == 52.0  # 500 °C would have been the hottest: it is ignored
    assert kinds(got) == {
        FaultKind.MISSING: 1,
        FaultKind.UNREADABLE: 1,
        FaultKind.NON_NUMERIC: 2,
        FaultKind.ABSURD: 2,
    }
    assert {Path(f.path).parent.name for f in got.faults if f.kind is FaultKind.ABSURD} == {
        "thermal_zone4",
        "thermal_zone5",
    }
    assert all(f.sensor == "temperature" for f in got.faults)


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads files whatever their mode")
def test_a_permission_denied_temperature_is_unreadable(tmp_path: Path) -> None:
    path = zone(tmp_path, 0, "x86_pkg_temp", "50000")
    (path / "temp").chmod(0)
    got = ThermalZoneReader(tmp_path).read()
    assert got.reading is None
    assert kinds(got) == {FaultKind.UNREADABLE: 1}


def test_a_zone_of_unknown_type_counts_only_when_no_types_are_configured(tmp_path: Path) -> None:
    zone(tmp_path, 0, None, "61000")
    unfiltered = ThermalZoneReader(tmp_path).read()
    assert unfiltered.reading is not None
    assert (unfiltered.reading.value, unfiltered.reading.origin) == (61.0, "thermal_zone0")
    filtered = ThermalZoneReader(tmp_path, ("x86_pkg_temp",)).read()
    assert filtered.reading is None
    assert kinds(filtered) == {FaultKind.MISSING: 1}


def test_no_thermal_zones_is_no_reading_and_no_fault(tmp_path: Path) -> None:
    got = ThermalZoneReader(tmp_path).read()
    assert got == Measurement(None, ())


def test_rapl_sums_top_level_packages_and_ignores_subzones_psys_and_mmio_twins(tmp_path: Path) -> None:
    pkg0 = rapl(tmp_path, "intel-rapl:0", "package-0", 1_000_000)
    pkg1 = rapl(tmp_path, "intel-rapl:1", "package-1", 5_000_000)
    core = rapl(tmp_path, "intel-rapl:0:0", "core", 100)
    psys = rapl(tmp_path, "intel-rapl:2", "psys", 100)
    mmio = rapl(tmp_path, "intel-rapl-mmio:0", "package-0", 100)
    reader = RaplReader(tmp_path)
    assert reader.read(10.0).reading is None  # the first read only sets the baseline
    set_energy(pkg0, 4_000_000)  # +3 J
    set_energy(pkg1, 7_500_000)  # +2.5 J
    for other in (core, psys, mmio):
        set_energy(other, 100_000_000)  # +100 J each, if anyone counted them
    got = reader.read(12.0)
    assert got.faults == ()
    assert got.reading is not None
    assert got.reading.value == pytest.approx(5.5)
    assert got.reading.window_s == pytest.approx(2.0)
    assert got.reading.source is Source.MEASURED
    assert got.reading.origin == "intel-rapl:0+intel-rapl:1"


def test_a_wrapped_counter_gives_the_right_joules(tmp_path: Path) -> None:
    pkg = rapl(tmp_path, "intel-rapl:0", "package-0", RANGE_UJ - 1_000_000)
    reader = RaplReader(tmp_path)
    reader.read(0.0)
    set_energy(pkg, 2_000_000)
    got = reader.read(1.0)
    assert got.faults == ()
    assert got.reading is not None
    assert got.reading.value == pytest.approx(3.0)


def test_a_counter_running_backwards_is_a_fault_and_the_next_period_measures_again(tmp_path: Path) -> None:
    pkg = rapl(tmp_path, "intel-rapl:0", "package-0", 50_000_000)
    reader = RaplReader(tmp_path, max_plausible_watts=500)
    reader.read(0.0)
    set_energy(pkg, 49_000_000)  # a wrap would mean 262 kJ in a second: it ran backwards
    backwards = reader.read(1.0)
    assert backwards.reading is None
    assert kinds(backwards) == {FaultKind.BACKWARDS: 1}
    set_energy(pkg, 53_000_000)
    again = reader.read(2.0)
    assert again.reading is not None
    assert again.reading.value == pytest.approx(4.0)


def test_an_energy_delta_above_the_plausible_power_is_absurd(tmp_path: Path) -> None:
    pkg = rapl(tmp_path, "intel-rapl:0", "package-0", 0)
    reader = RaplReader(tmp_path, max_plausible_watts=100)
    reader.read(0.0)
    set_energy(pkg, 150_000_000)  # 150 J in one second
    got = reader.read(1.0)
    assert got.reading is None
    assert kinds(got) == {FaultKind.ABSURD: 1}


def test_a_fault_in_any_package_leaves_the_whole_period_unmeasured(tmp_path: Path) -> None:
    pkg0 = rapl(tmp_path, "intel-rapl:0", "package-0", 0)
    pkg1 = rapl(tmp_path, "intel-rapl:1", "package-1", 0)
    reader = RaplReader(tmp_path)
    reader.read(0.0)
    set_energy(pkg0, 1_000_000)
    set_energy(pkg1, "abc")
    got = reader.read(1.0)
    assert got.reading is None  # half the device's energy would under-count
    assert kinds(got) == {FaultKind.NON_NUMERIC: 1}
    # The broken period set no baseline for package-1, so the next one only sets it again.
    set_energy(pkg1, 2_000_000)
    assert reader.read(2.0).reading is None
    set_energy(pkg0, 3_000_000)
    set_energy(pkg1, 4_000_000)
    healed = reader.read(3.0)
    assert healed.reading is not None
    assert healed.reading.value == pytest.approx(4.0)


def test_counter_bounds_and_missing_files_are_faults(tmp_path: Path) -> None:
    over = rapl(tmp_path, "intel-rapl:0", "package-0", 0, max_range_uj=1_000)
    no_range = rapl(tmp_path, "intel-rapl:1", "package-1", 0)
    (no_range / "max_energy_range_uj").unlink()
    reader = RaplReader(tmp_path)
    set_energy(over, 5_000)  # beyond the counter's own range
    got = reader.read(0.0)
    assert got.reading is None
    assert kinds(got) == {FaultKind.ABSURD: 1, FaultKind.MISSING: 1}


def test_no_powercap_is_no_reading_and_no_fault(tmp_path: Path) -> None:
    reader = RaplReader(tmp_path)
    assert reader.read(0.0) == Measurement(None, ())
    assert reader.read(1.0) == Measurement(None, ())


def test_cpu_frequency_is_the_mean_of_the_cores_that_expose_one(tmp_path: Path) -> None:
    cpus = tmp_path / "devices" / "system" / "cpu"
    for index, khz in enumerate(("1200000", "2400000", "abc", "0")):
        (cpus / f"cpu{index}" / "cpufreq").mkdir(parents=True)
        (cpus / f"cpu{index}" / "cpufreq" / "scaling_cur_freq").write_text(f"{khz}\n")
    (cpus / "cpu4").mkdir()  # no cpufreq: not a fault
    (cpus / "cpufreq").mkdir()  # the policy directory, not a core
    got = CpuFreqReader(tmp_path).read()
    assert got.reading is not None
    assert got.reading.value == pytest.approx(1800.0)
    assert got.reading.unit == "mhz"
    assert got.reading.origin == "2 cores"
    assert kinds(got) == {FaultKind.NON_NUMERIC: 1, FaultKind.ABSURD: 1}


def test_process_cpu_utilization_is_cpu_time_over_wall_time_and_cores() -> None:
    used = iter([10.0, 13.0, 13.0, 100.0])
    cpu = ProcessCpu(cores=2, cpu_seconds=lambda: next(used))
    assert cpu.read(100.0) is None  # the first read only sets the baseline
    got = cpu.read(102.0)
    assert got is not None
    assert got.value == pytest.approx(0.75)  # 3 CPU seconds over 2 s on 2 cores
    assert got.window_s == pytest.approx(2.0)
    idle = cpu.read(104.0)
    assert idle is not None
    assert idle.value == 0.0
    saturated = cpu.read(105.0)
    assert saturated is not None
    assert saturated.value == 1.0  # clamped: CPU time of children or clock skew cannot exceed all cores


def test_process_cpu_reads_this_process() -> None:
    cpu = ProcessCpu()
    cpu.read(0.0)
    got = cpu.read(1.0)
    assert got is not None
    assert 0.0 <= got.value <= 1.0
    assert cpu.cores >= 1


def test_a_platform_without_sensors_reads_nothing_and_faults_nothing(tmp_path: Path) -> None:
    sensors = SysfsSensors(tmp_path)
    for now in (0.0, 1.0):
        sample = sensors.read(now)
        assert (sample.temperature, sample.energy, sample.frequency, sample.faults) == (None, None, None, ())


def test_a_bad_value_from_the_hot_zone_does_not_let_a_cooler_zone_pass_for_the_temperature(tmp_path: Path) -> None:
    zones = tmp_path / "class" / "thermal"
    for n, (kind, millidegrees) in enumerate((("x86_pkg_temp", "97000"), ("acpitz", "40000"))):
        (zones / f"thermal_zone{n}").mkdir(parents=True)
        (zones / f"thermal_zone{n}" / "type").write_text(kind + "\n")
        (zones / f"thermal_zone{n}" / "temp").write_text(millidegrees + "\n")
    reader = ThermalZoneReader(tmp_path, hold_reads=2)
    first = reader.read().reading
    assert first is not None and first.value == 97.0
    (zones / "thermal_zone0" / "temp").write_text("garbage\n")
    for _ in range(2):  # the hot zone was 97 °C two reads ago: 40 °C is not the device's temperature
        measurement = reader.read()
        assert measurement.reading is None and measurement.faults
    later = reader.read().reading  # past hold_reads, the zones read well speak again
    assert later is not None and later.value == 40.0


def test_a_hot_zone_that_disappears_for_a_while_does_not_let_a_cooler_one_pass(tmp_path: Path) -> None:
    import shutil

    zones = tmp_path / "class" / "thermal"
    for n, (kind, millidegrees) in enumerate((("x86_pkg_temp", "97000"), ("acpitz", "40000"))):
        (zones / f"thermal_zone{n}").mkdir(parents=True)
        (zones / f"thermal_zone{n}" / "type").write_text(kind + "\n")
        (zones / f"thermal_zone{n}" / "temp").write_text(millidegrees + "\n")
    reader = ThermalZoneReader(tmp_path, hold_reads=1)
    assert reader.read().reading is not None
    shutil.rmtree(zones / "thermal_zone0")  # a driver reload
    assert reader.read().reading is None
    later = reader.read().reading
    assert later is not None and later.value == 40.0
