"""Thermal- and power-aware serving on a real device node (issue 13), with its edge as the upstream.

device-t ─▶ edge-t on loopback. Both hold ``lin`` (a linear model; different seeds), the
device also ``lm`` (a tiny char-LM: a generator, so its rows are tokens). The device reads
its sensors from a temporary sysfs tree — a thermal zone and a RAPL package domain, real
files the test rewrites — every 50 ms. Limits: soft 80 °C, hard 95 °C, hysteresis 5 °C.

Every wait is bounded polling of the node's own state; nothing asserts on timing.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
from opentelemetry.sdk.metrics.export import InMemoryMetricReader

from edgecascade.client_commands import _thermal
from protos.edgecascade.v1 import mesh_pb2, mesh_pb2_grpc
from protos.inference import grpc_service_pb2 as pb
from protos.inference import grpc_service_pb2_grpc as pb_grpc
from services.config import load_config
from services.engine.model_cache import LoadedModel, ModelCache
from services.engine.model_repository import ModelRepository
from services.engine.throttle import Throttle
from services.inference import DEGRADED, FALLBACK_REASON, SERVED_BY, FallbackReason
from services.rpc.node import Node, TierSpec
from services.telemetry_names import (
    ENERGY,
    FAULT_KIND,
    FORWARDED,
    INFERENCES_PER_JOULE,
    JOULES_PER_TOKEN,
    MODEL_NAME,
    OUTCOME,
    POWER,
    REQUESTS,
    RUN_SLOTS,
    SENSOR_FAULTS,
    SOURCE,
    STATE,
    TEMPERATURE,
    THERMAL_STATE,
    THERMAL_TRANSITION,
    THERMAL_TRANSITIONS,
)
from services.telemetry_names import FALLBACK_REASON as FALLBACK_REASON_ATTRIBUTE
from tests.support.onnx_models import linear_model, tiny_char_lm
from tests.support.requests import infer_request, params
from tier0_device.app import SPEC as DEVICE
from tier0_device.thermal.monitor import ThermalSnapshot
from tier0_device.thermal.policy import ThermalState
from tier0_device.thermal.sensors import Source
from tier0_device.thermal.thermal_service import ThermalService
from tier1_edge.app import SPEC as EDGE

ON_DEVICE = "tier0:device-t"
ON_EDGE = "tier1:edge-t"
X = {"x": np.ones((1, 4), np.float32)}
IDS = {"input_ids": np.full((1, 4), 2, np.int64)}
MAX_ROWS = 32
THERMAL = {"period_s": 0.05, "soft_limit_c": 80.0, "hard_limit_c": 95.0, "hysteresis_c": 5.0}
# Breaks and recovers fast, no result cache: each forwarded call reaches the edge.
GUARD = {
    "breaker_failures": 3,
    "breaker_open_s": 0.3,
    "retry_attempts": 2,
    "retry_initial_backoff_s": 0.01,
    "retry_max_backoff_s": 0.02,
    "cache_max_bytes": 0,
}
RAPL_RANGE_UJ = 262_143_328_850


def write(path: Path, text: str) -> None:
    """Replaces a sysfs file at once, as the kernel does: the node never reads half a value."""
    path.parent.mkdir(parents=True, exist_ok=True)
    staging = path.with_name(f".{path.name}.new")
    staging.write_text(f"{text}\n")
    os.replace(staging, path)


class Sysfs:
    """The device's temporary sysfs tree: one thermal zone, one RAPL package domain."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.zone = root / "class" / "thermal" / "thermal_zone0"
        self.rapl = root / "class" / "powercap" / "intel-rapl:0"
        self.energy_uj = 1_000_000

    def build(self) -> None:
        write(self.zone / "type", "x86_pkg_temp")
        self.temp("50000")
        write(self.rapl / "name", "package-0")
        write(self.rapl / "max_energy_range_uj", str(RAPL_RANGE_UJ))
        self.energy(0)

    def temp(self, text: str) -> None:
        write(self.zone / "temp", text)

    def energy(self, add_uj: int) -> None:
        self.energy_uj += add_uj
        write(self.rapl / "energy_uj", str(self.energy_uj))


