"""The model registry: checks, gates, encrypts and signs model variants into the TUF repository.

Directory layout::

    <registry>/repository/    the TUF repository (the only part the artifact service serves)
    <registry>/registry.sqlite  variants, content keys, signing-key locations (mode 0600)
    <registry>/.lock            serialises writers across processes (publishers, the region's re-signer)

Publishing a model version is all-or-nothing. Everything that can refuse it
runs before anything is written: the name, version and variant names; each
file's validity and its profile's digest; one signature across the variants
(and the declared one, and earlier variants of the same version); duplicates;
the quantization gate. Then, under the lock: content keys and ``pending`` rows
go to the database, the blobs and metadata to the repository (committed by its
timestamp), and the rows are marked ``published``. A crash anywhere leaves the
repository at the previous or the new version; :meth:`ModelRegistry.reconcile`
settles the database with it on the next write.

Rotating root follows the same rule: the new key ids are recorded as pending,
the key files written and fsynced, root N+1 committed, and only then are the
replaced key files retired. A crash anywhere is settled by
:meth:`ModelRegistry.reconcile_root_keys`, which every rotation runs first and last.
"""

from __future__ import annotations

import fcntl
import json
import logging
import re
import secrets
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from securesystemslib.signer import CryptoSigner
from tuf.api.metadata import Root, TargetFile

from services.atomic_files import fsync_directory
from services.errors import (
    ConfigError,
    DuplicateVariantError,
    InvalidArgumentError,
    ModelNotFoundError,
    PreconditionError,
)
from services.inference import ModelSignature
from services.updates.content_encryption import ALGORITHM, encrypt_artifact
from services.updates.variant_facts import (
    AAD_TARGET_PATH,
    Accuracy,
    Encryption,
    GoldenFacts,
    Latency,
    ProfiledWith,
    VariantFacts,
    check_model_ref,
    check_signature,
    check_variant_name,
    golden_path,
    ratio,
    target_path,
)
from tier2_region.registry.model_inspection import ModelFacts
from tier2_region.registry.profiles import VariantProfile
from tier2_region.registry.quantization_gate import DEFAULT_MAX_DROP_POINTS, GateDecision, GateOverride, check_gate
from tier2_region.registry.registry_database import RegistryDatabase, VariantRecord
from tier2_region.registry.signing_keys import (
    ONLINE_KEY_FILE,
    TARGETS_KEY_FILE,
    SigningKeys,
    load_signer,
    move_key_file,
    next_root_key_files,
    private_directory,
    root_key_files,
    write_private_key,
)
from tier2_region.registry.tuf_repository import (
    TARGETS_MAX_LENGTH,
    Clock,
    ExpiryPolicy,
    NewTarget,
    RepositoryState,
    TufRepository,
    metadata_expiries,
    utc_now,
)

log = logging.getLogger("edgecascade.registry")

REPOSITORY_DIR = "repository"
DATABASE_FILE = "registry.sqlite"
LOCK_FILE = ".lock"
TASK_PROPERTY = "edgecascade.task"
RETIRED_ROOT_PREFIX = "retired-root-v"
# Root keys written by a rotation that never committed them.
UNCOMMITTED_ROOT_DIR = "retired-root-uncommitted"
# Settings entry: {key id: file} of the new root keys of a rotation in progress (until it is settled).
PENDING_ROOT_KEYS = "root_rotation_pending"
_ROOT_KEY_FILE = re.compile(r"root-[0-9]+\.pem")

# The name checks are shared with the nodes (services.updates.variant_facts); named here too.
__all__ = [
    "ModelRegistry",
    "PublishRequest",
    "PublishedVariant",
    "RootRotation",
    "VariantSubmission",
    "check_model_ref",
    "check_variant_name",
]


@dataclass(frozen=True)
class VariantSubmission:
    """One variant file offered for publishing, with its profile."""

    variant: str
    facts: ModelFacts
    profile: VariantProfile


