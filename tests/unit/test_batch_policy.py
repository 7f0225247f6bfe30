"""The batcher's pure policy: a fake ``now`` is stepped, nothing sleeps and no loop runs."""

from __future__ import annotations

from dataclasses import dataclass

import pytest

from services.engine.batch_policy import (
    DRIFT,
    EWMA,
    MAX_SIGNATURES,
    Arrivals,
    BatchingConfig,
    BatchPolicy,
    FastestRuns,
    Refusal,
    RunTimes,
)
from services.errors import ConfigError

EPS = 1e-9


@dataclass
class Req:
    rows: int = 1
    deadline: float = 100.0
    enqueued: float = 0.0


def policy(batchable: bool = True, slots: int = 1, **config: int) -> BatchPolicy:
    return BatchPolicy(BatchingConfig(**config), batchable, slots)


def busy(p: BatchPolicy) -> BatchPolicy:
    """Requests have been arriving 10 µs apart, so a wait for company may pay."""
    p.arrivals = Arrivals(interval=1e-5, last=1.0)
    return p


def test_a_request_is_hopeless_once_its_predicted_run_reaches_the_deadline() -> None:
    p = policy()
    p.run_times.observe(1, 0.25)
    request = Req(deadline=2.0)
    assert p.hopeless(request, 1.75)  # 1.75 + 0.25 run == deadline
    assert not p.hopeless(request, 1.75 - EPS)
    assert p.hopeless(request, 3.0)  # already past


def test_before_any_run_is_timed_only_a_passed_deadline_is_hopeless() -> None:
    p = policy()
    request = Req(deadline=2.0)
    assert not p.hopeless(request, 2.0 - EPS)
    assert p.hopeless(request, 2.0)


def test_a_full_queue_refuses_whatever_the_deadline() -> None:
    p = policy(max_queue_size=3)
    assert p.refusal(queued=2, rows_ahead=2, deadline=1e9, now=0.0) is None
    assert p.refusal(queued=3, rows_ahead=3, deadline=1e9, now=0.0) is Refusal.QUEUE_FULL
    assert Refusal.QUEUE_FULL.value == "queue_full"


def test_a_predicted_wait_beyond_the_deadline_refuses_as_overloaded() -> None:
    p = policy(max_batch_size=1)
    assert p.refusal(queued=5, rows_ahead=5, deadline=10.01, now=10.0) is None  # no run timed yet: no prediction
    p.run_times.observe(1, 0.03)
    assert p.predicted_wait(5) == pytest.approx(0.15)  # five batches of one, one slot
    assert p.refusal(queued=5, rows_ahead=5, deadline=10.2, now=10.0) is None
    assert p.refusal(queued=5, rows_ahead=5, deadline=10.1, now=10.0) is Refusal.OVERLOADED
    assert p.refusal(queued=5, rows_ahead=0, deadline=10.001, now=10.0) is None  # nothing ahead at its level


def test_the_predicted_wait_counts_batches_and_rounds_over_the_slots() -> None:
    p = policy(max_batch_size=4, slots=2)
    p.run_times.observe(4, 0.5)
    assert p.predicted_wait(0) == 0.0
    assert p.predicted_wait(4) == 0.5  # one batch, one round
    assert p.predicted_wait(8) == 0.5  # two batches side by side
    assert p.predicted_wait(9) == 1.0  # a third batch needs a second round
    unbatched = policy(batchable=False, max_batch_size=4, slots=2)
    unbatched.run_times.observe(1, 0.5)
    assert unbatched.predicted_wait(3) == 1.0  # three single-row runs on two slots


def test_the_wait_window_ends_at_the_queue_delay_after_the_head() -> None:
    p = busy(policy(max_queue_delay_us=2000))
    head = Req(enqueued=10.0, deadline=99.0)
    assert p.window_end(head, head.deadline) == pytest.approx(10.002)
    assert p.company_wait(head, [head], rows=1, others_running=True, now=10.0005) == pytest.approx(0.0015)
    assert p.company_wait(head, [head], rows=1, others_running=True, now=10.002) == 0.0  # window closed


def test_the_wait_window_ends_earlier_when_the_tightest_deadline_needs_the_run() -> None:
    p = busy(policy(max_queue_delay_us=100_000, max_batch_size=8))
    p.run_times.observe(8, 0.05)
    head = Req(enqueued=10.0, deadline=99.0)
    tight = Req(enqueued=10.0, deadline=10.08)
    assert p.window_end(head, tight.deadline) == pytest.approx(10.03)  # 10.08 minus a full batch's run
    assert p.company_wait(head, [head, tight], rows=2, others_running=True, now=10.0) == pytest.approx(0.03)
    assert p.company_wait(head, [head, tight], rows=2, others_running=True, now=10.03 + EPS) == 0.0


