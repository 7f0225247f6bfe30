"""The edge's configuration: the shared sections plus ``[artifacts]``, ``[updates]``, ``[telemetry]``, ``[cascade]``
and ``[token_cascade]`` (the confidence cascades, as on a device: see :mod:`services.tier_config`).

``[artifacts]``
    ``cache_dir`` of the pull-through artifact cache (empty: no artifact
    service), ``trusted_root``: the root metadata file the cache trusts (required
    with ``cache_dir``), ``refresh_interval_s`` (how often a request for the
    timestamp starts a background refresh from upstream; a verified timestamp
    is served until its signed expiry), ``chunk_bytes`` and ``max_cache_bytes``:
    the bound on the bytes of cached blobs (default 10 GiB; 0 = unbounded,
    else at least 1 MiB). Least recently used blobs are evicted to stay within
    it; metadata is not counted and never evicted; a blob larger than the whole
    bound is refused (RESOURCE_EXHAUSTED), not streamed through.
``[telemetry]``
    The shared settings of the edge's own metrics (``services.tier_config``) plus
    the bounds of the relay of its devices' metrics and logs, which go where the
    edge's own go (``endpoint``, else the upstream): ``relay_max_requests`` and
    ``relay_max_bytes`` held while that is unreachable, for each signal (the oldest
    are dropped, and counted, beyond either).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from services.errors import ConfigError
from services.tier_config import (
    CascadeSection,
    TelemetrySection,
    TierConfig,
    TokenCascadeSection,
    UpdatesSection,
    check_chunk_bytes,
)
from tier1_edge.artifact_cache import DEFAULT_MAX_BYTES

# A smaller non-zero bound is surely a mistake of unit (it would hold no model).
MIN_CACHE_BYTES = 1024 * 1024


@dataclass(frozen=True)
class ArtifactsSection:
    """The edge's pull-through artifact cache."""

    cache_dir: str = ""
    trusted_root: str = ""
    refresh_interval_s: float = 10.0
    chunk_bytes: int = 256 * 1024
    max_cache_bytes: int = DEFAULT_MAX_BYTES

    def __post_init__(self) -> None:
        if self.cache_dir and not self.trusted_root:
            raise ConfigError(
                "[artifacts] trusted_root must name the registry's root metadata file (e.g. root.json) "
                "when cache_dir is set; the cache verifies everything against it"
            )
        if self.refresh_interval_s < 0:
            raise ConfigError(f"[artifacts] refresh_interval_s must not be negative, got {self.refresh_interval_s}")
        check_chunk_bytes("artifacts", self.chunk_bytes)
        if self.max_cache_bytes != 0 and self.max_cache_bytes < MIN_CACHE_BYTES:
            raise ConfigError(
                f"[artifacts] max_cache_bytes must be 0 (unbounded) or at least {MIN_CACHE_BYTES} bytes (1 MiB), "
                f"got {self.max_cache_bytes}"
            )


@dataclass(frozen=True)
class EdgeTelemetrySection(TelemetrySection):
    """The edge's own metrics (the shared settings) and the bounds of the relay of its devices'.

    Attributes:
        relay_max_requests: Devices' export requests held for the upstream, per signal (metrics, logs).
        relay_max_bytes: Their bytes held for the upstream, per signal.
    """

    relay_max_requests: int = 10_000
    relay_max_bytes: int = 64 * 1024 * 1024

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.relay_max_requests < 1:
            raise ConfigError(f"[telemetry] relay_max_requests must be at least 1, got {self.relay_max_requests}")
        if self.relay_max_bytes < 1024:
            raise ConfigError(f"[telemetry] relay_max_bytes must be at least 1024, got {self.relay_max_bytes}")


@dataclass(frozen=True)
class EdgeConfig(TierConfig):
    """The whole configuration of an edge process."""

    artifacts: ArtifactsSection = field(default_factory=ArtifactsSection)
    updates: UpdatesSection = field(default_factory=UpdatesSection)
    telemetry: EdgeTelemetrySection = field(default_factory=EdgeTelemetrySection)
    cascade: CascadeSection = field(default_factory=CascadeSection)
    token_cascade: TokenCascadeSection = field(default_factory=TokenCascadeSection)

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.artifacts.cache_dir:
            self.check_chunk_fits("artifacts", self.artifacts.chunk_bytes)
