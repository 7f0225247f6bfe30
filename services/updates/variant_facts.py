"""What the region signs about a model variant, as every tier reads it.

A variant is the TUF target ``models/<name>/<version>/<variant>`` (its encrypted
blob) with golden vectors beside it; its signed ``custom`` field carries the
facts a node needs to decide and to verify (schema :data:`SCHEMA`). This
module is the one place that knows that field:

* :class:`VariantFacts` is the blob's ``custom`` field as a frozen type; the
  registry builds one and signs :meth:`VariantFacts.to_dict`, every reader
  parses it with :meth:`VariantFacts.from_dict`. :class:`GoldenFacts` is the
  same for the golden vectors' target.
* ``from_dict`` checks every field's type and range and refuses the first bad
  one with an :class:`~services.errors.IntegrityError` naming it (signed data
  that does not parse is an integrity problem). Top-level keys it does not know
  are kept in ``unrecognized`` and written back by ``to_dict`` (as python-tuf's
  ``TargetFile.unrecognized_fields``), so a newer registry's extra facts
  survive a round trip: ``from_dict(d).to_dict() == d`` for every accepted ``d``
  whose nested objects hold only known keys (unknown keys inside them are ignored).
* TUF's canonical JSON has no floats: measured quantities are integers in named
  units (bytes, µs), ratios are decimal strings, held here as exact
  :class:`~decimal.Decimal` values so that they are written back unchanged.
* The checks of names that form target paths (model name, version, variant),
  of digests that become file names, and of model signatures live here too, so
  that the registry and the nodes apply the same ones.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any

from services.engine.model_repository import check_model_name, check_version
from services.errors import EdgecascadeError, IntegrityError, InvalidArgumentError, SignatureMismatchError
from services.inference import ModelSignature, TensorSpec
from services.tensors import DATATYPES

SCHEMA = "edgecascade.model/1"
MODEL_KIND = "model"
GOLDEN_KIND = "golden_vectors"
# The encryption's associated data: the blob's own target path (a blob moved to another path does not decrypt).
AAD_TARGET_PATH = "target_path"

# Matched with fullmatch: ``$`` would also accept a name followed by a newline.
_VARIANT = re.compile(r"[a-z0-9][a-z0-9_-]{0,31}")
_SHA256_HEX = re.compile(r"[0-9a-f]{64}")
# Decimal strings as written by ``f"{x:.6f}"``: no exponent, no leading zeros, so they are written back unchanged.
_DECIMAL = re.compile(r"-?(0|[1-9][0-9]*)(\.[0-9]+)?")
_BATCH_SIZE = re.compile(r"[1-9][0-9]*")


def target_path(name: str, version: str, variant: str) -> str:
    """The TUF target path of a model variant's encrypted blob."""
    return f"models/{name}/{version}/{variant}"


def golden_path(name: str, version: str, variant: str) -> str:
    """The TUF target path of a variant's golden vectors."""
    return f"models/{name}/{version}/{variant}.golden.json"


def check_variant_name(variant: str) -> str:
    """Returns ``variant`` if it is a valid variant name (``fp32``, ``int8``, ``int8-per-channel`` …).

    Raises:
        InvalidArgumentError: It is not 1-32 lower-case letters, digits, '_' or '-'.
    """
    if not _VARIANT.fullmatch(variant):
        raise InvalidArgumentError(
            f"variant name {variant!r} is not valid: use 1-32 lower-case letters, digits, '_' or '-', "
            "starting with a letter or digit"
        )
    return variant


def check_model_ref(name: str, version: str) -> tuple[str, str]:
    """Returns ``(name, version)`` if both are valid in a target path.

    The name as :func:`check_model_name` takes it (matched in full, so no
    trailing newline); the version as :func:`check_version` does (ASCII digits
    only: ``str.isdigit`` alone would take ``"¹"``).

    Raises:
        InvalidArgumentError: Either is not valid.
    """
    return check_model_name(name), check_version(version)


def is_sha256(value: object) -> bool:
    """Whether ``value`` is a sha256 digest as written in metadata and file names: 64 lowercase hex characters."""
    return isinstance(value, str) and _SHA256_HEX.fullmatch(value) is not None


