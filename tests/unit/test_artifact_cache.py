"""The edge's verifying pull-through cache over a scripted upstream (a repository directory)."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest

from services.artifact_cache import ArtifactCache, ArtifactCacheConfig
from services.errors import ArtifactNotFoundError, DigestMismatchError, InvalidArgumentError, UnavailableError
from services.tuf_client import hashed_target_path
from tests.support.registry import DirectorySource, RegistryKit, new_registry, publish_lm


class Ticks:
    """A monotonic clock the test moves."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def kit(tmp_path: Path) -> RegistryKit:
    kit = new_registry(tmp_path)
    publish_lm(kit)
    return kit


def _cache(kit: RegistryKit, tmp: Path, source: DirectorySource, clock: Ticks | None = None) -> ArtifactCache:
    config = ArtifactCacheConfig(tmp / "edge-cache", refresh_interval_s=10.0)
    return ArtifactCache(source, kit.registry.repository.trusted_root(), config, "test upstream", clock or Ticks())


def _blob_path(kit: RegistryKit, variant: str = "int8") -> str:
    return "targets/" + hashed_target_path(kit.registry.target("lm", "1", variant))


async def test_serves_verified_metadata_and_blobs(kit: RegistryKit, tmp_path: Path) -> None:
    source = DirectorySource(kit.registry.repository_dir)
    cache = _cache(kit, tmp_path, source)
    timestamp = await cache.open("metadata/timestamp.json")
    assert timestamp.read_bytes() == (kit.registry.repository.metadata_dir / "timestamp.json").read_bytes()
    for name in ("1.root.json", "2.snapshot.json", "2.targets.json"):
        served = await cache.open(f"metadata/{name}")
        assert served.read_bytes() == (kit.registry.repository_dir / "metadata" / name).read_bytes()
    blob = await cache.open(_blob_path(kit))
    assert blob.read_bytes() == (kit.registry.repository_dir / _blob_path(kit)).read_bytes()
    with pytest.raises(ArtifactNotFoundError):
        await cache.open("metadata/2.root.json")
    with pytest.raises(InvalidArgumentError):
        await cache.open("targets/../../etc/passwd")
    await cache.close()


async def test_one_upstream_download_per_digest_however_many_ask(kit: RegistryKit, tmp_path: Path) -> None:
    source = DirectorySource(kit.registry.repository_dir)
    cache = _cache(kit, tmp_path, source)
    path = _blob_path(kit)
    results = await asyncio.gather(*(cache.open(path) for _ in range(20)))
    assert len({str(p) for p in results}) == 1
    assert source.requests[path] == 1
    assert cache.stats.downloads == 1
    await cache.open(path)
    assert source.requests[path] == 1 and cache.stats.hits >= 1
    await cache.close()


async def test_a_corrupt_blob_is_never_cached_or_served(kit: RegistryKit, tmp_path: Path) -> None:
    path = _blob_path(kit)
    origin = kit.registry.repository_dir / path
    good = origin.read_bytes()
    origin.write_bytes(good[:-1] + bytes([good[-1] ^ 0xFF]))
    source = DirectorySource(kit.registry.repository_dir)
    cache = _cache(kit, tmp_path, source)
    waiters = [cache.open(path) for _ in range(3)]
    outcomes = await asyncio.gather(*waiters, return_exceptions=True)
    assert all(isinstance(o, DigestMismatchError) for o in outcomes)
    assert cache.stats.refused == 1
    assert not any((tmp_path / "edge-cache" / "blobs").iterdir())
    assert not any((tmp_path / "edge-cache" / "staging").iterdir())
    # Once the origin is repaired the same digest is fetched and served.
    origin.write_bytes(good)
    assert (await cache.open(path)).read_bytes() == good
    await cache.close()


async def test_keeps_serving_what_it_verified_while_upstream_is_down(kit: RegistryKit, tmp_path: Path) -> None:
    source = DirectorySource(kit.registry.repository_dir)
    clock = Ticks()
    cache = _cache(kit, tmp_path, source, clock)
    path = _blob_path(kit)
    blob = await cache.open(path)
    await cache.open("metadata/timestamp.json")
    source.down = True
    clock.now += 60  # the timestamp is stale: the cache asks upstream, fails, serves its verified copy
    assert (await cache.open("metadata/timestamp.json")).is_file()
    assert await cache.open(path) == blob
    assert cache.stats.refresh_failures == 1
    with pytest.raises(UnavailableError):
        await cache.open(_blob_path(kit, "fp32"))  # never cached, upstream gone
    await cache.close()
    # A restarted edge with the upstream still down serves from disk.
    restarted = _cache(kit, tmp_path, source)
    assert (await restarted.open(path)).read_bytes() == blob.read_bytes()
    assert (await restarted.open("metadata/2.targets.json")).is_file()
    await restarted.close()


async def test_replayed_metadata_does_not_displace_verified_metadata(kit: RegistryKit, tmp_path: Path) -> None:
    metadata = kit.registry.repository.metadata_dir
    old = (metadata / "timestamp.json").read_bytes()
    publish_lm(kit, version="2", seed=1)
    clock = Ticks()
    cache = _cache(kit, tmp_path, DirectorySource(kit.registry.repository_dir), clock)
    current = (await cache.open("metadata/timestamp.json")).read_bytes()
    assert json.loads(current)["signed"]["version"] == 3
    (metadata / "timestamp.json").write_bytes(old)  # the origin now replays version 2
    clock.now += 60
    assert (await cache.open("metadata/timestamp.json")).read_bytes() == current
    assert cache.stats.refresh_failures == 1
    await cache.close()


async def test_a_digest_the_signed_targets_do_not_list_is_not_found(kit: RegistryKit, tmp_path: Path) -> None:
    cache = _cache(kit, tmp_path, DirectorySource(kit.registry.repository_dir))
    with pytest.raises(ArtifactNotFoundError, match="another digest"):
        await cache.open("targets/models/lm/1/" + "0" * 64 + ".int8")
    with pytest.raises(ArtifactNotFoundError):
        await cache.open("targets/models/lm/1/int8")
    await cache.close()