@dataclass
class Rig:
    device: Node
    edge: Node
    sysfs: Sysfs
    reader: InMemoryMetricReader
    stub: pb_grpc.GRPCInferenceServiceStub
    mesh: mesh_pb2_grpc.MeshServiceStub
    edge_stub: pb_grpc.GRPCInferenceServiceStub

    @property
    def thermal(self) -> ThermalService:
        return self.device.component(ThermalService)

    @property
    def cache(self) -> ModelCache:
        cache = self.thermal.cache
        assert cache is not None
        return cache

    def snapshot(self) -> ThermalSnapshot:
        return self.thermal.monitor.snapshot()

    def loaded(self, name: str) -> LoadedModel:
        return next(m for m in self.cache.loaded() if m.name == name)

    async def ask(self, model: str = "lin", inputs: Mapping[str, np.ndarray[Any, Any]] = X) -> dict[str, Any]:
        return params(await self.stub.ModelInfer(infer_request(model, dict(inputs)), timeout=10))

    async def ask_on_a_stream(
        self, model: str = "lin", inputs: Mapping[str, np.ndarray[Any, Any]] = X
    ) -> dict[str, Any]:
        """One request on ModelStreamInfer; its one answer's parameters."""
        request = infer_request(model, dict(inputs))
        answers = [a async for a in self.stub.ModelStreamInfer(iter([request]), timeout=10)]
        assert len(answers) == 1 and not answers[0].error_message, answers
        return params(answers[0].infer_response)

    async def info(self) -> mesh_pb2.ThermalStatus:
        answer: mesh_pb2.GetTierInfoResponse = await self.mesh.GetTierInfo(mesh_pb2.GetTierInfoRequest(), timeout=5)
        assert answer.HasField("thermal")
        return answer.thermal

    def points(self, metric: str) -> list[Any]:
        data = self.reader.get_metrics_data()
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


async def eventually(done: Callable[[], bool], what: str, timeout_s: float = 20.0) -> None:
    """Polls the node's state (owned by its monitor's task) until ``done``, within a bound."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    while not done():
        if loop.time() > deadline:
            raise AssertionError(f"not within {timeout_s} s: {what}")
        await asyncio.sleep(0.01)


async def reading(rig: Rig, celsius: float) -> ThermalSnapshot:
    """Sets the zone's temperature and waits until the monitor has read it (and decided on it)."""
    rig.sysfs.temp(str(round(celsius * 1000)))

    def read() -> bool:
        t = rig.snapshot().temperature
        return t is not None and t.value == celsius

    await eventually(read, f"the monitor reads {celsius} °C")
    return rig.snapshot()


async def periods(rig: Rig, count: int) -> ThermalSnapshot:
    """Waits until the monitor has run ``count`` more periods."""
    target = rig.snapshot().polls + count
    await eventually(lambda: rig.snapshot().polls >= target, f"{count} more periods")
    return rig.snapshot()


async def _node(
    spec: TierSpec,
    repository: Path,
    node_id: str,
    readers: Sequence[InMemoryMetricReader] = (),
    **sections: Mapping[str, Any],
) -> Node:
    overrides: dict[str, Mapping[str, Any]] = {
        "server": {"node_id": node_id, "grace_seconds": 0.2},
        "repository": {"path": str(repository)},
        **sections,
    }
    node = Node(spec, load_config(spec.config_type, env={}, overrides=overrides), metric_readers=readers)
    await node.start()
    return node


@pytest.fixture
async def rig_factory(tmp_path: Path) -> AsyncIterator[Callable[..., Any]]:
    """Builds edge-t and device-t; ``sensors=False`` leaves the device's sysfs tree empty."""
    files = tmp_path / "files"
    device_repo = ModelRepository(tmp_path / "device")
    device_repo.add("lin", linear_model(files / "lin-d.onnx", seed=0))
    device_repo.add("lm", tiny_char_lm(files / "lm.onnx"))
    ModelRepository(tmp_path / "edge").add("lin", linear_model(files / "lin-e.onnx", seed=1))
    nodes: list[Node] = []
    channels: list[grpc.aio.Channel] = []

    async def build(sensors: bool = True, **thermal: Any) -> Rig:
        sysfs = Sysfs(tmp_path / "sys")
        sysfs.root.mkdir()
        if sensors:
            sysfs.build()
        edge = await _node(EDGE, tmp_path / "edge", "edge-t")
        nodes.append(edge)
        reader = InMemoryMetricReader()
        device = await _node(
            DEVICE,
            tmp_path / "device",
            "device-t",
            [reader],
            upstream={"address": edge.address, **GUARD},
            batching={"max_batch_size": MAX_ROWS},
            # Two run slots where the machine has the cores, so that heat has slots to take away.
            runtime={"max_concurrent_runs": min(2, os.cpu_count() or 1)},
            thermal={**THERMAL, "sysfs_root": str(sysfs.root), **thermal},
        )
        nodes.insert(0, device)
        channel = grpc.aio.insecure_channel(device.address)
        edge_channel = grpc.aio.insecure_channel(edge.address)
        channels.extend((channel, edge_channel))
        rig = Rig(
            device,
            edge,
            sysfs,
            reader,
            pb_grpc.GRPCInferenceServiceStub(channel),
            mesh_pb2_grpc.MeshServiceStub(channel),
            pb_grpc.GRPCInferenceServiceStub(edge_channel),
        )
        await eventually(lambda: rig.snapshot().polls >= 2, "the monitor's first periods")
        return rig

    try:
        yield build
    finally:
        for channel in channels:
            await channel.close()
        for node in nodes:
            await node.stop()