def ratio(value: float, places: int = 6) -> Decimal:
    """A measured ratio as signed metadata carries it: a decimal of ``places`` places (canonical JSON has no floats).

    Raises:
        InvalidArgumentError: ``value`` is not a finite number (no reader would accept it).
    """
    if not math.isfinite(value):
        raise InvalidArgumentError(f"a measured ratio must be a finite number to be signed, got {value}")
    return Decimal(f"{value:.{places}f}")


def signature_to_json(signature: ModelSignature) -> dict[str, list[dict[str, Any]]]:
    """The signature as JSON-ready data (what is signed into a target's ``custom``)."""

    def side(specs: Sequence[TensorSpec]) -> list[dict[str, Any]]:
        return [{"name": s.name, "datatype": s.datatype, "shape": list(s.shape)} for s in specs]

    return {"inputs": side(signature.inputs), "outputs": side(signature.outputs)}


def signature_from_json(data: Mapping[str, Any], where: str) -> ModelSignature:
    """Parses a declared signature: ``{"inputs": [{name, datatype, shape}], "outputs": [...]}``.

    Args:
        data: The parsed JSON.
        where: Names the source in error messages.

    Raises:
        InvalidArgumentError: The data does not have that shape (as :class:`SignatureMismatchError`).
    """

    def side(key: str) -> tuple[TensorSpec, ...]:
        items = data.get(key)
        if not isinstance(items, list):
            raise SignatureMismatchError(f"{where}: '{key}' must be a list of {{name, datatype, shape}}")
        specs = []
        for item in items:
            if not isinstance(item, dict) or not isinstance(item.get("name"), str):
                raise SignatureMismatchError(f"{where}: every entry of '{key}' needs a string 'name'")
            datatype = item.get("datatype")
            if datatype not in DATATYPES:
                raise SignatureMismatchError(
                    f"{where}: {key} '{item['name']}' has datatype {datatype!r}; expected one of "
                    f"{', '.join(sorted(DATATYPES))}"
                )
            shape = item.get("shape")
            if not isinstance(shape, list) or not all(isinstance(d, int) and d >= -1 for d in shape):
                raise SignatureMismatchError(
                    f"{where}: {key} '{item['name']}' needs 'shape' as a list of integers (-1 for any size)"
                )
            specs.append(TensorSpec(item["name"], datatype, tuple(shape)))
        return tuple(specs)

    return ModelSignature(inputs=side("inputs"), outputs=side("outputs"))


def check_signature(actual: ModelSignature, declared: ModelSignature, what: str) -> None:
    """Refuses a model whose inputs or outputs differ from the declared ones.

    Raises:
        SignatureMismatchError: A tensor is missing, extra, or differs in datatype or shape.
    """
    for side, have, want in (("input", actual.inputs, declared.inputs), ("output", actual.outputs, declared.outputs)):
        have_by_name = {s.name: s for s in have}
        want_by_name = {s.name: s for s in want}
        for name in want_by_name.keys() - have_by_name.keys():
            raise SignatureMismatchError(
                f"{what} has no {side} '{name}' although it was declared; it has {', '.join(sorted(have_by_name))}"
            )
        for name in have_by_name.keys() - want_by_name.keys():
            raise SignatureMismatchError(f"{what} has an undeclared {side} '{name}'")
        for name, spec in want_by_name.items():
            got = have_by_name[name]
            if got.datatype != spec.datatype or got.shape != spec.shape:
                raise SignatureMismatchError(
                    f"{what} {side} '{name}' is {got.datatype} {list(got.shape)}, "
                    f"declared {spec.datatype} {list(spec.shape)}"
                )


def _decimal_text(value: Decimal) -> str:
    # Fixed-point, exactly the digits parsed or made by ratio(): never an exponent.
    return format(value, "f")


