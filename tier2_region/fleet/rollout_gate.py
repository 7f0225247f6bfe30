"""The gates of a rollout stage: is there enough data to judge it, and is the new version as good as the baseline.

Each gate compares the new version on the cohort (*canary*) with the
baseline version beside it over the same window (*baseline*):

============== =====================================================================
gate           passes when
============== =====================================================================
error_rate     canary.error_rate − baseline.error_rate ≤ max_error_rate_increase
p99_latency    canary.p99_ms ≤ max_p99_ratio × max(baseline.p99_ms, 1 ms)
fallback_rate  canary.fallback_rate − baseline.fallback_rate ≤ max_fallback_rate_increase
failed_installs  cohort nodes whose install of the new version was refused ≤ max_failed_installs
============== =====================================================================

A figure nobody reported (``None``) is *no data*: the gate neither passes nor
fails, and the stage waits. No data is never success.
"""

from __future__ import annotations

from dataclasses import dataclass

from tier2_region.fleet.figures import VersionFigures
from tier2_region.fleet.rollout import RolloutPlan

PASS = "pass"
FAIL = "fail"
NO_DATA = "no_data"

ERROR_RATE = "error_rate"
P99_LATENCY = "p99_latency"
FALLBACK_RATE = "fallback_rate"
FAILED_INSTALLS = "failed_installs"

# Below a millisecond a p99 is timer noise; without a floor a 0.1 ms baseline would fail a 0.2 ms canary.
P99_FLOOR_MS = 1.0
# Shares are ratios of counts; this absorbs the float error of a difference that equals its limit.
_SLACK = 1e-9


@dataclass(frozen=True)
class GateResult:
    """One gate's reading: :data:`PASS`, :data:`FAIL` or :data:`NO_DATA`, with the figures that decided it."""

    gate: str
    status: str
    detail: str


def failed_installs(plan: RolloutPlan, version: str, failed: int) -> GateResult:
    """The failed-installs gate: at most ``plan.max_failed_installs`` cohort nodes refused the version."""
    detail = f"{failed} cohort node(s) failed to install version {version} (at most {plan.max_failed_installs} allowed)"
    return GateResult(FAILED_INSTALLS, PASS if failed <= plan.max_failed_installs else FAIL, detail)


def shortfall(plan: RolloutPlan, canary: VersionFigures, cohort: int, online: int) -> str:
    """Why the cohort's figures are too few to judge a stage ("" when there are enough).

    Args:
        plan: The rollout's plan (``min_devices``, ``min_requests``).
        canary: The new version's figures over the cohort.
        cohort: Eligible nodes in the cohort.
        online: Of those, the ones that checked in lately.
    """
    missing = []
    if canary.nodes < plan.min_devices:
        missing.append(
            f"{canary.nodes} of the {plan.min_devices} device(s) needed report version {canary.version} "
            f"({cohort} in the cohort, {online} online)"
        )
    if canary.requests < plan.min_requests:
        missing.append(
            f"{canary.requests} of the {plan.min_requests} request(s) needed were answered on version {canary.version}"
        )
    return "; ".join(missing)


def baseline_shortfall(plan: RolloutPlan, baseline: VersionFigures) -> str:
    """Why the baseline's figures are too few to compare with ("" when there are enough)."""
    if baseline.requests >= plan.min_requests:
        return ""
    return (
        f"only {baseline.requests} request(s) on the baseline version {baseline.version} to compare with "
        f"({plan.min_requests} needed)"
    )


def judge(plan: RolloutPlan, canary: VersionFigures, baseline: VersionFigures) -> tuple[GateResult, ...]:
    """Reads the metric gates (error rate, p99 latency, fallback rate) of the canary against the baseline."""
    return (
        _increase(
            ERROR_RATE,
            "error rate",
            (canary.error_rate, baseline.error_rate),
            plan.max_error_rate_increase,
            canary,
            baseline,
        ),
        _p99(plan, canary, baseline),
        _increase(
            FALLBACK_RATE,
            "fallback rate",
            (canary.fallback_rate, baseline.fallback_rate),
            plan.max_fallback_rate_increase,
            canary,
            baseline,
        ),
    )


def _percent(share: float) -> str:
    return f"{100 * share:.1f} %"


def _increase(
    gate: str,
    what: str,
    shares: tuple[float | None, float | None],
    limit: float,
    canary: VersionFigures,
    baseline: VersionFigures,
) -> GateResult:
    new, old = shares
    if new is None or old is None:
        missing = canary.version if new is None else baseline.version
        return GateResult(gate, NO_DATA, f"no {what} of version {missing} yet")
    rise = new - old
    detail = (
        f"{what} {_percent(new)} on version {canary.version} vs {_percent(old)} on version {baseline.version} "
        f"({100 * rise:+.1f} points; at most +{100 * limit:.1f} allowed)"
    )
    return GateResult(gate, PASS if rise <= limit + _SLACK else FAIL, detail)


def _p99(plan: RolloutPlan, canary: VersionFigures, baseline: VersionFigures) -> GateResult:
    new, old = canary.p99_ms, baseline.p99_ms
    if new is None or old is None:
        missing = canary.version if new is None else baseline.version
        return GateResult(P99_LATENCY, NO_DATA, f"no p99 latency of version {missing} yet")
    reference = max(old, P99_FLOOR_MS)
    detail = (
        f"p99 latency {new:.1f} ms on version {canary.version} vs {old:.1f} ms on version {baseline.version} "
        f"(×{new / reference:.2f}; at most ×{plan.max_p99_ratio:g} allowed)"
    )
    return GateResult(P99_LATENCY, PASS if new <= plan.max_p99_ratio * reference else FAIL, detail)
