"""The registry's TUF repository on disk, written with python-tuf's Metadata API.

Layout (consistent snapshots: every metadata version and every target blob is a
new file, named by version or digest, and never rewritten)::

    <repo>/metadata/1.root.json, root.json       root (offline keys, threshold configurable)
    <repo>/metadata/<N>.targets.json             targets (publisher key)
    <repo>/metadata/<M>.snapshot.json            snapshot (online key)
    <repo>/metadata/timestamp.json               timestamp (online key): the commit point
    <repo>/targets/models/<name>/<version>/<sha256>.<variant>

Ordering rule of every change: new blobs, then the next targets version, then
the next snapshot version, then ``timestamp.json`` is replaced atomically. The
repository's current state is whatever ``timestamp.json`` names, so a crash at
any point leaves it valid at either the previous or the new version, never in
between; files written before a crash that never got committed are unreferenced
and harmless (:meth:`TufRepository.unreferenced_files` lists them).

Callers serialise writers (``services.registry.registry`` holds a file lock);
readers need no lock because every file they can reach is complete.
"""

from __future__ import annotations

import copy
import json
import typing
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from securesystemslib.signer import Signer
from tuf.api.exceptions import RepositoryError
from tuf.api.metadata import Metadata, MetaFile, Role, Root, Snapshot, T, TargetFile, Targets, Timestamp
from tuf.api.serialization import DeserializationError
from tuf.api.serialization.json import JSONSerializer

from services.atomic_files import write_atomically
from services.errors import ConfigError, DuplicateVariantError, InternalError, PreconditionError
from services.registry.signing_keys import SigningKeys

METADATA_DIR = "metadata"
TARGETS_DIR = "targets"
HASH_ALGORITHM = "sha256"

Clock = Callable[[], datetime]


def utc_now() -> datetime:
    """The current time in UTC (the default clock)."""
    return datetime.now(UTC)


@dataclass(frozen=True)
class ExpiryPolicy:
    """How long each role's metadata stays valid, and when the online roles are re-signed.

    Attributes:
        root: Lifetime of root metadata.
        targets: Lifetime of targets metadata (re-signed on every publish).
        snapshot: Lifetime of snapshot metadata.
        timestamp: Lifetime of timestamp metadata.
        resign_margin: Snapshot or timestamp metadata with less than this left
            is re-signed by :meth:`TufRepository.refresh_online`.
    """

    root: timedelta = timedelta(days=365)
    targets: timedelta = timedelta(days=90)
    snapshot: timedelta = timedelta(days=7)
    timestamp: timedelta = timedelta(days=1)
    resign_margin: timedelta = timedelta(hours=6)

    def __post_init__(self) -> None:
        for name in ("root", "targets", "snapshot", "timestamp"):
            if getattr(self, name) <= timedelta(0):
                raise ConfigError(f"the {name} metadata expiry must be positive, got {getattr(self, name)}")
        if not timedelta(0) <= self.resign_margin < self.timestamp:
            raise ConfigError(
                f"the re-sign margin ({self.resign_margin}) must be shorter than the timestamp expiry "
                f"({self.timestamp}), else the timestamp would be re-signed on every check"
            )


@dataclass(frozen=True)
class NewTarget:
    """A blob to add to the repository and the signed facts about it.

    Attributes:
        path: The target path, e.g. ``models/lm/1/int8``.
        data: The blob's bytes (what the signed length and hashes cover).
        custom: JSON-serialisable fields signed into the target's ``custom``.
    """

    path: str
    data: bytes
    custom: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class RepositoryState:
    """The committed metadata of the repository."""

    root: Metadata[Root]
    timestamp: Metadata[Timestamp]
    snapshot: Metadata[Snapshot]
    targets: Metadata[Targets]


def blob_name(target: TargetFile) -> str:
    """The file of a target under ``targets/``: its digest prefixes the basename."""
    directory, sep, base = target.path.rpartition("/")
    return f"{directory}{sep}{target.hashes[HASH_ALGORITHM]}.{base}"


