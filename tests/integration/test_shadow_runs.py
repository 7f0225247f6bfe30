"""A rollout's shadow stage on a real device: the new version is installed beside the serving one, runs on
the live requests answered there with its answers discarded, and is compared with the serving version.

The device is a real node (its updater, installed stores, model caches, data plane and metrics) whose
upstream is a real region serving the signed registry's artifacts. The region's rollouts do not assign
shadows here: the test hands the device's updates service the desired state a shadow stage would send
(real assignments with key grants wrapped to the device), as a check-in answer would.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
from opentelemetry.sdk.metrics.export import InMemoryMetricReader

from protos.edgecascade.v1 import mesh_pb2, mesh_pb2_grpc
from protos.inference import grpc_service_pb2_grpc as pb_grpc
from services.config import load_config
from services.engine.shadow import ShadowAssignment
from services.rpc.node import Node
from services.rpc.updates_service import ENROLLMENT_FILE, NodeUpdatesService
from services.telemetry_names import (
    MODEL_VERSION,
    OK,
    OUTCOME,
    SHADOW_AGREEMENT,
    SHADOW_DIFFERENCE,
    SHADOW_LATENCY,
    SHADOW_RUNS,
    SHADOW_SERVING_LATENCY,
    UPDATE_OUTCOMES,
    UPDATE_STATE,
)
from services.tier_config import TierConfig
from services.updates.checkin import AssignedVariant, DesiredState
from services.updates.identity import FileKeyProvider, NodeKeys
from services.updates.update_journal import Assignment, UpdateJournal, UpdateState
from tests.support.registry import RegistryKit, new_registry
from tests.support.requests import infer_request, output, params
from tests.support.updater_node import Published, grant, publish_real, run_model, this_hardware_class
from tier0_device.app import SPEC as DEVICE
from tier2_region.app import SPEC as REGION

NODE_ID = "device-1"
ROWS = np.random.default_rng(5).integers(2, 30, size=(6, 4, 4)).astype(np.int64)  # 6 requests of 4 rows


def _assigned(kit: RegistryKit, published: Published, keys: NodeKeys, share: float = 0.0) -> AssignedVariant:
    """The assignment a region sends the device (a shadow one with ``share``)."""
    return AssignedVariant(
        published.name,
        published.version,
        published.variant,
        published.target_path,
        grant(kit, published, NODE_ID, keys.agreement_public),
        shadow=share > 0,
        shadow_share=share,
    )


def _points(reader: InMemoryMetricReader, metric: str, version: str) -> list[Any]:
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
        if (p.attributes or {}).get(MODEL_VERSION) == version
    ]


def _runs(reader: InMemoryMetricReader, version: str) -> dict[str, int]:
    return {p.attributes[OUTCOME]: int(p.value) for p in _points(reader, SHADOW_RUNS, version)}


async def _wait_for_runs(reader: InMemoryMetricReader, version: str, count: int) -> None:
    for _ in range(500):
        if sum(_runs(reader, version).values()) >= count:
            return
        await asyncio.sleep(0.01)
    raise AssertionError(f"expected {count} shadow runs of version {version}, got {_runs(reader, version)}")


async def _ask(stub: pb_grpc.GRPCInferenceServiceStub, serving: Published) -> None:
    """Sends every request; each is answered by the device's serving version, exactly as it answers."""
    for rows in ROWS:
        response = await stub.ModelInfer(infer_request("lm", {"input_ids": rows}), timeout=5)
        assert params(response)["edgecascade.served_by"] == f"tier0:{NODE_ID}"
        assert response.model_version == serving.version
        np.testing.assert_allclose(output(response, "probs"), run_model(serving.plaintext, {"input_ids": rows}))


async def _rows(mesh: mesh_pb2_grpc.MeshServiceStub) -> list[tuple[str, str, str, bool]]:
    info = await mesh.GetTierInfo(mesh_pb2.GetTierInfoRequest(), timeout=5)
    return [(m.name, m.version, m.state, m.shadow) for m in info.updates.installed]


