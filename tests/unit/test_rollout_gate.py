"""A rollout's plan, its cohort positions and its gates: the pure rules (issue 10 #3)."""

from __future__ import annotations

import math

import pytest

from services.errors import InvalidArgumentError
from tier2_region.fleet import rollout_gate as gates
from tier2_region.fleet.figures import VersionFigures
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
