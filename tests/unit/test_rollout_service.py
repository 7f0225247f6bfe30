"""The region's FleetControl moves rollouts on with a ticker, on the figures it is given (issue 10 #3)."""

from __future__ import annotations

import time
from collections.abc import Collection
from pathlib import Path

from opentelemetry.sdk.trace import TracerProvider

from services.config import load_config
from services.inference import NodeIdentity
from services.rpc.components import NodeContext
from services.updates.key_grants import KeyGrant
from tests.support.registry import new_registry, publish_lm
from tier2_region.config import RegionConfig
from tier2_region.fleet.domain import Assignment, DesiredState, NodeFacts
from tier2_region.fleet.figures import ShadowFigures, VersionFigures
from tier2_region.fleet.inventory import Inventory
from tier2_region.fleet.rollout import ROLLED_BACK, RUNNING
from tier2_region.fleet_service import FleetControl, _response

MB = 1024 * 1024


class EveryInstallFails:
    def figures(self, name: str, version: str, since: float, node_ids: Collection[str] | None = None) -> VersionFigures:
        return VersionFigures(name, version, failed_installs=len(node_ids or ()))

    def failed_installs(self, name: str, version: str, since: float, node_ids: Collection[str] | None = None) -> int:
        return len(node_ids or ())

    def shadow(self, name: str, version: str, since: float, node_ids: Collection[str] | None = None) -> ShadowFigures:
        return ShadowFigures(name, version)


def control(tmp_path: Path) -> FleetControl:
    kit = new_registry(tmp_path)
    publish_lm(kit, version="1")
    publish_lm(kit, version="2", seed=1)
    kit.registry.close()
    inventory = Inventory(tmp_path / "fleet.sqlite")
    with inventory.transaction() as db:
        for i in range(4):
            facts = NodeFacts(f"device-{i}", "device", "cpu-x86_64", 256 * MB, "1.40.0", MB)
            Inventory.put_node(db, facts, b"i" * 32, bytes(32), time.time(), keep=False)
            Inventory.record_check_in(db, facts, (), time.time())
    inventory.close()
    overrides = {
        "server": {"node_id": "region-1"},
        "registry": {"path": str(kit.registry.directory)},
        "fleet": {"path": str(tmp_path / "fleet.sqlite")},
    }
    config = load_config(RegionConfig, env={}, overrides=overrides)
    return FleetControl(NodeContext(config, NodeIdentity("tier2", "region-1"), TracerProvider()))


async def test_the_ticker_judges_rollouts_on_the_figures_it_is_given(tmp_path: Path) -> None:
    part = control(tmp_path)
    assert part.fleet is not None and part.rollouts is not None
    part.fleet.deploy("lm", "1")
    part.rollouts.start("lm", "2")
    await part.start()
    try:
        await part.tick_rollouts()
        assert part.rollouts.status("lm")[0].rollout.state == RUNNING  # no telemetry yet: nothing to judge
        part.use_figures(EveryInstallFails())
        await part.tick_rollouts()
        rollout = part.rollouts.status("lm")[0].rollout
        assert rollout.state == ROLLED_BACK and rollout.reason.startswith("gate failed_installs failed")
    finally:
        await part.stop()


async def test_stop_is_safe_without_start_and_without_a_fleet(tmp_path: Path) -> None:
    await control(tmp_path).stop()
    config = load_config(RegionConfig, env={})
    bare = FleetControl(NodeContext(config, NodeIdentity("tier2", "region-1"), TracerProvider()))
    assert bare.rollouts is None
    await bare.tick_rollouts()
    await bare.start()
    await bare.stop()


def test_a_shadow_assignment_reaches_the_node_marked_with_its_share() -> None:
    grant = KeyGrant("k", b"e" * 32, b"s" * 16, b"n" * 12, b"w" * 48)
    desired = DesiredState(
        (
            Assignment("lm", "1", "int8", "models/lm/1/int8", grant),
            Assignment("lm", "2", "int8", "models/lm/2/int8", grant, shadow=True, shadow_share=0.05),
        ),
        (),
        30,
    )
    serving, shadow = _response(desired).assignments
    assert (serving.version, serving.shadow, serving.shadow_share) == ("1", False, 0.0)
    assert (shadow.name, shadow.version, shadow.shadow, shadow.shadow_share) == ("lm", "2", True, 0.05)
    assert shadow.grant.wrapped_key == b"w" * 48
