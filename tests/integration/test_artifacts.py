"""The artifact path end to end: region (origin) → edge (verifying cache) → reference consumer, on 127.0.0.1:0.

The registry is built by the real pipeline (real profiling subprocesses,
real encryption and signing); the consumer is python-tuf's ngclient over gRPC.
Attacks are made on the region's disk, where an attacker who owns the origin
(but not the keys) would make them.
"""

from __future__ import annotations

import asyncio
import functools
import json
from collections.abc import AsyncIterator, Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any, TypeVar

import grpc
import numpy as np
import onnxruntime as ort
import pytest
from securesystemslib.signer import CryptoSigner
from tuf.api.metadata import Metadata, Timestamp

from protos.edgecascade.v1 import artifacts_pb2 as pb
from protos.edgecascade.v1 import artifacts_pb2_grpc as pb_grpc
from services.config import load_config
from services.errors import DigestMismatchError, IntegrityError, MetadataSignatureError, StaleVersionError
from services.rpc.artifact_client import GrpcArtifactSource
from services.rpc.node import Node, TierSpec
from services.updates.content_encryption import decrypt_artifact
from services.updates.model_fetcher import ModelFetcher
from services.updates.tuf_client import hashed_target_path
from tests.support.registry import RegistryKit, lm_variants, new_registry, publish_lm
from tier1_edge.app import SPEC as EDGE
from tier1_edge.cache_service import ArtifactCacheService
from tier2_region.app import SPEC as REGION
from tier2_region.registry.pipeline import PipelineOptions, ValidationChoice, prepare, publish_model
from tier2_region.registry.profiler import ProfileSettings
from tier2_region.registry.tuf_repository import ExpiryPolicy

T = TypeVar("T")

FAST = PipelineOptions(
    profile=ProfileSettings(batch_sizes=(1, 4), latency_runs=5, latency_budget_s=0.05),
    validation=ValidationChoice(heldout_docs=["the quick brown fox jumps over the lazy dog. " * 8], rows=200),
)


@dataclass
class Mesh:
    """A region serving a registry and an edge caching it."""

    kit: RegistryKit
    region: Node
    edge: Node
    root_file: Path
    tmp: Path
    devices: ThreadPoolExecutor
    sources: list[GrpcArtifactSource] = field(default_factory=list)

    async def run(self, fn: Callable[..., T], *args: Any) -> T:
        """Runs a blocking device call in the devices' own threads (never the loop's executor the nodes use)."""
        return await asyncio.get_running_loop().run_in_executor(self.devices, functools.partial(fn, *args))

    def fetcher(self, name: str, via: str = "edge") -> ModelFetcher:
        """A device's fetcher over the artifact service of the edge or the region (its channel closes at teardown)."""
        address = self.edge.address if via == "edge" else self.region.address
        source = GrpcArtifactSource(address, timeout_s=300.0)
        self.sources.append(source)
        root = self.root_file.read_bytes()
        return ModelFetcher(source, root, self.tmp / "devices" / name, f"artifact service {address}")

    def blob(self, variant: str = "int8") -> Path:
        info = self.kit.registry.target("lm", "1", variant)
        return self.kit.registry.repository.targets_dir / hashed_target_path(info)


async def start(spec: TierSpec, tmp: Path, node_id: str, **sections: Mapping[str, Any]) -> Node:
    overrides: dict[str, Mapping[str, Any]] = {
        "server": {"node_id": node_id, "grace_seconds": 0.2},
        "repository": {"path": str(tmp / node_id / "models")},
        **sections,
    }
    node = Node(spec, load_config(spec.config_type, env={}, overrides=overrides))
    await node.start()
    return node


@pytest.fixture
async def mesh(tmp_path: Path) -> AsyncIterator[Mesh]:
    kit = new_registry(tmp_path)
    subs = prepare(lm_variants(kit.files), "fp32", FAST)
    publish_model(kit.registry, kit.keys, "lm", "1", subs, FAST)
    root_file = tmp_path / "trusted-root.json"
    root_file.write_bytes(kit.registry.repository.trusted_root())
    region = await start(
        REGION,
        tmp_path,
        "region-1",
        registry={"path": str(kit.registry.directory), "key_dir": str(kit.key_dir), "chunk_bytes": 1024},
    )
    edge = await start(
        EDGE,
        tmp_path,
        "edge-1",
        upstream={"address": region.address},
        artifacts={
            "cache_dir": str(tmp_path / "edge-cache"),
            "trusted_root": str(root_file),
            "refresh_interval_s": 0.0,
            "chunk_bytes": 1024,
        },
    )
    devices = ThreadPoolExecutor(16, thread_name_prefix="device")
    mesh = Mesh(kit, region, edge, root_file, tmp_path, devices)
    try:
        yield mesh
    finally:
        for source in mesh.sources:
            source.close()
        await edge.stop()
        await region.stop()
        devices.shutdown(wait=False, cancel_futures=True)