@dataclass
class World:
    """A region serving the registry's artifacts and a device whose updates service the test drives."""

    kit: RegistryKit
    v1: Published
    same: Published  # version 2: the weights of version 1
    other: Published  # version 3: other weights
    elsewhere: Published  # version 4: signed for another hardware class
    state: Path
    keys: NodeKeys
    service: NodeUpdatesService
    reader: InMemoryMetricReader
    stub: pb_grpc.GRPCInferenceServiceStub
    mesh: mesh_pb2_grpc.MeshServiceStub
    device: Node
    config: TierConfig

    def serving(self) -> AssignedVariant:
        return _assigned(self.kit, self.v1, self.keys)

    def shadow(self, published: Published, share: float = 1.0) -> AssignedVariant:
        return _assigned(self.kit, published, self.keys, share)


@pytest.fixture
async def world(tmp_path: Path) -> AsyncIterator[World]:
    kit = new_registry(tmp_path)
    v1 = publish_real(kit, "lm", "1", seed=1)
    same = publish_real(kit, "lm", "2", seed=1)
    other = publish_real(kit, "lm", "3", seed=3)
    elsewhere = publish_real(kit, "lm", "4", seed=4, hardware_classes=("cpu-nowhere",))
    root = tmp_path / "root.json"
    root.write_bytes(kit.registry.repository.trusted_root())
    region_overrides: dict[str, Mapping[str, Any]] = {
        "server": {"node_id": "region-1", "grace_seconds": 0.2},
        "repository": {"path": str(tmp_path / "region-models")},
        "registry": {"path": str(kit.registry.directory)},
        "fleet": {"path": str(tmp_path / "fleet.sqlite")},
    }
    region = Node(REGION, load_config(REGION.config_type, env={}, overrides=region_overrides))
    await region.start()
    state = tmp_path / "device-state"
    device_overrides: dict[str, Mapping[str, Any]] = {
        "server": {"node_id": NODE_ID, "grace_seconds": 0.2},
        "repository": {"path": str(tmp_path / "device-models")},
        "upstream": {"address": region.address},
        # No enrollment token: the device never checks in, so only the desired states the tests give reach it.
        "updates": {
            "state_dir": str(state),
            "trusted_root": str(root),
            "hardware_class": this_hardware_class(),
            "check_interval_s": 3600,
        },
    }
    reader = InMemoryMetricReader()
    config = load_config(DEVICE.config_type, env={}, overrides=device_overrides)
    device = Node(DEVICE, config, [reader])
    try:
        await device.start()
        keys = FileKeyProvider(state / "keys").keys()
        async with grpc.aio.insecure_channel(device.address) as channel:
            yield World(
                kit,
                v1,
                same,
                other,
                elsewhere,
                state,
                keys,
                device.component(NodeUpdatesService),
                reader,
                pb_grpc.GRPCInferenceServiceStub(channel),
                mesh_pb2_grpc.MeshServiceStub(channel),
                device,
                config,
            )
    finally:
        await device.stop()
        await region.stop()


async def test_an_identical_shadow_runs_beside_the_serving_version_and_agrees_wholly(world: World) -> None:
    await world.service.apply([world.serving(), world.shadow(world.same)])
    # Installed through the same checks, reported with GetTierInfo, never at check-in, never serving.
    assert await _rows(world.mesh) == [("lm", "1", "committed", False), ("lm", "2", "committed", True)]
    assert [(m.name, m.version) for m in world.service._target.installed()] == [("lm", "1")]
    assert "committed" in {p.attributes[UPDATE_STATE] for p in _points(world.reader, UPDATE_OUTCOMES, "2")}
    await _ask(world.stub, world.v1)
    await _wait_for_runs(world.reader, "2", len(ROWS))
    assert _runs(world.reader, "2") == {OK: len(ROWS)}
    [agreement] = _points(world.reader, SHADOW_AGREEMENT, "2")
    [difference] = _points(world.reader, SHADOW_DIFFERENCE, "2")
    assert agreement.count == len(ROWS) and agreement.sum == len(ROWS)  # every run agrees wholly
    assert difference.count == len(ROWS) and difference.sum == 0.0
    for latency in (SHADOW_LATENCY, SHADOW_SERVING_LATENCY):
        [timed] = _points(world.reader, latency, "2")
        assert timed.count == len(ROWS) and timed.sum > 0


