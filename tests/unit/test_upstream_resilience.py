"""The circuit breaker, the retry budget and the result cache that guard every upstream call (issue 11, item 4)."""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence

import pytest

from protos.inference import grpc_service_pb2 as pb
from services.circuit_breaker import BreakerSettings, BreakerState, CircuitBreaker, Ticket
from services.dataplane import InferCall, Relayed
from services.errors import (
    ConfigError,
    DeadlineExceededError,
    ModelNotReadyError,
    RequestCancelledError,
    UnavailableError,
)
from services.inference import DEGRADED, FALLBACK_REASON, FallbackReason
from services.result_cache import ResultCache, ResultCacheSettings
from services.retry_budget import RetryBudget, RetrySettings
from services.rpc.guarded_upstream import CACHED, GuardedUpstream


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def _state(breaker: CircuitBreaker) -> BreakerState:
    """The state read afresh (a property mypy would otherwise narrow across calls that change it)."""
    return breaker.state


def _t(ticket: Ticket | None) -> Ticket:
    """The ticket of an admitted call."""
    assert ticket is not None, "the breaker refused the call"
    return ticket


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
        ticket = breaker.allow()
        assert ticket is not None
        breaker.failed(ticket, "unreachable")
    assert _state(breaker) is BreakerState.CLOSED
    ticket = breaker.allow()
    assert ticket is not None
    breaker.failed(ticket, "unreachable")
    assert _state(breaker) is BreakerState.OPEN
    assert not breaker.allow() and not breaker.allow()
    snapshot = breaker.snapshot()
    assert (snapshot.opened, snapshot.rejected, snapshot.failures) == (1, 2, 3)
    assert snapshot.retry_in_s == pytest.approx(2.0)
    assert "open" in breaker.refusal() and "edge:50051" in breaker.refusal() and "unreachable" in breaker.refusal()
    assert changes == [("closed", "open")]


def test_a_success_resets_the_consecutive_count() -> None:
    breaker, _ = _breaker(Clock(), consecutive_failures=3)
    for _ in range(10):  # (once it opens, calls are refused and report nothing)
        for failed in (True, True, False):
            ticket = breaker.allow()
            if ticket is not None:
                breaker.failed(ticket) if failed else breaker.succeeded(ticket)
    # 2 failures in a row at most, and the rate rule needs 20 calls at a share of 0.67 ≥ 0.5: it opens by rate
    assert _state(breaker) is BreakerState.OPEN
    breaker2, _ = _breaker(Clock(), consecutive_failures=3, failure_rate=0.9)
    for _ in range(10):
        breaker2.failed(_t(breaker2.allow()))
        breaker2.succeeded(_t(breaker2.allow()))
    assert _state(breaker2) is BreakerState.CLOSED


def test_the_failure_rate_counts_only_the_window() -> None:
    clock = Clock()
    breaker, _ = _breaker(clock, consecutive_failures=100, failure_rate=0.5, min_calls=10, window_s=5)
    for _ in range(9):
        breaker.failed(_t(breaker.allow()))
        breaker.succeeded(_t(breaker.allow()))
        clock.now += 1  # old outcomes leave the window as new ones come
    assert _state(breaker) is BreakerState.CLOSED
    for _ in range(5):
        ticket = breaker.allow()
        if ticket is not None:  # once it opens, calls are refused
            breaker.failed(ticket)
    assert _state(breaker) is BreakerState.OPEN


def test_half_open_lets_one_probe_through_and_closes_on_its_success() -> None:
    clock = Clock()
    breaker, changes = _breaker(clock, consecutive_failures=1, open_s=2, probes=1)
    breaker.failed(_t(breaker.allow()))
    clock.now += 2.0
    assert _state(breaker) is BreakerState.HALF_OPEN
    probe = breaker.allow()  # the probe
    assert probe is not None and probe.probe
    assert not breaker.allow()  # others do not wait behind it
    breaker.succeeded(probe)
    assert _state(breaker) is BreakerState.CLOSED and breaker.allow()
    assert changes == [("closed", "open"), ("open", "half_open"), ("half_open", "closed")]