def test_no_wait_for_a_full_batch_without_delay_or_with_nothing_else_running() -> None:
    head = Req(enqueued=0.0)
    p = busy(policy(max_queue_delay_us=1000, max_batch_size=2))
    assert p.company_wait(head, [head], rows=1, others_running=True, now=0.0) > 0
    assert p.company_wait(head, [head], rows=2, others_running=True, now=0.0) == 0.0  # full
    assert p.company_wait(head, [head], rows=1, others_running=False, now=0.0) == 0.0  # a closed loop
    assert busy(policy(max_queue_delay_us=0)).company_wait(head, [head], rows=1, others_running=True, now=0.0) == 0.0


def test_no_wait_when_the_next_arrival_is_unlikely_within_the_window() -> None:
    p = policy(max_queue_delay_us=1000)
    head = Req(enqueued=5.0)
    assert p.arrivals.interval == 1.0  # nothing seen yet: a second apart, longer than the window
    assert p.company_wait(head, [head], rows=1, others_running=True, now=5.0) == 0.0
    for i in range(60):  # arrivals every 100 µs
        p.arrivals.observe(5.0 + i * 1e-4)
    assert p.arrivals.interval < 1e-3
    assert p.company_wait(head, [head], rows=1, others_running=True, now=5.0) == pytest.approx(1e-3)


def test_arrivals_are_an_exponential_average_of_the_gaps() -> None:
    arrivals = Arrivals()
    arrivals.observe(2.0)  # the first arrival only sets the reference
    assert arrivals.interval == 1.0
    arrivals.observe(2.5)
    assert arrivals.interval == pytest.approx(1.0 + EWMA * (0.5 - 1.0))


def test_run_times_smooth_per_row_count_and_scale_up_from_the_nearest() -> None:
    times = RunTimes()
    assert times.predict(4) == 0.0
    times.observe(4, 1.0)
    times.observe(4, 2.0)
    assert times.predict(4) == pytest.approx(1.0 + EWMA)
    assert times.predict(8) == pytest.approx(2 * (1.0 + EWMA))  # twice the rows of the nearest
    assert times.predict(1) == pytest.approx(1.0 + EWMA)  # never scaled down


def test_the_inline_estimate_is_the_fastest_run_and_follows_slower_runs_only_slowly() -> None:
    runs = FastestRuns()
    runs.observe(1, 0.004)  # a run that waited for the GIL
    runs.observe(1, 0.00003)
    assert runs.predict(1) == pytest.approx(0.00003)
    runs.observe(1, 0.01)  # one slow run moves it by DRIFT of the difference, not to it
    assert runs.predict(1) == pytest.approx(0.00003 + DRIFT * (0.01 - 0.00003))
    for _ in range(1000):  # a model that really got slower is followed
        runs.observe(1, 0.01)
    assert runs.predict(1) == pytest.approx(0.01, rel=1e-3)


def test_only_timed_signatures_within_the_limit_run_inline_and_only_when_nothing_else_runs() -> None:
    p = policy(inline_run_us=200)
    small, wide = ("x", (8,)), ("x", (4096,))
    assert not p.runs_inline(small, 1, others_running=False)  # never timed: a thread first
    p.computed(small, 1, 50e-6)
    p.computed(wide, 1, 2e-3)
    assert p.runs_inline(small, 1, others_running=False)
    assert not p.runs_inline(small, 1, others_running=True)
    assert not p.runs_inline(wide, 1, others_running=False)  # same rows, another shape: its own time
    assert not p.runs_inline(small, 8, others_running=False)  # predicted from 1 row, scaled up: 400 µs
    assert not policy(inline_run_us=0).runs_inline(small, 1, others_running=False)


def test_the_inline_estimates_keep_a_bounded_number_of_signatures() -> None:
    p = policy()
    for width in range(MAX_SIGNATURES + 10):
        p.computed(("x", (width,)), 1, 1e-5)
    assert len(p.compute_times) == MAX_SIGNATURES
    assert ("x", (MAX_SIGNATURES + 9,)) in p.compute_times and ("x", (0,)) not in p.compute_times


def test_inline_run_us_is_bounded() -> None:
    with pytest.raises(ConfigError, match="inline_run_us"):
        BatchingConfig(inline_run_us=20_000)


def test_a_throttled_capacity_lengthens_the_predicted_wait() -> None:
    p = policy(max_batch_size=4, slots=2)
    p.run_times.observe(4, 0.5)
    p.run_times.observe(1, 0.2)
    assert p.predicted_wait(8) == 0.5  # two batches of four side by side
    p.capacity(per_batch=1, slots=1)  # a hot node: batches of one on one slot
    assert p.predicted_wait(8) == pytest.approx(8 * 0.2)
    assert p.refusal(queued=8, rows_ahead=8, deadline=11.0, now=10.0) is Refusal.OVERLOADED
