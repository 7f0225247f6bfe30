"""The registry's TUF repository on disk, written with python-tuf's Metadata API.

Layout (consistent snapshots: every metadata version and every target blob is a
new file, named by version or digest, and never rewritten)::

    <repo>/metadata/<R>.root.json, root.json     root (offline keys, threshold configurable; every version kept)
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

Root is rotated by writing ``<R+1>.root.json``, signed by a threshold of the
old root keys and of the new ones: a client that trusts any earlier version
walks the chain up from there. ``root.json`` is a copy of the newest version.

Callers serialise writers (``tier2_region.registry.registry`` holds a file lock);
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
from tier2_region.registry.signing_keys import SigningKeys

METADATA_DIR = "metadata"
TARGETS_DIR = "targets"
HASH_ALGORITHM = "sha256"
# A policy cap on the size of targets.json, not a client limit (clients take the signed
# length from snapshot, which always carries it). Every device downloads the whole
# targets.json after each targets change, so a huge one costs the fleet bandwidth and
# memory on every publish; a registry that needs more should be split with TUF delegations.
TARGETS_MAX_LENGTH: int = 5_000_000

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
        targets_resign_margin: Targets metadata with less than this left is
            re-signed by :meth:`TufRepository.refresh_online` when the targets
            key is at hand (None: a third of the targets lifetime, 30 days by default).
    """

    root: timedelta = timedelta(days=365)
    targets: timedelta = timedelta(days=90)
    snapshot: timedelta = timedelta(days=7)
    timestamp: timedelta = timedelta(days=1)
    resign_margin: timedelta = timedelta(hours=6)
    targets_resign_margin: timedelta | None = None

    def __post_init__(self) -> None:
        for name in ("root", "targets", "snapshot", "timestamp"):
            if getattr(self, name) <= timedelta(0):
                raise ConfigError(f"the {name} metadata expiry must be positive, got {getattr(self, name)}")
        for name in ("timestamp", "snapshot"):
            if not timedelta(0) <= self.resign_margin < getattr(self, name):
                raise ConfigError(
                    f"the re-sign margin ({self.resign_margin}) must be shorter than the {name} expiry "
                    f"({getattr(self, name)}), else the {name} would be re-signed on every check"
                )
        if not timedelta(0) <= self.targets_margin < self.targets:
            raise ConfigError(
                f"the targets re-sign margin ({self.targets_margin}) must be shorter than the targets expiry "
                f"({self.targets}), else targets would be re-signed on every check"
            )

    @property
    def targets_margin(self) -> timedelta:
        """When targets metadata is re-signed: this long before it expires."""
        return self.targets / 3 if self.targets_resign_margin is None else self.targets_resign_margin


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