def _staged(mesh: Mesh) -> list[Path]:
    return [p for p in (mesh.tmp / "devices").rglob("*") if p.is_file() and "staging" in p.parts]


async def test_a_device_fetches_a_model_through_the_edge_and_verifies_it(mesh: Mesh) -> None:
    fetcher = mesh.fetcher("device-1")
    target = await mesh.run(fetcher.resolve, "lm", "1", "int8")
    custom = target.custom
    assert custom["variant"] == "int8" and custom["opset"] == 17
    assert set(custom["peak_memory_bytes"]) == {"1", "4"}
    assert custom["accuracy"]["metric"] == "next_char_top1"
    download = await mesh.run(fetcher.download, target)
    key = mesh.kit.registry.database.content_key(custom["encryption"]["key_id"])
    model = decrypt_artifact(download.path.read_bytes(), key, target.target_path)
    # The decrypted model reproduces its signed golden vectors.
    golden = await mesh.run(fetcher.golden_vectors, target)
    session = ort.InferenceSession(model, providers=["CPUExecutionProvider"])
    (probs,) = session.run(["probs"], golden.inputs)
    np.testing.assert_allclose(probs, golden.outputs["probs"], atol=golden.atol, rtol=golden.rtol)
    assert mesh.edge.address != mesh.region.address
    edge_cache = mesh.edge.component(ArtifactCacheService).cache
    assert edge_cache is not None and edge_cache.stats.downloads == 2  # the blob and its golden vectors


async def test_many_devices_at_once_cost_one_upstream_download(mesh: Mesh) -> None:
    fetchers = [mesh.fetcher(f"device-{i}") for i in range(6)]

    def fetch(f: ModelFetcher) -> bytes:
        return f.download(f.resolve("lm", "1", "fp32")).path.read_bytes()

    blobs = await asyncio.gather(*(mesh.run(fetch, f) for f in fetchers))
    assert len(set(blobs)) == 1 and blobs[0] == mesh.blob("fp32").read_bytes()
    cache = mesh.edge.component(ArtifactCacheService).cache
    assert cache is not None and cache.stats.downloads == 1


async def test_the_artifact_service_answers_not_found_bad_paths_and_offsets(mesh: Mesh) -> None:
    blob_path = "targets/" + hashed_target_path(mesh.kit.registry.target("lm", "1", "int8"))
    whole = mesh.blob().read_bytes()
    for node in (mesh.region, mesh.edge):
        async with grpc.aio.insecure_channel(node.address) as channel:
            stub = pb_grpc.ArtifactServiceStub(channel)

            async def fetch(path: str, offset: int = 0, s: pb_grpc.ArtifactServiceStub = stub) -> bytes:
                return b"".join([r.data async for r in s.Fetch(pb.FetchRequest(path=path, offset=offset))])

            assert await fetch(blob_path) == whole
            assert await fetch(blob_path, 1000) == whole[1000:]  # resumable
            for path, code in (
                ("metadata/9.root.json", grpc.StatusCode.NOT_FOUND),
                ("targets/models/lm/1/nothing-here", grpc.StatusCode.NOT_FOUND),
                ("metadata/../registry.sqlite", grpc.StatusCode.INVALID_ARGUMENT),
                ("../keys/online.pem", grpc.StatusCode.INVALID_ARGUMENT),
                ("/etc/passwd", grpc.StatusCode.INVALID_ARGUMENT),
            ):
                with pytest.raises(grpc.aio.AioRpcError) as failed:
                    await fetch(path)
                assert failed.value.code() == code, (node.spec.tier, path)
            with pytest.raises(grpc.aio.AioRpcError) as past_end:
                await fetch(blob_path, len(whole) + 1)
            assert past_end.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert "past the end" in (past_end.value.details() or "")


