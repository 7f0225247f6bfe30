"""The edge's verifying pull-through cache, served over the artifact service.

With ``[artifacts] cache_dir`` the edge serves its devices the region's TUF
repository through :class:`~tier1_edge.artifact_cache.ArtifactCache`: a TUF
client of its ``[upstream]`` anchored in ``[artifacts] trusted_root``, which
verifies every blob before it caches or serves it, within ``[artifacts]
max_cache_bytes``. Without ``cache_dir`` it serves nothing. Its use, hits,
misses and evictions are part of the node's ``GetTierInfo`` (``artifact_cache``).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from protos.edgecascade.v1 import mesh_pb2
from services.errors import ConfigError, EdgecascadeError
from services.rpc.artifact_client import GrpcArtifactSource
from services.rpc.artifact_servicer import ArtifactServicer, artifact_bindings
from services.rpc.components import NodeContext
from services.rpc.server import ServiceBinding
from tier1_edge.artifact_cache import ArtifactCache, ArtifactCacheConfig
from tier1_edge.config import EdgeConfig


class ArtifactCacheService:
    """The artifact cache as the edge serves it.

    Args:
        context: The node's context; its configuration is an :class:`EdgeConfig`.

    Raises:
        ConfigError: No upstream to pull from, or the trusted root cannot be read or is not root metadata.
    """

    def __init__(self, context: NodeContext) -> None:
        config = context.config
        assert isinstance(config, EdgeConfig), "the artifact cache runs on the edge"
        settings = config.artifacts
        self.cache: ArtifactCache | None = None
        self._source: GrpcArtifactSource | None = None
        self._servicer: ArtifactServicer | None = None
        if not settings.cache_dir:
            return
        if not config.upstream.address:
            raise ConfigError("[artifacts] cache_dir needs an [upstream] address to pull artifacts from")
        try:
            root = Path(settings.trusted_root).read_bytes()
        except OSError as exc:
            raise ConfigError(
                f"[artifacts] trusted_root {settings.trusted_root} cannot be read: {exc.strerror}"
            ) from None
        self._source = GrpcArtifactSource(config.upstream.address, config.server.max_message_bytes)
        try:
            self.cache = ArtifactCache(
                self._source,
                root,
                ArtifactCacheConfig(Path(settings.cache_dir), settings.refresh_interval_s, settings.max_cache_bytes),
                f"upstream {config.upstream.address}",
            )
        except EdgecascadeError as exc:
            self._source.close()
            raise ConfigError(f"[artifacts] trusted_root {settings.trusted_root}: {exc.message}") from None
        self._servicer = ArtifactServicer(self.cache, settings.chunk_bytes)

    @property
    def bindings(self) -> Sequence[ServiceBinding]:
        """The artifact service, when a cache directory is configured."""
        return artifact_bindings(self._servicer)

    def tier_info(self, response: mesh_pb2.GetTierInfoResponse) -> None:
        """Adds the cache's use and counters to the node's answer (nothing without a cache)."""
        if self.cache is None:
            return
        usage = self.cache.usage()
        stats = self.cache.stats
        response.artifact_cache.CopyFrom(
            mesh_pb2.ArtifactCacheStatus(
                max_bytes=usage.max_bytes,
                used_bytes=usage.used_bytes,
                blobs=usage.blobs,
                in_flight_bytes=usage.in_flight_bytes,
                hits=stats.blob_hits,
                misses=stats.blob_misses,
                evictions=stats.evictions,
                evicted_bytes=stats.evicted_bytes,
                too_large=stats.too_large,
            )
        )

    async def start(self) -> None:
        """Nothing runs in the background until a device asks."""

    async def stop(self) -> None:
        """Cancels downloads in flight and closes the channel and files."""
        if self._servicer is not None:
            self._servicer.close()
        if self.cache is not None:
            await self.cache.close()
        if self._source is not None:
            self._source.close()
