"""The region's configuration: the shared sections plus ``[registry]``.

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
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import timedelta

from services.errors import ConfigError
from services.tier_config import TierConfig, check_chunk_bytes
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


@dataclass(frozen=True)
class RegionConfig(TierConfig):
    """The whole configuration of a region process."""

    registry: RegistrySection = field(default_factory=RegistrySection)

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.registry.path:
            self.check_chunk_fits("registry", self.registry.chunk_bytes)