@dataclass(frozen=True)
class PublishRequest:
    """A model version's variants to publish together.

    Attributes:
        name: Model name.
        version: Model version (a positive integer).
        variants: The variants; their profiles share one reference.
        hardware_classes: Device classes the variants are meant for.
        min_onnxruntime_version: Oldest runtime that may load them.
        max_drop_points: The quantization gate's limit in accuracy points.
        override: Why to publish variants that fail the gate, or None.
        declared_signature: The inputs and outputs the publisher expects, or None.
    """

    name: str
    version: str
    variants: tuple[VariantSubmission, ...]
    hardware_classes: tuple[str, ...]
    min_onnxruntime_version: str
    max_drop_points: float = DEFAULT_MAX_DROP_POINTS
    override: GateOverride | None = None
    declared_signature: ModelSignature | None = None


@dataclass(frozen=True)
class PublishedVariant:
    """A variant as committed: its target, blob and signed facts."""

    name: str
    version: str
    variant: str
    target_path: str
    golden_path: str
    length: int
    sha256: str
    facts: VariantFacts
    gate: GateDecision | None = None

    @property
    def custom(self) -> dict[str, Any]:
        """The signed ``custom`` field (``facts`` as signed)."""
        return self.facts.to_dict()


@dataclass(frozen=True)
class RootRotation:
    """A committed root rotation.

    Attributes:
        version: The new root version.
        expires: When it expires.
        threshold: Root signatures clients now require.
        key_files: The root key files of the new version (with ``keep_keys``: those at hand).
        retired: Where the replaced root key files were moved.
        reconciled: Where key files left by an interrupted rotation were moved before this one.
    """

    version: int
    expires: datetime
    threshold: int
    key_files: list[Path]
    retired: list[Path]
    reconciled: list[Path] = field(default_factory=list)


