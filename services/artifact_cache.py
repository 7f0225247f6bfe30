"""The edge's pull-through artifact cache: a TUF client of its upstream that serves only what it verified.

Layout under the cache directory::

    tuf/            ngclient's trusted metadata (rollback protection survives restarts)
    served/         verified metadata as served: timestamp.json, <N>.root.json,
                    <N>.snapshot.json, <N>.targets.json (exact upstream bytes)
    blobs/<sha256>  verified target blobs, by digest
    staging/        downloads in progress (nothing else is ever written outside it)

Requests (paths as in the artifact service):

* ``metadata/timestamp.json`` refreshes from upstream at most once per
  ``refresh_interval_s`` and serves the last timestamp that passed
  verification; an upstream that is down, replays old metadata or signs with
  the wrong key does not displace it.
* ``metadata/<N>.<role>.json`` is served when that version was verified here
  (after one refresh attempt if it is not known yet); otherwise NOT_FOUND, so
  a client's root-rotation walk ends cleanly.
* ``targets/<dir>/<sha256>.<name>`` is served from ``blobs/`` when the digest
  is cached; otherwise the signed targets must list ``<dir>/<name>`` with that
  digest, and it is downloaded once — one upstream download per digest however
  many requests wait for it — verified against its signed length and hashes,
  and only then moved into ``blobs/``. A blob that fails is never cached and
  every waiting request gets the integrity error.

Cached blobs and metadata keep being served while the upstream is down.
"""

from __future__ import annotations

import asyncio
import functools
import json
import logging
import os
import shutil
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import ParamSpec, TypeVar

from services.artifact_store import METADATA_PREFIX, TARGETS_PREFIX, check_artifact_path
from services.atomic_files import fsync_directory, write_atomically
from services.errors import ArtifactNotFoundError, EdgecascadeError, UnavailableError
from services.tuf_client import ArtifactSource, TufClient

log = logging.getLogger("edgecascade.artifact_cache")

ROLES = ("root", "snapshot", "targets")
# ngclient and the upstream client block; they get threads of their own so that a
# busy default executor (or many waiting requests) can never starve them.
WORKER_THREADS = 4

P = ParamSpec("P")
R = TypeVar("R")
# However often clients ask, a miss triggers at most one upstream refresh per this many seconds.
MISS_REFRESH_INTERVAL_S = 1.0


@dataclass(frozen=True)
class ArtifactCacheConfig:
    """How the cache behaves.

    Attributes:
        cache_dir: Where verified metadata and blobs are kept.
        refresh_interval_s: Serve a cached timestamp for at most this long before asking upstream again.
    """

    cache_dir: Path
    refresh_interval_s: float = 10.0


@dataclass
class CacheStats:
    """What the cache did since start."""

    hits: int = 0
    downloads: int = 0
    refused: int = 0
    refreshes: int = 0
    refresh_failures: int = 0


