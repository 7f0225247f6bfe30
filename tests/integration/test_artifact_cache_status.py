"""The edge's artifact cache shows its use, hits, misses and evictions in GetTierInfo and `edgecascade status`."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import grpc
from rich.console import Console

from edgecascade.client_commands import status
from protos.edgecascade.v1 import artifacts_pb2, artifacts_pb2_grpc, mesh_pb2, mesh_pb2_grpc
from services.updates.tuf_client import hashed_target_path
from tests.integration.conftest import start_node
from tests.support.registry import new_registry, publish_lm
from tier1_edge.app import SPEC as EDGE
from tier2_region.app import SPEC as REGION

MIB = 1024 * 1024


async def _tier_info(address: str) -> mesh_pb2.GetTierInfoResponse:
    async with grpc.aio.insecure_channel(address) as channel:
        info: mesh_pb2.GetTierInfoResponse = await mesh_pb2_grpc.MeshServiceStub(channel).GetTierInfo(
            mesh_pb2.GetTierInfoRequest()
        )
    return info


async def test_the_edge_reports_its_artifact_cache(tmp_path: Path) -> None:
    kit = new_registry(tmp_path)
    publish_lm(kit)
    root = tmp_path / "trusted-root.json"
    root.write_bytes(kit.registry.repository.trusted_root())
    registry = {"path": str(kit.registry.directory), "key_dir": str(kit.key_dir)}
    region = await start_node(REGION, tmp_path / "region-models", "region-1", registry=registry)
    artifacts = {"cache_dir": str(tmp_path / "edge-cache"), "trusted_root": str(root), "max_cache_bytes": MIB}
    edge = await start_node(EDGE, tmp_path / "edge-models", "edge-1", region.address, artifacts=artifacts)
    try:
        info = kit.registry.target("lm", "1", "int8")
        path = "targets/" + hashed_target_path(info)
        async with grpc.aio.insecure_channel(edge.address) as channel:
            stub = artifacts_pb2_grpc.ArtifactServiceStub(channel)
            for _ in range(3):  # one miss, then two hits
                data = b"".join([r.data async for r in stub.Fetch(artifacts_pb2.FetchRequest(path=path))])
                assert len(data) == info.length
        cache = (await _tier_info(edge.address)).artifact_cache
        assert cache == mesh_pb2.ArtifactCacheStatus(
            max_bytes=MIB, used_bytes=info.length, blobs=1, hits=2, misses=1, evictions=0
        )
        assert not (await _tier_info(region.address)).HasField("artifact_cache")  # the region runs none
        state = tmp_path / "state"
        state.mkdir()
        (state / "endpoints.json").write_text(
            json.dumps({"region": region.address, "edge": edge.address, "devices": []})
        )
        console = Console(record=True, width=400)
        # The CLI blocks; the nodes answer on this loop.
        assert await asyncio.to_thread(status, console, state, 5.0) == 0
        rows = {line.split("│")[1].strip(): line for line in console.export_text().splitlines() if "│" in line}
        assert "0.0 MB / 1.0 MB · blobs 1 · hits 2 · misses 1 · evicted 0" in rows[edge.address]
        assert rows[region.address].rstrip("│ ").endswith("-")
    finally:
        await edge.stop()
        await region.stop()