def metadata_expiries(state: RepositoryState) -> dict[str, datetime]:
    """When each top-level role's committed metadata expires, by role name."""
    return {
        Root.type: state.root.signed.expires,
        Targets.type: state.targets.signed.expires,
        Snapshot.type: state.snapshot.signed.expires,
        Timestamp.type: state.timestamp.signed.expires,
    }


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
        targets_max_length: The largest targets metadata a change may write
            (the registry's size cap, :data:`TARGETS_MAX_LENGTH`; tests pass a small one).
    """

    def __init__(
        self,
        root: Path,
        expiry: ExpiryPolicy | None = None,
        clock: Clock = utc_now,
        targets_max_length: int = TARGETS_MAX_LENGTH,
    ) -> None:
        self.root = root
        self.expiry = expiry or ExpiryPolicy()
        self._clock = clock
        self._targets_max_length = targets_max_length
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
        root = self._read(self.metadata_dir / f"{self.root_version()}.root.json", Root)
        return RepositoryState(root, timestamp, snapshot, targets)

    def root_version(self) -> int:
        """The newest root version: the last of the unbroken chain ``1.root.json``, ``2.root.json`` …"""
        version = 1
        while (self.metadata_dir / f"{version + 1}.root.json").is_file():
            version += 1
        return version

    def targets(self) -> dict[str, TargetFile]:
        """The committed targets by path.

        Raises:
            PreconditionError: The repository does not exist.
        """
        return dict(self.state().targets.signed.targets)

    def trusted_root(self) -> bytes:
        """The bytes of the newest committed root: what newly provisioned clients embed as their trust anchor.

        A client may start from any root it trusts and walks the chain forward
        from there, so a device provisioned after a rotation starts from the
        current root (not from version 1, signed by keys that may be retired).
        The chain of ``<N>.root.json`` files decides, not the ``root.json`` copy.

        Raises:
            PreconditionError: The repository does not exist.
        """
        path = self.metadata_dir / f"{self.root_version()}.root.json"
        if not path.is_file():
            raise PreconditionError(f"no TUF repository in {self.root}; create one first (edgecascade model init)")
        return path.read_bytes()

    def root_key_history(self) -> dict[str, int]:
        """Every key id that has been a root key, with the newest root version that lists it."""
        history: dict[str, int] = {}
        for version in range(1, self.root_version() + 1):
            root = self._read(self.metadata_dir / f"{version}.root.json", Root)
            for keyid in root.signed.roles[Root.type].keyids:
                history[keyid] = version
        return history

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
            PreconditionError: The targets metadata would outgrow the registry's size cap.
            ConfigError: The targets or online key is missing.
        """
        step = on_step or (lambda _name: None)
        state = self.state()
        targets, targets_bytes = self._next_targets(state, new, keys)
        for item in new:
            blob = self.targets_dir / blob_name(targets.targets[item.path])
            blob.parent.mkdir(parents=True, exist_ok=True)
            write_atomically(blob, item.data)
        step("blobs")
        write_atomically(self.metadata_dir / f"{targets.version}.targets.json", targets_bytes)
        step("targets")
        self._next_snapshot_and_timestamp(state, keys, targets.version, targets_bytes, step)
        return self.state()

    def check_targets(self, new: Sequence[NewTarget], keys: SigningKeys) -> None:
        """Refuses, writing nothing, what :meth:`add_targets` would refuse.

        Raises:
            (what :meth:`add_targets` raises before its first write)
        """
        self._next_targets(self.state(), new, keys)

    def _next_targets(
        self, state: RepositoryState, new: Sequence[NewTarget], keys: SigningKeys
    ) -> tuple[Targets, bytes]:
        """The next targets version with ``new`` added, signed and serialised (nothing written)."""
        if keys.targets is None or keys.online is None:
            raise ConfigError("publishing needs the targets key and the online key")
        paths = [t.path for t in new]
        taken = sorted({p for p in paths if p in state.targets.signed.targets or paths.count(p) > 1})
        if taken:
            raise DuplicateVariantError(f"target {taken[0]} is already published; published variants are immutable")
        targets = copy.deepcopy(state.targets.signed)
        for item in new:
            info = TargetFile.from_data(item.path, item.data, [HASH_ALGORITHM])
            info.unrecognized_fields["custom"] = item.custom
            targets.targets[item.path] = info
        targets.version += 1
        targets.expires = self._clock() + self.expiry.targets
        data = self._signed(targets, keys.targets).to_bytes(self._serializer)
        if len(data) > self._targets_max_length:
            raise PreconditionError(
                f"publishing {len(new)} more targets refused: the targets metadata would grow to {len(data)} bytes, "
                f"over the registry's cap of {self._targets_max_length} bytes "
                f"({len(state.targets.signed.targets)} targets are signed now); nothing was written. "
                "The cap is a policy: every device downloads the whole targets metadata after each change, so a "
                "bigger one costs the fleet bandwidth and memory on every publish. Split the registry "
                "(TUF delegations), or move models to a new registry"
            )
        return targets, data

    def resign_targets(self, keys: SigningKeys, on_step: Callable[[str], None] | None = None) -> RepositoryState:
        """Re-signs the targets metadata unchanged but with a new expiry, then snapshot and timestamp.

        Raises:
            ConfigError: The targets or online key is missing.
            PreconditionError: The repository does not exist.
        """
        if keys.targets is None or keys.online is None:
            raise ConfigError("re-signing targets needs the targets key (targets.pem) and the online key")
        step = on_step or (lambda _name: None)
        state = self.state()
        targets = copy.deepcopy(state.targets.signed)
        targets.version += 1
        targets.expires = self._clock() + self.expiry.targets
        targets_bytes = self._write_versioned(self._signed(targets, keys.targets))
        step("targets")
        self._next_snapshot_and_timestamp(state, keys, targets.version, targets_bytes, step)
        return self.state()

    def refresh_online(self, keys: SigningKeys) -> list[str]:
        """Re-signs the roles that are within their re-sign margin of expiring.

        Targets are re-signed only when ``keys`` holds the targets key (the
        serving region normally does not: then ``edgecascade model
        resign-targets`` does it); snapshot and timestamp follow a new targets version.

        Returns:
            The roles re-signed (empty when nothing was close to expiry).

        Raises:
            ConfigError: The online key is missing.
            PreconditionError: The repository does not exist.
        """
        if keys.online is None:
            raise ConfigError("re-signing snapshot and timestamp needs the online key")
        state = self.state()
        now = self._clock()
        if keys.targets is not None and state.targets.signed.expires <= now + self.expiry.targets_margin:
            self.resign_targets(keys)
            return [Targets.type, Snapshot.type, Timestamp.type]
        deadline = now + self.expiry.resign_margin
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

    def next_root(self, current_keys: Sequence[Signer], new_keys: Sequence[Signer], threshold: int) -> Metadata[Root]:
        """Root version N+1 with ``new_keys`` as the root keys, signed by old and new keys (nothing written).

        Args:
            current_keys: Signers that include at least the threshold of the
                current root's keys (others are ignored).
            new_keys: The root keys of the new version; every current root key
                not among them is revoked (:meth:`renewed_root` keeps the role as it is).
            threshold: Root signatures clients will require from now on.

        Raises:
            ConfigError: Too few of the current root keys, or a threshold the new keys cannot meet.
            PreconditionError: The repository does not exist.
        """
        old = self.state().root.signed
        role = old.roles[Root.type]
        signers = self._current_root_signers(old, current_keys)
        new_ids = list(dict.fromkeys(k.public_key.keyid for k in new_keys))
        if not 1 <= threshold <= len(new_ids):
            raise ConfigError(
                f"root threshold must be between 1 and the number of new root keys ({len(new_ids)}), got {threshold}"
            )
        root = copy.deepcopy(old)
        root.version += 1
        root.expires = self._clock() + self.expiry.root
        for keyid in list(role.keyids):
            root.revoke_key(keyid, Root.type)
        for signer in new_keys:
            if signer.public_key.keyid not in root.roles[Root.type].keyids:
                root.add_key(signer.public_key, Root.type)
        root.roles[Root.type].threshold = threshold
        md = Metadata(root)
        for signer in [*signers, *new_keys]:
            if signer.public_key.keyid not in md.signatures:
                md.sign(signer, append=True)
        # What a client checks: a threshold of the old root's keys and of the new root's keys.
        if not root.get_root_verification_result(old, md.signed_bytes, md.signatures).verified:
            raise InternalError("the new root metadata does not verify against the old and the new root")
        return md

    def renewed_root(self, current_keys: Sequence[Signer]) -> Metadata[Root]:
        """Root version N+1 with every role unchanged (keys and thresholds), only a new expiry (nothing written).

        Signed by the current root keys among ``current_keys``; a threshold of
        them is required, as for any new root version.

        Raises:
            ConfigError: Fewer than the threshold of the current root keys.
            PreconditionError: The repository does not exist.
        """
        old = self.state().root.signed
        signers = self._current_root_signers(old, current_keys)
        root = copy.deepcopy(old)
        root.version += 1
        root.expires = self._clock() + self.expiry.root
        md = Metadata(root)
        for signer in signers:
            md.sign(signer, append=True)
        if not root.get_root_verification_result(old, md.signed_bytes, md.signatures).verified:
            raise InternalError("the renewed root metadata does not verify against the old and the new root")
        return md

    def _current_root_signers(self, old: Root, current_keys: Sequence[Signer]) -> list[Signer]:
        """The signers among ``current_keys`` that are keys of root ``old``: at least its threshold, or ConfigError."""
        role = old.roles[Root.type]
        signers: dict[str, Signer] = {}
        for signer in current_keys:
            if signer.public_key.keyid in role.keyids:
                signers.setdefault(signer.public_key.keyid, signer)
        if len(signers) < role.threshold:
            raise ConfigError(
                f"rotating root version {old.version} needs {role.threshold} of its {len(role.keyids)} root keys; "
                f"{len(signers)} of them were given (root keys: {', '.join(k[:12] for k in role.keyids)})"
            )
        return list(signers.values())

    def commit_root(self, root: Metadata[Root]) -> None:
        """Writes root version N+1: ``<N+1>.root.json`` (what clients walk to), then the ``root.json`` copy.

        Raises:
            PreconditionError: ``root`` is not the next version.
        """
        expected = self.root_version() + 1
        if root.signed.version != expected:
            raise PreconditionError(
                f"root version {root.signed.version} cannot be committed: the next root version is {expected}"
            )
        data = root.to_bytes(self._serializer)
        write_atomically(self.metadata_dir / f"{root.signed.version}.root.json", data)
        write_atomically(self.metadata_dir / "root.json", data)

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