class ModelRegistry:
    """Opens a registry directory (creating the database if needed).

    Args:
        directory: The registry directory.
        expiry: Metadata lifetimes used for every new signature.
        clock: Current UTC time (tests pass a fake one).
        targets_max_length: The largest targets metadata a publish may write
            (default :data:`TARGETS_MAX_LENGTH`, a policy cap: every device downloads
            the whole targets metadata after each change).
    """

    def __init__(
        self,
        directory: Path,
        expiry: ExpiryPolicy | None = None,
        clock: Clock = utc_now,
        targets_max_length: int = TARGETS_MAX_LENGTH,
    ) -> None:
        self.directory = directory
        directory.mkdir(parents=True, exist_ok=True)
        self.repository = TufRepository(directory / REPOSITORY_DIR, expiry, clock, targets_max_length)
        self.database = RegistryDatabase(directory / DATABASE_FILE)
        self._clock = clock
        self._warned_targets_version = 0

    def close(self) -> None:
        """Closes the database."""
        self.database.close()

    @property
    def repository_dir(self) -> Path:
        """What the artifact service serves."""
        return self.repository.root

    def exists(self) -> bool:
        """Whether the TUF repository has been created."""
        return self.repository.exists()

    @contextmanager
    def locked(self) -> Iterator[None]:
        """Holds the registry's write lock (blocking); released when the process dies, too."""
        with (self.directory / LOCK_FILE).open("a") as fh:
            fcntl.flock(fh.fileno(), fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(fh.fileno(), fcntl.LOCK_UN)

    def create(self, keys: SigningKeys, root_threshold: int, key_dir: Path, root_key_dir: Path | None) -> None:
        """Creates the empty TUF repository and records where its keys are.

        Raises:
            ConfigError: Keys are missing, the threshold cannot be met, or the repository exists.
        """
        with self.locked():
            self.repository.create(keys, root_threshold)
            rows = [
                ("targets", keys.targets.public_key.keyid if keys.targets else "", str(key_dir / TARGETS_KEY_FILE)),
                (
                    "snapshot+timestamp",
                    keys.online.public_key.keyid if keys.online else "",
                    str(key_dir / ONLINE_KEY_FILE),
                ),
            ]
            root_files = root_key_files(root_key_dir) if root_key_dir else []
            rows += [("root", s.public_key.keyid, str(p)) for s, p in zip(keys.root, root_files, strict=False)]
            self.database.record_signing_keys(rows)
            expiry = self.repository.expiry
            self.database.set_settings(
                {
                    "root_threshold": str(root_threshold),
                    "expiry_seconds": json.dumps(
                        {
                            "root": expiry.root.total_seconds(),
                            "targets": expiry.targets.total_seconds(),
                            "snapshot": expiry.snapshot.total_seconds(),
                            "timestamp": expiry.timestamp.total_seconds(),
                        }
                    ),
                }
            )

    def reconcile(self) -> tuple[list[str], list[str]]:
        """Settles rows left ``pending`` by an interrupted publish against the committed targets.

        Returns:
            ``(published, dropped)`` target paths.
        """
        with self.locked():
            return self._reconcile()

    def _reconcile(self) -> tuple[list[str], list[str]]:
        if not self.repository.exists():
            return [], []
        return self.database.reconcile(set(self.repository.targets()))

    def publish(
        self, request: PublishRequest, keys: SigningKeys, on_step: Callable[[str], None] | None = None
    ) -> list[PublishedVariant]:
        """Publishes a model version's variants in one commit.

        Args:
            request: What to publish.
            keys: The targets key and the online key.
            on_step: Called after each durable step (``pending``, ``blobs``,
                ``targets``, ``snapshot``, ``timestamp``, ``published``).

        Returns:
            The published variants.

        Raises:
            InvalidArgumentError: Bad name, version or variant name; a profile
                that belongs to another file; no variants.
            SignatureMismatchError: Variants disagree on inputs/outputs, or
                differ from the declared signature or earlier variants of this version.
            DuplicateVariantError: A variant is already published.
            QuantizationGateError: A variant fails the gate without an override.
            PreconditionError: The repository does not exist, or the signed
                targets would outgrow the registry's size cap.
            ConfigError: A signing key is missing.
        """
        step = on_step or (lambda _name: None)
        name, version = check_model_ref(request.name, request.version)
        what = f"model '{name}' version {version}"
        if not request.variants:
            raise InvalidArgumentError(f"{what}: nothing to publish; give at least one variant")
        seen: set[str] = set()
        for sub in request.variants:
            check_variant_name(sub.variant)
            if sub.variant in seen:
                raise InvalidArgumentError(f"{what}: variant '{sub.variant}' is given twice")
            seen.add(sub.variant)
            if sub.profile.file_sha256 != sub.facts.sha256:
                raise InvalidArgumentError(
                    f"{what}: the profile given for variant '{sub.variant}' was measured on another file "
                    f"(sha256 {sub.profile.file_sha256[:12]}…, the file is {sub.facts.sha256[:12]}…); profile it again"
                )
        first = request.variants[0]
        for sub in request.variants:
            check_signature(sub.facts.signature, first.facts.signature, f"{what} variant '{sub.variant}'")
            if request.declared_signature is not None:
                check_signature(sub.facts.signature, request.declared_signature, f"{what} variant '{sub.variant}'")
        if not self.repository.exists():
            raise PreconditionError(f"no registry in {self.directory}; create one first (edgecascade model init)")
        decisions = {
            sub.variant: check_gate(what, sub.variant, sub.profile, request.max_drop_points, request.override)
            for sub in request.variants
        }
        with self.locked():
            self._reconcile()
            existing = self.database.variants(name, version)
            for record in existing:
                if record.variant in seen:
                    raise DuplicateVariantError(
                        f"{what} variant '{record.variant}' is already published; published variants are "
                        "immutable, publish a new version instead"
                    )
            if existing:
                earlier = VariantFacts.from_dict(existing[0].custom, existing[0].target_path).signature
                check_signature(
                    first.facts.signature, earlier, f"{what} (as published earlier: '{existing[0].variant}')"
                )
            return self._commit(request, decisions, keys, step)

    def _commit(
        self,
        request: PublishRequest,
        decisions: dict[str, GateDecision],
        keys: SigningKeys,
        step: Callable[[str], None],
    ) -> list[PublishedVariant]:
        now = self._clock().replace(microsecond=0).isoformat()
        targets: list[NewTarget] = []
        records: list[VariantRecord] = []
        content_keys: dict[str, bytes] = {}
        published: list[PublishedVariant] = []
        for sub in request.variants:
            path = target_path(request.name, request.version, sub.variant)
            golden = golden_path(request.name, request.version, sub.variant)
            # The bytes inspected and profiled (``facts.sha256`` is their digest, and the profile was
            # checked against it above), never the file again: it may have been replaced since.
            plaintext = sub.facts.data
            encrypted = encrypt_artifact(plaintext, path)
            key_id = secrets.token_hex(16)
            facts = self._facts(request, sub, decisions[sub.variant], key_id, golden, now)
            custom = facts.to_dict()
            golden_bytes = json.dumps(sub.profile.golden.to_json(), sort_keys=True).encode()
            golden_custom = GoldenFacts(request.name, request.version, sub.variant).to_dict()
            targets += [NewTarget(path, encrypted.blob, custom), NewTarget(golden, golden_bytes, golden_custom)]
            content_keys[key_id] = encrypted.key
            info = TargetFile.from_data(path, encrypted.blob, ["sha256"])
            records.append(
                VariantRecord(
                    request.name,
                    request.version,
                    sub.variant,
                    path,
                    golden,
                    info.hashes["sha256"],
                    info.length,
                    key_id,
                    custom,
                    "pending",
                    now,
                )
            )
            published.append(
                PublishedVariant(
                    request.name,
                    request.version,
                    sub.variant,
                    path,
                    golden,
                    info.length,
                    info.hashes["sha256"],
                    facts,
                    decisions[sub.variant],
                )
            )
        # Refusals of the repository (size limit, duplicates, keys) come before anything is written.
        self.repository.check_targets(targets, keys)
        self.database.add_pending(records, content_keys, ALGORITHM)
        step("pending")
        try:
            self.repository.add_targets(targets, keys, step)
        except BaseException:
            # Not committed (the timestamp was not replaced): drop the pending rows and keys again.
            self._reconcile()
            raise
        self.database.mark_published(r.target_path for r in records)
        step("published")
        return published

    def _facts(
        self,
        request: PublishRequest,
        sub: VariantSubmission,
        decision: GateDecision,
        key_id: str,
        golden: str,
        now: str,
    ) -> VariantFacts:
        """The facts to sign about one variant, checked as every reader will check them.

        Raises:
            IntegrityError: A fact is out of range (a negative measurement): no reader would accept it.
            InvalidArgumentError: A measured ratio is not a finite number.
        """
        profile = sub.profile
        facts = VariantFacts(
            name=request.name,
            version=request.version,
            variant=sub.variant,
            task=sub.facts.properties.get(TASK_PROPERTY, ""),
            properties=dict(sorted(sub.facts.properties.items())),
            plaintext_sha256=sub.facts.sha256,
            plaintext_length=sub.facts.size,
            encryption=Encryption(ALGORITHM, key_id, AAD_TARGET_PATH),
            signature=sub.facts.signature,
            opset=sub.facts.opset,
            max_batch_size=profile.max_batch_size,
            peak_memory={b.batch_size: b.peak_memory_bytes for b in profile.batches},
            latency={b.batch_size: Latency(round(b.latency_p50_us), round(b.latency_p99_us)) for b in profile.batches},
            load_time_us=round(profile.load_time_ms * 1000),
            accuracy=Accuracy(
                metric=profile.metric,
                value=ratio(profile.accuracy),
                reference=ratio(profile.reference_accuracy),
                drop_points=ratio(profile.accuracy_drop_points, 4),
                agreement=ratio(profile.agreement),
                validation_size=profile.validation_size,
                validation_source=profile.validation_source,
            ),
            confidence_threshold=ratio(profile.confidence_threshold),
            confidence_target_accuracy=ratio(profile.target_accuracy),
            hardware_classes=tuple(request.hardware_classes),
            min_onnxruntime_version=request.min_onnxruntime_version,
            golden_vectors=golden,
            gate=decision.facts(),
            profiled_with=ProfiledWith(profile.onnxruntime_version, profile.machine, profile.intra_op_threads),
            published_at=now,
        )
        # Signed only if every reader will accept it.
        VariantFacts.from_dict(facts.to_dict(), target_path(request.name, request.version, sub.variant))
        return facts

    def refresh_online(self, keys: SigningKeys) -> list[str]:
        """Re-signs what is close to expiry (see :meth:`TufRepository.refresh_online`).

        Targets are re-signed here only if ``keys`` holds the targets key; without
        it, targets close to expiry are logged once per targets version (run
        ``edgecascade model resign-targets`` where the targets key is).

        Raises:
            ConfigError: The online key is missing.
            PreconditionError: The repository does not exist.
        """
        with self.locked():
            roles = self.repository.refresh_online(keys)
            if keys.targets is None:
                self._warn_targets_expiry()
            return roles

    def _warn_targets_expiry(self) -> None:
        targets = self.repository.state().targets.signed
        margin = self.repository.expiry.targets_margin
        if targets.expires <= self._clock() + margin and targets.version != self._warned_targets_version:
            self._warned_targets_version = targets.version
            log.warning(
                "the registry's targets metadata expires at %s and this process has no targets key to renew it; "
                "run `edgecascade model resign-targets` before then, or every client refresh will fail",
                targets.expires.isoformat(),
            )

    def resign_targets(self, keys: SigningKeys) -> RepositoryState:
        """Re-signs targets (same targets, new version and expiry), then snapshot and timestamp.

        Raises:
            ConfigError: The targets or online key is missing.
            PreconditionError: The repository does not exist.
        """
        with self.locked():
            self._reconcile()
            return self.repository.resign_targets(keys)

    def rotate_root(
        self,
        root_key_dir: Path,
        *,
        new_key_dir: Path | None = None,
        new_key_count: int = 0,
        threshold: int = 0,
        keep_keys: bool = False,
        on_step: Callable[[str], None] | None = None,
    ) -> RootRotation:
        """Writes root version N+1, signed by a threshold of the current root keys and of the new ones.

        New keys are generated (``root-<k>.pem``, the next free numbers in
        ``new_key_dir``), fsynced with their directory, and only then is root
        N+1 committed; the replaced key files then move to ``retired-root-v<N>/``
        next to them. With ``keep_keys`` the root role stays exactly as it is
        (every key id and the threshold, including keys not at hand) and only
        root's version and expiry change; a threshold of its keys must be in
        ``root_key_dir`` to sign it.

        Every rotation starts and ends with :meth:`reconcile_root_keys`, so one
        interrupted by a crash is settled by the next (or by that method alone).

        Args:
            root_key_dir: Holds (at least a threshold of) the current root keys.
            new_key_dir: Where new root keys go (default: ``root_key_dir``).
            new_key_count: How many new root keys (0: as many as root has now).
            threshold: Root signatures required from now on (0: as now, at most the key count).
            keep_keys: Keep the root role as it is; only renew root's expiry.
            on_step: Called after each durable step (``pending``: the new key ids
                are recorded; ``keys``: their files are on disk; ``root``: root
                N+1 is committed; ``retired``: replaced keys moved, database settled).

        Raises:
            ConfigError: Too few current root keys, an impossible threshold, a key
                file that exists, or ``keep_keys`` with options that change root's keys.
            PreconditionError: The repository does not exist.
        """
        step = on_step or (lambda _name: None)
        if keep_keys and (new_key_dir is not None or new_key_count or threshold):
            raise ConfigError(
                "keeping the root keys keeps root's keys and threshold as they are: "
                "no new key directory, key count or threshold goes with it"
            )
        directories = _distinct([root_key_dir, new_key_dir or root_key_dir])
        with self.locked():
            reconciled = self._reconcile_root_keys(directories)
            old = self.repository.state().root.signed
            role = old.roles[Root.type]
            current = [load_signer(p) for p in root_key_files(root_key_dir)]
            written: list[Path] = []
            if keep_keys:
                root = self.repository.renewed_root(current)
            else:
                count = new_key_count or len(role.keyids)
                if count < 1:
                    raise ConfigError(f"root needs at least one key, got {count}")
                new_keys = [Ed25519PrivateKey.generate() for _ in range(count)]
                new_signers = [CryptoSigner(k) for k in new_keys]
                wanted = threshold or min(role.threshold, count)
                root = self.repository.next_root(current, new_signers, wanted)
                target_dir = new_key_dir or root_key_dir
                paths = next_root_key_files(target_dir, count)
                # Recorded before the files exist: if the commit never happens, reconciling knows them as ours.
                pending = {s.public_key.keyid: str(p) for s, p in zip(new_signers, paths, strict=True)}
                self.database.set_settings({PENDING_ROOT_KEYS: json.dumps(pending, sort_keys=True)})
                step("pending")
                private_directory(target_dir)
                for path, key in zip(paths, new_keys, strict=True):
                    write_private_key(path, key)
                    written.append(path)
                # The new keys' directory entries reach the disk before root N+1 names them.
                fsync_directory(target_dir)
            step("keys")
            self.repository.commit_root(root)
            step("root")
            retired = self._reconcile_root_keys(directories)
            step("retired")
            new_role = root.signed.roles[Root.type]
            files = written or [p for p in root_key_files(root_key_dir) if _keyid(p) in new_role.keyids]
            return RootRotation(
                root.signed.version, root.signed.expires, new_role.threshold, files, retired, reconciled
            )

    def reconcile_root_keys(self, *root_key_dirs: Path) -> list[Path]:
        """Settles root key files and the database with the newest committed root.

        Every root key file the registry knows of (in ``root_key_dirs``, where
        the database says root keys are, and those written by a rotation that
        did not finish) whose key the committed root no longer lists moves to
        ``retired-root-v<N>/`` next to it (N: the last root version that listed
        it), or to ``retired-root-uncommitted/`` if no committed root ever did.
        Both directories are fsynced. Files holding keys no root of this
        registry ever listed, nor a rotation of it wrote, are left alone (a
        directory of another registry's keys is not emptied). Then the database's
        root key rows, root version and threshold are set from the committed root.

        Idempotent; :meth:`rotate_root` runs it first and last.

        Returns:
            Where the moved files are now.

        Raises:
            ConfigError: A root key file cannot be loaded.
            PreconditionError: The repository does not exist.
        """
        with self.locked():
            return self._reconcile_root_keys(_distinct(list(root_key_dirs)))

    def _reconcile_root_keys(self, directories: list[Path]) -> list[Path]:
        root = self.repository.state().root.signed
        keyids = root.roles[Root.type].keyids
        history = self.repository.root_key_history()
        pending: dict[str, str] = json.loads(self.database.settings().get(PENDING_ROOT_KEYS, "{}"))
        known = {keyid: location for role, keyid, location in self.database.signing_keys() if role == Root.type}
        candidates = [p for d in directories for p in root_key_files(d)]
        candidates += [Path(location) for location in [*known.values(), *pending.values()] if location]
        locations: dict[str, str] = {}
        moved: list[Path] = []
        touched: list[Path] = []
        for path in dict.fromkeys(candidates):
            if not _ROOT_KEY_FILE.fullmatch(path.name) or path.parent.name.startswith("retired-root-"):
                continue
            if not path.is_file():
                continue
            keyid = _keyid(path)
            if keyid in keyids:
                locations.setdefault(keyid, str(path))
                continue
            if keyid in history:
                retired_dir = path.parent / f"{RETIRED_ROOT_PREFIX}{history[keyid]}"
            elif pending.get(keyid) == str(path):
                retired_dir = path.parent / UNCOMMITTED_ROOT_DIR
            else:
                continue  # never a key of this registry: not ours to move
            moved.append(move_key_file(path, retired_dir))
            touched += [retired_dir, path.parent]
        for directory in dict.fromkeys(touched):
            fsync_directory(directory)
        if moved:
            log.warning("moved root keys the committed root %d does not list: %s", root.version, moved)
        rows = [(Root.type, k, locations.get(k) or known.get(k, "")) for k in keyids]
        self.database.replace_signing_keys(Root.type, [row for row in rows if row[2]])
        self.database.set_settings(
            {
                "root_version": str(root.version),
                "root_threshold": str(root.roles[Root.type].threshold),
                PENDING_ROOT_KEYS: "{}",
            }
        )
        return moved

    def expiries(self) -> dict[str, datetime]:
        """When each top-level role's committed metadata expires.

        Raises:
            PreconditionError: The repository does not exist.
        """
        return metadata_expiries(self.repository.state())

    def variants(self, name: str = "", version: str = "") -> list[VariantRecord]:
        """Published variants, optionally of one model (and version)."""
        return self.database.variants(name, version)

    def target(self, name: str, version: str, variant: str) -> TargetFile:
        """The committed, signed target info of one variant.

        Raises:
            ModelNotFoundError: No such variant is committed.
        """
        path = target_path(name, version, variant)
        found = self.repository.targets().get(path)
        if found is None:
            raise ModelNotFoundError(f"{path} is not in the registry")
        return found


def _keyid(path: Path) -> str:
    return load_signer(path).public_key.keyid


def _distinct(directories: list[Path]) -> list[Path]:
    return list(dict.fromkeys(directories))
