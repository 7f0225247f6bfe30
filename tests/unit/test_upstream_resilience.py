"""The circuit breaker, the retry budget and the result cache that guard every upstream call (issue 11, item 4)."""

from __future__ import annotations

import pytest

from services.circuit_breaker import BreakerSettings, BreakerState, CircuitBreaker
from services.errors import ConfigError
from services.result_cache import ResultCache, ResultCacheSettings
from services.retry_budget import RetryBudget, RetrySettings


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def _state(breaker: CircuitBreaker) -> BreakerState:
    """The state read afresh (a property mypy would otherwise narrow across calls that change it)."""
    return breaker.state


def _breaker(clock: Clock, **settings: float) -> tuple[CircuitBreaker, list[tuple[str, str]]]:
    changes: list[tuple[str, str]] = []
    breaker = CircuitBreaker(
        "edge:50051",
        BreakerSettings(**settings),  # type: ignore[arg-type]
        clock=clock,
        on_change=lambda old, new: changes.append((old.value, new.value)),
    )
    return breaker, changes


def test_the_breaker_opens_after_consecutive_failures_and_refuses_at_once() -> None:
    clock = Clock()
    breaker, changes = _breaker(clock, consecutive_failures=3)
    for _ in range(2):
        assert breaker.allow()
        breaker.failed("unreachable")
    assert _state(breaker) is BreakerState.CLOSED
    assert breaker.allow()
    breaker.failed("unreachable")
    assert _state(breaker) is BreakerState.OPEN
    assert not breaker.allow() and not breaker.allow()
    snapshot = breaker.snapshot()
    assert (snapshot.opened, snapshot.rejected, snapshot.failures) == (1, 2, 3)
    assert snapshot.retry_in_s == pytest.approx(2.0)
    assert "open" in breaker.refusal() and "edge:50051" in breaker.refusal() and "unreachable" in breaker.refusal()
    assert changes == [("closed", "open")]


def test_a_success_resets_the_consecutive_count() -> None:
    breaker, _ = _breaker(Clock(), consecutive_failures=3)
    for _ in range(10):
        breaker.allow()
        breaker.failed()
        breaker.allow()
        breaker.failed()
        breaker.allow()
        breaker.succeeded()
    # 2 failures in a row at most, and the rate rule needs 20 calls at a share of 0.67 ≥ 0.5: it opens by rate
    assert _state(breaker) is BreakerState.OPEN
    breaker2, _ = _breaker(Clock(), consecutive_failures=3, failure_rate=0.9)
    for _ in range(10):
        breaker2.allow()
        breaker2.failed()
        breaker2.allow()
        breaker2.succeeded()
    assert _state(breaker2) is BreakerState.CLOSED


def test_the_failure_rate_counts_only_the_window() -> None:
    clock = Clock()
    breaker, _ = _breaker(clock, consecutive_failures=100, failure_rate=0.5, min_calls=10, window_s=5)
    for _ in range(9):
        breaker.allow()
        breaker.failed()
        breaker.allow()
        breaker.succeeded()
        clock.now += 1  # old outcomes leave the window as new ones come
    assert _state(breaker) is BreakerState.CLOSED
    for _ in range(5):
        breaker.allow()
        breaker.failed()
    assert _state(breaker) is BreakerState.OPEN


def test_half_open_lets_one_probe_through_and_closes_on_its_success() -> None:
    clock = Clock()
    breaker, changes = _breaker(clock, consecutive_failures=1, open_s=2, probes=1)
    breaker.allow()
    breaker.failed()
    clock.now += 2.0
    assert _state(breaker) is BreakerState.HALF_OPEN
    assert breaker.allow()  # the probe
    assert not breaker.allow()  # others do not wait behind it
    breaker.succeeded()
    assert _state(breaker) is BreakerState.CLOSED and breaker.allow()
    assert changes == [("closed", "open"), ("open", "half_open"), ("half_open", "closed")]


def test_a_failed_probe_opens_again_for_longer_up_to_the_cap() -> None:
    clock = Clock()
    breaker, _ = _breaker(clock, consecutive_failures=1, open_s=1, max_open_s=3)
    breaker.allow()
    breaker.failed()
    waits = []
    for _ in range(4):
        waits.append(breaker.retry_in())
        clock.now += breaker.retry_in()
        assert breaker.allow()
        breaker.failed("still down")
    assert waits == [pytest.approx(1), pytest.approx(2), pytest.approx(3), pytest.approx(3)]
    clock.now += breaker.retry_in()
    assert breaker.allow()
    breaker.succeeded()
    # closed again: the next opening starts from the first cool-down
    breaker.allow()
    breaker.failed()
    assert breaker.retry_in() == pytest.approx(1)


