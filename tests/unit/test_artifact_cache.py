"""The edge's verifying pull-through cache over a scripted upstream (a repository directory)."""

from __future__ import annotations

import asyncio
import json
import logging
import threading
from collections import Counter
from collections.abc import Callable, Collection, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from opentelemetry.sdk.trace import TracerProvider

from protos.edgecascade.v1 import mesh_pb2
from services.config import load_config
from services.errors import (
    ArtifactNotFoundError,
    CapacityError,
    ConfigError,
    DigestMismatchError,
    InvalidArgumentError,
    UnavailableError,
)
from services.inference import NodeIdentity
from services.rpc.components import NodeContext
from services.updates.tuf_client import hashed_target_path
from tests.support.registry import DirectorySource, FakeClock, RegistryKit, new_registry, publish_lm
from tier1_edge import artifact_cache
from tier1_edge.artifact_cache import ArtifactCache, ArtifactCacheConfig
from tier1_edge.cache_service import ArtifactCacheService
from tier1_edge.config import EdgeConfig

# Only a bound for a test that has already failed (something waited that should not have); never reached when passing.
LIMIT_S = 20.0
TIMESTAMP = "metadata/timestamp.json"


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


class GatedSource(DirectorySource):
    """An upstream whose chosen paths block (a slow region) while the test holds the gate closed."""

    def __init__(self, root: Path, gated: Callable[[str], bool]) -> None:
        super().__init__(root)
        self.gated = gated
        self.gate = threading.Event()
        self.gate.set()
        self.held: Counter[str] = Counter()
        self._arrived = threading.Condition()

    def fetch(self, path: str, offset: int = 0) -> Iterator[bytes]:
        if self.gated(path) and not self.gate.is_set():
            with self._arrived:
                self.held[path] += 1
                self._arrived.notify_all()
            self.gate.wait(LIMIT_S)
        yield from super().fetch(path, offset)

    def wait_held(self, count: int) -> bool:
        """Blocks until ``count`` fetches have reached the closed gate (False if they never do)."""
        with self._arrived:
            return self._arrived.wait_for(lambda: self.held.total() >= count, LIMIT_S)


def _cache(
    kit: RegistryKit,
    tmp: Path,
    source: DirectorySource,
    clock: Ticks | None = None,
    wall: FakeClock | None = None,
    max_bytes: int = artifact_cache.DEFAULT_MAX_BYTES,
    keep: Callable[[], Collection[str]] | None = None,
) -> ArtifactCache:
    config = ArtifactCacheConfig(tmp / "edge-cache", refresh_interval_s=10.0, max_bytes=max_bytes)
    root = kit.registry.repository.trusted_root()
    return ArtifactCache(
        source,
        root,
        config,
        "test upstream",
        clock or Ticks(),
        wall or (lambda: datetime.now(UTC)),
        keep or (lambda: ()),
    )


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
    clock.now += 60  # the timestamp is stale: the cache serves its verified copy and asks upstream, which fails
    assert (await cache.open("metadata/timestamp.json")).is_file()
    await cache.wait_refreshed()
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
    await cache.wait_refreshed()
    assert cache.stats.refresh_failures == 1
    assert (await cache.open("metadata/timestamp.json")).read_bytes() == current
    await cache.close()


async def test_a_digest_the_signed_targets_do_not_list_is_not_found(kit: RegistryKit, tmp_path: Path) -> None:
    cache = _cache(kit, tmp_path, DirectorySource(kit.registry.repository_dir))
    with pytest.raises(ArtifactNotFoundError, match="another digest"):
        await cache.open("targets/models/lm/1/" + "0" * 64 + ".int8")
    with pytest.raises(ArtifactNotFoundError):
        await cache.open("targets/models/lm/1/int8")
    await cache.close()


