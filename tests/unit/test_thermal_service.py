"""The device's thermal component over a real model cache and a real temporary sysfs tree.

The monitor's ticker runs once at start (the period is long), and the test polls it by hand
after that, so every step is one period.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from opentelemetry.sdk.trace import TracerProvider

from protos.edgecascade.v1 import mesh_pb2
from services.engine.batcher import BatchingConfig
from services.engine.model_cache import ModelCache
from services.engine.model_repository import ModelRepository
from services.engine.run_pool import RunPool
from services.engine.throttle import VARIANT_PROPERTY, Throttle
from services.inference import FallbackReason, NodeIdentity
from services.rpc.components import NodeContext
from services.telemetry_names import (
    ENERGY,
    INFERENCES_PER_JOULE,
    JOULES_PER_TOKEN,
    MODEL_NAME,
    MODEL_VARIANT,
    SOURCE,
    STATE,
    THERMAL_STATE,
)
from tests.support.onnx_models import linear_model, tiny_char_lm
from tier0_device.config import DeviceConfig
from tier0_device.thermal import policy
from tier0_device.thermal.config import ThermalSection
from tier0_device.thermal.policy import ThermalDecision, ThermalState
from tier0_device.thermal.sensors import ProcessCpu
from tier0_device.thermal.thermal_service import ThermalService, throttle_for


def write(path: Path, text: str) -> None:
    """Replaces a sysfs file at once, as the kernel does (a reader never sees half a value)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    staging = path.with_name(path.name + ".new")
    staging.write_text(text + "\n")
    os.replace(staging, path)


def zone(root: Path, celsius: float) -> None:
    write(root / "class" / "thermal" / "thermal_zone0" / "type", "x86_pkg_temp")
    write(root / "class" / "thermal" / "thermal_zone0" / "temp", str(round(celsius * 1000)))


class CpuTime:
    """This process's CPU seconds as the test sets them (the estimate then does not depend on the machine)."""

    def __init__(self) -> None:
        self.seconds = 0.0

    def __call__(self) -> float:
        return self.seconds


@pytest.fixture
async def cache(tmp_path: Path) -> AsyncIterator[ModelCache]:
    repo = ModelRepository(tmp_path / "repo")
    repo.add("lin", linear_model(tmp_path / "lin.onnx"), properties={VARIANT_PROPERTY: "int8"})
    repo.add("lm", tiny_char_lm(tmp_path / "lm.onnx"))
    pool = RunPool(2)
    built = ModelCache(repo, pool, BatchingConfig(max_batch_size=16), 1 << 40)
    yield built
    await built.close()
    pool.close()


def context(cache: ModelCache, reader: InMemoryMetricReader, **thermal: Any) -> NodeContext:
    return NodeContext(
        DeviceConfig(thermal=ThermalSection(**thermal)),
        NodeIdentity("tier0", "device-t"),
        TracerProvider(),
        cache,
        MeterProvider(metric_readers=[reader]),
    )


def points(reader: InMemoryMetricReader, metric: str) -> list[Any]:
    data = reader.get_metrics_data()
    if data is None:
        return []
    return [
        p
        for rm in data.resource_metrics
        for sm in rm.scope_metrics
        for m in sm.metrics
        if m.name == metric
        for p in m.data.data_points
    ]


def test_each_decision_becomes_the_engines_throttle() -> None:
    assert throttle_for(ThermalDecision()) == Throttle()
    hot = ThermalDecision(ThermalState.SOFT, shrink_steps=3, batch_floor=2, thread_floor=1, prefer_int8=True)
    assert throttle_for(hot) == Throttle(shrink_steps=3, batch_floor=2, slot_floor=1, prefer_int8=True)
    critical = ThermalDecision(ThermalState.HARD, 12, 4, 2, prefer_int8=True, forward_new_work=True)
    assert throttle_for(critical) == Throttle(12, 4, 2, True, FallbackReason.THERMAL)
    # One word on the wire and in the metrics, the engine's own reason.
    assert FallbackReason.THERMAL.value == "thermal"


async def test_disabled_it_observes_nothing_throttles_nothing_and_says_so(cache: ModelCache, tmp_path: Path) -> None:
    zone(tmp_path / "sys", 99.0)  # critical, were anyone reading
    reader = InMemoryMetricReader()
    service = ThermalService(context(cache, reader, enabled=False, sysfs_root=str(tmp_path / "sys"), period_s=0.05))
    await service.start()
    try:
        assert cache.loader.run_observers == [] and service.cache is None
        await cache.run(await cache.get("lin"), {"x": np.ones((1, 4), np.float32)})
        assert cache.throttle == Throttle() and cache.pool.limit == cache.pool.slots
        response = mesh_pb2.GetTierInfoResponse()
        service.tier_info(response)
        assert response.HasField("thermal") and not response.thermal.enabled
        assert response.thermal == mesh_pb2.ThermalStatus(enabled=False)
        assert points(reader, THERMAL_STATE) == [] and service.monitor.snapshot().polls == 0
    finally:
        await service.stop()