def test_a_cancelled_probe_frees_its_slot() -> None:
    clock = Clock()
    breaker, _ = _breaker(clock, consecutive_failures=1, open_s=1)
    breaker.allow()
    breaker.failed()
    clock.now += 1
    assert breaker.allow()
    breaker.released()
    assert breaker.allow()


@pytest.mark.parametrize(
    "bad",
    [
        {"consecutive_failures": 0},
        {"failure_rate": 0.0},
        {"failure_rate": float("nan")},
        {"window_s": -1},
        {"open_s": 10, "max_open_s": 5},
        {"probes": 0},
    ],
)
def test_bad_breaker_settings_are_refused(bad: dict[str, float]) -> None:
    with pytest.raises(ConfigError):
        BreakerSettings(**bad)  # type: ignore[arg-type]


def test_the_retry_budget_stops_retries_once_most_calls_fail_and_refills_with_successes() -> None:
    budget = RetryBudget(RetrySettings(max_tokens=10, token_ratio=0.5))
    allowed = 0
    for _ in range(100):  # every attempt fails: a storm would retry all 100
        budget.failed()
        if budget.allow_retry():
            allowed += 1
            budget.failed()
    assert allowed <= 3
    assert budget.refused >= 97
    for _ in range(12):
        budget.succeeded()
    assert budget.allow_retry()


@pytest.mark.parametrize("bad", [{"attempts": 0}, {"initial_backoff_s": 0}, {"token_ratio": 2}, {"max_tokens": 0}])
def test_bad_retry_settings_are_refused(bad: dict[str, float]) -> None:
    with pytest.raises(ConfigError):
        RetrySettings(**bad)  # type: ignore[arg-type]


def test_the_result_cache_hits_on_repeats_and_stays_within_its_bytes() -> None:
    clock = Clock()
    cache = ResultCache(ResultCacheSettings(max_bytes=100, max_entry_bytes=60, ttl_s=10), clock)
    assert cache.get(b"k1") is None
    assert cache.put(b"k1", b"a" * 35, "lm", "1")
    assert cache.get(b"k1") == b"a" * 35
    assert cache.put(b"k2", b"b" * 35, "lm", "1")
    cache.get(b"k1")  # k1 is now the most recently used
    assert cache.put(b"k3", b"c" * 35, "lm", "1")  # 3 × 37 bytes > 100: the least recently used (k2) goes
    assert cache.used_bytes <= 100
    assert cache.get(b"k2") is None and cache.get(b"k1") is not None and cache.get(b"k3") is not None
    assert not cache.put(b"big", b"x" * 70, "lm", "1")
    assert cache.stats.too_large == 1 and cache.stats.evicted == 1
    assert cache.stats.hit_rate == pytest.approx(4 / 6)


def test_the_result_cache_never_serves_a_stale_or_another_versions_answer() -> None:
    clock = Clock()
    cache = ResultCache(ResultCacheSettings(ttl_s=5), clock)
    cache.put(b"lm||x", b"v1 answer", "lm", "1")
    cache.put(b"other||x", b"other answer", "other", "3")
    # the upstream now answers lm with version 2: every lm answer of version 1 goes, other models stay
    cache.put(b"lm||y", b"v2 answer", "lm", "2")
    assert cache.get(b"lm||x") is None
    assert cache.get(b"lm||y") == b"v2 answer"
    assert cache.get(b"other||x") == b"other answer"
    assert cache.stats.invalidated == 1
    clock.now += 5.1
    assert cache.get(b"lm||y") is None
    assert cache.stats.expired == 1
    assert len(cache) == 1 and cache.used_bytes == len(b"other||x") + len(b"other answer")


def test_a_cache_of_zero_bytes_stores_nothing() -> None:
    cache = ResultCache(ResultCacheSettings(max_bytes=0))
    assert not cache.enabled
    assert not cache.put(b"k", b"v", "lm", "1")
    assert cache.get(b"k") is None