async def test_a_path_the_targets_do_not_list_does_not_fail_a_download_of_its_digest(
    kit: RegistryKit, tmp_path: Path
) -> None:
    source = DirectorySource(kit.registry.repository_dir)
    cache = _cache(kit, tmp_path, source)
    await cache.open(TIMESTAMP)
    path = _blob_path(kit)
    digest = kit.registry.target("lm", "1", "int8").hashes["sha256"]
    bogus = asyncio.create_task(cache.open(f"targets/nope/{digest}.x"))  # asks first, for the same digest
    legit = [asyncio.create_task(cache.open(path)) for _ in range(3)]
    with pytest.raises(ArtifactNotFoundError):
        await bogus
    served = await asyncio.gather(*legit)
    assert {p.read_bytes() for p in served} == {(kit.registry.repository_dir / path).read_bytes()}
    assert source.requests[path] == 1 and cache.stats.downloads == 1
    await cache.close()


async def test_a_path_the_targets_do_not_list_gets_nothing_from_a_download_in_flight(
    kit: RegistryKit, tmp_path: Path
) -> None:
    source = GatedSource(kit.registry.repository_dir, lambda p: p.startswith("targets/"))
    cache = _cache(kit, tmp_path, source)
    await cache.open(TIMESTAMP)
    path = _blob_path(kit)
    digest = kit.registry.target("lm", "1", "int8").hashes["sha256"]
    source.gate.clear()
    legit = asyncio.create_task(cache.open(path))
    try:
        assert await asyncio.to_thread(source.wait_held, 1)  # the real download is in flight, held upstream
        bogus = asyncio.create_task(cache.open(f"targets/models/lm/9/{digest}.int8"))
        await asyncio.sleep(0)  # it gets as far as it can while the download is still held
    finally:
        source.gate.set()
    with pytest.raises(ArtifactNotFoundError):
        await bogus
    assert (await legit).read_bytes() == (kit.registry.repository_dir / path).read_bytes()
    assert source.requests[path] == 1
    await cache.close()


async def test_a_cached_timestamp_is_served_at_once_while_the_region_is_slow(kit: RegistryKit, tmp_path: Path) -> None:
    source = GatedSource(kit.registry.repository_dir, lambda p: p == TIMESTAMP)
    clock = Ticks()
    cache = _cache(kit, tmp_path, source, clock)
    old = (await cache.open(TIMESTAMP)).read_bytes()
    publish_lm(kit, version="2", seed=1)
    new = (kit.registry.repository.metadata_dir / "timestamp.json").read_bytes()
    assert json.loads(new)["signed"]["version"] > json.loads(old)["signed"]["version"]
    source.gate.clear()
    clock.now += 60  # past the refresh interval: the region is asked again, and it hangs
    try:
        served = await asyncio.wait_for(asyncio.gather(*(cache.open(TIMESTAMP) for _ in range(5))), LIMIT_S)
        assert [p.read_bytes() for p in served] == [old] * 5
        assert await asyncio.to_thread(source.wait_held, 1)
        assert source.held[TIMESTAMP] == 1  # one background refresh for all five requests
        assert (await cache.open(TIMESTAMP)).read_bytes() == old  # still answered while the refresh waits
    finally:
        source.gate.set()
    await asyncio.wait_for(cache.wait_refreshed(), LIMIT_S)
    assert (await cache.open(TIMESTAMP)).read_bytes() == new
    assert cache.stats.refreshes == 2 and cache.stats.refresh_failures == 0
    await cache.close()