async def test_a_shadow_with_other_weights_disagrees_and_replaces_the_previous_shadow(world: World) -> None:
    await world.service.apply([world.serving(), world.shadow(world.same)])
    await world.service.apply([world.serving(), world.shadow(world.other)])
    assert await _rows(world.mesh) == [("lm", "1", "committed", False), ("lm", "3", "committed", True)]
    assert sorted(p.name for p in (world.state / "shadow" / "installed" / "lm").iterdir()) == ["3"]
    await _ask(world.stub, world.v1)
    await _wait_for_runs(world.reader, "3", len(ROWS))
    [agreement] = _points(world.reader, SHADOW_AGREEMENT, "3")
    [difference] = _points(world.reader, SHADOW_DIFFERENCE, "3")
    assert agreement.count == len(ROWS) and agreement.sum < len(ROWS)
    assert difference.sum > 0
    assert _runs(world.reader, "2") == {}  # the previous shadow never ran


async def test_a_shadow_that_fails_a_gate_is_refused_and_counted_as_a_failed_install(world: World) -> None:
    await world.service.apply([world.serving(), world.shadow(world.elsewhere)])
    [serving, shadow] = await _rows(world.mesh)
    assert serving == ("lm", "1", "committed", False) and shadow == ("lm", "", "refused", True)
    assert "refused" in {p.attributes[UPDATE_STATE] for p in _points(world.reader, UPDATE_OUTCOMES, "4")}
    await _ask(world.stub, world.v1)  # still answered by the serving version; nothing to run beside it
    assert _runs(world.reader, "4") == {}


async def test_the_shadow_is_removed_when_its_stage_ends(world: World) -> None:
    await world.service.apply([world.serving(), world.shadow(world.other)])
    await world.service.apply([world.serving()])
    assert await _rows(world.mesh) == [("lm", "1", "committed", False)]
    assert not (world.state / "shadow" / "installed" / "lm").exists()
    assert not list((world.state / "shadow" / "journal").glob("*.json"))
    await _ask(world.stub, world.v1)
    await asyncio.sleep(0.1)
    assert _runs(world.reader, "3") == {}


async def test_a_restart_brings_the_shadow_back_and_it_runs_once_a_check_in_names_it_again(world: World) -> None:
    await world.service.apply([world.serving(), world.shadow(world.same)])
    await world.device.stop()
    reader = InMemoryMetricReader()
    again = Node(DEVICE, world.config, [reader])
    await again.start()
    try:
        async with grpc.aio.insecure_channel(again.address) as channel:
            stub, mesh = pb_grpc.GRPCInferenceServiceStub(channel), mesh_pb2_grpc.MeshServiceStub(channel)
            # Recovered from the shadow store and journal; its share is not kept, so it waits for a check-in.
            assert await _rows(mesh) == [("lm", "1", "committed", False), ("lm", "2", "committed", True)]
            await _ask(stub, world.v1)
            await asyncio.sleep(0.1)
            assert _runs(reader, "2") == {}
            await again.component(NodeUpdatesService).apply([world.serving(), world.shadow(world.same)])
            await _ask(stub, world.v1)
            await _wait_for_runs(reader, "2", len(ROWS))
            assert _runs(reader, "2") == {OK: len(ROWS)}
    finally:
        await again.stop()


# -- the review's fixes ------------------------------------------------------------------------------------------


def _checking_in(world: World, monkeypatch: pytest.MonkeyPatch, answers: list[DesiredState]) -> None:
    """Makes the device's check-ins answer ``answers`` in turn (as if enrolled with a region that sends them)."""
    (world.state / ENROLLMENT_FILE).write_text("{}\n")

    async def check_in(*args: Any) -> DesiredState:
        return answers.pop(0)

    assert world.service._client is not None
    monkeypatch.setattr(world.service._client, "check_in", check_in)


