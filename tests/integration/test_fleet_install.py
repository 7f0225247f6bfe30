"""A device installs what the region deploys to it, through its edge, and serves it: enrollment, a
signed check-in, the variant that fits, a key grant only it opens, the edge's verifying cache, the
updater's trial and hot swap — with no model plaintext on the device's disk (issue 9)."""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import grpc
import numpy as np

from protos.inference import grpc_service_pb2_grpc as pb_grpc
from services.config import load_config
from services.rpc.node import Node
from services.rpc.updates_service import NodeUpdatesService
from tests.integration.conftest import start_node
from tests.support.registry import new_registry
from tests.support.requests import infer_request, params
from tests.support.updater_node import model_plaintexts, plaintext_leaks, publish_real, this_hardware_class
from tier0_device.app import SPEC as DEVICE
from tier1_edge.app import SPEC as EDGE
from tier2_region.app import SPEC as REGION
from tier2_region.fleet_service import FleetControl


async def _served_by_device(address: str, attempts: int = 1500) -> dict[str, Any]:
    """Asks the device for ``lm`` until the device itself answers (bounded)."""
    return await _served_by(address, "tier0:device-1", attempts)


async def _served_by(address: str, node: str, attempts: int = 1500) -> dict[str, Any]:
    """Asks a node for ``lm`` until ``node`` answers (bounded)."""
    request = infer_request("lm", {"input_ids": np.zeros((1, 4), np.int64)})
    async with grpc.aio.insecure_channel(address) as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        for _ in range(attempts):
            try:
                answer = params(await stub.ModelInfer(request, timeout=5))
            except grpc.aio.AioRpcError:
                answer = {}
            if answer.get("edgecascade.served_by") == node:
                return answer
            await asyncio.sleep(0.02)
    raise AssertionError(f"{node} never served the deployed model")


async def test_a_deployed_model_is_installed_through_the_edge_and_served_by_the_device(tmp_path: Path) -> None:
    kit = new_registry(tmp_path)
    publish_real(kit, "lm", "1")
    root = tmp_path / "root.json"
    root.write_bytes(kit.registry.repository.trusted_root())
    overrides: dict[str, Mapping[str, Any]] = {
        "server": {"node_id": "region-1", "grace_seconds": 0.2},
        "repository": {"path": str(tmp_path / "region-models")},
        "registry": {"path": str(kit.registry.directory)},
        "fleet": {"path": str(tmp_path / "fleet.sqlite"), "check_interval_s": 1},
    }
    region = Node(REGION, load_config(REGION.config_type, env={}, overrides=overrides))
    await region.start()
    nodes: list[Node] = [region]
    try:
        fleet = region.component(FleetControl).fleet
        assert fleet is not None
        fleet.deploy("lm", "1", tier="device")
        edge = await start_node(
            EDGE,
            tmp_path / "edge-models",
            "edge-1",
            upstream=region.address,
            artifacts={"cache_dir": str(tmp_path / "edge-cache"), "trusted_root": str(root), "refresh_interval_s": 0},
        )
        nodes.append(edge)
        state = tmp_path / "device-state"
        device = await start_node(
            DEVICE,
            tmp_path / "device-models",
            "device-1",
            upstream=edge.address,
            updates={
                "state_dir": str(state),
                "enrollment_token": fleet.create_token().token,
                "trusted_root": str(root),
                "hardware_class": this_hardware_class(),
                "check_interval_s": 0.2,
                "jitter": 0.0,
            },
        )
        nodes.append(device)
        answer = await _served_by_device(device.address)
        assert "edgecascade.fallback_reason" not in answer
        service = device.component(NodeUpdatesService)

        def state_of_lm() -> tuple[str, str]:
            installed = {m.name: m for m in service._target.installed()}
            return (installed["lm"].version, installed["lm"].state) if "lm" in installed else ("", "")

        # The new version serves from its trial on; the commit follows right after.
        for _ in range(500):
            if state_of_lm() == ("1", "committed"):
                break
            await asyncio.sleep(0.01)
        assert state_of_lm() == ("1", "committed")
        assert plaintext_leaks(state, model_plaintexts(kit.files)) == []
    finally:
        for node in reversed(nodes):
            await node.stop()
    # A restart serves the committed version again, decrypted from the encrypted blob.
    again = await start_node(
        DEVICE,
        tmp_path / "device-models",
        "device-1",
        upstream="127.0.0.1:9",  # nothing there: serving must not need the upstream
        updates={"state_dir": str(state), "trusted_root": str(root), "hardware_class": this_hardware_class()},
    )
    try:
        await _served_by_device(again.address, attempts=50)
    finally:
        await again.stop()


async def test_an_edge_installs_what_is_deployed_to_edges_and_serves_it_to_its_devices(tmp_path: Path) -> None:
    kit = new_registry(tmp_path)
    publish_real(kit, "lm", "1")
    root = tmp_path / "root.json"
    root.write_bytes(kit.registry.repository.trusted_root())
    overrides: dict[str, Mapping[str, Any]] = {
        "server": {"node_id": "region-1", "grace_seconds": 0.2},
        "repository": {"path": str(tmp_path / "region-models")},
        "registry": {"path": str(kit.registry.directory)},
        "fleet": {"path": str(tmp_path / "fleet.sqlite"), "check_interval_s": 1},
    }
    region = Node(REGION, load_config(REGION.config_type, env={}, overrides=overrides))
    await region.start()
    nodes: list[Node] = [region]
    try:
        fleet = region.component(FleetControl).fleet
        assert fleet is not None
        fleet.deploy("lm", "1", tier="edge")
        state = tmp_path / "edge-state"
        edge = await start_node(
            EDGE,
            tmp_path / "edge-models",
            "edge-1",
            upstream=region.address,
            artifacts={"cache_dir": str(tmp_path / "edge-cache"), "trusted_root": str(root), "refresh_interval_s": 0},
            updates={
                "state_dir": str(state),
                "enrollment_token": fleet.create_token().token,
                "trusted_root": str(root),
                "hardware_class": this_hardware_class(),
                "check_interval_s": 0.2,
                "jitter": 0.0,
            },
        )
        nodes.append(edge)
        # A device without [updates] holds nothing: its request for lm is answered by the edge's installed copy.
        device = await start_node(DEVICE, tmp_path / "device-models", "device-1", upstream=edge.address)
        nodes.append(device)
        answer = await _served_by(device.address, "tier1:edge-1")
        assert answer["edgecascade.fallback_reason"] == "model_not_held"
        updates = edge.component(NodeUpdatesService)

        def committed() -> bool:  # it serves from its trial on; the commit follows right after
            return [(m.name, m.version, m.state) for m in updates._target.installed()] == [("lm", "1", "committed")]

        for _ in range(500):
            if committed():
                break
            await asyncio.sleep(0.01)
        assert committed()
        # Neither the edge's state nor its artifact cache holds the model in plaintext.
        assert plaintext_leaks(state, model_plaintexts(kit.files)) == []
        assert plaintext_leaks(tmp_path / "edge-cache", model_plaintexts(kit.files)) == []
    finally:
        for node in reversed(nodes):
            await node.stop()