async def test_metadata_never_queues_behind_blob_transfers(
    kit: RegistryKit, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(artifact_cache, "WORKER_THREADS", 2)
    source = GatedSource(kit.registry.repository_dir, lambda p: p.startswith("targets/"))
    clock = Ticks()
    cache = _cache(kit, tmp_path, source, clock)
    old = (await cache.open(TIMESTAMP)).read_bytes()
    publish_lm(kit, version="2", seed=1)
    source.gate.clear()
    blobs = [asyncio.create_task(cache.open(_blob_path(kit, v))) for v in ("int8", "fp32")]
    try:
        assert await asyncio.to_thread(source.wait_held, 2)  # every blob thread is busy with a slow transfer
        clock.now += 60
        assert (await asyncio.wait_for(cache.open(TIMESTAMP), LIMIT_S)).read_bytes() == old
        await asyncio.wait_for(cache.wait_refreshed(), LIMIT_S)  # the refresh ran while the blobs were held
        current = (kit.registry.repository.metadata_dir / "timestamp.json").read_bytes()
        assert (await cache.open(TIMESTAMP)).read_bytes() == current != old
        assert not any(b.done() for b in blobs)
    finally:
        source.gate.set()
    assert all(p.is_file() for p in await asyncio.gather(*blobs))
    await cache.close()


async def test_an_expired_cached_timestamp_waits_for_the_refresh(kit: RegistryKit, tmp_path: Path) -> None:
    source = GatedSource(kit.registry.repository_dir, lambda p: p == TIMESTAMP)
    wall = FakeClock(datetime.now(UTC))
    cache = _cache(kit, tmp_path, source, wall=wall)
    old = (await cache.open(TIMESTAMP)).read_bytes()
    publish_lm(kit, version="2", seed=1)
    new = (kit.registry.repository.metadata_dir / "timestamp.json").read_bytes()
    wall.advance(timedelta(days=2))  # the cached copy's signed expiry (a day) has passed; the interval has not
    source.gate.clear()
    request = asyncio.create_task(cache.open(TIMESTAMP))
    try:
        held = asyncio.create_task(asyncio.to_thread(source.wait_held, 1))
        await asyncio.wait({request, held}, return_when=asyncio.FIRST_COMPLETED)
        assert not request.done(), "an expired timestamp was served without asking the region"
        assert await held
    finally:
        source.gate.set()
    served = (await asyncio.wait_for(request, LIMIT_S)).read_bytes()
    assert served == new != old
    await cache.close()


async def test_an_expired_cached_timestamp_is_never_served_when_the_region_is_down(
    kit: RegistryKit, tmp_path: Path
) -> None:
    source = DirectorySource(kit.registry.repository_dir)
    clock = Ticks()
    wall = FakeClock(datetime.now(UTC))
    cache = _cache(kit, tmp_path, source, clock, wall)
    blob = await cache.open(_blob_path(kit))
    source.down = True
    wall.advance(timedelta(days=2))
    for _ in range(2):
        clock.now += 60
        with pytest.raises(UnavailableError):
            await cache.open(TIMESTAMP)
    assert await cache.open(_blob_path(kit)) == blob  # verified blobs are still served
    assert cache.stats.refresh_failures == 2
    await cache.close()


def _warnings(caplog: pytest.LogCaptureFixture) -> list[str]:
    """What the cache itself warned about."""
    records = caplog.records
    return [r.getMessage() for r in records if r.name == artifact_cache.log.name and r.levelno >= logging.WARNING]


def _refresh_attempts(cache: ArtifactCache) -> int:
    return cache.stats.refreshes + cache.stats.refresh_failures


@pytest.mark.parametrize("cached", ["absent", "expired"])
async def test_a_down_region_is_asked_once_per_interval_when_no_timestamp_can_be_served(
    kit: RegistryKit, tmp_path: Path, caplog: pytest.LogCaptureFixture, cached: str
) -> None:
    source = DirectorySource(kit.registry.repository_dir)
    clock = Ticks()
    wall = FakeClock(datetime.now(UTC))
    cache = _cache(kit, tmp_path, source, clock, wall)
    if cached == "expired":
        await cache.open(TIMESTAMP)
        wall.advance(timedelta(days=2))  # past the cached copy's signed expiry
    source.down = True
    clock.now += 60
    caplog.set_level(logging.WARNING, logger="edgecascade.artifact_cache")
    caplog.clear()
    failures = [cache.stats.refresh_failures]
    errors: list[UnavailableError] = []
    for _ in range(50):
        with pytest.raises(UnavailableError) as raised:
            await cache.open(TIMESTAMP)
        errors.append(raised.value)
    failures.append(cache.stats.refresh_failures)
    assert failures[1] - failures[0] == 1, "each poll asked the region again"
    assert {(type(e), e.message) for e in errors} == {(type(errors[0]), errors[0].message)}
    assert cache.stats.refresh_failures_replayed == 49
    warnings = _warnings(caplog)
    assert len(warnings) == 1, warnings
    assert "serving what was verified before" not in warnings[0]
    # Once the interval has passed, the region is asked again (once).
    clock.now += artifact_cache.MISS_REFRESH_INTERVAL_S
    for _ in range(3):
        with pytest.raises(UnavailableError):
            await cache.open(TIMESTAMP)
    assert cache.stats.refresh_failures - failures[1] == 1
    # And when it is back, the next attempt succeeds.
    source.down = False
    clock.now += artifact_cache.MISS_REFRESH_INTERVAL_S
    assert (await cache.open(TIMESTAMP)).is_file()
    await cache.close()


async def test_blob_misses_before_any_refresh_ask_a_down_region_once_per_interval(
    kit: RegistryKit, tmp_path: Path
) -> None:
    source = DirectorySource(kit.registry.repository_dir)
    source.down = True
    clock = Ticks()
    cache = _cache(kit, tmp_path, source, clock)
    outcomes = [await asyncio.gather(cache.open(_blob_path(kit)), return_exceptions=True) for _ in range(20)]
    assert all(isinstance(o[0], UnavailableError) for o in outcomes)
    assert cache.stats.refresh_failures == 1 and cache.stats.refresh_failures_replayed == 19
    await cache.close()


async def test_a_failed_background_refresh_says_the_verified_copy_is_served(
    kit: RegistryKit, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    source = DirectorySource(kit.registry.repository_dir)
    clock = Ticks()
    cache = _cache(kit, tmp_path, source, clock)
    await cache.open(TIMESTAMP)
    source.down = True
    clock.now += 60
    caplog.set_level(logging.WARNING, logger="edgecascade.artifact_cache")
    assert (await cache.open(TIMESTAMP)).is_file()
    await cache.wait_refreshed()
    warnings = _warnings(caplog)
    assert len(warnings) == 1 and "serving what was verified before" in warnings[0]
    await cache.close()


async def test_a_listed_blob_does_not_wait_behind_a_background_refresh_on_a_slow_region(
    kit: RegistryKit, tmp_path: Path
) -> None:
    source = GatedSource(kit.registry.repository_dir, lambda p: p == TIMESTAMP)
    clock = Ticks()
    cache = _cache(kit, tmp_path, source, clock)
    await cache.open(TIMESTAMP)
    source.gate.clear()
    clock.now += 60  # the next timestamp request starts a background refresh, which hangs on the region
    try:
        assert (await cache.open(TIMESTAMP)).is_file()
        assert await asyncio.to_thread(source.wait_held, 1)
        attempts = _refresh_attempts(cache)
        blob = await asyncio.wait_for(cache.open(_blob_path(kit)), LIMIT_S)
        assert blob.read_bytes() == (kit.registry.repository_dir / _blob_path(kit)).read_bytes()
        assert _refresh_attempts(cache) == attempts and source.held[TIMESTAMP] == 1
    finally:
        source.gate.set()
    await asyncio.wait_for(cache.wait_refreshed(), LIMIT_S)
    await cache.close()


async def test_requests_joining_a_long_download_start_no_refresh(kit: RegistryKit, tmp_path: Path) -> None:
    source = GatedSource(kit.registry.repository_dir, lambda p: p.startswith("targets/"))
    clock = Ticks()
    cache = _cache(kit, tmp_path, source, clock)
    await cache.open(TIMESTAMP)
    attempts = _refresh_attempts(cache)
    timestamps = source.requests[TIMESTAMP]
    path = _blob_path(kit)
    source.gate.clear()
    first = asyncio.create_task(cache.open(path))
    joiners: list[asyncio.Task[Path]] = []
    try:
        assert await asyncio.to_thread(source.wait_held, 1)  # the download is in flight, held upstream
        for _ in range(5):
            clock.now += 2 * artifact_cache.MISS_REFRESH_INTERVAL_S  # the download takes long
            joiners.append(asyncio.create_task(cache.open(path)))
            await asyncio.sleep(0)  # the request runs up to its first wait
            await asyncio.wait_for(cache.wait_refreshed(), LIMIT_S)  # and any refresh it started ends
        assert _refresh_attempts(cache) == attempts and source.requests[TIMESTAMP] == timestamps
    finally:
        source.gate.set()
    served = await asyncio.gather(first, *joiners)
    assert len({str(p) for p in served}) == 1
    assert source.requests[path] == 1 and cache.stats.downloads == 1
    await cache.close()


async def test_a_blob_the_verified_targets_do_not_list_yet_refreshes_once_per_interval(
    kit: RegistryKit, tmp_path: Path
) -> None:
    source = DirectorySource(kit.registry.repository_dir)
    clock = Ticks()
    cache = _cache(kit, tmp_path, source, clock)
    await cache.open(TIMESTAMP)
    publish_lm(kit, version="2", seed=1)
    new_path = "targets/" + hashed_target_path(kit.registry.target("lm", "2", "int8"))
    clock.now += 2 * artifact_cache.MISS_REFRESH_INTERVAL_S
    attempts = _refresh_attempts(cache)
    blob = await cache.open(new_path)  # not listed in what was verified: one refresh, then it is
    assert blob.read_bytes() == (kit.registry.repository_dir / new_path).read_bytes()
    assert _refresh_attempts(cache) == attempts + 1
    unlisted = "targets/models/lm/9/" + "0" * 64 + ".int8"
    for _ in range(5):
        with pytest.raises(ArtifactNotFoundError):
            await cache.open(unlisted)
    assert _refresh_attempts(cache) == attempts + 1  # within the interval of the last refresh
    clock.now += 2 * artifact_cache.MISS_REFRESH_INTERVAL_S
    with pytest.raises(ArtifactNotFoundError):
        await cache.open(unlisted)
    assert _refresh_attempts(cache) == attempts + 2
    await cache.close()


# --- the bound ---------------------------------------------------------------------------------------------------

# Holds any two of the test blobs (1822 and 2444 bytes), never three.
BOUND = 5000
PAST_GRACE_S = artifact_cache.IN_USE_GRACE_S + 1


@dataclass(frozen=True)
class Blob:
    path: str
    digest: str
    size: int


def _blobs(kit: RegistryKit) -> tuple[Blob, Blob, Blob, Blob]:
    """lm 1 int8, lm 1 fp32, and lm 2 int8 and fp32 (published here)."""
    publish_lm(kit, version="2", seed=1)
    found = []
    for version, variant in (("1", "int8"), ("1", "fp32"), ("2", "int8"), ("2", "fp32")):
        info = kit.registry.target("lm", version, variant)
        found.append(Blob("targets/" + hashed_target_path(info), info.hashes["sha256"], info.length))
    a, b, c, d = found
    assert a.size + b.size <= BOUND and c.size + d.size <= BOUND and a.size + b.size + c.size > BOUND
    return a, b, c, d


def _kept(tmp: Path) -> set[str]:
    return {p.name for p in (tmp / "edge-cache" / "blobs").iterdir()}


def _metadata_files(tmp: Path) -> dict[str, bytes]:
    cache_dir = tmp / "edge-cache"
    return {
        str(p.relative_to(cache_dir)): p.read_bytes()
        for d in ("served", "tuf")
        for p in (cache_dir / d).rglob("*")
        if p.is_file()
    }


async def test_a_bound_smaller_than_three_blobs_evicts_the_least_recently_used(
    kit: RegistryKit, tmp_path: Path
) -> None:
    a, b, c, _ = _blobs(kit)
    source = DirectorySource(kit.registry.repository_dir)
    clock = Ticks()
    cache = _cache(kit, tmp_path, source, clock, max_bytes=BOUND)
    for blob in (a, b, a):  # the second `a` is a hit: a is now more recently used than b
        await cache.open(blob.path)
        clock.now += PAST_GRACE_S
    assert (cache.stats.blob_hits, cache.stats.blob_misses, source.requests[a.path]) == (1, 2, 1)
    served = await cache.open(c.path)  # no room for c: b, the least recently used, goes
    assert served.read_bytes() == (kit.registry.repository_dir / c.path).read_bytes()
    assert _kept(tmp_path) == {a.digest, c.digest}
    assert (cache.stats.evictions, cache.stats.evicted_bytes) == (1, b.size)
    assert cache.usage() == artifact_cache.ArtifactCacheUsage(BOUND, a.size + c.size, 2, 0)
    assert (await cache.open(a.path)).is_file() and source.requests[a.path] == 1  # kept: still a hit
    clock.now += PAST_GRACE_S
    await cache.open(b.path)  # evicted: a miss, downloaded again, and c (now the least recently used) goes
    assert source.requests[b.path] == 2 and _kept(tmp_path) == {a.digest, b.digest}
    assert (cache.stats.blob_hits, cache.stats.blob_misses, cache.stats.evictions) == (2, 4, 2)
    assert cache.usage().used_bytes == a.size + b.size <= BOUND
    await cache.close()


async def test_a_blob_used_within_the_grace_is_not_evicted_and_the_excess_goes_later(
    kit: RegistryKit, tmp_path: Path
) -> None:
    a, b, c, _ = _blobs(kit)
    clock = Ticks()
    cache = _cache(kit, tmp_path, DirectorySource(kit.registry.repository_dir), clock, max_bytes=BOUND)
    path_a = await cache.open(a.path)
    await cache.open(b.path)
    reading = path_a.open("rb")  # a request streaming a now
    try:
        await cache.open(c.path)  # a and b were just used (their requests may not have opened them yet): kept
        assert _kept(tmp_path) == {a.digest, b.digest, c.digest} and cache.stats.evictions == 0
        assert cache.usage().used_bytes == a.size + b.size + c.size > BOUND
        clock.now += PAST_GRACE_S
        await cache.open(c.path)  # the next blob request evicts the excess: a, the least recently used
        assert _kept(tmp_path) == {b.digest, c.digest} and cache.usage().used_bytes <= BOUND
        # The stream that had a open reads it to the end.
        assert reading.read() == (kit.registry.repository_dir / a.path).read_bytes()
    finally:
        reading.close()
    await cache.close()


async def test_a_blob_in_flight_is_never_evicted(kit: RegistryKit, tmp_path: Path) -> None:
    a, b, c, d = _blobs(kit)
    source = GatedSource(kit.registry.repository_dir, lambda p: p == c.path)
    clock = Ticks()
    cache = _cache(kit, tmp_path, source, clock, max_bytes=BOUND)
    for blob in (a, b):
        await cache.open(blob.path)
    clock.now += PAST_GRACE_S
    source.gate.clear()
    transfer = asyncio.create_task(cache.open(c.path))
    try:
        assert await asyncio.to_thread(source.wait_held, 1)
        # Room for c was made before its transfer began: a (the least recently used) went; c is reserved.
        assert _kept(tmp_path) == {b.digest}
        assert cache.usage() == artifact_cache.ArtifactCacheUsage(BOUND, b.size, 1, c.size)
        await cache.open(d.path)  # b goes, not c's reservation
        clock.now += PAST_GRACE_S
        await cache.open(a.path)  # d goes; c, in flight all along, is no candidate
        assert _kept(tmp_path) == {a.digest} and cache.stats.evictions == 3
        assert not transfer.done()
    finally:
        source.gate.set()
    assert (await transfer).read_bytes() == (kit.registry.repository_dir / c.path).read_bytes()
    assert _kept(tmp_path) == {a.digest, c.digest}
    assert cache.usage() == artifact_cache.ArtifactCacheUsage(BOUND, a.size + c.size, 2, 0)
    await cache.close()


async def test_digests_the_keep_hook_names_are_never_evicted(kit: RegistryKit, tmp_path: Path) -> None:
    a, b, c, d = _blobs(kit)
    clock = Ticks()
    keep = {a.digest}
    cache = _cache(
        kit, tmp_path, DirectorySource(kit.registry.repository_dir), clock, max_bytes=BOUND, keep=lambda: keep
    )
    for blob in (a, b, c, d):  # a is always the least recently used, and always kept
        await cache.open(blob.path)
        clock.now += PAST_GRACE_S
    assert _kept(tmp_path) == {a.digest, d.digest} and cache.stats.evictions == 2

    def broken() -> Collection[str]:
        raise RuntimeError("assignments unavailable")

    cache.set_keep(broken)  # a hook that fails keeps everything
    await cache.open(b.path)
    assert _kept(tmp_path) == {a.digest, b.digest, d.digest} and cache.stats.evictions == 2
    cache.set_keep(lambda: ())
    clock.now += PAST_GRACE_S
    await cache.open(b.path)
    assert _kept(tmp_path) == {b.digest, d.digest} and cache.usage().used_bytes <= BOUND
    await cache.close()


async def test_metadata_is_never_evicted_nor_counted(kit: RegistryKit, tmp_path: Path) -> None:
    a, b, c, d = _blobs(kit)
    clock = Ticks()
    cache = _cache(kit, tmp_path, DirectorySource(kit.registry.repository_dir), clock, max_bytes=2500)
    for name in ("timestamp.json", "1.root.json", "3.snapshot.json", "3.targets.json"):
        await cache.open(f"metadata/{name}")
    metadata = _metadata_files(tmp_path)
    assert sum(len(data) for data in metadata.values()) > 2500  # more than the bound, and never in its way
    for blob in (a, b, c, d):  # each one pushes the one before out
        await cache.open(blob.path)
        clock.now += PAST_GRACE_S
    assert _kept(tmp_path) == {d.digest} and cache.stats.evictions == 3
    assert cache.usage().used_bytes == d.size
    assert _metadata_files(tmp_path) == metadata
    assert (await cache.open("metadata/3.targets.json")).is_file()
    await cache.close()


async def test_a_blob_larger_than_the_whole_bound_is_refused_before_any_transfer(
    kit: RegistryKit, tmp_path: Path
) -> None:
    a, b, _, _ = _blobs(kit)
    source = DirectorySource(kit.registry.repository_dir)
    cache = _cache(kit, tmp_path, source, max_bytes=2000)
    for _ in range(2):
        with pytest.raises(CapacityError, match=r"more than this edge's whole artifact cache.*max_cache_bytes = 2000"):
            await cache.open(b.path)
    assert source.requests[b.path] == 0 and cache.stats.too_large == 2 and not _kept(tmp_path)
    assert (await cache.open(a.path)).is_file()  # one that fits is served
    assert not any((tmp_path / "edge-cache" / "staging").iterdir())
    await cache.close()


async def test_a_restart_keeps_the_usage_the_order_and_the_bound(kit: RegistryKit, tmp_path: Path) -> None:
    a, b, c, _ = _blobs(kit)
    source = DirectorySource(kit.registry.repository_dir)
    clock = Ticks()
    cache = _cache(kit, tmp_path, source, clock, max_bytes=BOUND)
    for blob in (a, b, a):  # a is used last
        await cache.open(blob.path)
        clock.now += PAST_GRACE_S
    await cache.close()
    restarted = _cache(kit, tmp_path, source, max_bytes=BOUND)
    assert restarted.usage() == artifact_cache.ArtifactCacheUsage(BOUND, a.size + b.size, 2, 0)
    await restarted.open(c.path)  # the order of use survived the restart: b goes, not a
    assert _kept(tmp_path) == {a.digest, c.digest}
    await restarted.close()
    # A restart with a smaller bound trims at once, least recently used first (a, used before c came).
    smaller = _cache(kit, tmp_path, source, max_bytes=2000)
    assert _kept(tmp_path) == {c.digest}
    assert smaller.usage() == artifact_cache.ArtifactCacheUsage(2000, c.size, 1, 0)
    assert smaller.stats.evictions == 1
    await smaller.close()
    # Evicted files on their way out when the edge stopped are deleted at the next start.
    leftover = tmp_path / "edge-cache" / "evicted" / "leftover"
    leftover.write_bytes(b"x")
    _cache(kit, tmp_path, source, max_bytes=0)
    assert not leftover.exists()


async def test_an_unbounded_cache_never_evicts(kit: RegistryKit, tmp_path: Path) -> None:
    blobs = _blobs(kit)
    clock = Ticks()
    cache = _cache(kit, tmp_path, DirectorySource(kit.registry.repository_dir), clock, max_bytes=0)
    for blob in blobs:
        await cache.open(blob.path)
        clock.now += PAST_GRACE_S
    assert _kept(tmp_path) == {blob.digest for blob in blobs} and cache.stats.evictions == 0
    assert cache.usage() == artifact_cache.ArtifactCacheUsage(0, sum(blob.size for blob in blobs), 4, 0)
    await cache.close()


@pytest.mark.parametrize("value", [-1, 1, 1024 * 1024 - 1])
def test_the_bound_is_zero_or_at_least_a_mebibyte(value: int) -> None:
    with pytest.raises(ConfigError, match=r"\[artifacts\] max_cache_bytes must be 0 \(unbounded\) or at least 1048576"):
        load_config(EdgeConfig, env={}, overrides={"artifacts": {"max_cache_bytes": value}})


def test_the_bound_defaults_to_ten_gibibytes_and_is_set_by_file_or_environment() -> None:
    assert load_config(EdgeConfig, env={}).artifacts.max_cache_bytes == 10 * 1024**3
    assert load_config(EdgeConfig, env={"EDGECASCADE_ARTIFACTS__MAX_CACHE_BYTES": "0"}).artifacts.max_cache_bytes == 0
    with pytest.raises(ConfigError, match="max_cache_bytes"):
        load_config(EdgeConfig, env={"EDGECASCADE_ARTIFACTS__MAX_CACHE_BYTES": "10GiB"})


def test_the_service_passes_the_bound_and_reports_it(kit: RegistryKit, tmp_path: Path) -> None:
    root = tmp_path / "root.json"
    root.write_bytes(kit.registry.repository.trusted_root())
    config = load_config(
        EdgeConfig,
        env={},
        overrides={
            "artifacts": {"cache_dir": str(tmp_path / "c"), "trusted_root": str(root), "max_cache_bytes": 2**20},
            "upstream": {"address": "127.0.0.1:1"},
        },
    )
    service = ArtifactCacheService(NodeContext(config, NodeIdentity("tier1", "e"), TracerProvider()))
    response = mesh_pb2.GetTierInfoResponse()
    service.tier_info(response)
    assert response.artifact_cache == mesh_pb2.ArtifactCacheStatus(max_bytes=2**20)
    assert response.HasField("artifact_cache")
    without = ArtifactCacheService(
        NodeContext(load_config(EdgeConfig, env={}), NodeIdentity("tier1", "e"), TracerProvider())
    )
    response = mesh_pb2.GetTierInfoResponse()
    without.tier_info(response)
    assert not response.HasField("artifact_cache")
    asyncio.run(service.stop())