class TufRepository:
    """Creates, extends and re-signs one TUF repository directory.

    Args:
        root: The repository directory (what the artifact service serves).
        expiry: Metadata lifetimes.
        clock: Returns the current UTC time (tests pass a fake one).
    """

    def __init__(self, root: Path, expiry: ExpiryPolicy | None = None, clock: Clock = utc_now) -> None:
        self.root = root
        self.expiry = expiry or ExpiryPolicy()
        self._clock = clock
        self._serializer = JSONSerializer(compact=False)

    @property
    def metadata_dir(self) -> Path:
        """``<repo>/metadata``."""
        return self.root / METADATA_DIR

    @property
    def targets_dir(self) -> Path:
        """``<repo>/targets``."""
        return self.root / TARGETS_DIR

    def exists(self) -> bool:
        """Whether the repository has been created (its timestamp is committed)."""
        return (self.metadata_dir / "timestamp.json").is_file()

    def create(self, keys: SigningKeys, root_threshold: int = 1) -> RepositoryState:
        """Writes version 1 of every role: an empty repository.

        Args:
            keys: Root keys (at least ``root_threshold``), the targets key and the online key.
            root_threshold: Root signatures a client requires.

        Raises:
            ConfigError: Keys are missing, the threshold cannot be met, or the
                repository already exists.
        """
        if self.exists():
            raise ConfigError(f"a TUF repository already exists in {self.root}")
        if keys.targets is None or keys.online is None:
            raise ConfigError("creating a repository needs the targets and the online key")
        if not 1 <= root_threshold <= len(keys.root):
            raise ConfigError(
                f"root threshold must be between 1 and the number of root keys ({len(keys.root)}), got {root_threshold}"
            )
        now = self._clock()
        root = Root(expires=now + self.expiry.root, consistent_snapshot=True)
        root.roles[Root.type] = Role([], root_threshold)
        for signer in keys.root:
            root.add_key(signer.public_key, Root.type)
        root.add_key(keys.targets.public_key, Targets.type)
        root.add_key(keys.online.public_key, Snapshot.type)
        root.add_key(keys.online.public_key, Timestamp.type)
        root_md = Metadata(root)
        for signer in keys.root:
            root_md.sign(signer, append=True)
        self.metadata_dir.mkdir(parents=True, exist_ok=True)
        self.targets_dir.mkdir(parents=True, exist_ok=True)
        root_bytes = root_md.to_bytes(self._serializer)
        write_atomically(self.metadata_dir / "1.root.json", root_bytes)
        write_atomically(self.metadata_dir / "root.json", root_bytes)
        targets_md = self._signed(Targets(expires=now + self.expiry.targets), keys.targets)
        targets_bytes = self._write_versioned(targets_md)
        snapshot_md = self._signed(
            Snapshot(expires=now + self.expiry.snapshot, meta={"targets.json": self._meta(1, targets_bytes)}),
            keys.online,
        )
        snapshot_bytes = self._write_versioned(snapshot_md)
        self._commit_timestamp(Timestamp(expires=now + self.expiry.timestamp), snapshot_md, snapshot_bytes, keys)
        return self.state()

    def state(self) -> RepositoryState:
        """Reads the committed metadata, following ``timestamp.json``.

        Raises:
            PreconditionError: The repository does not exist.
            InternalError: A file the timestamp refers to is missing or unreadable.
        """
        if not self.exists():
            raise PreconditionError(f"no TUF repository in {self.root}; create one first (edgecascade model init)")
        timestamp = self._read(self.metadata_dir / "timestamp.json", Timestamp)
        snapshot = self._read(self.metadata_dir / f"{timestamp.signed.snapshot_meta.version}.snapshot.json", Snapshot)
        targets_version = snapshot.signed.meta["targets.json"].version
        targets = self._read(self.metadata_dir / f"{targets_version}.targets.json", Targets)
        root = self._read(self.metadata_dir / "root.json", Root)
        return RepositoryState(root, timestamp, snapshot, targets)

    def targets(self) -> dict[str, TargetFile]:
        """The committed targets by path.

        Raises:
            PreconditionError: The repository does not exist.
        """
        return dict(self.state().targets.signed.targets)

    def trusted_root(self) -> bytes:
        """The bytes of root version 1: what clients embed as their trust anchor.

        Raises:
            PreconditionError: The repository does not exist.
        """
        path = self.metadata_dir / "1.root.json"
        if not path.is_file():
            raise PreconditionError(f"no TUF repository in {self.root}; create one first (edgecascade model init)")
        return path.read_bytes()

    def add_targets(
        self, new: Sequence[NewTarget], keys: SigningKeys, on_step: Callable[[str], None] | None = None
    ) -> RepositoryState:
        """Adds targets in one commit: blobs, targets, snapshot, then timestamp.

        Args:
            new: The targets to add; none may exist yet.
            keys: The targets key and the online key.
            on_step: Called after each durable step (``blobs``, ``targets``,
                ``snapshot``, ``timestamp``); crash tests stop the process there.

        Returns:
            The new committed state.

        Raises:
            DuplicateVariantError: A target path is already in the repository (or twice in ``new``).
            ConfigError: The targets or online key is missing.
        """
        if keys.targets is None or keys.online is None:
            raise ConfigError("publishing needs the targets key and the online key")
        step = on_step or (lambda _name: None)
        state = self.state()
        paths = [t.path for t in new]
        taken = sorted({p for p in paths if p in state.targets.signed.targets or paths.count(p) > 1})
        if taken:
            raise DuplicateVariantError(f"target {taken[0]} is already published; published variants are immutable")
        now = self._clock()
        targets = copy.deepcopy(state.targets.signed)
        for item in new:
            info = TargetFile.from_data(item.path, item.data, [HASH_ALGORITHM])
            info.unrecognized_fields["custom"] = item.custom
            blob = self.targets_dir / blob_name(info)
            blob.parent.mkdir(parents=True, exist_ok=True)
            write_atomically(blob, item.data)
            targets.targets[item.path] = info
        step("blobs")
        targets.version += 1
        targets.expires = now + self.expiry.targets
        targets_bytes = self._write_versioned(self._signed(targets, keys.targets))
        step("targets")
        self._next_snapshot_and_timestamp(state, keys, targets.version, targets_bytes, step)
        return self.state()

    def refresh_online(self, keys: SigningKeys) -> list[str]:
        """Re-signs snapshot and timestamp when they are within the re-sign margin of expiring.

        Returns:
            The roles re-signed (empty when nothing was close to expiry).

        Raises:
            ConfigError: The online key is missing.
            PreconditionError: The repository does not exist.
        """
        if keys.online is None:
            raise ConfigError("re-signing snapshot and timestamp needs the online key")
        state = self.state()
        deadline = self._clock() + self.expiry.resign_margin
        if state.snapshot.signed.expires <= deadline:
            meta = state.snapshot.signed.meta["targets.json"]
            targets_bytes = (self.metadata_dir / f"{meta.version}.targets.json").read_bytes()
            self._next_snapshot_and_timestamp(state, keys, meta.version, targets_bytes, lambda _name: None)
            return [Snapshot.type, Timestamp.type]
        if state.timestamp.signed.expires <= deadline:
            snapshot_bytes = (self.metadata_dir / f"{state.snapshot.signed.version}.snapshot.json").read_bytes()
            self._commit_timestamp(state.timestamp.signed, state.snapshot, snapshot_bytes, keys)
            return [Timestamp.type]
        return []

    def unreferenced_files(self) -> list[Path]:
        """Metadata and blobs newer than the committed state: left by an interrupted change."""
        state = self.state()
        stray = [
            p
            for p in self.metadata_dir.glob("*.json")
            if (p.name.endswith(".targets.json") and _version(p) > state.targets.signed.version)
            or (p.name.endswith(".snapshot.json") and _version(p) > state.snapshot.signed.version)
        ]
        known = {self.targets_dir / blob_name(t) for t in state.targets.signed.targets.values()}
        stray += [p for p in self.targets_dir.rglob("*") if p.is_file() and p not in known]
        return sorted(stray)

    def _next_snapshot_and_timestamp(
        self,
        state: RepositoryState,
        keys: SigningKeys,
        targets_version: int,
        targets_bytes: bytes,
        step: Callable[[str], None],
    ) -> None:
        assert keys.online is not None
        now = self._clock()
        snapshot = copy.deepcopy(state.snapshot.signed)
        snapshot.version += 1
        snapshot.expires = now + self.expiry.snapshot
        snapshot.meta["targets.json"] = self._meta(targets_version, targets_bytes)
        snapshot_md = self._signed(snapshot, keys.online)
        snapshot_bytes = self._write_versioned(snapshot_md)
        step("snapshot")
        self._commit_timestamp(state.timestamp.signed, snapshot_md, snapshot_bytes, keys)
        step("timestamp")

    def _commit_timestamp(
        self, previous: Timestamp, snapshot: Metadata[Snapshot], snapshot_bytes: bytes, keys: SigningKeys
    ) -> None:
        assert keys.online is not None
        timestamp = copy.deepcopy(previous)
        if self.exists():
            timestamp.version += 1
        timestamp.expires = self._clock() + self.expiry.timestamp
        timestamp.snapshot_meta = self._meta(snapshot.signed.version, snapshot_bytes)
        data = self._signed(timestamp, keys.online).to_bytes(self._serializer)
        # The commit point: before this rename the old state is current, after it the new one.
        write_atomically(self.metadata_dir / "timestamp.json", data)

    def _signed(self, signed: T, signer: Signer) -> Metadata[T]:
        md = Metadata(signed)
        md.sign(signer)
        return md

    def _write_versioned(self, md: Metadata[Any]) -> bytes:
        data = md.to_bytes(self._serializer)
        write_atomically(self.metadata_dir / f"{md.signed.version}.{md.signed.type}.json", data)
        return data

    @staticmethod
    def _meta(version: int, data: bytes) -> MetaFile:
        return MetaFile.from_data(version, data, [HASH_ALGORITHM])

    @staticmethod
    def _read(path: Path, kind: type[T]) -> Metadata[T]:
        try:
            md: Metadata[Any] = Metadata.from_bytes(path.read_bytes())
        except (OSError, DeserializationError, RepositoryError, ValueError, json.JSONDecodeError) as exc:
            raise InternalError(f"repository file {path.name} is missing or unreadable") from exc
        if not isinstance(md.signed, kind):
            raise InternalError(f"repository file {path.name} holds {md.signed.type} metadata, not {kind.type}")
        return typing.cast("Metadata[T]", md)


def _version(path: Path) -> int:
    head = path.name.split(".", 1)[0]
    return int(head) if head.isdigit() else 0