class _Fields:
    """One signed JSON object being read: each getter checks a field's type and names the field it refuses.

    Args:
        data: The object.
        where: Names the target in messages (``models/lm/1/int8``).
        prefix: The object's own place (``accuracy.``), for nested objects.

    Raises:
        IntegrityError: ``data`` is not a JSON object.
    """

    def __init__(self, data: object, where: str, prefix: str = "") -> None:
        self._where = where
        self._prefix = prefix
        if not isinstance(data, Mapping):
            raise IntegrityError(f"{where}: signed field '{prefix.rstrip('.') or 'custom'}' must be a JSON object")
        self._data: Mapping[str, Any] = data
        self._read: set[str] = set()

    def error(self, key: str, problem: str) -> IntegrityError:
        """The error for field ``key``."""
        return IntegrityError(f"{self._where}: signed field '{self._prefix}{key}' {problem}")

    def raw(self, key: str) -> Any:
        """The value of a required field, unchecked.

        Raises:
            IntegrityError: The field is missing.
        """
        if key not in self._data:
            raise self.error(key, "is missing")
        self._read.add(key)
        return self._data[key]

    def text(self, key: str) -> str:
        """A string field."""
        value = self.raw(key)
        if not isinstance(value, str):
            raise self.error(key, f"must be a string, got {_shown(value)}")
        return value

    def integer(self, key: str, minimum: int = 0) -> int:
        """An integer field of at least ``minimum`` (a JSON boolean is not an integer)."""
        value = self.raw(key)
        if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
            kind = "a non-negative integer" if minimum == 0 else f"an integer of at least {minimum}"
            raise self.error(key, f"must be {kind}, got {_shown(value)}")
        return value

    def decimal(self, key: str) -> Decimal:
        """A decimal-string field (``"0.500000"``, ``"-1.2500"``)."""
        value = self.raw(key)
        if not isinstance(value, str) or not _DECIMAL.fullmatch(value):
            raise self.error(key, f'must be a decimal string such as "0.500000", got {_shown(value)}')
        return Decimal(value)

    def flag(self, key: str) -> bool:
        """A boolean field."""
        value = self.raw(key)
        if not isinstance(value, bool):
            raise self.error(key, f"must be true or false, got {_shown(value)}")
        return value

    def texts(self, key: str) -> tuple[str, ...]:
        """A list of strings."""
        value = self.raw(key)
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise self.error(key, f"must be a list of strings, got {_shown(value)}")
        return tuple(value)

    def text_map(self, key: str) -> dict[str, str]:
        """An object of strings."""
        value = self.raw(key)
        if not isinstance(value, Mapping) or not all(isinstance(v, str) for v in value.values()):
            raise self.error(key, f"must be an object of strings, got {_shown(value)}")
        return dict(value)

    def nested(self, key: str) -> _Fields:
        """A nested object, read with its own getters (its fields named ``key.field``)."""
        return _Fields(self.raw(key), self._where, f"{self._prefix}{key}.")

    def by_batch_size(self, key: str) -> Iterator[tuple[int, str, _Fields]]:
        """An object keyed by batch size (``{"1": …, "8": …}``): yields ``(size, key, the object as fields)``."""
        table = self.nested(key)
        for size in table.names():
            if not isinstance(size, str) or not _BATCH_SIZE.fullmatch(size):
                raise table.error(size, "is not a batch size (a positive integer without leading zeros)")
            yield int(size), size, table

    def names(self) -> list[str]:
        """Every field name of the object."""
        return list(self._data)

    def matches(self, key: str, expected: str, problem: str) -> None:
        """Refuses field ``key`` unless it is ``expected``."""
        value = self.raw(key)
        if value != expected:
            raise self.error(key, f"is {_shown(value)}, not {expected!r}: {problem}")

    def checked(self, key: str, check: Callable[[str], object]) -> str:
        """A string field that ``check`` accepts (it raises an edgecascade error otherwise)."""
        value = self.text(key)
        try:
            check(value)
        except EdgecascadeError as exc:
            raise self.error(key, f"is not valid: {exc.message}") from None
        return value

    def unread(self) -> dict[str, Any]:
        """The fields no getter asked for, in their order: kept, not interpreted."""
        return {k: v for k, v in self._data.items() if k not in self._read}


def _shown(value: object) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


@dataclass(frozen=True)
class Encryption:
    """How the blob is encrypted: the algorithm, the id of its content key, and what its associated data is."""

    algorithm: str
    key_id: str
    aad: str = AAD_TARGET_PATH

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form."""
        return {"algorithm": self.algorithm, "key_id": self.key_id, "aad": self.aad}

    @classmethod
    def _read(cls, f: _Fields) -> Encryption:
        return cls(f.text("algorithm"), f.text("key_id"), f.text("aad"))


@dataclass(frozen=True)
class Latency:
    """Latency percentiles at one batch size, in microseconds."""

    p50: int
    p99: int

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form."""
        return {"p50": self.p50, "p99": self.p99}

    @classmethod
    def _read(cls, f: _Fields) -> Latency:
        return cls(f.integer("p50"), f.integer("p99"))


