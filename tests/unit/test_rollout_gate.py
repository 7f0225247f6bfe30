"""A rollout's plan, its cohort positions and its gates: the pure rules (issue 10 #3)."""

from __future__ import annotations

import math

import pytest

from services.errors import InvalidArgumentError
from tier2_region.fleet import rollout_gate as gates
from tier2_region.fleet.figures import ShadowFigures, VersionFigures
from tier2_region.fleet.rollout import RolloutPlan, cohort_position
from tier2_region.fleet.rollout_policy import Member, widen


def test_a_position_is_stable_in_range_and_differs_per_model() -> None:
    ids = [f"device-{i}" for i in range(2000)]
    positions = [cohort_position("lm", node) for node in ids]
    assert positions == [cohort_position("lm", node) for node in ids]  # same input, same place
    assert all(0 <= p < 100 for p in positions)
    # Spread evenly: each tenth of the range holds about a tenth of the nodes.
    deciles = [sum(10 * d <= p < 10 * (d + 1) for p in positions) for d in range(10)]
    assert all(140 <= n <= 260 for n in deciles), deciles
    # Another model picks other canaries.
    other = [cohort_position("other", node) for node in ids]
    assert sum(a < 10 and b < 10 for a, b in zip(positions, other, strict=True)) < 60


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"steps": (10, 5, 100)}, "steps 10,5,100 must increase"),
        ({"steps": (1, 10, 10, 100)}, "must increase"),
        ({"steps": (1, 10, 50)}, "must end at 100"),
        ({"steps": ()}, "1 to 20 steps"),
        ({"steps": (0, 100)}, "above 0 and at most 100"),
        ({"steps": (50, 150)}, "above 0 and at most 100"),
        ({"steps": (math.nan, 100)}, "above 0 and at most 100"),
        ({"interval_s": 0}, "interval_s must be a positive number of seconds"),
        ({"interval_s": 1e12}, "interval_s must be a positive number of seconds"),
        ({"min_devices": 0}, "min_devices must be at least 1"),
        ({"min_requests": 0}, "min_requests must be at least 1"),
        ({"max_error_rate_increase": 2}, "max_error_rate_increase is a share between 0 and 1"),
        ({"max_fallback_rate_increase": -0.1}, "max_fallback_rate_increase is a share between 0 and 1"),
        ({"max_p99_ratio": 0.9}, "max_p99_ratio must be at least 1"),
        ({"max_failed_installs": -1}, "max_failed_installs must be 0 or more"),
    ],
)
def test_a_bad_plan_is_refused_saying_what_would_be_accepted(changes: dict[str, object], message: str) -> None:
    with pytest.raises(InvalidArgumentError, match=message):
        RolloutPlan(**changes)  # type: ignore[arg-type]


def test_the_default_plan_is_the_issue_s() -> None:
    plan = RolloutPlan()
    assert plan.steps == (1, 10, 50, 100)
    assert RolloutPlan(steps=(5, 100)).steps == (5.0, 100.0)


def figures(
    version: str, requests: int = 1000, errors: int = 0, fallbacks: int = 0, p99: float | None = 20.0
) -> VersionFigures:
    return VersionFigures("lm", version, nodes=5, requests=requests, errors=errors, fallbacks=fallbacks, p99_ms=p99)


def statuses(results: tuple[gates.GateResult, ...]) -> dict[str, str]:
    return {r.gate: r.status for r in results}


def test_gates_pass_at_their_limits_and_fail_beyond() -> None:
    plan = RolloutPlan(max_error_rate_increase=0.01, max_p99_ratio=1.5, max_fallback_rate_increase=0.05)
    old = figures("1", errors=10, fallbacks=100, p99=20.0)
    at_limit = figures("2", errors=20, fallbacks=150, p99=30.0)
    assert set(statuses(gates.judge(plan, at_limit, old)).values()) == {gates.PASS}
    beyond = figures("2", errors=21, fallbacks=151, p99=30.2)
    results = gates.judge(plan, beyond, old)
    assert statuses(results) == {"error_rate": "fail", "p99_latency": "fail", "fallback_rate": "fail"}
    detail = {r.gate: r.detail for r in results}
    assert detail["p99_latency"] == (
        "p99 latency 30.2 ms on version 2 vs 20.0 ms on version 1 (×1.51; at most ×1.5 allowed)"
    )
    assert (
        detail["error_rate"]
        == "error rate 2.1 % on version 2 vs 1.0 % on version 1 (+1.1 points; at most +1.0 allowed)"
    )