async def test_a_flipped_byte_at_the_region_never_leaves_the_edge(mesh: Mesh) -> None:
    blob = mesh.blob()
    data = bytearray(blob.read_bytes())
    data[100] ^= 0x40
    blob.write_bytes(bytes(data))
    via_edge = mesh.fetcher("device-1")
    target = await mesh.run(via_edge.resolve, "lm", "1", "int8")
    with pytest.raises(IntegrityError) as refused:
        await mesh.run(via_edge.download, target)
    assert isinstance(refused.value, DigestMismatchError)  # the edge named the class over the wire
    assert not list((mesh.tmp / "edge-cache" / "blobs").iterdir())
    direct = mesh.fetcher("device-2", via="region")
    with pytest.raises(DigestMismatchError, match="does not match its signed info"):
        await mesh.run(direct.download, await mesh.run(direct.resolve, "lm", "1", "int8"))
    assert _staged(mesh) == []


async def test_a_blob_longer_than_signed_is_refused(mesh: Mesh) -> None:
    blob = mesh.blob("fp32")
    blob.write_bytes(blob.read_bytes() + b"MORE" * 5000)
    direct = mesh.fetcher("device-1", via="region")
    with pytest.raises(DigestMismatchError, match="longer than its signed length"):
        await mesh.run(direct.download, await mesh.run(direct.resolve, "lm", "1", "fp32"))
    via_edge = mesh.fetcher("device-2")
    with pytest.raises(DigestMismatchError):
        await mesh.run(via_edge.download, await mesh.run(via_edge.resolve, "lm", "1", "fp32"))
    assert _staged(mesh) == []
    assert not list((mesh.tmp / "edge-cache" / "blobs").iterdir())


async def test_forged_and_replayed_metadata_are_refused(mesh: Mesh) -> None:
    timestamp = mesh.kit.registry.repository.metadata_dir / "timestamp.json"
    genuine = timestamp.read_bytes()
    device = mesh.fetcher("device-1", via="region")
    await mesh.run(device.refresh)
    await mesh.run(mesh.fetcher("device-2").refresh)  # the edge verifies the genuine metadata
    # Signed with a key root does not trust.
    forged = Metadata[Timestamp].from_bytes(genuine)
    forged.signed.version += 5
    forged.sign(CryptoSigner.generate_ed25519())
    timestamp.write_bytes(forged.to_bytes())
    with pytest.raises(MetadataSignatureError):
        await mesh.run(mesh.fetcher("device-1", via="region").refresh)
    # The edge keeps serving the timestamp it verified; its devices are not affected.
    served = await mesh.run(mesh.fetcher("device-2").resolve, "lm", "1", "int8")
    assert served.custom["variant"] == "int8"
    # Replay: a genuine but older timestamp after a newer one was trusted.
    timestamp.write_bytes(genuine)
    await mesh.run(publish_lm, mesh.kit, "lm", "2", 1)
    newer = timestamp.read_bytes()
    await mesh.run(mesh.fetcher("device-1", via="region").refresh)
    timestamp.write_bytes(genuine)
    with pytest.raises(StaleVersionError, match="rollback refused"):
        await mesh.run(mesh.fetcher("device-1", via="region").refresh)
    assert json.loads(newer)["signed"]["version"] > json.loads(genuine)["signed"]["version"]


async def test_the_edge_keeps_serving_when_the_region_is_gone(mesh: Mesh) -> None:
    first = mesh.fetcher("device-1")
    target = await mesh.run(first.resolve, "lm", "1", "int8")
    expected = (await mesh.run(first.download, target)).path.read_bytes()
    await mesh.region.stop()
    # A device the edge has never seen bootstraps from the edge alone.
    late = mesh.fetcher("device-late")
    target = await mesh.run(late.resolve, "lm", "1", "int8")
    assert (await mesh.run(late.download, target)).path.read_bytes() == expected
    cache = mesh.edge.component(ArtifactCacheService).cache
    assert cache is not None and cache.stats.refresh_failures >= 1


async def test_the_region_re_signs_its_timestamp_before_it_expires(tmp_path: Path) -> None:
    kit = new_registry(
        tmp_path, expiry=ExpiryPolicy(timestamp=timedelta(seconds=4), resign_margin=timedelta(seconds=3))
    )
    timestamp = kit.registry.repository.metadata_dir / "timestamp.json"
    before = json.loads(timestamp.read_bytes())["signed"]["version"]
    registry = {
        "path": str(kit.registry.directory),
        "key_dir": str(kit.key_dir),
        "timestamp_expiry_s": 4,
        "resign_margin_s": 3,
        "resign_check_s": 0.1,
    }
    region = await start(REGION, tmp_path, "region-1", registry=registry)
    try:
        for _ in range(50):
            if json.loads(timestamp.read_bytes())["signed"]["version"] > before:
                break
            await asyncio.sleep(0.1)
        assert json.loads(timestamp.read_bytes())["signed"]["version"] > before
    finally:
        await region.stop()