@dataclass(frozen=True)
class Accuracy:
    """The variant measured against its reference on one validation set.

    Attributes:
        metric: What was measured (``next_char_top1``, ``top1``).
        value: The variant's accuracy (a ratio).
        reference: The reference's accuracy on the same set.
        drop_points: ``reference - value`` in percentage points (negative: gained).
        agreement: How often the variant's prediction equals the reference's.
        validation_size: Rows in the validation set.
        validation_source: Where the validation set came from.
    """

    metric: str
    value: Decimal
    reference: Decimal
    drop_points: Decimal
    agreement: Decimal
    validation_size: int
    validation_source: str

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form."""
        return {
            "metric": self.metric,
            "value": _decimal_text(self.value),
            "reference": _decimal_text(self.reference),
            "drop_points": _decimal_text(self.drop_points),
            "agreement": _decimal_text(self.agreement),
            "validation_size": self.validation_size,
            "validation_source": self.validation_source,
        }

    @classmethod
    def _read(cls, f: _Fields) -> Accuracy:
        return cls(
            metric=f.text("metric"),
            value=f.decimal("value"),
            reference=f.decimal("reference"),
            drop_points=f.decimal("drop_points"),
            agreement=f.decimal("agreement"),
            validation_size=f.integer("validation_size"),
            validation_source=f.text("validation_source"),
        )


@dataclass(frozen=True)
class GateOverride:
    """Why a variant that failed the quantization gate was published anyway: reason, who, when (ISO 8601)."""

    reason: str
    by: str
    at: str

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form."""
        return {"reason": self.reason, "by": self.by, "at": self.at}

    @classmethod
    def _read(cls, f: _Fields) -> GateOverride:
        return cls(f.text("reason"), f.text("by"), f.text("at"))


@dataclass(frozen=True)
class GateFacts:
    """The quantization gate's signed verdict on a variant.

    Attributes:
        drop_points: The variant's accuracy drop, in percentage points.
        max_drop_points: The largest drop the gate allowed.
        passed: Whether the drop was within the limit.
        override: Why it was published although it failed, or None.
    """

    drop_points: Decimal
    max_drop_points: Decimal
    passed: bool
    override: GateOverride | None = None

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form (``override`` is written as null when there is none)."""
        return {
            "drop_points": _decimal_text(self.drop_points),
            "max_drop_points": _decimal_text(self.max_drop_points),
            "passed": self.passed,
            "override": None if self.override is None else self.override.to_dict(),
        }

    @classmethod
    def _read(cls, f: _Fields) -> GateFacts:
        override = None if f.raw("override") is None else GateOverride._read(f.nested("override"))
        return cls(f.decimal("drop_points"), f.decimal("max_drop_points"), f.flag("passed"), override)


@dataclass(frozen=True)
class ProfiledWith:
    """Where the variant was profiled: onnxruntime version, machine, intra-op threads."""

    onnxruntime: str
    machine: str
    intra_op_threads: int

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form."""
        return {"onnxruntime": self.onnxruntime, "machine": self.machine, "intra_op_threads": self.intra_op_threads}

    @classmethod
    def _read(cls, f: _Fields) -> ProfiledWith:
        return cls(f.text("onnxruntime"), f.text("machine"), f.integer("intra_op_threads"))