async def test_a_withdrawn_shadow_stops_at_once_while_installs_run_and_each_kind_has_its_own_task(
    world: World, monkeypatch: pytest.MonkeyPatch
) -> None:
    await world.service.apply([world.serving()])
    shadows = world.service._shadow
    assert shadows is not None and shadows.runner is not None
    release = asyncio.Event()

    async def slow_serving_update(assignments: Any) -> None:  # a serving download that takes its time
        await release.wait()

    monkeypatch.setattr(world.service._target, "apply", slow_serving_update)
    _checking_in(
        world,
        monkeypatch,
        [DesiredState((world.serving(), world.shadow(world.same))), DesiredState((world.serving(),))],
    )
    await world.service._tick()
    # The shadow installs in its own task while the serving update still runs.
    assert world.service._apply_shadows is not None
    await asyncio.wait_for(asyncio.shield(world.service._apply_shadows), 30)
    assert world.service._apply is not None and not world.service._apply.done()
    assert shadows.runner.assigned == {"lm": ShadowAssignment("2", 1.0)}

    never = asyncio.Event()

    async def slow_shadow_install(assignments: Any) -> None:
        await never.wait()

    monkeypatch.setattr(shadows, "apply", slow_shadow_install)
    world.service._apply_shadows = asyncio.create_task(slow_shadow_install([]))  # a shadow install still running
    await world.service._tick()  # the answer no longer names the shadow
    assert shadows.runner.assigned == {}  # not sampled any more, though neither task could take the answer
    await _ask(world.stub, world.v1)
    await asyncio.sleep(0.1)
    assert _runs(world.reader, "2") == {}
    release.set()
    world.service._apply_shadows.cancel()


async def test_a_removal_drops_the_journal_entry_first_and_finishes_when_cancelled(
    world: World, monkeypatch: pytest.MonkeyPatch
) -> None:
    await world.service.apply([world.serving(), world.shadow(world.other)])
    shadows = world.service._shadow
    assert shadows is not None
    updater = shadows.updater
    real_remove = updater.store.remove
    order: list[str] = []

    def slow_journal_remove(name: str) -> bool:
        order.append("journal")
        time.sleep(0.2)  # the caller is cancelled meanwhile
        return UpdateJournal.remove(updater.journal, name)

    def store_remove(name: str) -> list[str]:
        order.append("store")
        return real_remove(name)

    monkeypatch.setattr(updater.journal, "remove", slow_journal_remove)
    monkeypatch.setattr(updater.store, "remove", store_remove)
    removal = asyncio.create_task(updater.remove("lm"))
    await asyncio.sleep(0.05)
    removal.cancel()
    with pytest.raises(asyncio.CancelledError):
        await removal
    for _ in range(100):
        if order == ["journal", "store"] and not updater.store.models():
            break
        await asyncio.sleep(0.02)
    assert order == ["journal", "store"]
    assert updater.journal.read("lm") is None and updater.store.models() == []


async def test_an_unfinished_shadow_install_is_not_resumed_at_start_and_removed_if_withdrawn(world: World) -> None:
    await world.service.apply([world.serving()])
    await world.device.stop()
    # A shadow download a crash interrupted.
    journal = UpdateJournal(world.state / "shadow" / "journal")
    journal.record(Assignment.of(world.shadow(world.other)), UpdateState.ASSIGNED)
    journal.record(Assignment.of(world.shadow(world.other)), UpdateState.DOWNLOADING)
    again = Node(DEVICE, world.config, [InMemoryMetricReader()])
    await again.start()
    try:
        service = again.component(NodeUpdatesService)
        await asyncio.sleep(0.5)  # a resumed install would have fetched and installed it by now
        entry = journal.read("lm")
        assert entry is not None and entry.state is UpdateState.DOWNLOADING
        assert service._shadow is not None and service._shadow.updater.store.models() == []
        await service.apply([world.serving()])  # the first check-in no longer names it
        assert journal.read("lm") is None
    finally:
        await again.stop()


async def test_a_removed_shadows_run_counts_are_dropped(world: World) -> None:
    await world.service.apply([world.serving(), world.shadow(world.same)])
    await _ask(world.stub, world.v1)
    await _wait_for_runs(world.reader, "2", len(ROWS))
    await world.service.apply([world.serving(), world.shadow(world.other)])
    assert _runs(world.reader, "2") == {}
    assert {k[1] for k in world.device.fleet_metrics._shadow_runs} <= {"3"}
