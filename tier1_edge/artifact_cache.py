"""The edge's pull-through artifact cache: a TUF client of its upstream that serves only what it verified.

Layout under the cache directory::

    tuf/            ngclient's trusted metadata (rollback protection survives restarts)
    served/         verified metadata as served: timestamp.json, <N>.root.json,
                    <N>.snapshot.json, <N>.targets.json (exact upstream bytes)
    blobs/<sha256>  verified target blobs, by digest; a blob's mtime records its last use
    staging/        downloads in progress (nothing else is ever written outside it)
    evicted/        evicted blobs on their way out (emptied at start)

Requests (paths as in the artifact service):

* ``metadata/timestamp.json`` is served at once from the last timestamp that
  passed verification for as long as that copy is within its signed expiry.
  A request that finds no refresh started within ``refresh_interval_s`` also
  starts one from upstream in the background (stale-while-revalidate, one
  refresh at a time, failures logged once per attempt and counted), and a
  later request gets what it verified. Only when no unexpired verified copy
  exists does a request wait for the upstream (joining a refresh in flight)
  and get its error if that refresh fails; within ``MISS_REFRESH_INTERVAL_S``
  of a failed attempt such requests get that failure again at once instead of
  a new attempt, so a region that is down is asked at most once per interval
  however often clients poll. An upstream that is down, slow, replays old
  metadata or signs with the wrong key does not displace or delay the
  verified copy.
* ``metadata/<N>.<role>.json`` is served when that version was verified here
  (after one refresh attempt if it is not known yet); otherwise NOT_FOUND, so
  a client's root-rotation walk ends cleanly.
* ``targets/<dir>/<sha256>.<name>`` is served from ``blobs/`` when the digest
  is cached; otherwise the signed targets must list ``<dir>/<name>`` with that
  digest — checked for every request, before it joins a download in flight —
  and it is downloaded once — one upstream download per digest however many
  requests wait for it — verified against its signed length and hashes, and
  only then moved into ``blobs/``. A blob that fails is never cached and every
  waiting request gets the integrity error. The check uses the metadata
  verified last and does not wait for a refresh in flight; only a path it does
  not find listed with that digest (a target published since) refreshes first
  (at most once per ``MISS_REFRESH_INTERVAL_S``, joining a refresh in flight)
  and is looked up again. Before the first successful refresh there is nothing
  to look up in, and a request waits for one (as a timestamp request does).

Cached blobs and metadata keep being served while the upstream is down.
Metadata work (refreshes, lookups in the signed targets) and blob transfers
run in separate thread pools, so metadata never queues behind a slow blob.

The blobs are bounded (``ArtifactCacheConfig.max_bytes``, 0 = unbounded);
metadata is small, never counted and never evicted. A download reserves its
signed length against the bound before it starts; room is made by evicting
the least recently used blobs (a hit or a download is a use; the order lives
in each blob's mtime, written with strictly increasing stamps, so it survives
a restart, and a restart with a smaller bound trims at once). Never evicted:
a download in flight (it is in ``staging/`` until verified, and only its
reservation counts), a digest the ``keep`` hook names (what current
assignments need; empty until the fleet work plugs it in), and a blob used
within ``IN_USE_GRACE_S`` — the artifact service opens the path ``open()``
returns, and an evicted file already open keeps streaming (it is unlinked,
not truncated), so the grace covers a request between the two. When nothing
more can be evicted the blob is still kept and served, the cache stays over
its bound for a while (logged once), and every later hit or download evicts
the excess as soon as it may. A blob whose signed length is larger than the whole
bound is refused before any byte is transferred, with ``CapacityError``
(RESOURCE_EXHAUSTED) naming ``[artifacts] max_cache_bytes``: the edge only
serves what it verified and keeps, and the bound is the operator's word.
"""

from __future__ import annotations