@dataclass(frozen=True)
class VariantFacts:
    """The signed ``custom`` field of a model variant's target (schema :data:`SCHEMA`, kind ``model``).

    Python names follow the JSON keys, except the two tables keyed by batch
    size: ``peak_memory`` (JSON ``peak_memory_bytes``) and ``latency`` (JSON
    ``latency_us``), so that :meth:`peak_memory_bytes` can take a batch size.

    Attributes:
        name: Model name.
        version: Model version (a positive integer, as text).
        variant: Variant name (``fp32``, ``int8`` …).
        task: The model's ``edgecascade.task`` property (``char-lm``), or "".
        properties: The model's ``edgecascade.*`` metadata properties.
        plaintext_sha256: Digest of the decrypted ONNX file.
        plaintext_length: Its length in bytes.
        encryption: How the blob is encrypted.
        signature: The model's inputs and outputs.
        opset: The ``ai.onnx`` opset it imports.
        max_batch_size: The largest batch size profiled.
        peak_memory: Peak memory in bytes by profiled batch size.
        latency: Latency percentiles by profiled batch size.
        load_time_us: Time to load the model, in microseconds.
        accuracy: Accuracy against the reference.
        confidence_threshold: Confidence above which the variant's predictions are kept.
        confidence_target_accuracy: The accuracy kept predictions reach.
        hardware_classes: Device classes the variant is meant for.
        min_onnxruntime_version: Oldest onnxruntime that may load it.
        golden_vectors: Target path of its golden vectors.
        gate: The quantization gate's verdict.
        profiled_with: Where it was profiled.
        published_at: When it was published (ISO 8601, UTC).
        unrecognized: Fields this version does not know, kept to be written back.
    """

    name: str
    version: str
    variant: str
    task: str
    properties: Mapping[str, str]
    plaintext_sha256: str
    plaintext_length: int
    encryption: Encryption
    signature: ModelSignature
    opset: int
    max_batch_size: int
    peak_memory: Mapping[int, int]
    latency: Mapping[int, Latency]
    load_time_us: int
    accuracy: Accuracy
    confidence_threshold: Decimal
    confidence_target_accuracy: Decimal
    hardware_classes: tuple[str, ...]
    min_onnxruntime_version: str
    golden_vectors: str
    gate: GateFacts
    profiled_with: ProfiledWith
    published_at: str
    unrecognized: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        clash = set(self.unrecognized) & _VARIANT_KEYS
        if clash:
            raise ValueError(f"unrecognized fields may not repeat known ones: {sorted(clash)}")

    @property
    def target_path(self) -> str:
        """The target path of the variant's encrypted blob, from its name, version and variant."""
        return target_path(self.name, self.version, self.variant)

    @property
    def threshold(self) -> float:
        """:attr:`confidence_threshold` as a float, what a cascade compares confidences with."""
        return float(self.confidence_threshold)

    def peak_memory_bytes(self, batch_size: int) -> int | None:
        """Signed peak memory at a profiled batch size, or None if that size was not profiled."""
        return self.peak_memory.get(batch_size)

    def latency_us(self, batch_size: int) -> Latency | None:
        """Signed latency percentiles at a profiled batch size, or None if that size was not profiled."""
        return self.latency.get(batch_size)

    def to_dict(self) -> dict[str, Any]:
        """The signed ``custom`` field: what :meth:`from_dict` read, unrecognized fields included."""
        return {
            "schema": SCHEMA,
            "kind": MODEL_KIND,
            "name": self.name,
            "version": self.version,
            "variant": self.variant,
            "task": self.task,
            "properties": dict(self.properties),
            "plaintext_sha256": self.plaintext_sha256,
            "plaintext_length": self.plaintext_length,
            "encryption": self.encryption.to_dict(),
            "signature": signature_to_json(self.signature),
            "opset": self.opset,
            "max_batch_size": self.max_batch_size,
            "peak_memory_bytes": {str(b): v for b, v in self.peak_memory.items()},
            "latency_us": {str(b): v.to_dict() for b, v in self.latency.items()},
            "load_time_us": self.load_time_us,
            "accuracy": self.accuracy.to_dict(),
            "confidence_threshold": _decimal_text(self.confidence_threshold),
            "confidence_target_accuracy": _decimal_text(self.confidence_target_accuracy),
            "hardware_classes": list(self.hardware_classes),
            "min_onnxruntime_version": self.min_onnxruntime_version,
            "golden_vectors": self.golden_vectors,
            "gate": self.gate.to_dict(),
            "profiled_with": self.profiled_with.to_dict(),
            "published_at": self.published_at,
            **self.unrecognized,
        }

    @classmethod
    def from_dict(cls, data: object, where: str = "model variant") -> VariantFacts:
        """Reads and checks a variant's signed ``custom`` field.

        Args:
            data: The parsed ``custom`` field.
            where: Names the target in error messages (its path).

        Raises:
            IntegrityError: ``data`` is not an object; the schema is not
                :data:`SCHEMA` or the kind not ``model``; or a field is
                missing, of the wrong type or out of range (named in the message).
        """
        f = _Fields(data, where)
        f.matches("schema", SCHEMA, "written by another version of edgecascade")
        f.matches("kind", MODEL_KIND, "not a model variant published by edgecascade")
        digest = f.text("plaintext_sha256")
        if not is_sha256(digest):
            raise f.error("plaintext_sha256", f"must be 64 lowercase hex characters, got {_shown(digest)}")
        signature = f.raw("signature")
        if not isinstance(signature, Mapping):
            raise f.error("signature", "must be an object of inputs and outputs")
        try:
            parsed = signature_from_json(signature, f"{where}: signed field 'signature'")
        except SignatureMismatchError as exc:
            raise IntegrityError(exc.message) from None
        return cls(
            name=f.checked("name", check_model_name),
            version=f.checked("version", check_version),
            variant=f.checked("variant", check_variant_name),
            task=f.text("task"),
            properties=f.text_map("properties"),
            plaintext_sha256=digest,
            plaintext_length=f.integer("plaintext_length"),
            encryption=Encryption._read(f.nested("encryption")),
            signature=parsed,
            opset=f.integer("opset"),
            max_batch_size=f.integer("max_batch_size", minimum=1),
            peak_memory={size: t.integer(key) for size, key, t in f.by_batch_size("peak_memory_bytes")},
            latency={size: Latency._read(t.nested(key)) for size, key, t in f.by_batch_size("latency_us")},
            load_time_us=f.integer("load_time_us"),
            accuracy=Accuracy._read(f.nested("accuracy")),
            confidence_threshold=f.decimal("confidence_threshold"),
            confidence_target_accuracy=f.decimal("confidence_target_accuracy"),
            hardware_classes=f.texts("hardware_classes"),
            min_onnxruntime_version=f.text("min_onnxruntime_version"),
            golden_vectors=f.text("golden_vectors"),
            gate=GateFacts._read(f.nested("gate")),
            profiled_with=ProfiledWith._read(f.nested("profiled_with")),
            published_at=f.text("published_at"),
            unrecognized=f.unread(),
        )