def test_a_failed_probe_opens_again_for_longer_up_to_the_cap() -> None:
    clock = Clock()
    breaker, _ = _breaker(clock, consecutive_failures=1, open_s=1, max_open_s=3)
    breaker.failed(_t(breaker.allow()))
    waits = []
    for _ in range(4):
        waits.append(breaker.retry_in())
        clock.now += breaker.retry_in()
        ticket = breaker.allow()
        assert ticket is not None
        breaker.failed(ticket, "still down")
    assert waits == [pytest.approx(1), pytest.approx(2), pytest.approx(3), pytest.approx(3)]
    clock.now += breaker.retry_in()
    ticket = breaker.allow()
    assert ticket is not None
    breaker.succeeded(ticket)
    # closed again: the next opening starts from the first cool-down
    breaker.failed(_t(breaker.allow()))
    assert breaker.retry_in() == pytest.approx(1)


def test_a_cancelled_probe_frees_its_slot() -> None:
    clock = Clock()
    breaker, _ = _breaker(clock, consecutive_failures=1, open_s=1)
    breaker.failed(_t(breaker.allow()))
    clock.now += 1
    ticket = breaker.allow()
    assert ticket is not None
    breaker.released(ticket)
    assert breaker.allow()


def test_late_outcomes_of_calls_admitted_before_the_breaker_opened_leave_the_probes_alone() -> None:
    clock = Clock()
    breaker, changes = _breaker(clock, consecutive_failures=1, open_s=1)
    late_success, late_cancel, late_failure = (_t(breaker.allow()) for _ in range(3))  # admitted while closed
    breaker.failed(_t(breaker.allow()), "unreachable")  # opens it
    clock.now += 1
    probe = _t(breaker.allow())
    assert probe.probe and breaker.allow() is None
    breaker.succeeded(late_success)  # a success of the closed epoch does not close it
    assert _state(breaker) is BreakerState.HALF_OPEN
    breaker.released(late_cancel)  # nor does a cancel free the probe's slot
    assert breaker.allow() is None
    breaker.failed(late_failure, "late")  # nor does a late failure reopen it while the probe is in flight
    assert _state(breaker) is BreakerState.HALF_OPEN
    breaker.succeeded(probe)  # the real probe decides
    assert _state(breaker) is BreakerState.CLOSED
    assert changes == [("closed", "open"), ("open", "half_open"), ("half_open", "closed")]


def test_a_probe_of_an_earlier_half_open_spell_does_not_decide_the_next_one() -> None:
    clock = Clock()
    breaker, _ = _breaker(clock, consecutive_failures=1, open_s=1, probes=2)
    breaker.failed(_t(breaker.allow()))
    clock.now += 1
    first, second = _t(breaker.allow()), _t(breaker.allow())
    breaker.failed(first)  # reopens; ``second`` is still in flight
    clock.now += breaker.retry_in()
    probes = [_t(breaker.allow()), _t(breaker.allow())]
    breaker.succeeded(second)  # late: neither counts as one of the two probes nor frees a slot
    assert breaker.allow() is None and _state(breaker) is BreakerState.HALF_OPEN
    breaker.succeeded(probes[0])
    assert _state(breaker) is BreakerState.HALF_OPEN
    breaker.succeeded(probes[1])
    assert _state(breaker) is BreakerState.CLOSED


def test_a_late_outcome_feeds_the_window_only_while_closed() -> None:
    clock = Clock()
    breaker, _ = _breaker(clock, consecutive_failures=2, open_s=1)
    old = _t(breaker.allow())
    breaker.failed(_t(breaker.allow()))
    breaker.failed(_t(breaker.allow()))  # opens
    breaker.failed(old)  # late while open: not counted toward anything but the total
    clock.now += 1
    breaker.succeeded(_t(breaker.allow()))  # the probe closes it
    late = _t(breaker.allow())
    breaker.failed(late)  # closed: counted in the window, one in a row
    assert _state(breaker) is BreakerState.CLOSED
    breaker.failed(_t(breaker.allow()))
    assert _state(breaker) is BreakerState.OPEN


