"""The publish pipeline end to end: inspect → (quantize) → profile → gate → encrypt → sign → publish.

What the ``edgecascade model`` commands and ``edgecascade up`` run. Every
check that can refuse a model (valid ONNX, signatures, profiles that match the
files) runs before the first profiling process starts, and everything before
:meth:`ModelRegistry.publish` is read-only, so a refused model changes nothing.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from services.errors import InvalidArgumentError
from services.inference import ModelSignature
from services.updates.checkin import machine_hardware_class
from tier2_region.registry.model_inspection import ModelFacts, check_signature, inspect_model
from tier2_region.registry.profiler import ProfileSettings, profile_variants
from tier2_region.registry.profiles import VariantProfile
from tier2_region.registry.quantization_gate import DEFAULT_MAX_DROP_POINTS, GateOverride
from tier2_region.registry.registry import (
    ModelRegistry,
    PublishedVariant,
    PublishRequest,
    VariantSubmission,
    check_variant_name,
)
from tier2_region.registry.signing_keys import SigningKeys
from tier2_region.registry.validation_sets import (
    ValidationSet,
    char_lm_tokenizer,
    char_lm_validation,
    load_validation,
    stdlib_heldout_docstrings,
    synthetic_validation,
)

DEFAULT_VALIDATION_ROWS = 4000


def default_hardware_class() -> str:
    """The hardware class of this machine (``cpu-x86_64``): where the profile was measured."""
    return machine_hardware_class()


@dataclass(frozen=True)
class ValidationChoice:
    """Where validation rows come from (see :func:`build_validation`)."""

    npz: Path | None = None
    heldout_docs: Sequence[str] | None = None
    heldout_source: str = ""
    rows: int = DEFAULT_VALIDATION_ROWS


@dataclass(frozen=True)
class PipelineOptions:
    """How a model version is profiled, gated and described."""

    profile: ProfileSettings = field(default_factory=ProfileSettings)
    validation: ValidationChoice = field(default_factory=ValidationChoice)
    max_drop_points: float = DEFAULT_MAX_DROP_POINTS
    override: GateOverride | None = None
    hardware_classes: tuple[str, ...] = ()
    min_onnxruntime_version: str = ""
    declared_signature: ModelSignature | None = None


def build_validation(reference: ModelFacts, choice: ValidationChoice) -> ValidationSet:
    """The validation set for a model: a supplied file, held-out text for a char-LM, or seeded random rows.

    Raises:
        InvalidArgumentError: The supplied file does not fit the model.
    """
    if choice.npz is not None:
        return load_validation(choice.npz, reference.signature)
    tokenizer = char_lm_tokenizer(reference.properties)
    if tokenizer is not None and len(reference.signature.inputs) == 1:
        vocab, context = tokenizer
        docs = choice.heldout_docs
        source = choice.heldout_source
        if docs is None:
            docs = stdlib_heldout_docstrings()
            source = "docstrings of a hash-chosen 10% of the stdlib's top-level modules"
        return char_lm_validation(
            vocab, context, docs, choice.rows, reference.signature.inputs[0].name, f"{choice.rows} windows of {source}"
        )
    return synthetic_validation(reference.signature, choice.rows)


def prepare(
    files: Mapping[str, Path],
    reference: str,
    options: PipelineOptions,
    reference_file: Path | None = None,
    profiles: Mapping[str, VariantProfile] | None = None,
    on_progress: Callable[[str], None] | None = None,
) -> tuple[VariantSubmission, ...]:
    """Inspects and profiles the variant files of one model version.

    Args:
        files: Variant name → ONNX file.
        reference: The variant the others are compared with (usually ``fp32``),
            or any name when ``reference_file`` is given.
        options: Profiling and validation settings.
        reference_file: A reference model that is compared against but not published.
        profiles: Profiles measured earlier (``edgecascade model profile``), by file
            digest; when given, nothing is measured now.
        on_progress: Called with a file name before it is profiled.

    Returns:
        The submissions, reference first.

    Raises:
        InvalidModelError: A file is not a valid, loadable ONNX model.
        SignatureMismatchError: A file differs from the declared signature or the reference's.
        InvalidArgumentError: Unknown reference, bad variant name, a missing profile.
    """
    for variant in files:
        check_variant_name(variant)
    if reference not in files and reference_file is None:
        raise InvalidArgumentError(
            f"reference variant '{reference}' is not among the variants given ({', '.join(files)}); "
            "name one of them or give --reference-file"
        )
    facts = {variant: inspect_model(path) for variant, path in files.items()}
    ref_facts = inspect_model(reference_file) if reference_file is not None else facts[reference]
    for variant, f in facts.items():
        check_signature(f.signature, ref_facts.signature, f"variant '{variant}' ({f.path.name})")
        if options.declared_signature is not None:
            check_signature(f.signature, options.declared_signature, f"variant '{variant}' ({f.path.name})")
    if profiles is None:
        validation = build_validation(ref_facts, options.validation)
        others = [f for v, f in facts.items() if f.sha256 != ref_facts.sha256]
        profiles = profile_variants(ref_facts, others, validation, options.profile, on_progress)
    missing = [f.path.name for f in facts.values() if f.sha256 not in profiles]
    if missing:
        raise InvalidArgumentError(
            f"the profiles given have no entry for {', '.join(missing)}; run `edgecascade model profile` on it"
        )
    order = sorted(facts, key=lambda v: v != reference)
    return tuple(VariantSubmission(v, facts[v], profiles[facts[v].sha256]) for v in order)


def publish_model(
    registry: ModelRegistry,
    keys: SigningKeys,
    name: str,
    version: str,
    submissions: Sequence[VariantSubmission],
    options: PipelineOptions,
    on_step: Callable[[str], None] | None = None,
) -> list[PublishedVariant]:
    """Gates, encrypts, signs and publishes prepared variants in one commit.

    Raises:
        (what :meth:`ModelRegistry.publish` raises)
    """
    runtime = submissions[0].profile.onnxruntime_version if submissions else ""
    request = PublishRequest(
        name=name,
        version=version,
        variants=tuple(submissions),
        hardware_classes=options.hardware_classes or (default_hardware_class(),),
        min_onnxruntime_version=options.min_onnxruntime_version or _major_minor(runtime),
        max_drop_points=options.max_drop_points,
        override=options.override,
        declared_signature=options.declared_signature,
    )
    return registry.publish(request, keys, on_step)


def _major_minor(version: str) -> str:
    parts = version.split(".")
    return ".".join(parts[:2]) if len(parts) >= 2 else version