class ArtifactCache:
    """Serves a verified view of the upstream repository.

    Args:
        source: The upstream artifact service (a synchronous client; used from worker threads).
        trusted_root: The root metadata this edge trusts (its trust anchor).
        config: Directories and intervals.
        what: Names the upstream in messages.
        clock: Monotonic seconds (tests pass a fake one).

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
    ) -> None:
        self._dir = config.cache_dir
        self._served = self._dir / "served"
        self._blobs = self._dir / "blobs"
        self._staging = self._dir / "staging"
        for directory in (self._served, self._blobs, self._staging):
            directory.mkdir(parents=True, exist_ok=True)
        self._client = TufClient(source, self._dir / "tuf", trusted_root, what)
        self._interval = config.refresh_interval_s
        self._clock = clock
        self._refresh_lock = asyncio.Lock()
        self._last_attempt = -float("inf")
        self._refreshed = False
        self._inflight: dict[str, asyncio.Task[Path]] = {}
        self._executor = ThreadPoolExecutor(WORKER_THREADS, thread_name_prefix="artifact-cache")
        self.stats = CacheStats()

    async def _blocking(self, fn: Callable[P, R], *args: P.args, **kwargs: P.kwargs) -> R:
        return await asyncio.get_running_loop().run_in_executor(self._executor, functools.partial(fn, *args, **kwargs))

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
        if name == "timestamp.json":
            await self._refresh(self._interval, required=not served.is_file())
            if served.is_file():
                self.stats.hits += 1
                return served
            raise ArtifactNotFoundError("no verified timestamp.json is cached")
        version, _, role = name.partition(".")
        if not version.isdigit() or role.removesuffix(".json") not in ROLES or not role.endswith(".json"):
            raise ArtifactNotFoundError(f"no metadata file metadata/{name}")
        if not served.is_file():
            await self._refresh(MISS_REFRESH_INTERVAL_S, required=False)
        if served.is_file():
            self.stats.hits += 1
            return served
        raise ArtifactNotFoundError(f"no verified metadata/{name}")

    async def _blob(self, hashed: str) -> Path:
        directory, sep, base = hashed.rpartition("/")
        digest, dot, name = base.partition(".")
        if not dot or len(digest) != 64 or not all(c in "0123456789abcdef" for c in digest):
            raise ArtifactNotFoundError(f"no target at targets/{hashed} (expected <dir>/<sha256>.<name>)")
        cached = self._blobs / digest
        if cached.is_file():
            self.stats.hits += 1
            return cached
        task = self._inflight.get(digest)
        if task is None:
            # The download belongs to no single request: one that gives up must not cancel it for the others.
            task = asyncio.create_task(self._download(f"{directory}{sep}{name}", digest), name=f"fetch {digest[:12]}")
            self._inflight[digest] = task
            task.add_done_callback(functools.partial(self._finished, digest))
        return await asyncio.shield(task)

    def _finished(self, digest: str, task: asyncio.Task[Path]) -> None:
        self._inflight.pop(digest, None)
        if not task.cancelled():
            task.exception()  # retrieved here too, so a failure nobody awaited is not reported as lost

    async def close(self) -> None:
        """Cancels downloads in flight and waits for them to end."""
        tasks = list(self._inflight.values())
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        # A transfer already inside a worker thread ends with its call's deadline; nobody waits for it.
        self._executor.shutdown(wait=False, cancel_futures=True)

    async def _download(self, target_path: str, digest: str) -> Path:
        await self._refresh(MISS_REFRESH_INTERVAL_S, required=not self._refreshed)
        info = await self._blocking(self._client.target_info, target_path)
        if info.hashes.get("sha256") != digest:
            raise ArtifactNotFoundError(
                f"the signed targets list {target_path} with another digest than {digest[:12]}…"
            )
        try:
            download = await self._blocking(self._client.download, info, self._staging)
        except EdgecascadeError as exc:
            if not isinstance(exc, UnavailableError | ArtifactNotFoundError):
                self.stats.refused += 1
                log.warning("refused to cache %s: %s", target_path, exc.message)
            raise
        cached = self._blobs / digest
        await self._blocking(_move_into, download.path, cached)
        self.stats.downloads += 1
        log.info("cached %s (%d bytes, verified)", target_path, info.length)
        return cached

    async def _refresh(self, max_age: float, required: bool) -> None:
        """Refreshes from upstream unless it was tried within ``max_age`` seconds.

        A failure is raised only when ``required`` (nothing verified to fall back on).
        """
        async with self._refresh_lock:
            if self._clock() - self._last_attempt < max_age and not (required and not self._refreshed):
                return
            self._last_attempt = self._clock()
            try:
                await self._blocking(self._client.refresh)
            except EdgecascadeError as exc:
                self.stats.refresh_failures += 1
                if required:
                    raise
                log.warning("upstream metadata not refreshed, serving what was verified before: %s", exc.message)
                return
            self.stats.refreshes += 1
            self._refreshed = True
            await self._blocking(self._publish_verified)

    def _publish_verified(self) -> None:
        """Copies what ngclient just verified into ``served/`` under the names clients ask for."""
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
        timestamp = tuf_dir / "timestamp.json"
        if timestamp.is_file():
            write_atomically(self._served / "timestamp.json", timestamp.read_bytes())


def _move_into(source: Path, target: Path) -> None:
    try:
        os.replace(source, target)
    except OSError:
        shutil.move(source, target)
    fsync_directory(target.parent)
