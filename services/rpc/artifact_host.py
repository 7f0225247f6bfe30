"""The artifact service of one node: the region's origin or the edge's verifying cache.

* **origin** (the region, ``[registry] path``): serves the registry's TUF
  repository directory, and — with ``[registry] key_dir`` — re-signs snapshot
  and timestamp before they expire, checking every ``resign_check_s``.
* **cache** (the edge, ``[artifacts] cache_dir``): a pull-through cache of its
  ``[upstream]`` that verifies everything against ``[artifacts] trusted_root``.

Either section on a tier it does not belong to stops start-up. Built inside the
running loop by :class:`services.rpc.node.Node`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from pathlib import Path

from protos.edgecascade.v1 import artifacts_pb2, artifacts_pb2_grpc
from services.artifact_cache import ArtifactCache, ArtifactCacheConfig
from services.artifact_store import ArtifactDirectory, ArtifactProvider
from services.errors import ConfigError, EdgecascadeError
from services.registry.registry import ModelRegistry
from services.registry.signing_keys import SigningKeys, load_keys
from services.rpc.artifact_client import GrpcArtifactSource
from services.rpc.artifact_servicer import ArtifactServicer
from services.rpc.server import ServiceBinding
from services.tier_config import TierConfig

log = logging.getLogger("edgecascade.artifacts")

ARTIFACT_SERVICE = artifacts_pb2.DESCRIPTOR.services_by_name["ArtifactService"].full_name
ORIGIN = "origin"
CACHE = "cache"


class ArtifactHost:
    """Builds and runs a node's artifact service, if its configuration asks for one.

    Args:
        role: ``origin``, ``cache`` or ``""`` (the tier serves no artifacts).
        config: The node's configuration.

    Raises:
        ConfigError: A section is set on the wrong tier, the edge has no upstream,
            or a key or the trusted root cannot be read.
    """

    def __init__(self, role: str, config: TierConfig) -> None:
        registry, artifacts = config.registry, config.artifacts
        if registry.path and role != ORIGIN:
            raise ConfigError("[registry] belongs to the region; leave it empty on this tier")
        if artifacts.cache_dir and role != CACHE:
            raise ConfigError("[artifacts] cache_dir belongs to the edge; leave it empty on this tier")
        self._registry: ModelRegistry | None = None
        self._keys: SigningKeys | None = None
        self._source: GrpcArtifactSource | None = None
        self._cache: ArtifactCache | None = None
        self._task: asyncio.Task[None] | None = None
        self._check_s = registry.resign_check_s
        provider: ArtifactProvider | None = None
        chunk = registry.chunk_bytes
        if registry.path:
            self._registry = ModelRegistry(Path(registry.path), registry.expiry)
            if registry.key_dir:
                # By default the serving process holds the online key only; root and targets keys stay
                # out of its reach. With resign_targets the operator trades that for targets that
                # renew themselves (else `edgecascade model resign-targets` renews them).
                self._keys = load_keys(Path(registry.key_dir), publisher=registry.resign_targets)
            provider = ArtifactDirectory(self._registry.repository_dir)
        elif artifacts.cache_dir:
            if not config.upstream.address:
                raise ConfigError("[artifacts] cache_dir needs an [upstream] address to pull artifacts from")
            try:
                root = Path(artifacts.trusted_root).read_bytes()
            except OSError as exc:
                raise ConfigError(
                    f"[artifacts] trusted_root {artifacts.trusted_root} cannot be read: {exc.strerror}"
                ) from None
            self._source = GrpcArtifactSource(config.upstream.address, config.server.max_message_bytes)
            try:
                self._cache = ArtifactCache(
                    self._source,
                    root,
                    ArtifactCacheConfig(Path(artifacts.cache_dir), artifacts.refresh_interval_s),
                    f"upstream {config.upstream.address}",
                )
            except EdgecascadeError as exc:
                self._source.close()
                raise ConfigError(f"[artifacts] trusted_root {artifacts.trusted_root}: {exc.message}") from None
            provider = self._cache
            chunk = artifacts.chunk_bytes
        self._servicer = ArtifactServicer(provider, chunk) if provider is not None else None

    @property
    def bindings(self) -> list[ServiceBinding]:
        """The artifact service binding, or none."""
        servicer = self._servicer
        if servicer is None:
            return []
        return [
            ServiceBinding(
                ARTIFACT_SERVICE, lambda s: artifacts_pb2_grpc.add_ArtifactServiceServicer_to_server(servicer, s)
            )
        ]

    async def start(self) -> None:
        """Starts re-signing (origin with an online key); warns when nothing will re-sign."""
        if self._registry is None:
            return
        if not self._registry.exists():
            log.warning(
                "no TUF repository in %s yet; every artifact is NOT_FOUND until one is created",
                self._registry.directory,
            )
        if self._keys is None:
            log.warning("[registry] key_dir is empty: snapshot and timestamp will not be re-signed before they expire")
            return
        self._task = asyncio.create_task(self._resign_forever(), name="registry re-signer")

    async def _resign_forever(self) -> None:
        """Re-signs every ``resign_check_s`` until cancelled; a failed round is logged and the next one runs.

        Any ``Exception`` (a full disk's ``OSError`` too) only costs that round:
        if this task ended, the timestamp would expire and every client refresh
        with it. Cancellation (``CancelledError``, a ``BaseException``) goes through.
        """
        assert self._registry is not None
        assert self._keys is not None
        while True:
            if self._registry.exists():
                try:
                    roles = await asyncio.to_thread(self._registry.refresh_online, self._keys)
                except EdgecascadeError as exc:
                    log.error("re-signing the registry's online metadata failed: %s", exc.message)
                except Exception:
                    log.exception("re-signing the registry's online metadata failed; retrying at the next check")
                else:
                    if roles:
                        log.info("re-signed %s before expiry", " and ".join(roles))
            await asyncio.sleep(self._check_s)

    async def stop(self) -> None:
        """Stops re-signing, cancels downloads in flight and closes channels and files."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        if self._servicer is not None:
            self._servicer.close()
        if self._cache is not None:
            await self._cache.close()
        if self._source is not None:
            self._source.close()
        if self._registry is not None:
            self._registry.close()

    @property
    def cache(self) -> ArtifactCache | None:
        """The edge's cache (for status and tests), or None."""
        return self._cache

    @property
    def registry(self) -> ModelRegistry | None:
        """The region's registry (for status and tests), or None."""
        return self._registry