@pytest.mark.parametrize(
    "bad",
    [
        {"consecutive_failures": 0},
        {"failure_rate": 0.0},
        {"failure_rate": float("nan")},
        {"window_s": -1},
        {"open_s": 10, "max_open_s": 5},
        {"probes": 0},
        {"min_timeout_s": -1},
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


# -- the guard around the upstream adapter (a fake adapter: no transport) --------------------------------------


class FakeUpstream:
    """An upstream adapter whose calls fail or answer as the test says; counts the calls it got."""

    def __init__(self) -> None:
        self.calls = 0
        self.fail: BaseException | None = None
        self.response = pb.ModelInferResponse(model_name="m", model_version="1")
        self.stream_messages: list[pb.ModelStreamInferResponse] = []

    def available(self) -> bool:
        return True

    async def infer(self, call: InferCall, reason: FallbackReason, timeout: float, route: Sequence[str]) -> Relayed:
        self.calls += 1
        if self.fail is not None:
            raise self.fail
        response = pb.ModelInferResponse()
        response.CopyFrom(self.response)
        response.parameters[FALLBACK_REASON].string_param = reason
        return Relayed(response, reason)

    async def stream(
        self, call: InferCall, reason: FallbackReason, timeout: float, route: Sequence[str]
    ) -> AsyncIterator[Relayed]:
        self.calls += 1
        if self.fail is not None:
            raise self.fail
        for message in self.stream_messages:
            yield Relayed(message, reason)


def _guard(
    inner: FakeUpstream, clock: Clock | None = None, attempts: int = 3, cache: int = 0, **breaker: float
) -> GuardedUpstream:
    return GuardedUpstream(
        inner,  # type: ignore[arg-type]
        CircuitBreaker("edge:1", BreakerSettings(**breaker), clock=clock or Clock()),  # type: ignore[arg-type]
        RetryBudget(RetrySettings(max_tokens=10)),
        RetrySettings(attempts=attempts, initial_backoff_s=0.001, max_backoff_s=0.002),
        ResultCache(ResultCacheSettings(max_bytes=cache)),
    )


def _call(model: str = "m") -> InferCall:
    request = pb.ModelInferRequest(model_name=model)
    return InferCall(model, "", {}, lambda: None, wire=request)  # type: ignore[arg-type,return-value]


REASON = FallbackReason.LOW_CONFIDENCE


async def test_a_timeout_of_an_attempt_given_too_little_time_does_not_count_against_the_upstream() -> None:
    inner = FakeUpstream()
    inner.fail = DeadlineExceededError("upstream took too long")
    guard = _guard(inner, consecutive_failures=1, min_timeout_s=0.05)
    with pytest.raises(DeadlineExceededError):
        await guard.infer(_call(), REASON, 0.02, [])
    assert _state(guard.breaker) is BreakerState.CLOSED and guard.breaker.failures == 0
    with pytest.raises(DeadlineExceededError):
        await guard.infer(_call(), REASON, 0.2, [])
    assert _state(guard.breaker) is BreakerState.OPEN
    # An attempt below the cascade's floor is not even sent.
    fresh = FakeUpstream()
    guard = _guard(fresh)
    with pytest.raises(DeadlineExceededError, match="too little of the deadline"):
        await guard.infer(_call(), REASON, 0.001, [])
    assert fresh.calls == 0 and guard.breaker.failures == 0


async def test_a_cancelled_status_from_the_upstream_counts_as_its_failure() -> None:
    inner = FakeUpstream()
    inner.fail = RequestCancelledError("the upstream cancelled the call")
    inner.fail.from_peer = True
    guard = _guard(inner, consecutive_failures=1)
    with pytest.raises(RequestCancelledError):
        await guard.infer(_call(), REASON, 1.0, [])
    assert _state(guard.breaker) is BreakerState.OPEN


async def test_an_unexpected_error_of_a_probe_frees_its_slot() -> None:
    clock = Clock()
    inner = FakeUpstream()
    guard = _guard(inner, clock, consecutive_failures=1, open_s=1)
    inner.fail = UnavailableError("down")
    with pytest.raises(UnavailableError):
        await guard.infer(_call(), REASON, 1.0, [])
    assert _state(guard.breaker) is BreakerState.OPEN
    clock.now += 1

    async def streamed() -> None:
        async for _ in guard.stream(_call(), REASON, 1.0, []):
            pass

    inner.fail = RuntimeError("a bug in the adapter")
    for path in (lambda: guard.infer(_call(), REASON, 1.0, []), streamed):
        with pytest.raises(RuntimeError):
            await path()
        assert _state(guard.breaker) is BreakerState.HALF_OPEN
    inner.fail = None
    await guard.infer(_call(), REASON, 1.0, [])  # the probe slot is free: this call is the probe
    assert _state(guard.breaker) is BreakerState.CLOSED


async def test_a_relayed_stream_whose_first_message_is_an_error_neither_closes_nor_reopens_the_breaker() -> None:
    clock = Clock()
    inner = FakeUpstream()
    guard = _guard(inner, clock, consecutive_failures=1, open_s=1)
    inner.fail = UnavailableError("down")
    with pytest.raises(UnavailableError):
        await guard.infer(_call(), REASON, 1.0, [])
    clock.now += 1
    inner.fail = None
    inner.stream_messages = [pb.ModelStreamInferResponse(error_message="model 'm' is not ready")]
    got = [relayed.message async for relayed in guard.stream(_call(), REASON, 1.0, [])]
    assert [m.error_message for m in got] == ["model 'm' is not ready"]
    # It may be the caller's own mistake (no error class in-band): not a success, not a failure either.
    assert _state(guard.breaker) is BreakerState.HALF_OPEN, "an in-band error must not close the breaker"
    assert guard.breaker.opened == 1, "an in-band error must not reopen it (any client could)"
    inner.stream_messages = [pb.ModelStreamInferResponse()]
    [m async for m in guard.stream(_call(), REASON, 1.0, [])]  # the released slot lets the next probe through
    assert _state(guard.breaker) is BreakerState.CLOSED


async def test_only_retries_actually_sent_are_counted() -> None:
    inner = FakeUpstream()
    inner.fail = UnavailableError("down")
    guard = _guard(inner, attempts=2, consecutive_failures=100)
    with pytest.raises(UnavailableError):
        await guard.infer(_call(), REASON, 1.0, [])
    assert inner.calls == 2
    assert guard.budget.retries == 1, "the last failure is not retried (attempts used up): no retry to count"


async def test_an_error_from_beyond_the_upstream_is_not_retried_nor_counted_and_is_marked_relayed() -> None:
    inner = FakeUpstream()
    error = ModelNotReadyError("the region's model 'm' is not ready")
    error.from_peer = error.beyond = True
    inner.fail = error
    guard = _guard(inner, consecutive_failures=1)
    with pytest.raises(ModelNotReadyError) as caught:
        await guard.infer(_call(), REASON, 1.0, [])
    assert inner.calls == 1 and guard.breaker.state is BreakerState.CLOSED
    assert caught.value.relayed
    own = FakeUpstream()
    own.fail = ModelNotReadyError("the edge's model 'm' is not ready")
    own.fail.from_peer = True
    guard = _guard(own, attempts=2, consecutive_failures=2)
    with pytest.raises(ModelNotReadyError):
        await guard.infer(_call(), REASON, 1.0, [])
    assert own.calls == 2 and guard.breaker.state is BreakerState.OPEN  # its own: retried and counted


async def test_degraded_answers_are_not_cached_and_a_hit_carries_this_calls_reason() -> None:
    inner = FakeUpstream()
    inner.response.parameters[DEGRADED].string_param = "upstream_timeout"
    guard = _guard(inner, cache=1 << 20)
    await guard.infer(_call(), REASON, 1.0, [])
    await guard.infer(_call(), REASON, 1.0, [])
    assert inner.calls == 2, "a degraded answer must not be served from the cache"
    del inner.response.parameters[DEGRADED]
    await guard.infer(_call(), FallbackReason.LOW_CONFIDENCE, 1.0, [])
    hit = (await guard.infer(_call(), FallbackReason.QUEUE_FULL, 1.0, [])).message
    assert inner.calls == 3 and hit.parameters[CACHED].bool_param
    assert hit.parameters[FALLBACK_REASON].string_param == FallbackReason.QUEUE_FULL