_VARIANT_KEYS = frozenset(
    {
        "schema", "kind", "name", "version", "variant", "task", "properties", "plaintext_sha256",
        "plaintext_length", "encryption", "signature", "opset", "max_batch_size", "peak_memory_bytes",
        "latency_us", "load_time_us", "accuracy", "confidence_threshold", "confidence_target_accuracy",
        "hardware_classes", "min_onnxruntime_version", "golden_vectors", "gate", "profiled_with", "published_at",
    }
)  # fmt: skip


@dataclass(frozen=True)
class GoldenFacts:
    """The signed ``custom`` field of a variant's golden vectors' target (kind ``golden_vectors``).

    Attributes:
        name: Model name.
        version: Model version.
        variant: The variant the vectors were computed with.
        unrecognized: Fields this version does not know, kept to be written back.
    """

    name: str
    version: str
    variant: str
    unrecognized: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        clash = set(self.unrecognized) & _GOLDEN_KEYS
        if clash:
            raise ValueError(f"unrecognized fields may not repeat known ones: {sorted(clash)}")

    @property
    def target_path(self) -> str:
        """The target path of the golden vectors."""
        return golden_path(self.name, self.version, self.variant)

    def to_dict(self) -> dict[str, Any]:
        """The signed ``custom`` field."""
        return {
            "schema": SCHEMA,
            "kind": GOLDEN_KIND,
            "name": self.name,
            "version": self.version,
            "variant": self.variant,
            **self.unrecognized,
        }

    @classmethod
    def from_dict(cls, data: object, where: str = "golden vectors") -> GoldenFacts:
        """Reads and checks a golden-vectors target's signed ``custom`` field.

        Raises:
            IntegrityError: Not an object, another schema or kind, or a bad name, version or variant.
        """
        f = _Fields(data, where)
        f.matches("schema", SCHEMA, "written by another version of edgecascade")
        f.matches("kind", GOLDEN_KIND, "not golden vectors published by edgecascade")
        return cls(
            name=f.checked("name", check_model_name),
            version=f.checked("version", check_version),
            variant=f.checked("variant", check_variant_name),
            unrecognized=f.unread(),
        )


_GOLDEN_KEYS = frozenset({"schema", "kind", "name", "version", "variant"})
