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

A rollout's shadow phase has gates of its own, on the shadow's runs beside the
serving version on the same sampled requests (:class:`~tier2_region.fleet.figures.ShadowFigures`):

================ ===================================================================
gate             passes when
================ ===================================================================
agreement        shadow.agreement ≥ min_agreement (mean top-1 agreement); for outputs without a top-1
                 (no agreement after min_requests compared runs) it does not apply when
                 max_mean_difference is set, and waits for the operator to set it otherwise
mean_difference  shadow.mean_difference ≤ max_mean_difference (only when that is set)
p99_latency      shadow.p99_ms ≤ max_p99_ratio × max(shadow.serving_p99_ms, 1 ms)
error_rate       shadow.error_rate ≤ max_error_rate_increase (failed runs per run; shed runs did not run)
failed_installs  as above: the shadow install is an install
================ ===================================================================

A figure nobody reported (``None``) is *no data*: the gate neither passes nor
fails, and the stage waits. No data is never success. A gate that does not
apply to what was measured (:data:`NOT_APPLICABLE`) neither passes nor fails
either, but does not hold the stage: another gate judges that figure.
"""

from __future__ import annotations

from dataclasses import dataclass

from tier2_region.fleet.figures import ShadowFigures, VersionFigures
from tier2_region.fleet.rollout import RolloutPlan

PASS = "pass"
FAIL = "fail"
NO_DATA = "no_data"
NOT_APPLICABLE = "not_applicable"  # e.g. the agreement of outputs that have no top-1 class

ERROR_RATE = "error_rate"
P99_LATENCY = "p99_latency"
FALLBACK_RATE = "fallback_rate"
FAILED_INSTALLS = "failed_installs"
AGREEMENT = "agreement"
MEAN_DIFFERENCE = "mean_difference"

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


# The shadow phase


def shadow_shortfall(plan: RolloutPlan, shadow: ShadowFigures, cohort: int, online: int) -> str:
    """Why the shadow's figures are too few to judge it ("" when there are enough).

    Enough is ``min_requests`` compared runs from at least ``min_devices`` nodes, e.g.
    ``shadow: 12 of 100 compared runs, 1 of 2 node(s) (3 in the cohort, 3 online)``.
    """
    if shadow.compared >= plan.min_requests and shadow.nodes >= plan.min_devices:
        return ""
    text = (
        f"shadow: {shadow.compared} of {plan.min_requests} compared runs, {shadow.nodes} of {plan.min_devices} "
        f"node(s) ({cohort} in the cohort, {online} online)"
    )
    if shadow.shed:
        text += f"; {shadow.shed} run(s) shed (the nodes were busy)"
    if shadow.errors:
        text += f"; {shadow.errors} run(s) failed"
    return text


def shadow_errors(plan: RolloutPlan, shadow: ShadowFigures) -> GateResult:
    """The shadow's error gate: failed runs per run at most ``max_error_rate_increase``.

    It can be read before the agreement can: a shadow that fails every run is never compared, and must
    not wait for comparisons that cannot come.
    """
    rate = shadow.error_rate
    if rate is None:
        return GateResult(ERROR_RATE, NO_DATA, f"no shadow run of version {shadow.version} yet")
    detail = (
        f"{_percent(rate)} of the shadow's runs failed ({shadow.errors} of {shadow.ok + shadow.errors}; "
        f"at most {_percent(plan.max_error_rate_increase)} allowed)"
    )
    return GateResult(ERROR_RATE, PASS if rate <= plan.max_error_rate_increase + _SLACK else FAIL, detail)


def judge_shadow(plan: RolloutPlan, shadow: ShadowFigures) -> tuple[GateResult, ...]:
    """Reads the shadow gates: agreement, mean difference (if gated), p99 latency and errors."""
    results = [_agreement(plan, shadow)]
    if plan.max_mean_difference is not None:
        results.append(_difference(plan.max_mean_difference, shadow))
    results.append(_shadow_p99(plan, shadow))
    results.append(shadow_errors(plan, shadow))
    return tuple(results)


def _agreement(plan: RolloutPlan, shadow: ShadowFigures) -> GateResult:
    value = shadow.agreement
    if value is None and shadow.compared >= plan.min_requests:
        # Enough runs were compared and none had a top-1 class (a regressor's outputs, an [N, 1] score):
        # no agreement will ever come.
        if plan.max_mean_difference is not None:
            return GateResult(
                AGREEMENT,
                NOT_APPLICABLE,
                f"no top-1 output to compare; judged on the mean difference (over {shadow.compared} compared "
                f"run(s) on {shadow.nodes} node(s))",
            )
        return GateResult(
            AGREEMENT,
            NO_DATA,
            f"no top-1 output to compare in {shadow.compared} compared run(s) of version {shadow.version}, so no "
            "agreement will come; abort the rollout and start it again with --max-mean-difference D to judge the "
            "shadow on the mean difference of its outputs",
        )
    if value is None:
        return GateResult(AGREEMENT, NO_DATA, f"no agreement of version {shadow.version} with the serving one yet")
    passed = value >= plan.min_agreement - _SLACK
    detail = (
        f"top-1 agreement {value:.2f} {'≥' if passed else '<'} {plan.min_agreement:.2f} "
        f"(over {shadow.compared} compared run(s) on {shadow.nodes} node(s))"
    )
    return GateResult(AGREEMENT, PASS if passed else FAIL, detail)


def _difference(limit: float, shadow: ShadowFigures) -> GateResult:
    value = shadow.mean_difference
    if value is None:
        return GateResult(MEAN_DIFFERENCE, NO_DATA, f"no output difference of version {shadow.version} yet")
    passed = value <= limit + _SLACK
    detail = f"mean absolute difference of the outputs {value:.4g} {'≤' if passed else '>'} {limit:.4g}"
    return GateResult(MEAN_DIFFERENCE, PASS if passed else FAIL, detail)


def _shadow_p99(plan: RolloutPlan, shadow: ShadowFigures) -> GateResult:
    new, old = shadow.p99_ms, shadow.serving_p99_ms
    if new is None or old is None:
        which = "the shadow's" if new is None else "the serving version's"
        return GateResult(P99_LATENCY, NO_DATA, f"no p99 latency of {which} runs on the sampled requests yet")
    reference = max(old, P99_FLOOR_MS)
    detail = (
        f"shadow p99 latency {new:.1f} ms vs {old:.1f} ms serving the same requests "
        f"(×{new / reference:.2f}; at most ×{plan.max_p99_ratio:g} allowed)"
    )
    return GateResult(P99_LATENCY, PASS if new <= plan.max_p99_ratio * reference else FAIL, detail)