def test_a_faster_or_cleaner_version_passes() -> None:
    results = gates.judge(RolloutPlan(), figures("2", p99=5.0), figures("1", errors=50, fallbacks=50, p99=40.0))
    assert set(statuses(results).values()) == {gates.PASS}


def test_a_figure_nobody_reported_is_no_data_never_a_pass() -> None:
    results = gates.judge(RolloutPlan(), figures("2", requests=0, p99=None), figures("1"))
    assert set(statuses(results).values()) == {gates.NO_DATA}
    assert "no p99 latency of version 2 yet" in [r.detail for r in results]
    baseline_silent = gates.judge(RolloutPlan(), figures("2"), figures("1", requests=0, p99=None))
    assert "no error rate of version 1 yet" in [r.detail for r in baseline_silent]


def test_a_sub_millisecond_baseline_is_compared_from_one_millisecond() -> None:
    result = gates.judge(RolloutPlan(max_p99_ratio=1.5), figures("2", p99=1.4), figures("1", p99=0.1))[1]
    assert result.status == gates.PASS
    result = gates.judge(RolloutPlan(max_p99_ratio=1.5), figures("2", p99=1.6), figures("1", p99=0.1))[1]
    assert result.status == gates.FAIL


def test_failed_installs_gate_and_what_a_short_stage_lacks() -> None:
    plan = RolloutPlan(min_devices=3, min_requests=100, max_failed_installs=1)
    assert gates.failed_installs(plan, "2", 1).status == gates.PASS
    failed = gates.failed_installs(plan, "2", 2)
    assert failed.status == gates.FAIL and failed.detail == (
        "2 cohort node(s) failed to install version 2 (at most 1 allowed)"
    )
    short = gates.shortfall(plan, VersionFigures("lm", "2", nodes=2, requests=40), cohort=4, online=3)
    assert short == (
        "2 of the 3 device(s) needed report version 2 (4 in the cohort, 3 online); "
        "40 of the 100 request(s) needed were answered on version 2"
    )
    assert gates.shortfall(plan, VersionFigures("lm", "2", nodes=3, requests=100), 4, 3) == ""
    assert "only 99 request(s) on the baseline version 1" in gates.baseline_shortfall(
        plan, VersionFigures("lm", "1", requests=99)
    )


def test_a_stage_too_small_for_min_devices_widens_to_the_lowest_online_nodes_and_never_shrinks() -> None:
    members = [Member(f"n{i}", float(p), online=p != 3) for i, p in enumerate([3, 7, 12, 40, 80])]
    plan = RolloutPlan(min_devices=2)
    bound = widen(plan, 0, 0.0, members)
    # 1 % holds nobody; the two lowest *online* nodes are at 7 and 12 (3 is offline and counts for nothing).
    assert 12 < bound < 12.0001
    assert widen(plan, 0, 50.0, members) == 50.0  # never narrower than it was
    assert widen(RolloutPlan(min_devices=9), 0, 0.0, members) == 1.0  # too few online: wait at the step's own size


# The shadow phase's gates


def shadow(
    ok: int = 1000,
    errors: int = 0,
    agreement: float | None = 0.95,
    p99: float | None = 30.0,
    serving_p99: float | None = 20.0,
    difference: float | None = 0.05,
    nodes: int = 5,
    shed: int = 0,
) -> ShadowFigures:
    return ShadowFigures(
        "lm",
        "2",
        nodes=nodes,
        ok=ok,
        errors=errors,
        shed=shed,
        compared=ok,
        agreement=agreement,
        mean_difference=difference,
        p99_ms=p99,
        serving_p99_ms=serving_p99,
    )


SHADOW_PLAN = RolloutPlan(min_devices=2, min_requests=100, shadow_percent=5, max_mean_difference=0.1)


