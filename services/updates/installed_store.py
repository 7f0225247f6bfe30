"""The models a node has installed, at rest only as encrypted blobs with their wrapped keys.

Layout (under the node's state directory)::

    <root>/<model>/<version>/model.ecm        the encrypted blob exactly as signed (AES-256-GCM)
    <root>/<model>/<version>/grant.json       the content key wrapped to this node (never the plain key)
    <root>/<model>/<version>/facts.json       the signed facts (TUF ``custom``), target path, length, sha256
    <root>/<model>/<version>/golden.json      the signed golden vectors (verified at download)
    <root>/<model>/<version>/committed.json   present once committed: {"seq": N}

Invariants:

* **No model plaintext on disk.** A version is decrypted in memory each time it is
  opened (:class:`DecryptingOpener`): the grant is unwrapped with the node's
  X25519 key, the blob decrypted, its plaintext checked against the signed
  sha256, and onnxruntime builds the session from the bytes.
* **A version directory is complete or absent.** It is assembled under a hidden
  temporary name, its files fsynced, and renamed into place (then the parent is
  fsynced). Hidden leftovers of a crash are removed at start.
* **What serves is what was committed last.** Committing writes ``committed.json``
  (atomically) with a sequence number above every other; the committed version
  is the one with the highest readable marker, the previous one the next highest.
  A torn or garbage marker never wins: that directory counts as uncommitted, so
  the one before it serves. Only the two newest committed versions are kept
  (the previous one for a local revert); older ones are removed.
* Uncommitted versions serve only while the updater has them on trial
  (:meth:`InstalledStore.begin_trial`): the store then lists them last, so the
  model cache's ``load(name)`` picks them and hot-swaps them in once warm.

:class:`StoreRepository` is the read side the :class:`~services.engine.model_cache.ModelCache`
uses (the same interface as :class:`~services.engine.model_repository.ModelRepository`).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import shutil
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from services.atomic_files import fsync_directory, fsync_file, write_atomically
from services.cascade import THRESHOLD_PROPERTY
from services.engine.memory import PEAK_PROPERTY
from services.engine.model_repository import (
    DEFAULT_MAX_BATCH_SIZE,
    PLATFORM,
    ModelEntry,
    ModelRepository,
    check_model_name,
    check_version,
)
from services.engine.onnx_session import OnnxSession
from services.engine.throttle import VARIANT_PROPERTY
from services.errors import IntegrityError, InvalidArgumentError, ModelNotReadyError, PreconditionError
from services.updates.content_encryption import decrypt_artifact
from services.updates.key_grants import KeyGrant, unwrap_key
from services.updates.update_journal import grant_from_json, grant_to_json

log = logging.getLogger("edgecascade.updates")

BLOB_FILE = "model.ecm"
GRANT_FILE = "grant.json"
FACTS_FILE = "facts.json"
GOLDEN_FILE = "golden.json"
COMMIT_FILE = "committed.json"
KEEP_COMMITTED = 2


def signed_peak_bytes(facts: dict[str, Any]) -> int | None:
    """The signed peak memory at the variant's max batch size (the largest profiled when that is missing)."""
    table = facts.get("peak_memory_bytes")
    if not isinstance(table, dict) or not table:
        return None
    at_max = table.get(str(facts.get("max_batch_size")))
    if isinstance(at_max, int):
        return at_max
    values = [v for v in table.values() if isinstance(v, int)]
    return max(values) if values else None


