"""`edgecascade status` warns well before the region's registry metadata expires (issue 7 #7).

A real region node on 127.0.0.1:0 serving a real registry; status reads the
metadata expiries from the region's artifact service, as clients fetch it.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Mapping
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from rich.console import Console

from edgecascade import client_commands
from services.config import load_config
from services.rpc.node import Node
from tests.support.registry import FakeClock, new_registry
from tier2_region.app import SPEC as REGION
from tier2_region.origin_service import ArtifactOrigin
from tier2_region.registry.tuf_repository import ExpiryPolicy


async def _region(tmp: Path, registry: Mapping[str, Any]) -> Node:
    overrides: dict[str, Mapping[str, Any]] = {
        "server": {"node_id": "region-1", "grace_seconds": 0.2},
        "repository": {"path": str(tmp / "region-models")},
        "registry": registry,
    }
    node = Node(REGION, load_config(REGION.config_type, env={}, overrides=overrides))
    await node.start()
    return node


async def _status(tmp: Path, region: Node) -> tuple[int, str]:
    state = tmp / "state"
    state.mkdir(exist_ok=True)
    endpoints = {"region": region.address, "edge": region.address, "devices": []}
    (state / "endpoints.json").write_text(json.dumps(endpoints))
    console = Console(record=True, width=240, color_system=None)
    code = await asyncio.to_thread(client_commands.status, console, state, 5.0)
    return code, console.export_text()


async def test_status_warns_when_targets_expire_within_30_days(tmp_path: Path) -> None:
    kit = new_registry(tmp_path, expiry=ExpiryPolicy(targets=timedelta(days=10)))
    region = await _region(tmp_path, {"path": str(kit.registry.directory)})
    try:
        code, out = await _status(tmp_path, region)
    finally:
        await region.stop()
    assert code == 0, out
    assert "warning: registry targets metadata expires in 9 days" in out
    assert "edgecascade model resign-targets" in out
    assert "root metadata" not in out  # a year left: no warning


async def test_status_fails_when_a_role_has_expired(tmp_path: Path) -> None:
    """An expired role stops every refresh in the fleet: status exits non-zero, not just a yellow line."""
    two_days_ago = FakeClock(datetime.now(UTC).replace(microsecond=0) - timedelta(days=2))
    kit = new_registry(tmp_path, two_days_ago)  # its timestamp (1 day) expired yesterday; nothing re-signs it
    region = await _region(tmp_path, {"path": str(kit.registry.directory)})
    try:
        code, out = await _status(tmp_path, region)
    finally:
        await region.stop()
    assert code == 1, out
    assert "registry timestamp metadata EXPIRED" in out
    assert "snapshot metadata" not in out  # five days left


async def test_status_says_nothing_about_a_healthy_registry_or_a_region_without_one(tmp_path: Path) -> None:
    kit = new_registry(tmp_path)
    region = await _region(tmp_path, {"path": str(kit.registry.directory)})
    bare = await _region(tmp_path / "bare", {})
    try:
        for node in (region, bare):
            code, out = await _status(tmp_path, node)
            assert code == 0 and "warning" not in out, out
    finally:
        await region.stop()
        await bare.stop()


async def _targets_version(region: Node) -> int:
    from tuf.api.metadata import Metadata, Targets

    registry = region.component(ArtifactOrigin).registry
    assert registry is not None
    metadata = registry.repository_dir / "metadata"
    newest = max(metadata.glob("*.targets.json"), key=lambda p: int(p.name.split(".")[0]))
    targets = Metadata[Targets].from_file(str(newest)).signed
    return targets.version


async def test_a_region_holding_the_targets_key_renews_targets_by_itself(tmp_path: Path) -> None:
    kit = new_registry(tmp_path, expiry=ExpiryPolicy(targets=timedelta(days=10)))
    settings = {"path": str(kit.registry.directory), "key_dir": str(kit.key_dir), "resign_check_s": 0.2}
    offline = await _region(tmp_path / "offline", settings)
    try:
        await asyncio.sleep(0.5)  # a few re-sign checks
        assert await _targets_version(offline) == 1  # the targets key stays offline by default
    finally:
        await offline.stop()
    region = await _region(tmp_path, {**settings, "resign_targets": True})
    try:
        for _ in range(100):
            version = await _targets_version(region)
            if version > 1:
                break
            await asyncio.sleep(0.05)
        code, out = await _status(tmp_path, region)
    finally:
        await region.stop()
    assert version == 2, "targets were not re-signed inside their margin"
    assert code == 0, out
    assert "targets metadata expires" not in out  # renewed for the full 90 days