def test_shadow_gates_pass_at_their_limits_and_fail_beyond() -> None:
    at_limits = shadow(ok=990, errors=10, agreement=0.9, p99=30.0, serving_p99=20.0, difference=0.1)
    assert statuses(gates.judge_shadow(SHADOW_PLAN, at_limits)) == {
        gates.AGREEMENT: gates.PASS,
        gates.MEAN_DIFFERENCE: gates.PASS,
        gates.P99_LATENCY: gates.PASS,
        gates.ERROR_RATE: gates.PASS,
    }
    beyond = shadow(ok=980, errors=20, agreement=0.89, p99=31.0, serving_p99=20.0, difference=0.11)
    assert set(statuses(gates.judge_shadow(SHADOW_PLAN, beyond)).values()) == {gates.FAIL}
    (agreement, difference, p99, errors) = gates.judge_shadow(SHADOW_PLAN, beyond)
    assert agreement.detail == "top-1 agreement 0.89 < 0.90 (over 980 compared run(s) on 5 node(s))"
    assert difference.detail == "mean absolute difference of the outputs 0.11 > 0.1"
    assert p99.detail == "shadow p99 latency 31.0 ms vs 20.0 ms serving the same requests (×1.55; at most ×1.5 allowed)"
    assert errors.detail == "2.0 % of the shadow's runs failed (20 of 1000; at most 1.0 % allowed)"
    # Without max_mean_difference the difference is not gated.
    plain = RolloutPlan(shadow_percent=5)
    assert gates.MEAN_DIFFERENCE not in statuses(gates.judge_shadow(plain, shadow(difference=9.0)))


def test_a_shadow_figure_nobody_reported_is_no_data() -> None:
    # Fewer compared runs than min_requests: an agreement may still come.
    few = shadow(ok=50, agreement=None, serving_p99=None, difference=None)
    results = statuses(gates.judge_shadow(SHADOW_PLAN, few))
    assert results == {
        gates.AGREEMENT: gates.NO_DATA,
        gates.MEAN_DIFFERENCE: gates.NO_DATA,
        gates.P99_LATENCY: gates.NO_DATA,
        gates.ERROR_RATE: gates.PASS,
    }
    assert gates.shadow_errors(SHADOW_PLAN, shadow(ok=0, errors=0, shed=40)).status == gates.NO_DATA
    # Shed runs did not run: they are neither successes nor failures.
    assert shadow(ok=50, errors=50, shed=900).error_rate == 0.5


def test_a_shadow_with_too_few_compared_runs_or_nodes_says_what_is_missing() -> None:
    assert gates.shadow_shortfall(SHADOW_PLAN, shadow(ok=100, nodes=2), 3, 3) == ""
    assert gates.shadow_shortfall(SHADOW_PLAN, shadow(ok=12, nodes=1), 3, 2) == (
        "shadow: 12 of 100 compared runs, 1 of 2 node(s) (3 in the cohort, 2 online)"
    )
    assert gates.shadow_shortfall(SHADOW_PLAN, shadow(ok=0, nodes=0, errors=3, shed=7), 2, 2) == (
        "shadow: 0 of 100 compared runs, 0 of 2 node(s) (2 in the cohort, 2 online); 7 run(s) shed (the nodes "
        "were busy); 3 run(s) failed"
    )


def test_outputs_without_a_top_1_are_judged_on_the_mean_difference_when_it_is_gated() -> None:
    # A regressor's (or an [N, 1] score's) shadow: every compared run records a difference, none an agreement.
    regressor = shadow(agreement=None, difference=0.05)
    results = gates.judge_shadow(SHADOW_PLAN, regressor)
    assert statuses(results) == {
        gates.AGREEMENT: gates.NOT_APPLICABLE,
        gates.MEAN_DIFFERENCE: gates.PASS,
        gates.P99_LATENCY: gates.PASS,
        gates.ERROR_RATE: gates.PASS,
    }
    assert results[0].detail == (
        "no top-1 output to compare; judged on the mean difference (over 1000 compared run(s) on 5 node(s))"
    )
    # ... and fail on it.
    far = statuses(gates.judge_shadow(SHADOW_PLAN, shadow(agreement=None, difference=0.5)))
    assert (far[gates.AGREEMENT], far[gates.MEAN_DIFFERENCE]) == (gates.NOT_APPLICABLE, gates.FAIL)


def test_outputs_without_a_top_1_wait_for_the_operator_to_gate_the_mean_difference() -> None:
    plain = RolloutPlan(min_devices=2, min_requests=100, shadow_percent=5)
    (agreement, *_) = gates.judge_shadow(plain, shadow(agreement=None))
    assert agreement.status == gates.NO_DATA
    assert agreement.detail == (
        "no top-1 output to compare in 1000 compared run(s) of version 2, so no agreement will come; abort the "
        "rollout and start it again with --max-mean-difference D to judge the shadow on the mean difference of its "
        "outputs"
    )
