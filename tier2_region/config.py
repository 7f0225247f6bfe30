"""The region's configuration: the shared sections plus ``[registry]``, ``[fleet]`` and ``[telemetry]``.

``[registry]``
    ``path`` of the model registry (its TUF repository is served by the
    artifact service; empty: no artifact service), ``key_dir`` holding the
    online key (``online.pem``) that re-signs snapshot and timestamp (empty:
    no re-signing), metadata lifetimes ``root_expiry_s``, ``targets_expiry_s``,
    ``snapshot_expiry_s``, ``timestamp_expiry_s``, ``resign_margin_s`` (re-sign
    when less is left; longer than ``resign_check_s``, and snapshot and
    timestamp must outlive margin + check), ``resign_check_s`` (how often to
    look), ``resign_targets`` (load ``targets.pem`` from ``key_dir`` too and
    re-sign targets in the last third of their lifetime; off by default so the
    targets key stays offline, renewed with ``edgecascade model resign-targets``)
    and ``chunk_bytes`` per streamed artifact message.
``[fleet]``
    ``path`` of the fleet inventory (SQLite: nodes, enrollment tokens,
    deployments; empty: no fleet service; needs ``[registry] path``, whose
    variants it assigns), ``check_interval_s`` between a node's check-ins (the
    node adds jitter), ``clock_skew_s``: how far a check-in's timestamp may be
    from the region's clock (a nonce is remembered for twice that), and
    ``token_ttl_s``: how long an enrollment token made by ``edgecascade fleet
    token`` is valid unless told otherwise.
``[telemetry]``
    ``path`` of the telemetry store (SQLite: the nodes' OTLP metrics folded into
    windows, and their anomalies; empty: no OTLP receiver; needs ``[fleet]
    path``: only enrolled nodes are heard), ``window_s`` (width of a window),
    ``retention_s`` (windows and anomalies older than this are dropped),
    ``max_rows`` (window rows kept per table, oldest windows dropped first),
    ``max_series`` (cumulative series whose last value is remembered),
    ``max_points_per_request``, ``max_attributes`` (per resource, point or log
    record), ``queue_points`` (data points waiting to be written; more are
    refused with RESOURCE_EXHAUSTED), ``max_anomalies_per_node``, and
    ``forward_endpoint`` (``host:port`` of an OTLP/gRPC collector that gets a copy
    of what was accepted; empty: none) with ``forward_queue`` (requests waiting
    to be forwarded; more are dropped and counted), ``hard_examples_max_rows``
    (hard examples kept for retraining, default 10,000; the oldest are pruned
    and counted) and ``hard_examples_max_bytes`` (the largest hard example's
    body taken, default 64 KiB; a larger one is refused, never cut).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import timedelta

from services.errors import ConfigError
from services.tier_config import MAX_HARD_EXAMPLE_BYTES, MIN_HARD_EXAMPLE_BYTES, TierConfig, check_chunk_bytes
from tier2_region.registry.tuf_repository import ExpiryPolicy


@dataclass(frozen=True)
class RegistrySection:
    """The region's model registry and the artifact service that serves it."""

    path: str = ""
    key_dir: str = ""
    root_expiry_s: int = 365 * 86400
    targets_expiry_s: int = 90 * 86400
    snapshot_expiry_s: int = 7 * 86400
    timestamp_expiry_s: int = 86400
    resign_margin_s: int = 6 * 3600
    resign_check_s: float = 60.0
    resign_targets: bool = False
    chunk_bytes: int = 256 * 1024

    def __post_init__(self) -> None:
        for name in ("root_expiry_s", "targets_expiry_s", "snapshot_expiry_s", "timestamp_expiry_s"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"[registry] {name} must be a positive number of seconds, got {getattr(self, name)}")
        # A margin that is too small (zero or negative too) is refused below: it must exceed resign_check_s.
        if self.resign_margin_s >= self.timestamp_expiry_s:
            raise ConfigError(
                f"[registry] resign_margin_s ({self.resign_margin_s} s) must be shorter than timestamp_expiry_s "
                f"({self.timestamp_expiry_s} s), else the timestamp is re-signed at every check"
            )
        if self.resign_check_s <= 0 or self.resign_check_s >= self.timestamp_expiry_s - self.resign_margin_s:
            raise ConfigError(
                "[registry] resign_check_s must be positive and shorter than timestamp_expiry_s − resign_margin_s "
                f"({self.timestamp_expiry_s - self.resign_margin_s} s), else a timestamp can expire between checks; "
                f"got {self.resign_check_s}"
            )
        # A role is re-signed at the first check that finds it inside the margin.
        if self.resign_margin_s <= self.resign_check_s:
            raise ConfigError(
                f"[registry] resign_margin_s ({self.resign_margin_s} s) must be longer than resign_check_s "
                f"({self.resign_check_s:g} s), else metadata can expire between two checks"
            )
        for name in ("snapshot_expiry_s", "timestamp_expiry_s"):
            if getattr(self, name) <= self.resign_margin_s + self.resign_check_s:
                raise ConfigError(
                    f"[registry] {name} ({getattr(self, name)} s) must be longer than resign_margin_s + "
                    f"resign_check_s ({self.resign_margin_s + self.resign_check_s:g} s), else it is re-signed "
                    "at every check"
                )
        # A region with the targets key re-signs targets a third of their lifetime before expiry
        # (ExpiryPolicy.targets_margin); without it, an operator does and the check interval does not matter.
        if self.resign_targets and self.targets_expiry_s <= 3 * self.resign_check_s:
            raise ConfigError(
                f"[registry] targets_expiry_s ({self.targets_expiry_s} s) must be longer than 3 × resign_check_s "
                f"({3 * self.resign_check_s:g} s) with resign_targets: the region re-signs targets in the last "
                "third of their lifetime"
            )
        check_chunk_bytes("registry", self.chunk_bytes)
        if self.key_dir and not self.path:
            raise ConfigError("[registry] key_dir is set but path is empty; set the registry path too")
        if self.resign_targets and not self.key_dir:
            raise ConfigError("[registry] resign_targets needs key_dir (where targets.pem is)")

    @property
    def expiry(self) -> ExpiryPolicy:
        """The metadata lifetimes as the registry core takes them."""
        return ExpiryPolicy(
            root=timedelta(seconds=self.root_expiry_s),
            targets=timedelta(seconds=self.targets_expiry_s),
            snapshot=timedelta(seconds=self.snapshot_expiry_s),
            timestamp=timedelta(seconds=self.timestamp_expiry_s),
            resign_margin=timedelta(seconds=self.resign_margin_s),
        )


