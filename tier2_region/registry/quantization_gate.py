"""The quantization gate: a variant may not lose more accuracy than allowed, unless someone says why.

The drop is the reference's accuracy minus the variant's, in percentage
points, on the same validation set. Passing variants carry the decision in
their signed metadata; a failing one is refused with a report, or — when an
override reason is given — published with the override (reason, who, when)
signed alongside, so the exception stays visible to every consumer.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from services.errors import QuantizationGateError
from services.updates.variant_facts import GateFacts, GateOverride, ratio
from tier2_region.registry.profiles import VariantProfile

# GateOverride (why a failing variant was published anyway) is signed as it is: it is one of the variant facts.
__all__ = ["DEFAULT_MAX_DROP_POINTS", "GateDecision", "GateOverride", "check_gate"]

DEFAULT_MAX_DROP_POINTS = 1.0


@dataclass(frozen=True)
class GateDecision:
    """The gate's verdict on one variant."""

    variant: str
    drop_points: float
    max_drop_points: float
    passed: bool
    override: GateOverride | None = None

    def facts(self) -> GateFacts:
        """The verdict as signed into the variant's facts (points to 4 decimal places)."""
        return GateFacts(ratio(self.drop_points, 4), ratio(self.max_drop_points, 4), self.passed, self.override)

    def to_json(self) -> dict[str, Any]:
        """JSON-ready form (signed into the target's ``custom``)."""
        return self.facts().to_dict()


def check_gate(
    what: str, variant: str, profile: VariantProfile, max_drop_points: float, override: GateOverride | None
) -> GateDecision:
    """Decides whether ``variant`` may be published.

    Args:
        what: Names the model and version in the report (``lm version 3``).
        variant: The variant's name.
        profile: Its profile against the reference.
        max_drop_points: Largest accuracy drop allowed, in percentage points.
        override: Why to publish it even if it fails, or None.

    Returns:
        The decision (with the override only when one was needed).

    Raises:
        QuantizationGateError: The variant fails and there is no override.
    """
    drop = profile.accuracy_drop_points
    passed = drop <= max_drop_points
    if passed:
        return GateDecision(variant, drop, max_drop_points, True)
    if override is None:
        raise QuantizationGateError(
            f"{what} variant '{variant}' fails the quantization gate: {profile.metric} "
            f"{profile.reference_accuracy:.2%} (reference) → {profile.accuracy:.2%}, a drop of {drop:.2f} points "
            f"where at most {max_drop_points:.2f} is allowed (agreement with the reference {profile.agreement:.2%}). "
            "Nothing was published. Pass --override-gate REASON to publish it anyway; the override is signed into "
            "its metadata."
        )
    return GateDecision(variant, drop, max_drop_points, False, override)