import asyncio
import copy
import functools
import json
import logging
import os
import shutil
import stat
import time
from collections import OrderedDict
from collections.abc import Callable, Collection
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import ParamSpec, TypeVar

from tuf.api.metadata import TargetFile

from services.atomic_files import fsync_directory, write_atomically
from services.errors import ArtifactNotFoundError, CapacityError, EdgecascadeError, UnavailableError
from services.single_flight import SingleFlight
from services.updates.artifact_store import METADATA_PREFIX, TARGETS_PREFIX, check_artifact_path
from services.updates.tuf_client import HASH_ALGORITHM, ArtifactSource, TufClient, is_sha256

log = logging.getLogger("edgecascade.artifact_cache")

ROLES = ("root", "snapshot", "targets")
TIMESTAMP = "timestamp.json"
# ngclient and the upstream client block; they get threads of their own so that a
# busy default executor (or many waiting requests) can never starve them. Blob
# transfers and metadata work (refreshes, target lookups) have separate pools:
# a slow blob must never hold up a timestamp.
WORKER_THREADS = 4
METADATA_THREADS = 2

P = ParamSpec("P")
R = TypeVar("R")
# However often clients ask, a miss triggers at most one upstream refresh per this many seconds, and
# within this long after a failed refresh a request that needs one gets that failure again at once.
MISS_REFRESH_INTERVAL_S = 1.0
# The default bound on cached blob bytes.
DEFAULT_MAX_BYTES = 10 * 1024**3
# A blob used (hit or downloaded) within this many seconds is never evicted: the request that got its path may not
# have opened it yet. Once open, an evicted file keeps streaming (it is unlinked, not truncated).
IN_USE_GRACE_S = 30.0


@dataclass(frozen=True)
class ArtifactCacheConfig:
    """How the cache behaves.

    Attributes:
        cache_dir: Where verified metadata and blobs are kept.
        refresh_interval_s: How often a request for the timestamp starts a background refresh
            from upstream: when no refresh was started within this many seconds. It does not limit
            how long a verified timestamp is served: that is until its signed expiry.
        max_bytes: The bound on the bytes of cached blobs (0: unbounded); metadata is not counted.
    """

    cache_dir: Path
    refresh_interval_s: float = 10.0
    max_bytes: int = DEFAULT_MAX_BYTES


@dataclass
class ArtifactCacheStats:
    """What the cache did since start."""

    # Files served from what was verified before (metadata and blobs).
    hits: int = 0
    # Blob requests served from blobs/, and those that needed a download (started or joined).
    blob_hits: int = 0
    blob_misses: int = 0
    # Blobs evicted to stay within the bound, and their bytes.
    evictions: int = 0
    evicted_bytes: int = 0
    # Blobs refused because their signed length is larger than the whole bound.
    too_large: int = 0
    downloads: int = 0
    refused: int = 0
    refreshes: int = 0
    refresh_failures: int = 0
    # Requests answered with the last refresh failure, without a new upstream attempt (see MISS_REFRESH_INTERVAL_S).
    refresh_failures_replayed: int = 0


@dataclass(frozen=True)
class ArtifactCacheUsage:
    """The cache's blobs on disk now.

    Attributes:
        max_bytes: The bound (0: unbounded).
        used_bytes: Bytes of the verified blobs kept (may exceed the bound while nothing more can be evicted).
        blobs: How many are kept.
        in_flight_bytes: Signed lengths of the downloads in flight, reserved against the bound.
    """

    max_bytes: int
    used_bytes: int
    blobs: int
    in_flight_bytes: int


def _keep_nothing() -> Collection[str]:
    return ()