@dataclass(frozen=True)
class StoredVersion:
    """One installed version: where its files are and what was signed about it."""

    name: str
    version: str
    variant: str
    target_path: str
    path: Path
    facts: dict[str, Any]
    grant: KeyGrant
    length: int
    sha256: str
    commit_seq: int | None

    @property
    def blob(self) -> Path:
        """The encrypted blob."""
        return self.path / BLOB_FILE

    @property
    def golden(self) -> Path:
        """The signed golden vectors (JSON)."""
        return self.path / GOLDEN_FILE

    @property
    def plaintext_length(self) -> int:
        """The signed length of the decrypted model."""
        value = self.facts.get("plaintext_length")
        return int(value) if isinstance(value, int) else self.length

    def entry(self) -> ModelEntry:
        """The repository entry the model cache loads: metadata from the signed facts."""
        properties = {str(k): str(v) for k, v in dict(self.facts.get("properties") or {}).items()}
        peak = signed_peak_bytes(self.facts)
        if peak is not None:
            properties.setdefault(PEAK_PROPERTY, str(peak))
        # Which variant this is, signed: a hot device prefers an int8 one it has loaded (services.engine.throttle).
        properties[VARIANT_PROPERTY] = self.variant
        threshold = self.facts.get("confidence_threshold")
        if isinstance(threshold, str | int | float) and not isinstance(threshold, bool):
            # The threshold calibrated at publish, signed: what the confidence cascade compares answers with.
            properties[THRESHOLD_PROPERTY] = str(threshold)
        max_batch = self.facts.get("max_batch_size")
        return ModelEntry(
            name=self.name,
            version=self.version,
            path=self.path,
            platform=PLATFORM,
            max_batch_size=max_batch if isinstance(max_batch, int) else DEFAULT_MAX_BATCH_SIZE,
            task=str(self.facts.get("task", "")),
            properties=properties,
        )

    def plaintext(self, node_id: str, agreement: X25519PrivateKey) -> bytes:
        """Unwraps the grant, decrypts the blob in memory and checks the signed plaintext digest.

        Raises:
            IntegrityError: The grant does not open for this node and target, the blob does
                not decrypt, or the plaintext is not what was signed.
            OSError: The blob cannot be read.
        """
        return open_plaintext(self.blob.read_bytes(), self.grant, self.facts, node_id, agreement, self.target_path)


def open_plaintext(
    blob: bytes, grant: KeyGrant, facts: dict[str, Any], node_id: str, agreement: X25519PrivateKey, target_path: str
) -> bytes:
    """Decrypts a variant's blob with its grant and checks the plaintext against the signed sha256 and length.

    Raises:
        IntegrityError: The grant is for another node, target or key, or was altered; the blob does
            not decrypt; or the plaintext differs from what was signed.
    """
    encryption = facts.get("encryption")
    signed_key_id = encryption.get("key_id") if isinstance(encryption, dict) else None
    if signed_key_id != grant.key_id:
        raise IntegrityError(f"the key grant for {target_path} is for key {grant.key_id!r}, not the signed one")
    key = unwrap_key(grant, agreement, node_id, target_path)
    plaintext = decrypt_artifact(blob, key, target_path)
    digest = hashlib.sha256(plaintext).hexdigest()
    if digest != facts.get("plaintext_sha256"):
        raise IntegrityError(
            f"{target_path} decrypts to bytes with sha256 {digest}, not the signed {facts.get('plaintext_sha256')}"
        )
    length = facts.get("plaintext_length")
    if isinstance(length, int) and length != len(plaintext):
        raise IntegrityError(f"{target_path} decrypts to {len(plaintext)} bytes, not the signed {length}")
    return plaintext