async def _computed(stub: pb_grpc.GRPCInferenceServiceStub, model: str) -> int:
    stats = await stub.ModelStatistics(pb.ModelStatisticsRequest(name=model))
    return sum(s.inference_count for s in stats.model_stats)


async def test_heat_shrinks_batches_and_slots_sends_work_upward_above_hard_and_cools_with_hysteresis(
    rig_factory: Callable[..., Any],
) -> None:
    r: Rig = await rig_factory()
    assert (await r.ask())[SERVED_BY] == ON_DEVICE  # loads lin
    lin = r.loaded("lin")
    slots = r.cache.pool.slots
    assert r.snapshot().state is ThermalState.NORMAL
    assert lin.batcher.max_rows == MAX_ROWS and r.cache.pool.limit == slots

    # Above the soft limit: hot. Each period there halves the caps once more, down to the floors (1).
    snap = await reading(r, 85.0)
    assert snap.state is ThermalState.SOFT and r.cache.throttle.prefer_int8
    assert lin.batcher.max_rows < MAX_ROWS and r.cache.throttle.forward is None
    await eventually(lambda: lin.batcher.max_rows == 1 and r.cache.pool.limit == 1, "caps at their floors")
    answer = await r.ask()
    assert answer[SERVED_BY] == ON_DEVICE and FALLBACK_REASON not in answer  # a hot device still serves

    # Above the hard limit: critical, and new work goes to the edge.
    assert (await reading(r, 97.0)).state is ThermalState.HARD
    assert r.cache.throttle.forward is FallbackReason.THERMAL
    before = await _computed(r.edge_stub, "lin")
    answer = await r.ask()
    assert answer[SERVED_BY] == ON_EDGE and answer[FALLBACK_REASON] == "thermal" and DEGRADED not in answer
    assert await _computed(r.edge_stub, "lin") == before + 1
    streamed = await r.ask_on_a_stream()  # new streams go upward too
    assert streamed[SERVED_BY] == ON_EDGE and streamed[FALLBACK_REASON] == "thermal"
    assert await _computed(r.edge_stub, "lin") == before + 2
    info = await r.info()
    assert (info.state, info.forwarding, info.temperature_c, info.temperature_source) == (
        "critical",
        True,
        97.0,
        "measured",
    )
    assert (info.run_slots, info.configured_run_slots) == (1, slots)
    assert ("lin", 1, MAX_ROWS) in {(c.name, c.rows, c.configured_rows) for c in info.batch_caps}

    # Below the hard limit but not below it minus the hysteresis: still critical.
    await reading(r, 92.0)
    assert (await periods(r, 5)).state is ThermalState.HARD
    assert (await reading(r, 88.0)).state is ThermalState.SOFT
    assert (await r.ask())[SERVED_BY] == ON_DEVICE
    # Below the soft limit but not below it minus the hysteresis: still hot, caps held at the floors.
    await reading(r, 77.0)
    assert (await periods(r, 5)).state is ThermalState.SOFT
    assert lin.batcher.max_rows == 1 and r.cache.pool.limit == 1
    # Below soft − hysteresis: normal, every limit lifted at once.
    assert (await reading(r, 74.0)).state is ThermalState.NORMAL
    assert r.cache.throttle == Throttle()
    assert lin.batcher.max_rows == MAX_ROWS and r.cache.pool.limit == slots

    moves = {"normal->hot": 1, "hot->critical": 1, "critical->hot": 1, "hot->normal": 1}
    assert r.snapshot().transitions == moves
    info = await r.info()
    assert info.state == "normal" and dict(info.transitions) == moves and not info.forwarding
    assert (info.soft_limit_c, info.hard_limit_c, info.hysteresis_c) == (80.0, 95.0, 5.0)
    assert "normal" in _thermal(mesh_pb2.GetTierInfoResponse(thermal=info))

    # The metrics carry the same: the forwarded request under its reason, the state, transitions, temperature.
    forwarded = [
        p
        for p in r.points(REQUESTS)
        if p.attributes.get(FALLBACK_REASON_ATTRIBUTE) == "thermal" and p.attributes.get(OUTCOME) == FORWARDED
    ]
    assert sum(p.value for p in forwarded) == 2
    assert {p.attributes[STATE]: p.value for p in r.points(THERMAL_STATE)} == {"normal": 1, "hot": 0, "critical": 0}
    assert {p.attributes[THERMAL_TRANSITION]: p.value for p in r.points(THERMAL_TRANSITIONS)} == moves
    assert [(p.value, p.attributes[SOURCE]) for p in r.points(TEMPERATURE)] == [(74.0, "measured")]
    assert [p.value for p in r.points(RUN_SLOTS)] == [slots]


