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
"""

from __future__ import annotations

import fcntl
import json
import re
import secrets
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tuf.api.metadata import TargetFile

from services.errors import (
    DuplicateVariantError,
    InvalidArgumentError,
    ModelNotFoundError,
    PreconditionError,
)
from services.inference import ModelSignature
from services.model_repository import check_model_name, check_version
from services.registry.content_encryption import ALGORITHM, encrypt_artifact
from services.registry.model_inspection import ModelFacts, check_signature, signature_from_json, signature_to_json
from services.registry.profiles import VariantProfile
from services.registry.quantization_gate import DEFAULT_MAX_DROP_POINTS, GateDecision, GateOverride, check_gate
from services.registry.registry_database import RegistryDatabase, VariantRecord
from services.registry.signing_keys import (
    ONLINE_KEY_FILE,
    TARGETS_KEY_FILE,
    SigningKeys,
    root_key_files,
)
from services.registry.tuf_repository import Clock, ExpiryPolicy, NewTarget, TufRepository, utc_now

REPOSITORY_DIR = "repository"
DATABASE_FILE = "registry.sqlite"
LOCK_FILE = ".lock"
SCHEMA = "edgecascade.model/1"
TASK_PROPERTY = "edgecascade.task"

_VARIANT = re.compile(r"^[a-z0-9][a-z0-9_-]{0,31}$")


def check_variant_name(variant: str) -> str:
    """Returns ``variant`` if it is a valid variant name (``fp32``, ``int8``, ``int8-per-channel`` …).

    Raises:
        InvalidArgumentError: It is not 1-32 lower-case letters, digits, '_' or '-'.
    """
    if not _VARIANT.match(variant):
        raise InvalidArgumentError(
            f"variant name {variant!r} is not valid: use 1-32 lower-case letters, digits, '_' or '-', "
            "starting with a letter or digit"
        )
    return variant


def target_path(name: str, version: str, variant: str) -> str:
    """The TUF target path of a model variant's encrypted blob."""
    return f"models/{name}/{version}/{variant}"


def golden_path(name: str, version: str, variant: str) -> str:
    """The TUF target path of a variant's golden vectors."""
    return f"models/{name}/{version}/{variant}.golden.json"


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
    """A variant as committed: its target, blob and signed custom fields."""

    name: str
    version: str
    variant: str
    target_path: str
    golden_path: str
    length: int
    sha256: str
    custom: dict[str, Any] = field(default_factory=dict)
    gate: GateDecision | None = None


class ModelRegistry:
    """Opens a registry directory (creating the database if needed).

    Args:
        directory: The registry directory.
        expiry: Metadata lifetimes used for every new signature.
        clock: Current UTC time (tests pass a fake one).
    """

    def __init__(self, directory: Path, expiry: ExpiryPolicy | None = None, clock: Clock = utc_now) -> None:
        self.directory = directory
        directory.mkdir(parents=True, exist_ok=True)
        self.repository = TufRepository(directory / REPOSITORY_DIR, expiry, clock)
        self.database = RegistryDatabase(directory / DATABASE_FILE)
        self._clock = clock

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
            PreconditionError: The repository does not exist.
            ConfigError: A signing key is missing.
        """
        step = on_step or (lambda _name: None)
        name, version = check_model_name(request.name), check_version(request.version)
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
                earlier = signature_from_json(existing[0].custom["signature"], "the registry")
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
            encrypted = encrypt_artifact(sub.facts.path.read_bytes(), path)
            key_id = secrets.token_hex(16)
            custom = self._custom(request, sub, decisions[sub.variant], key_id, golden, now)
            golden_bytes = json.dumps(sub.profile.golden.to_json(), sort_keys=True).encode()
            golden_custom = {
                "schema": SCHEMA,
                "kind": "golden_vectors",
                "name": request.name,
                "version": request.version,
                "variant": sub.variant,
            }
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
                    custom,
                    decisions[sub.variant],
                )
            )
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

    def _custom(
        self,
        request: PublishRequest,
        sub: VariantSubmission,
        decision: GateDecision,
        key_id: str,
        golden: str,
        now: str,
    ) -> dict[str, Any]:
        profile = sub.profile
        # TUF's canonical JSON has no floats: measured quantities are integers in
        # named units, ratios are decimal strings.
        return {
            "schema": SCHEMA,
            "kind": "model",
            "name": request.name,
            "version": request.version,
            "variant": sub.variant,
            "task": sub.facts.properties.get(TASK_PROPERTY, ""),
            "properties": dict(sorted(sub.facts.properties.items())),
            "plaintext_sha256": sub.facts.sha256,
            "plaintext_length": sub.facts.size,
            "encryption": {"algorithm": ALGORITHM, "key_id": key_id, "aad": "target_path"},
            "signature": signature_to_json(sub.facts.signature),
            "opset": sub.facts.opset,
            "max_batch_size": profile.max_batch_size,
            "peak_memory_bytes": {str(b.batch_size): b.peak_memory_bytes for b in profile.batches},
            "latency_us": {
                str(b.batch_size): {"p50": round(b.latency_p50_us), "p99": round(b.latency_p99_us)}
                for b in profile.batches
            },
            "load_time_us": round(profile.load_time_ms * 1000),
            "accuracy": {
                "metric": profile.metric,
                "value": decimal(profile.accuracy),
                "reference": decimal(profile.reference_accuracy),
                "drop_points": decimal(profile.accuracy_drop_points, 4),
                "agreement": decimal(profile.agreement),
                "validation_size": profile.validation_size,
                "validation_source": profile.validation_source,
            },
            "confidence_threshold": decimal(profile.confidence_threshold),
            "confidence_target_accuracy": decimal(profile.target_accuracy),
            "hardware_classes": list(request.hardware_classes),
            "min_onnxruntime_version": request.min_onnxruntime_version,
            "golden_vectors": golden,
            "gate": decision.to_json(),
            "profiled_with": {
                "onnxruntime": profile.onnxruntime_version,
                "machine": profile.machine,
                "intra_op_threads": profile.intra_op_threads,
            },
            "published_at": now,
        }

    def refresh_online(self, keys: SigningKeys) -> list[str]:
        """Re-signs snapshot and timestamp if they are close to expiry (see :meth:`TufRepository.refresh_online`).

        Raises:
            ConfigError: The online key is missing.
            PreconditionError: The repository does not exist.
        """
        with self.locked():
            return self.repository.refresh_online(keys)

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


def decimal(value: float, places: int = 6) -> str:
    """A ratio as the decimal string signed metadata carries (canonical JSON has no floats)."""
    return f"{value:.{places}f}"
