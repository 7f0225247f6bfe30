"""Which variant of a model a node gets: a pure rule over the variants' signed facts.

A variant *fits* a node when all three hold:

* **hardware class** — the variant's signed ``hardware_classes`` is empty (any
  class) or lists the node's class; a node that reports no class takes any
  (``NodeFacts.hardware_class``: "empty = any" in the contract);
* **runtime** — the variant's ``min_onnxruntime_version`` is empty, or the
  node's onnxruntime version is at least that, compared numerically part by
  part (``1.9`` < ``1.20``; missing parts are 0, a suffix such as ``rc1`` is
  ignored; a node that reports no parseable version fits no variant that
  names a minimum);
* **memory** — the variant's signed peak memory at batch size 1 (or at the
  smallest batch size profiled, if 1 was not) is at most the node's memory
  budget; a variant without a signed memory profile fits nowhere.

Among the variants that fit, the node gets the **most accurate**: the highest
signed ``accuracy.value`` (a variant without one ranks last); ties go to the
smaller peak memory, then to the variant name, so the choice is repeatable.
A variant whose signed facts cannot be read
(:meth:`~services.updates.variant_facts.VariantFacts.from_dict` refuses them)
fits nowhere. When none fits, the answer is the reason of each variant, e.g. ``no variant
fits: fp32 needs 420.0 MB, budget 128.0 MB; int8 needs 210.0 MB, budget 128.0 MB``.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import dataclass

from services.engine.memory import megabytes
from services.updates.variant_facts import VariantFacts
from tier2_region.fleet.domain import NodeFacts

_LEADING_DIGITS = re.compile(r"\d+")


@dataclass(frozen=True)
class VariantOffer:
    """What the rule reads of one variant's signed facts.

    Attributes:
        variant: Its name (``fp32``, ``int8`` …).
        target_path: Its TUF target (the encrypted blob).
        key_id: The id of its content key.
        peak_memory_bytes: Signed peak memory at batch size 1 (or the smallest profiled), None if unsigned.
        hardware_classes: The device classes it is for; empty = any.
        min_onnxruntime_version: The oldest runtime that may load it; empty = any.
        accuracy: Its signed accuracy value, None if it has none.
        problem: Why its signed facts could not be read ("" if they could); such a variant fits nowhere.
    """

    variant: str
    target_path: str
    key_id: str
    peak_memory_bytes: int | None
    hardware_classes: tuple[str, ...]
    min_onnxruntime_version: str
    accuracy: float | None
    problem: str = ""


def offer_from_facts(facts: VariantFacts) -> VariantOffer:
    """What the rule reads of a variant's signed facts."""
    sizes = sorted(facts.peak_memory)
    peak = facts.peak_memory_bytes(1) if 1 in facts.peak_memory else (facts.peak_memory[sizes[0]] if sizes else None)
    accuracy = float(facts.accuracy.value)
    return VariantOffer(
        variant=facts.variant,
        target_path=facts.target_path,
        key_id=facts.encryption.key_id,
        peak_memory_bytes=peak,
        hardware_classes=tuple(facts.hardware_classes),
        min_onnxruntime_version=facts.min_onnxruntime_version,
        accuracy=accuracy if math.isfinite(accuracy) else None,
    )


def unreadable_offer(variant: str, target_path: str, problem: str) -> VariantOffer:
    """A variant whose signed facts cannot be read: it fits nowhere, and says why."""
    return VariantOffer(variant, target_path, "", None, (), "", None, problem=problem)


def parse_version(text: str) -> tuple[int, ...] | None:
    """The numeric parts of a version (``"1.20.1rc1"`` → ``(1, 20, 1)``), or None if it starts with no number."""
    parts: list[int] = []
    for piece in text.strip().split("."):
        match = _LEADING_DIGITS.match(piece)
        if match is None:
            break
        parts.append(int(match.group()))
        if match.end() < len(piece):
            break
    return tuple(parts) or None


def version_at_least(version: str, minimum: str) -> bool:
    """Whether ``version`` is ``minimum`` or newer, compared numerically (an empty minimum: always)."""
    if not minimum.strip():
        return True
    have, need = parse_version(version), parse_version(minimum)
    if need is None:
        return False  # a minimum nobody can read is met by nobody
    if have is None:
        return False
    width = max(len(have), len(need))
    return have + (0,) * (width - len(have)) >= need + (0,) * (width - len(need))


def misfit(node: NodeFacts, offer: VariantOffer) -> str:
    """Why ``offer`` does not fit ``node`` ("" if it fits)."""
    if offer.problem:
        return f"{offer.variant}: {offer.problem}"
    if offer.hardware_classes and node.hardware_class and node.hardware_class not in offer.hardware_classes:
        return f"{offer.variant} is for {', '.join(offer.hardware_classes)}, the node is {node.hardware_class}"
    if not version_at_least(node.onnxruntime_version, offer.min_onnxruntime_version):
        return (
            f"{offer.variant} needs onnxruntime {offer.min_onnxruntime_version} or newer, "
            f"the node has {node.onnxruntime_version or 'none stated'}"
        )
    if offer.peak_memory_bytes is None:
        return f"{offer.variant} has no signed memory profile"
    if offer.peak_memory_bytes > node.memory_budget_bytes:
        return (
            f"{offer.variant} needs {megabytes(offer.peak_memory_bytes)}, budget {megabytes(node.memory_budget_bytes)}"
        )
    return ""


def choose_variant(node: NodeFacts, offers: Sequence[VariantOffer]) -> VariantOffer | str:
    """The variant ``node`` gets (the most accurate that fits), or why none fits.

    Returns:
        The chosen offer, or a reason beginning ``no variant fits:``.
    """
    fitting = [offer for offer in offers if not misfit(node, offer)]
    if not fitting:
        reasons = "; ".join(misfit(node, offer) for offer in offers) or "the model has no variants"
        return f"no variant fits: {reasons}"

    def rank(offer: VariantOffer) -> tuple[float, int, str]:
        accuracy = -math.inf if offer.accuracy is None else offer.accuracy
        return (-accuracy, offer.peak_memory_bytes or 0, offer.variant)

    return min(fitting, key=rank)