# The largest check interval the wire carries (uint32 seconds) is far beyond any sensible one: a day.
MAX_CHECK_INTERVAL_S = 86400


@dataclass(frozen=True)
class FleetSection:
    """The region's fleet: enrollment, check-in and assignment of model variants."""

    path: str = ""
    check_interval_s: int = 30
    clock_skew_s: int = 300
    token_ttl_s: int = 86400

    def __post_init__(self) -> None:
        if not 1 <= self.check_interval_s <= MAX_CHECK_INTERVAL_S:
            raise ConfigError(
                f"[fleet] check_interval_s must be between 1 and {MAX_CHECK_INTERVAL_S} seconds, "
                f"got {self.check_interval_s}"
            )
        if self.clock_skew_s <= 0:
            raise ConfigError(f"[fleet] clock_skew_s must be a positive number of seconds, got {self.clock_skew_s}")
        if self.token_ttl_s <= 0:
            raise ConfigError(f"[fleet] token_ttl_s must be a positive number of seconds, got {self.token_ttl_s}")


@dataclass(frozen=True)
class TelemetrySection:
    """The region's OTLP receiver and the store it folds the nodes' telemetry into."""

    path: str = ""
    window_s: int = 60
    retention_s: int = 7 * 86400
    max_rows: int = 1_000_000
    max_series: int = 1_000_000
    max_points_per_request: int = 10_000
    max_attributes: int = 128
    queue_points: int = 200_000
    max_anomalies_per_node: int = 100
    forward_endpoint: str = ""
    forward_queue: int = 256
    hard_examples_max_rows: int = 10_000
    hard_examples_max_bytes: int = 64 * 1024

    def __post_init__(self) -> None:
        if not MIN_HARD_EXAMPLE_BYTES <= self.hard_examples_max_bytes <= MAX_HARD_EXAMPLE_BYTES:
            raise ConfigError(
                f"[telemetry] hard_examples_max_bytes must be from {MIN_HARD_EXAMPLE_BYTES} to "
                f"{MAX_HARD_EXAMPLE_BYTES}, got {self.hard_examples_max_bytes}"
            )
        positive = (
            "window_s",
            "max_rows",
            "max_series",
            "max_points_per_request",
            "max_attributes",
            "max_anomalies_per_node",
            "forward_queue",
            "hard_examples_max_rows",
        )
        for name in positive:
            if getattr(self, name) <= 0:
                raise ConfigError(f"[telemetry] {name} must be positive, got {getattr(self, name)}")
        # Fewer than two windows would leave a gate nothing but a window still filling.
        if self.retention_s < 2 * self.window_s:
            raise ConfigError(
                f"[telemetry] retention_s ({self.retention_s} s) must be at least two windows "
                f"(2 × window_s = {2 * self.window_s} s)"
            )
        # A request the queue could never take would be refused forever, and retried forever.
        if self.queue_points < self.max_points_per_request:
            raise ConfigError(
                f"[telemetry] queue_points ({self.queue_points}) must be at least max_points_per_request "
                f"({self.max_points_per_request})"
            )
        if self.forward_endpoint and ":" not in self.forward_endpoint:
            raise ConfigError(
                "[telemetry] forward_endpoint must be host:port of an OTLP/gRPC collector, "
                f"got {self.forward_endpoint!r}"
            )


@dataclass(frozen=True)
class RegionConfig(TierConfig):
    """The whole configuration of a region process."""

    registry: RegistrySection = field(default_factory=RegistrySection)
    fleet: FleetSection = field(default_factory=FleetSection)
    telemetry: TelemetrySection = field(default_factory=TelemetrySection)

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.registry.path:
            self.check_chunk_fits("registry", self.registry.chunk_bytes)
        if self.fleet.path and not self.registry.path:
            raise ConfigError(
                "[fleet] path is set but [registry] path is empty; the fleet assigns the registry's variants, "
                "set the registry path too"
            )
        if self.telemetry.path and not self.fleet.path:
            raise ConfigError(
                "[telemetry] path is set but [fleet] path is empty; the region hears only enrolled nodes, "
                "set the fleet path too"
            )