async def test_a_critical_device_whose_upstream_fails_answers_itself_marked_degraded(
    rig_factory: Callable[..., Any],
) -> None:
    r: Rig = await rig_factory()
    assert (await reading(r, 99.0)).state is ThermalState.HARD
    answer = await r.ask()
    assert answer[SERVED_BY] == ON_EDGE and answer[FALLBACK_REASON] == "thermal"
    # A stream the edge refuses in-band (it does not hold "lm") is answered here, not with the edge's error.
    streamed = await r.ask_on_a_stream("lm", IDS)
    assert streamed[SERVED_BY] == ON_DEVICE and FALLBACK_REASON not in streamed and DEGRADED not in streamed
    await r.edge.stop()
    # Sent upward in vain and not servable here either (no such version): an error naming both, no second try.
    request = infer_request("lin", dict(X))
    request.model_version = "9"
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await r.stub.ModelInfer(request, timeout=10)
    assert caught.value.code() == grpc.StatusCode.UNAVAILABLE and "too hot" in (caught.value.details() or "")
    answer = await r.ask()
    assert answer[SERVED_BY] == ON_DEVICE and answer[DEGRADED]  # at the floors, and saying why
    assert FALLBACK_REASON not in answer
    streamed = await r.ask_on_a_stream()
    assert streamed[SERVED_BY] == ON_DEVICE and streamed[DEGRADED]


async def test_rapl_energy_is_measured_and_shared_among_the_versions_that_ran(rig_factory: Callable[..., Any]) -> None:
    r: Rig = await rig_factory()
    added_uj = 0
    for _ in range(5):
        for _ in range(3):
            await r.ask("lin")
        await r.ask("lm", IDS)
        r.sysfs.energy(20_000)  # 20 mJ more on the package counter
        added_uj += 20_000
        await periods(r, 1)

    def closed() -> bool:
        lin, lm = r.snapshot().energy.version("lin", "1"), r.snapshot().energy.version("lm", "1")
        return lin is not None and lm is not None and (lin.inferences, lm.inferences) == (15, 5)

    await eventually(closed, "every run's period closed")
    energy = r.snapshot().energy
    lin, lm = energy.version("lin", "1"), energy.version("lm", "1")
    assert lin is not None and lm is not None
    assert lin.source is Source.MEASURED and lin.estimated_joules == 0 and lin.measured_joules > 0
    assert lm.source is Source.MEASURED and lm.tokens == 5 and lin.tokens == 0
    assert energy.estimated_joules == 0 and energy.measured_joules <= added_uj / 1e6 + 1e-9
    assert energy.power is not None and energy.power.source is Source.MEASURED

    info = await r.info()
    assert info.power_source == "measured" and info.HasField("power_watts")
    rows = {e.name: e for e in info.energy}
    assert (rows["lin"].source, rows["lin"].inferences, rows["lin"].joules) == ("measured", 15, lin.joules)
    assert rows["lin"].inferences_per_joule == pytest.approx(15 / lin.joules)
    assert rows["lm"].joules_per_token == pytest.approx(lm.joules / 5) and not rows["lin"].HasField("joules_per_token")
    assert sum(faults for faults in info.faults.values()) == 0
    shown = _thermal(mesh_pb2.GetTierInfoResponse(thermal=info))
    assert "50.0 °C" in shown and "W measured" in shown and "inferences/J measured" in shown

    joules = {(p.attributes[MODEL_NAME], p.attributes[SOURCE]): p.value for p in r.points(ENERGY)}
    assert joules == {("lin", "measured"): lin.joules, ("lm", "measured"): lm.joules}
    per_joule = {p.attributes[MODEL_NAME]: p.value for p in r.points(INFERENCES_PER_JOULE)}
    assert per_joule == {"lin": pytest.approx(15 / lin.joules), "lm": pytest.approx(5 / lm.joules)}
    assert {p.attributes[MODEL_NAME] for p in r.points(JOULES_PER_TOKEN)} == {"lm"}
    assert {p.attributes[SOURCE] for p in r.points(POWER)} == {"measured"}