class ArtifactCache:
    """Serves a verified view of the upstream repository.

    Args:
        source: The upstream artifact service (a synchronous client; used from worker threads).
        trusted_root: The root metadata this edge trusts (its trust anchor).
        config: Directories and intervals.
        what: Names the upstream in messages.
        clock: Monotonic seconds (tests pass a fake one).
        wall_clock: The current UTC time, compared with signed expiry dates (tests pass a fake one).
        keep: Returns the sha256 digests of blobs that must not be evicted (what current assignments
            need); asked at each eviction. If it raises, nothing is evicted that time.

    Raises:
        IntegrityError: ``trusted_root`` is not valid root metadata.
    """

    def __init__(
        self,
        source: ArtifactSource,
        trusted_root: bytes,
        config: ArtifactCacheConfig,
        what: str = "upstream",
        clock: Callable[[], float] = time.monotonic,
        wall_clock: Callable[[], datetime] = lambda: datetime.now(UTC),
        keep: Callable[[], Collection[str]] = _keep_nothing,
    ) -> None:
        self._dir = config.cache_dir
        self._served = self._dir / "served"
        self._blobs = self._dir / "blobs"
        self._staging = self._dir / "staging"
        evicted = self._dir / "evicted"
        for directory in (self._served, self._blobs, self._staging, evicted):
            directory.mkdir(parents=True, exist_ok=True)
        self._client = TufClient(source, self._dir / "tuf", trusted_root, what)
        self._interval = config.refresh_interval_s
        self._clock = clock
        self._wall_clock = wall_clock
        self._last_attempt = -float("inf")
        self._last_failure: EdgecascadeError | None = None  # of the last attempt, None once one succeeds
        self._refreshed = False
        self._refresh_task: asyncio.Task[None] | None = None
        self._timestamp_expires = _expiry_of(self._served / TIMESTAMP)
        self._downloads: SingleFlight[str, Path] = SingleFlight()
        self._blob_executor = ThreadPoolExecutor(WORKER_THREADS, thread_name_prefix="artifact-cache-blob")
        self._metadata_executor = ThreadPoolExecutor(METADATA_THREADS, thread_name_prefix="artifact-cache-metadata")
        # Deleting a large evicted file can take a while: it neither blocks the loop nor queues behind transfers.
        self._evict_executor = ThreadPoolExecutor(1, thread_name_prefix="artifact-cache-evict")
        self.stats = ArtifactCacheStats()
        self._shelf = _BlobShelf(
            self._blobs,
            evicted,
            config.max_bytes,
            clock,
            self.stats,
            keep,
            lambda path: self._evict_executor.submit(path.unlink, missing_ok=True),
        )

    def set_keep(self, keep: Callable[[], Collection[str]]) -> None:
        """Replaces the hook naming the digests that must not be evicted (see the constructor's ``keep``)."""
        self._shelf.keep = keep

    def usage(self) -> ArtifactCacheUsage:
        """The blobs kept now, against the bound."""
        return self._shelf.usage()

    async def _blob_work(self, fn: Callable[P, R], *args: P.args, **kwargs: P.kwargs) -> R:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._blob_executor, functools.partial(fn, *args, **kwargs))

    async def _metadata_work(self, fn: Callable[P, R], *args: P.args, **kwargs: P.kwargs) -> R:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._metadata_executor, functools.partial(fn, *args, **kwargs))

    async def open(self, path: str) -> Path:
        """Returns a verified local file for an artifact path.

        Raises:
            InvalidArgumentError: The path is not a valid artifact path.
            ArtifactNotFoundError: The verified metadata does not have it.
            IntegrityError: The upstream's blob failed verification (nothing was cached).
            UnavailableError: It is not cached and the upstream cannot be reached.
            MetadataExpiredError, StaleVersionError, MetadataSignatureError: The
                upstream's metadata was refused and nothing verified is cached.
        """
        check_artifact_path(path)
        if path.startswith(METADATA_PREFIX):
            return await self._metadata(path[len(METADATA_PREFIX) :])
        assert path.startswith(TARGETS_PREFIX)
        return await self._blob(path[len(TARGETS_PREFIX) :])

    async def _metadata(self, name: str) -> Path:
        if "/" in name:
            raise ArtifactNotFoundError(f"no metadata file metadata/{name}")
        served = self._served / name
        if name == TIMESTAMP:
            return await self._timestamp(served)
        version, _, role = name.partition(".")
        if not version.isdigit() or role.removesuffix(".json") not in ROLES or not role.endswith(".json"):
            raise ArtifactNotFoundError(f"no metadata file metadata/{name}")
        if not served.is_file():
            await self._refresh(MISS_REFRESH_INTERVAL_S, required=False)
        if served.is_file():
            self.stats.hits += 1
            return served
        raise ArtifactNotFoundError(f"no verified metadata/{name}")

    async def _timestamp(self, served: Path) -> Path:
        if self._timestamp_valid():
            # Stale-while-revalidate: the verified copy is answered now; upstream is asked behind it.
            self._revalidate()
            self.stats.hits += 1
            return served
        # Nothing verified and unexpired to serve: this request waits for upstream (joining a refresh in flight).
        await self._refresh(0.0, required=True)
        if self._timestamp_expires is not None:  # set once a verified timestamp is in served/
            self.stats.hits += 1
            return served
        raise ArtifactNotFoundError(f"no verified {TIMESTAMP} is cached")

    def _timestamp_valid(self) -> bool:
        expires = self._timestamp_expires
        return expires is not None and self._wall_clock() < expires

    async def _blob(self, hashed: str) -> Path:
        directory, sep, base = hashed.rpartition("/")
        digest, dot, name = base.partition(".")
        if not dot or not is_sha256(digest):
            raise ArtifactNotFoundError(f"no target at targets/{hashed} (expected <dir>/<sha256>.<name>)")
        cached = self._blob_hit(digest)
        if cached is not None:
            return cached
        # Each request proves its own path before it joins a download of the digest: one for a path the
        # signed targets do not list must neither get the blob nor fail the download for the others.
        info = await self._signed_info(f"{directory}{sep}{name}", digest)
        cached = self._blob_hit(digest)  # downloaded while this request looked its path up
        if cached is not None:
            return cached
        self.stats.blob_misses += 1
        # One download per digest; it belongs to no single request, so one that gives up cancels nothing.
        return await self._downloads.run(digest, lambda: self._download(info, digest), name=f"fetch {digest[:12]}")

    def _blob_hit(self, digest: str) -> Path | None:
        cached = self._shelf.use(digest)
        if cached is not None:
            self.stats.hits += 1
            self.stats.blob_hits += 1
        return cached

    async def _signed_info(self, target_path: str, digest: str) -> TargetFile:
        if not self._refreshed:
            # Nothing verified to look the path up in yet: wait for upstream (joining a refresh in flight).
            await self._refresh(MISS_REFRESH_INTERVAL_S, required=True)
            return await self._listed(target_path, digest)
        # The metadata verified last answers at once, whatever refresh is in flight (however slow the region).
        try:
            return await self._listed(target_path, digest)
        except ArtifactNotFoundError:
            pass
        # Not listed with this digest: perhaps published since. Refresh (rate-limited) and look again.
        await self._refresh(MISS_REFRESH_INTERVAL_S, required=False)
        return await self._listed(target_path, digest)

    async def _listed(self, target_path: str, digest: str) -> TargetFile:
        """The signed info of ``target_path`` in the metadata verified last, if it lists it with ``digest``."""
        info = await self._metadata_work(self._client.target_info, target_path)
        if info.hashes.get(HASH_ALGORITHM) != digest:
            raise ArtifactNotFoundError(
                f"the signed targets list {target_path} with another digest than {digest[:12]}…"
            )
        return info

    async def close(self) -> None:
        """Cancels downloads and the refresh in flight and waits for them to end."""
        await self._downloads.cancel_all()
        refresh = self._refresh_task
        if refresh is not None:
            refresh.cancel()
            await asyncio.gather(refresh, return_exceptions=True)
        # A transfer already inside a worker thread ends with its call's deadline; nobody waits for it.
        self._blob_executor.shutdown(wait=False, cancel_futures=True)
        self._metadata_executor.shutdown(wait=False, cancel_futures=True)
        # Deletions not run yet are left in evicted/, which the next start empties.
        self._evict_executor.shutdown(wait=False, cancel_futures=True)

    async def wait_refreshed(self) -> None:
        """Waits for the refresh in flight, if any, to end (its failure is counted and logged, not raised)."""
        task = self._refresh_task
        if task is not None:
            await asyncio.wait({task})

    async def _download(self, info: TargetFile, digest: str) -> Path:
        # Room is made (or the blob refused as larger than the bound) before a byte is transferred.
        self._shelf.reserve(digest, info.length, info.path)
        try:
            try:
                download = await self._blob_work(self._client.download, info, self._staging)
            except EdgecascadeError as exc:
                if not isinstance(exc, UnavailableError | ArtifactNotFoundError):
                    self.stats.refused += 1
                    log.warning("refused to cache %s: %s", info.path, exc.message)
                raise
            await self._blob_work(_move_into, download.path, self._blobs / digest)
        except BaseException:
            self._shelf.release(digest)
            raise
        cached = self._shelf.add(digest, info.length)
        self.stats.downloads += 1
        log.info("cached %s (%d bytes, verified)", info.path, info.length)
        return cached

    def _revalidate(self) -> None:
        """Starts a background refresh if the last attempt is older than the refresh interval and none is running."""
        if self._refresh_task is None and self._clock() - self._last_attempt >= self._interval:
            self._start_refresh()

    async def _refresh(self, max_age: float, required: bool) -> None:
        """Waits for a refresh from upstream: the one in flight, or a new one unless one was tried within ``max_age`` s.

        A failure is raised only when ``required`` (nothing verified to fall back on). A required refresh
        is always attempted, except within ``MISS_REFRESH_INTERVAL_S`` of a failed attempt: then that
        failure is raised again at once (the same class and message) without asking upstream.
        """
        task = self._refresh_task
        if task is None:
            since = self._clock() - self._last_attempt
            if required:
                failure = self._last_failure
                if failure is not None and since < MISS_REFRESH_INTERVAL_S:
                    self.stats.refresh_failures_replayed += 1
                    raise copy.copy(failure) from failure
            elif since < max_age:
                return
            task = self._start_refresh()
        try:
            # The refresh belongs to no single request: one that gives up must not cancel it for the others.
            await asyncio.shield(task)
        except EdgecascadeError:
            if required:
                raise

    def _start_refresh(self) -> asyncio.Task[None]:
        self._last_attempt = self._clock()
        task = asyncio.create_task(self._run_refresh(), name="refresh upstream metadata")
        self._refresh_task = task
        task.add_done_callback(self._refresh_finished)
        return task

    async def _run_refresh(self) -> None:
        try:
            await self._metadata_work(self._client.refresh)
        except EdgecascadeError as exc:
            self.stats.refresh_failures += 1
            self._last_failure = exc
            if self._timestamp_valid():
                log.warning("upstream metadata not refreshed; serving what was verified before: %s", exc.message)
            else:
                log.warning(
                    "upstream metadata not refreshed and no unexpired verified timestamp is cached; "
                    "requests that need a refresh get this error (upstream is asked at most once per %g s): %s",
                    MISS_REFRESH_INTERVAL_S,
                    exc.message,
                )
            raise
        self._last_failure = None
        self.stats.refreshes += 1
        self._refreshed = True
        self._timestamp_expires = await self._metadata_work(self._publish_verified)

    def _refresh_finished(self, task: asyncio.Task[None]) -> None:
        if self._refresh_task is task:
            self._refresh_task = None
        if task.cancelled():
            return
        exc = task.exception()  # retrieved here too, so a failure nobody awaited is not reported as lost
        if exc is not None and not isinstance(exc, EdgecascadeError):
            self.stats.refresh_failures += 1
            log.error("refreshing upstream metadata failed unexpectedly", exc_info=exc)

    def _publish_verified(self) -> datetime | None:
        """Copies what ngclient just verified into ``served/`` under the names clients ask for.

        Returns:
            The signed expiry of the timestamp now served (None if there is none).
        """
        tuf_dir = self._client.metadata_dir
        for role in ("snapshot", "targets"):
            source = tuf_dir / f"{role}.json"
            if source.is_file():
                data = source.read_bytes()
                target = self._served / f"{json.loads(data)['signed']['version']}.{role}.json"
                if not target.is_file():
                    write_atomically(target, data)
        for root in (tuf_dir / "root_history").glob("*.root.json"):
            target = self._served / root.name
            if not target.is_file():
                write_atomically(target, root.read_bytes())
        # Last: a client that reads this timestamp finds every file it names.
        timestamp = tuf_dir / TIMESTAMP
        if not timestamp.is_file():
            return None
        data = timestamp.read_bytes()
        write_atomically(self._served / TIMESTAMP, data)
        return _expiry_from(data)