@pytest.fixture
async def hot_device(cache: ModelCache, tmp_path: Path) -> AsyncIterator[tuple[ThermalService, InMemoryMetricReader]]:
    """The service on ``cache`` over a sysfs tree at 50 °C, after its first period."""
    zone(tmp_path / "sys", 50.0)
    reader = InMemoryMetricReader()
    cpu = CpuTime()
    service = ThermalService(
        context(cache, reader, sysfs_root=str(tmp_path / "sys"), period_s=60.0, idle_watts=2.0, busy_watts=6.0),
        cpu=ProcessCpu(cores=2, cpu_seconds=cpu),
    )
    await service.start()
    try:
        for _ in range(200):  # the ticker's first poll, at start; the test polls by hand after it
            if service.monitor.snapshot().polls:
                break
            await asyncio.sleep(0.01)
        yield service, reader
    finally:
        await service.stop()


async def test_each_decision_is_put_in_force_on_the_cache(
    cache: ModelCache, hot_device: tuple[ThermalService, InMemoryMetricReader], tmp_path: Path
) -> None:
    service, _ = hot_device
    lin = await cache.get("lin")
    assert lin.batcher.max_rows == 16 and cache.pool.limit == 2
    zone(tmp_path / "sys", 85.0)
    await service.monitor.poll()
    assert cache.throttle.shrink_steps == 1 and cache.throttle.prefer_int8
    assert lin.batcher.max_rows == 8 and cache.pool.limit == 1
    zone(tmp_path / "sys", 99.0)
    await service.monitor.poll()
    assert cache.throttle.forward is FallbackReason.THERMAL and lin.batcher.max_rows == 1
    zone(tmp_path / "sys", 60.0)
    await service.monitor.poll()
    assert cache.throttle == Throttle() and lin.batcher.max_rows == 16 and cache.pool.limit == 2


async def test_runs_are_accounted_per_version_and_reported(
    cache: ModelCache, hot_device: tuple[ThermalService, InMemoryMetricReader], tmp_path: Path
) -> None:
    service, reader = hot_device
    lin, lm = await cache.get("lin"), await cache.get("lm")
    zone(tmp_path / "sys", 99.0)
    await service.monitor.poll()  # critical: every cap at its floor
    for _ in range(3):
        await cache.run(lin, {"x": np.ones((2, 4), np.float32)})
    await cache.run(lm, {"input_ids": np.full((1, 4), 2, np.int64)})
    await asyncio.sleep(0.01)  # a period of some length: the estimate is watts × its seconds
    await service.monitor.poll()

    response = mesh_pb2.GetTierInfoResponse()
    service.tier_info(response)
    t = response.thermal
    assert (t.enabled, t.state, t.temperature_c, t.temperature_source) == (True, "critical", 99.0, "measured")
    assert t.forwarding and t.prefer_int8 and t.shrink_steps == policy.MAX_SHRINK_STEPS
    assert (t.run_slots, t.configured_run_slots) == (1, 2)
    assert {(c.name, c.rows, c.configured_rows) for c in t.batch_caps} == {("lin", 1, 16), ("lm", 1, 16)}
    assert t.power_source == "estimated" and not t.HasField("frequency_mhz")
    assert t.transitions == {"normal->critical": 1}
    energy = {e.name: e for e in t.energy}
    # Inferences are rows; a generator's rows are tokens too. The variant is the entry's signed one.
    assert (energy["lin"].variant, energy["lin"].inferences, energy["lin"].tokens) == ("int8", 6, 0)
    assert (energy["lm"].variant, energy["lm"].inferences, energy["lm"].tokens) == ("", 1, 1)
    assert energy["lin"].source == "estimated" and energy["lin"].joules > 0
    assert energy["lin"].inferences_per_joule == pytest.approx(6 / energy["lin"].joules)
    assert energy["lm"].joules_per_token == pytest.approx(energy["lm"].joules)
    assert not energy["lin"].HasField("joules_per_token")
    assert sum(e.joules for e in t.energy) + t.idle_joules == pytest.approx(t.joules)

    states = {p.attributes[STATE]: p.value for p in points(reader, THERMAL_STATE)}
    assert states == {"normal": 0, "hot": 0, "critical": 1}
    joules = {(p.attributes[MODEL_NAME], p.attributes[SOURCE]): p.value for p in points(reader, ENERGY)}
    assert joules == {("lin", "estimated"): energy["lin"].joules, ("lm", "estimated"): energy["lm"].joules}
    per_joule = {p.attributes[MODEL_NAME]: p for p in points(reader, INFERENCES_PER_JOULE)}
    assert per_joule["lin"].attributes[MODEL_VARIANT] == "int8"
    assert [p.attributes[MODEL_NAME] for p in points(reader, JOULES_PER_TOKEN)] == ["lm"]