class InstalledStore:
    """Installed versions per model (see the module docstring). Thread-safe.

    Args:
        root: The store directory; created (0700) if missing.
    """

    def __init__(self, root: Path) -> None:
        self.root = root
        root.mkdir(mode=0o700, parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._versions: dict[str, dict[str, StoredVersion]] = {}
        self._trials: dict[str, str] = {}
        self._scan()

    # -- reading -----------------------------------------------------------------------------------------------

    def names(self) -> list[str]:
        """Models with a committed version."""
        with self._lock:
            return sorted(n for n in self._versions if self._committed_locked(n, 0) is not None)

    def models(self) -> list[str]:
        """Models with any installed version (committed or not)."""
        with self._lock:
            return sorted(n for n, versions in self._versions.items() if versions)

    def get(self, name: str, version: str) -> StoredVersion | None:
        """An installed version (committed or not), or None."""
        with self._lock:
            return self._versions.get(name, {}).get(version)

    def all(self, name: str) -> list[StoredVersion]:
        """Every installed version of a model (committed or not)."""
        with self._lock:
            return list(self._versions.get(name, {}).values())

    def committed(self, name: str) -> StoredVersion | None:
        """The version that serves: the last committed."""
        with self._lock:
            return self._committed_locked(name, 0)

    def previous(self, name: str) -> StoredVersion | None:
        """The committed version before it, kept (encrypted) for a local revert."""
        with self._lock:
            return self._committed_locked(name, 1)

    def serving(self, name: str) -> list[StoredVersion]:
        """What the model cache may load: the committed version, then the one on trial (if any)."""
        with self._lock:
            found = [v for v in (self._committed_locked(name, 0),) if v is not None]
            trial = self._trials.get(name)
            if trial is not None and trial in self._versions.get(name, {}):
                found = [v for v in found if v.version != trial] + [self._versions[name][trial]]
            return found

    def _committed_locked(self, name: str, index: int) -> StoredVersion | None:
        ranked = sorted(
            (v for v in self._versions.get(name, {}).values() if v.commit_seq is not None),
            key=lambda v: v.commit_seq or 0,
            reverse=True,
        )
        return ranked[index] if len(ranked) > index else None

    # -- writing -----------------------------------------------------------------------------------------------

    def add(
        self,
        name: str,
        version: str,
        variant: str,
        target_path: str,
        blob: Path,
        grant: KeyGrant,
        facts: dict[str, Any],
        length: int,
        sha256: str,
        golden: bytes,
    ) -> StoredVersion:
        """Installs a verified encrypted blob as an uncommitted version, atomically; the blob file is moved in.

        An uncommitted directory of the same version (another variant, or a leftover) is replaced.

        Raises:
            PreconditionError: That version is already committed here.
            InvalidArgumentError: The name or version is not valid.
            OSError: The files cannot be written (nothing is left behind).
        """
        check_model_name(name)
        check_version(version)
        model_dir = self.root / name
        model_dir.mkdir(mode=0o700, exist_ok=True)
        target = model_dir / version
        with self._lock:
            existing = self._versions.get(name, {}).get(version)
        if existing is not None and existing.commit_seq is not None:
            raise PreconditionError(f"model '{name}' version {version} is already committed on this node")
        staging = model_dir / f".{version}.{os.getpid()}.{threading.get_ident()}.tmp"
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir(mode=0o700)
        try:
            try:
                os.replace(blob, staging / BLOB_FILE)
            except OSError:  # another file system: copy, then drop the staged file
                shutil.copyfile(blob, staging / BLOB_FILE)
                blob.unlink()
            meta = {"variant": variant, "target_path": target_path, "length": length, "sha256": sha256, "facts": facts}
            (staging / FACTS_FILE).write_text(json.dumps(meta, sort_keys=True))
            (staging / GRANT_FILE).write_text(json.dumps(grant_to_json(grant), sort_keys=True))
            (staging / GOLDEN_FILE).write_bytes(golden)
            for file in (BLOB_FILE, FACTS_FILE, GRANT_FILE, GOLDEN_FILE):
                fsync_file(staging / file)
            fsync_directory(staging)
            if target.exists():
                self._remove_dir(target)
            os.replace(staging, target)
            fsync_directory(model_dir)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
        stored = self._read(name, target)
        if stored is None:  # pragma: no cover - just written
            raise IntegrityError(f"model '{name}' version {version} was written but cannot be read back")
        with self._lock:
            self._versions.setdefault(name, {})[version] = stored
        return stored

    def commit(self, name: str, version: str) -> StoredVersion:
        """Makes an installed version the committed one (durably); keeps the previous one, removes older ones.

        Committing the previous version again is a local revert.

        Raises:
            PreconditionError: The version is not installed.
            OSError: The marker cannot be written (the old committed version still serves).
        """
        with self._lock:
            stored = self._versions.get(name, {}).get(version)
            seqs = [v.commit_seq for v in self._versions.get(name, {}).values() if v.commit_seq is not None]
        if stored is None:
            raise PreconditionError(f"model '{name}' version {version} is not installed on this node")
        seq = max(seqs, default=0) + 1
        write_atomically(stored.path / COMMIT_FILE, json.dumps({"seq": seq}).encode(), mode=0o600)
        committed = StoredVersion(**{**stored.__dict__, "commit_seq": seq})
        with self._lock:
            self._versions[name][version] = committed
            ranked = sorted(
                (v for v in self._versions[name].values() if v.commit_seq is not None),
                key=lambda v: v.commit_seq or 0,
                reverse=True,
            )
            old = ranked[KEEP_COMMITTED:]
            for v in old:
                del self._versions[name][v.version]
        for v in old:
            self._remove_dir(v.path)
        return committed

    def discard(self, name: str, version: str) -> None:
        """Removes an uncommitted version (a refused or abandoned one); committed versions stay."""
        with self._lock:
            stored = self._versions.get(name, {}).get(version)
            if stored is None or stored.commit_seq is not None:
                return
            del self._versions[name][version]
            if self._trials.get(name) == version:
                del self._trials[name]
        self._remove_dir(stored.path)

    def remove(self, name: str) -> list[str]:
        """Removes every installed version of a model, committed ones too (the model leaves the node).

        Returns the versions removed. Each version directory goes as in :meth:`discard` (renamed out of
        sight, then deleted), the committed ones last, so a crash part-way leaves a complete version or none.

        Raises:
            InvalidArgumentError: The name is not valid.
        """
        check_model_name(name)
        with self._lock:
            versions = sorted(self._versions.pop(name, {}).values(), key=lambda v: v.commit_seq or 0)
            self._trials.pop(name, None)
        for v in versions:
            self._remove_dir(v.path)
        model_dir = self.root / name
        with contextlib.suppress(OSError):  # not empty (a leftover) or gone: the scan at start cleans up
            model_dir.rmdir()
            fsync_directory(self.root)
        return [v.version for v in versions]

    def begin_trial(self, name: str, version: str) -> None:
        """Lists an uncommitted version last in :meth:`serving` (so the cache loads it) until :meth:`end_trial`."""
        with self._lock:
            self._trials[name] = version

    def end_trial(self, name: str) -> None:
        """Ends a trial (after commit or refusal)."""
        with self._lock:
            self._trials.pop(name, None)

    def on_trial(self, name: str) -> str | None:
        """The version of ``name`` on trial, if any."""
        with self._lock:
            return self._trials.get(name)

    def clean(self, keep: set[tuple[str, str]]) -> list[tuple[str, str]]:
        """Removes uncommitted versions other than ``keep`` (name, version); returns what was removed."""
        removed = []
        with self._lock:
            doomed = [
                v
                for versions in self._versions.values()
                for v in versions.values()
                if v.commit_seq is None and (v.name, v.version) not in keep
            ]
        for v in doomed:
            self.discard(v.name, v.version)
            removed.append((v.name, v.version))
        return removed

    # -- internals ---------------------------------------------------------------------------------------------

    def _remove_dir(self, path: Path) -> None:
        """Renames a directory out of sight (atomic), then deletes it: a crash never leaves half a version listed."""
        trash = path.parent / f".{path.name}.{os.getpid()}.{threading.get_ident()}.trash"
        shutil.rmtree(trash, ignore_errors=True)
        try:
            os.replace(path, trash)
        except FileNotFoundError:
            return
        fsync_directory(path.parent)
        shutil.rmtree(trash, ignore_errors=True)

    def _scan(self) -> None:
        for model_dir in sorted(p for p in self.root.iterdir() if p.is_dir()):
            try:
                check_model_name(model_dir.name)
            except InvalidArgumentError:
                log.warning("installed store: %s is not a model directory; ignored", model_dir)
                continue
            for child in sorted(model_dir.iterdir()):
                if child.name.startswith("."):
                    # A version being assembled or removed when the process stopped: never complete.
                    if child.is_dir():
                        shutil.rmtree(child, ignore_errors=True)
                    else:
                        child.unlink(missing_ok=True)
                    continue
                stored = self._read(model_dir.name, child)
                if stored is not None:
                    self._versions.setdefault(model_dir.name, {})[stored.version] = stored

    def _read(self, name: str, path: Path) -> StoredVersion | None:
        """Reads a version directory; None (logged) when it is not a complete version."""
        try:
            check_version(path.name)
            meta = json.loads((path / FACTS_FILE).read_text())
            grant = grant_from_json(json.loads((path / GRANT_FILE).read_text()))
            length, blob_size = int(meta["length"]), (path / BLOB_FILE).stat().st_size
            if blob_size != length or not (path / GOLDEN_FILE).is_file():
                raise IntegrityError(f"blob is {blob_size} bytes, signed {length}")
            facts = dict(meta["facts"])
            stored = StoredVersion(
                name,
                path.name,
                str(meta["variant"]),
                str(meta["target_path"]),
                path,
                facts,
                grant,
                length,
                str(meta["sha256"]),
                self._commit_seq(path),
            )
        except (OSError, ValueError, KeyError, TypeError, IntegrityError, InvalidArgumentError) as exc:
            log.error("installed store: %s is not a complete version (%s); ignored", path, exc)
            return None
        return stored

    @staticmethod
    def _commit_seq(path: Path) -> int | None:
        marker = path / COMMIT_FILE
        if not marker.exists():
            return None
        try:
            seq = json.loads(marker.read_text())["seq"]
        except (OSError, ValueError, KeyError, TypeError):
            log.error("installed store: %s is not a valid commit marker; that version counts as uncommitted", marker)
            return None
        return seq if isinstance(seq, int) and seq > 0 else None

    def repository(self) -> StoreRepository:
        """The read side for the model cache."""
        return StoreRepository(self)

    def opener(self, node_id: str, agreement: X25519PrivateKey) -> DecryptingOpener:
        """The session opener that decrypts this store's versions in memory."""
        return DecryptingOpener(self, node_id, agreement)


class StoreRepository(ModelRepository):
    """The installed store as the model cache's repository: committed versions (and the one on trial).

    Read-only: versions arrive through the updater, never by :meth:`add`.

    Args:
        store: The installed store.
    """

    def __init__(self, store: InstalledStore) -> None:
        super().__init__(store.root)
        self.store = store

    def entries(self) -> list[ModelEntry]:
        """Every version that may serve, by model name."""
        return [entry for name in self.store.names() for entry in self.versions(name)]

    def names(self) -> list[str]:
        """Models with a committed version."""
        return self.store.names()

    def versions(self, name: str) -> list[ModelEntry]:
        """The committed version, then the one on trial; the one :meth:`resolve` picks by default is last."""
        return [v.entry() for v in self.store.serving(name)]

    def add(self, name: str, source: Path, version: str = "", properties: dict[str, str] | None = None) -> ModelEntry:
        """Refused: an installed store holds only what the updater verified (and never plaintext).

        Raises:
            PreconditionError: Always.
        """
        raise PreconditionError(f"model '{name}' cannot be added by hand: this node installs models via its updater")


class DecryptingOpener:
    """Opens installed versions from their encrypted blobs, in memory.

    A :class:`~services.engine.model_loader.SessionOpener`.

    Args:
        store: The installed store.
        node_id: This node's id (bound into its key grants).
        agreement: This node's X25519 private key.
    """

    def __init__(self, store: InstalledStore, node_id: str, agreement: X25519PrivateKey) -> None:
        self.store = store
        self._node_id = node_id
        self._agreement = agreement

    def _stored(self, entry: ModelEntry) -> StoredVersion:
        stored = self.store.get(entry.name, entry.version)
        if stored is None:
            raise ModelNotReadyError(f"model '{entry.name}' version {entry.version} is not installed on this node")
        return stored

    def size(self, entry: ModelEntry) -> int:
        """The signed plaintext length.

        Raises:
            ModelNotReadyError: The version is no longer installed.
        """
        return self._stored(entry).plaintext_length

    def open(self, entry: ModelEntry, intra_op_threads: int) -> OnnxSession:
        """Decrypts the version in memory, checks it against its signed digest and opens it from the bytes.

        Raises:
            ModelNotReadyError: Not installed, not readable, not what was signed, or onnxruntime cannot load it.
        """
        stored = self._stored(entry)
        what = f"model '{entry.name}' version {entry.version}"
        try:
            plaintext = stored.plaintext(self._node_id, self._agreement)
        except IntegrityError as exc:
            raise ModelNotReadyError(f"{what} was refused: {exc.message}") from exc
        except OSError as exc:
            raise ModelNotReadyError(f"{what} cannot be read: {exc.strerror}") from exc
        return OnnxSession(plaintext, intra_op_threads)