async def test_without_sensors_the_power_profile_estimates_and_says_so(rig_factory: Callable[..., Any]) -> None:
    r: Rig = await rig_factory(sensors=False)
    for _ in range(5):
        await r.ask("lin")

    def closed() -> bool:
        lin = r.snapshot().energy.version("lin", "1")
        return lin is not None and lin.inferences == 5

    await eventually(closed, "the runs' period closed")
    snap = r.snapshot()
    lin = snap.energy.version("lin", "1")
    assert lin is not None and lin.source is Source.ESTIMATED and lin.measured_joules == 0 and lin.joules > 0
    assert snap.temperature is None and snap.state is ThermalState.NORMAL and r.cache.throttle == Throttle()
    assert sum(snap.faults.values()) == 0  # a platform without sensors is not at fault

    info = await r.info()
    assert not info.HasField("temperature_c") and info.power_source == "estimated"
    assert [(e.name, e.source, e.inferences) for e in info.energy] == [("lin", "estimated", 5)]
    shown = _thermal(mesh_pb2.GetTierInfoResponse(thermal=info))
    assert "no sensor" in shown and "W estimated" in shown and "inferences/J estimated" in shown

    assert r.points(TEMPERATURE) == []
    assert {p.attributes[SOURCE] for p in r.points(POWER)} == {"estimated"}
    assert {(p.attributes[MODEL_NAME], p.attributes[SOURCE]) for p in r.points(ENERGY)} == {("lin", "estimated")}


async def test_bad_readings_are_counted_and_ignored(rig_factory: Callable[..., Any]) -> None:
    # stale_periods = 0: the state a device had holds however long its sensor talks nonsense.
    r: Rig = await rig_factory(stale_periods=0)
    assert (await reading(r, 85.0)).state is ThermalState.SOFT

    r.sysfs.temp("not a number")
    await eventually(lambda: r.snapshot().faults["non_numeric"] > 0, "a non-numeric reading counted")
    info = await r.info()
    assert not info.HasField("temperature_c") and "no valid temperature" in _thermal(
        mesh_pb2.GetTierInfoResponse(thermal=info)
    )
    r.sysfs.temp("400000")  # 400 °C: no device runs that hot
    await eventually(lambda: r.snapshot().faults["absurd"] > 0, "an absurd reading counted")
    r.sysfs.energy(-500_000)  # the counter runs backwards without wrapping
    await eventually(lambda: r.snapshot().faults["backwards"] > 0, "a backwards energy counter counted")
    snap = await periods(r, 3)
    assert snap.state is ThermalState.SOFT and snap.ignored_readings >= 2
    assert snap.transitions == {"normal->hot": 1}

    assert (await reading(r, 60.0)).state is ThermalState.NORMAL  # a valid reading counts again
    info = await r.info()
    assert info.faults["non_numeric"] >= 1 and info.faults["absurd"] >= 1 and info.faults["backwards"] >= 1
    assert info.faults_by_sensor["temperature.non_numeric"] >= 1 and info.faults_by_sensor["energy.backwards"] >= 1
    assert "bad readings ignored" in _thermal(mesh_pb2.GetTierInfoResponse(thermal=info))
    faults = {p.attributes[FAULT_KIND]: p.value for p in r.points(SENSOR_FAULTS)}
    assert faults["non_numeric"] >= 1 and faults["absurd"] >= 1 and faults["backwards"] >= 1
    assert faults["missing"] == 0 and faults["unreadable"] == 0