@dataclass
class _Blob:
    size: int
    used_at: float | None  # monotonic time of the last use by this process; None: not used since start


class _BlobShelf:
    """The verified blobs in ``blobs/``, least recently used first, and their bound (used on the event loop only).

    Args:
        directory: ``blobs/``.
        evicted: Where an evicted blob is renamed before it is deleted (emptied here at start).
        max_bytes: The bound (0: unbounded).
        clock: Monotonic seconds.
        stats: Counts evictions and blobs refused as too large.
        keep: Returns the digests that must not be evicted.
        discard: Deletes an evicted file (in the background).
    """

    def __init__(
        self,
        directory: Path,
        evicted: Path,
        max_bytes: int,
        clock: Callable[[], float],
        stats: ArtifactCacheStats,
        keep: Callable[[], Collection[str]],
        discard: Callable[[Path], object],
    ) -> None:
        self._dir = directory
        self._evicted = evicted
        self._max = max_bytes
        self._clock = clock
        self._stats = stats
        self.keep = keep
        self._discard = discard
        self._blobs: OrderedDict[str, _Blob] = OrderedDict()
        self._reserved: dict[str, int] = {}
        self._used = 0
        self._stamp_ns = 0  # the last mtime written: stamps only grow, so the order survives a coarse clock
        self._evictions = 0
        self._over = False
        for leftover in evicted.iterdir():
            leftover.unlink(missing_ok=True)
        found: list[tuple[int, str, int]] = []
        for path in directory.iterdir():
            try:
                info = path.stat()
            except FileNotFoundError:
                continue
            if is_sha256(path.name) and stat.S_ISREG(info.st_mode):
                found.append((info.st_mtime_ns, path.name, info.st_size))
        for mtime_ns, digest, size in sorted(found):
            self._blobs[digest] = _Blob(size, None)
            self._used += size
            self._stamp_ns = max(self._stamp_ns, mtime_ns)
        self.make_room()  # a restart with a smaller bound

    def usage(self) -> ArtifactCacheUsage:
        return ArtifactCacheUsage(self._max, self._used, len(self._blobs), sum(self._reserved.values()))

    def use(self, digest: str) -> Path | None:
        """The blob's file, now its most recently used one (and an excess left earlier is evicted if it may be now).

        None if it is not kept.
        """
        blob = self._blobs.get(digest)
        if blob is None:
            return None
        path = self._dir / digest
        if not path.is_file():  # deleted behind the cache's back: a miss
            del self._blobs[digest]
            self._used -= blob.size
            return None
        self._touch(digest, blob)
        self.make_room()
        return path

    def reserve(self, digest: str, length: int, target_path: str) -> None:
        """Reserves a download's signed length, making room for it.

        Raises:
            CapacityError: It is larger than the whole bound.
        """
        if self._max and length > self._max:
            self._stats.too_large += 1
            raise CapacityError(
                f"{target_path} is {length} bytes, more than this edge's whole artifact cache "
                f"([artifacts] max_cache_bytes = {self._max}); it is not served through this edge"
            )
        self._reserved[digest] = length
        self.make_room()

    def release(self, digest: str) -> None:
        """Drops the reservation of a download that failed or was cancelled."""
        self._reserved.pop(digest, None)

    def add(self, digest: str, size: int) -> Path:
        """Keeps a blob just moved into ``blobs/`` (its reservation ends), as the most recently used."""
        self._reserved.pop(digest, None)
        old = self._blobs.pop(digest, None)
        if old is not None:
            self._used -= old.size
        blob = _Blob(size, None)
        self._blobs[digest] = blob
        self._used += size
        self._touch(digest, blob)
        self.make_room()
        return self._dir / digest

    def make_room(self) -> None:
        """Evicts least recently used blobs until the kept and reserved bytes fit the bound, as far as it may."""
        if not self._max:
            return
        excess = self._used + sum(self._reserved.values()) - self._max
        if excess <= 0:
            self._over = False
            return
        try:
            keep = frozenset(self.keep())
        except Exception:
            log.exception("the hook naming the blobs to keep failed; nothing is evicted this time")
            return
        now = self._clock()
        for digest, blob in list(self._blobs.items()):
            if excess <= 0:
                break
            if digest in keep or (blob.used_at is not None and now - blob.used_at < IN_USE_GRACE_S):
                continue
            self._evict(digest, blob)
            excess -= blob.size
        if excess > 0 and not self._over:
            log.warning(
                "the artifact cache is %d bytes over its bound of %d: the other blobs are in use, in flight or kept; "
                "the excess is evicted as soon as it may be",
                excess,
                self._max,
            )
        self._over = excess > 0

    def _touch(self, digest: str, blob: _Blob) -> None:
        blob.used_at = self._clock()
        self._blobs.move_to_end(digest)
        stamp = max(time.time_ns(), self._stamp_ns + 1)
        self._stamp_ns = stamp
        try:
            os.utime(self._dir / digest, ns=(stamp, stamp))
        except OSError as exc:  # only the order after a restart suffers
            log.warning("cannot record the use of blob %s: %s", digest[:12], exc.strerror)

    def _evict(self, digest: str, blob: _Blob) -> None:
        del self._blobs[digest]
        self._used -= blob.size
        self._evictions += 1
        # Renamed at once (a request from now on misses it), deleted in the background; a reader that has
        # it open keeps reading.
        doomed = self._evicted / f"{digest}.{self._evictions}"
        try:
            os.replace(self._dir / digest, doomed)
        except FileNotFoundError:
            return
        except OSError as exc:  # left in blobs/, uncounted, until the next start finds it again
            log.warning("cannot evict blob %s: %s", digest[:12], exc.strerror)
            return
        self._stats.evictions += 1
        self._stats.evicted_bytes += blob.size
        self._discard(doomed)
        log.info("evicted blob %s (%d bytes, least recently used)", digest[:12], blob.size)


def _expiry_of(path: Path) -> datetime | None:
    """The signed expiry of a verified metadata file, or None if it is missing or unreadable."""
    try:
        return _expiry_from(path.read_bytes())
    except OSError:
        return None


def _expiry_from(data: bytes) -> datetime | None:
    try:
        expires = datetime.fromisoformat(json.loads(data)["signed"]["expires"])
    except (ValueError, KeyError, TypeError):
        return None
    return expires if expires.tzinfo is not None else expires.replace(tzinfo=UTC)


def _move_into(source: Path, target: Path) -> None:
    try:
        os.replace(source, target)
    except OSError:
        shutil.move(source, target)
    fsync_directory(target.parent)
