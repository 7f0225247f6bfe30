"""The token cascade's core (services.cascade_generation) against a fake upstream: plans, windows, bounds, failures."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pytest

from services.cascade import Cascade, CascadeSettings
from services.cascade_generation import (
    DEGRADED_INCOMPATIBLE,
    PAIR_PROPERTY,
    SIGNAL_MAX,
    CascadePlan,
    CascadeTally,
    CascadeToken,
    TokenCascade,
    TokenCascadeSettings,
    UpstreamGenerator,
)
from services.engine.generation import CharTokenizer, GenerationParams
from services.errors import CircuitOpenError, DeadlineExceededError, InvalidArgumentError, RequestCancelledError
from services.inference import CASCADE, THRESHOLD, TOKEN_LOCAL, TOKEN_UPSTREAM

VOCAB = ["", "", *"abcd"]
Array = np.ndarray[Any, Any]


@dataclass
class FakeUpstream:
    """A paired model whose distribution is fixed; records every call's rows."""

    probs: Array
    vocab: tuple[str, ...] = tuple(VOCAB)
    context_length: int = 6
    max_batch_size: int = 64
    fail: Exception | None = None
    calls: list[Array] = field(default_factory=list)
    described: int = 0
    delay_s: float = 0.0  # each distribution call takes this long (or fails with DEADLINE_EXCEEDED at its timeout)
    timeouts: list[float] = field(default_factory=list)

    def available(self) -> bool:
        return True

    async def generator(self, model: str, timeout: float, route: Sequence[str]) -> UpstreamGenerator:
        self.described += 1
        return UpstreamGenerator(model, self.vocab, self.context_length, self.max_batch_size)

    async def distribution(
        self, model: str, version: str, input_ids: Array, timeout: float, route: Sequence[str]
    ) -> Array:
        self.calls.append(input_ids)
        self.timeouts.append(timeout)
        if self.delay_s:
            try:
                await asyncio.wait_for(asyncio.sleep(self.delay_s), timeout)
            except TimeoutError:
                raise DeadlineExceededError("upstream took too long") from None
        if self.fail is not None:
            raise self.fail
        return np.tile(self.probs, (len(input_ids), 1))


def device_step(probs: Array) -> Any:
    async def step(ids: Array) -> Array:
        assert ids.shape == (1, 4)
        return probs[None, :]

    return step


DEVICE = np.array([0.0, 0.0, 0.7, 0.1, 0.1, 0.1])  # sure of "a"
EDGE = np.array([0.0, 0.0, 0.1, 0.1, 0.1, 0.7])  # sure of "d"


async def run(
    cascade: TokenCascade, plan: CascadePlan, device: Array = DEVICE, **params: Any
) -> tuple[list[CascadeToken], CascadeTally]:
    tally = CascadeTally()
    deadline = asyncio.get_running_loop().time() + 10
    tokens = [
        t
        async for t in cascade.generate(
            plan,
            CharTokenizer(VOCAB, 4),
            device_step(device),
            "ab",
            GenerationParams(**{"seed": 0, **params}),
            ("tier0:d",),
            deadline,
            tally,
        )
    ]
    return tokens, tally


def test_plan_pairing_mode_and_threshold() -> None:
    cascade = TokenCascade(TokenCascadeSettings(pairs={"lm": "big"}, threshold=0.4), FakeUpstream(EDGE), Cascade())
    assert cascade.plan("other", {}, {}) is None  # no pairing: the node's default mode does not apply
    with pytest.raises(InvalidArgumentError, match="no upstream model"):
        cascade.plan("other", {}, {CASCADE: "confidence"})
    # Forwarded by a node that accepted the parameters: generated here without the cascade, not refused.
    assert cascade.plan("other", {}, {CASCADE: "confidence"}, forwarded=True) is None
    assert cascade.plan("lm", {}, {CASCADE: "off"}) is None
    assert cascade.plan("lm", {}, {}) == CascadePlan("confidence", "big", 0.4, "chosen_prob")
    assert cascade.plan("lm", {}, {CASCADE: "speculative", THRESHOLD: 0.9}) == CascadePlan(
        "speculative", "big", 0.9, "chosen_prob"
    )
    # Signed pairing, and the [cascade] policy's per-model threshold over the token default.
    policy = Cascade(CascadeSettings(thresholds={"small": 0.2}))
    signed = TokenCascade(TokenCascadeSettings(), FakeUpstream(EDGE), policy)
    assert signed.plan("small", {PAIR_PROPERTY: "big"}, {}) == CascadePlan("confidence", "big", 0.2, "chosen_prob")
    with pytest.raises(InvalidArgumentError):
        signed.plan("small", {PAIR_PROPERTY: "big"}, {THRESHOLD: -0.1})


async def test_confidence_mode_escalates_unsure_steps_with_the_upstreams_own_window() -> None:
    upstream = FakeUpstream(EDGE)
    cascade = TokenCascade(TokenCascadeSettings(), upstream, Cascade())
    tokens, tally = await run(cascade, CascadePlan("confidence", "big", 0.5, "chosen_prob"), max_tokens=30)
    for t in tokens:  # a local token is "a" (0.7 ≥ 0.5); any other device pick went up
        assert (t.origin == TOKEN_LOCAL) == (t.confidence is not None and t.confidence >= 0.5)
        assert t.origin == TOKEN_UPSTREAM or t.text == "a"
    assert tally.tokens_escalated == tally.upstream_calls == len(upstream.calls) > 0
    first = upstream.calls[0]
    assert first.shape == (1, 6)  # the upstream model's context length, left-padded

    # max_prob decides before sampling: 0.7 ≥ 0.5 always, never escalated.
    upstream.calls.clear()
    _, tally = await run(cascade, CascadePlan("confidence", "big", 0.5, SIGNAL_MAX), max_tokens=10)
    assert (tally.tokens_local, tally.upstream_calls) == (10, 0)


async def test_speculative_blocks_respect_the_upstreams_max_batch_size() -> None:
    upstream = FakeUpstream(EDGE, max_batch_size=2)
    cascade = TokenCascade(TokenCascadeSettings(k_max=8), upstream, Cascade())
    tokens, tally = await run(cascade, CascadePlan("speculative", "big", 0.5, "chosen_prob"), max_tokens=25)
    assert len(tokens) == tally.tokens == 25
    assert all(len(rows) <= 2 for rows in upstream.calls)
    assert tally.drafted <= tally.upstream_calls  # k = 1 when only 2 rows fit
    assert tally.tokens_local == tally.accepted


async def test_a_failing_upstream_degrades_once_and_the_rest_is_local() -> None:
    upstream = FakeUpstream(EDGE, fail=CircuitOpenError("breaker open"))
    cascade = TokenCascade(TokenCascadeSettings(), upstream, Cascade())
    for mode in ("confidence", "speculative"):
        upstream.calls.clear()
        tokens, tally = await run(cascade, CascadePlan(mode, "big", 1.0, "chosen_prob"), max_tokens=12)
        assert tally.degraded == "circuit_open"
        assert len(upstream.calls) == 1 and all(t.origin == TOKEN_LOCAL for t in tokens) and len(tokens) == 12
        assert tally.upstream_calls == 0, "a call this node's breaker refused was never sent"


async def test_an_upstream_model_with_another_vocabulary_is_not_used() -> None:
    upstream = FakeUpstream(EDGE, vocab=("", "", *"wxyz"))
    cascade = TokenCascade(TokenCascadeSettings(), upstream, Cascade())
    _, tally = await run(cascade, CascadePlan("confidence", "big", 1.0, "chosen_prob"), max_tokens=5)
    assert tally.degraded == DEGRADED_INCOMPATIBLE and not upstream.calls and tally.tokens_local == 5


async def _timed_run(
    cascade: TokenCascade, plan: CascadePlan, seconds: float, step_s: float, max_tokens: int
) -> tuple[list[CascadeToken], CascadeTally, float]:
    """A generation whose device steps take ``step_s`` and whose deadline is ``seconds`` away; also the
    seconds left of the deadline when it ended."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + seconds

    async def step(ids: Array) -> Array:
        await asyncio.sleep(step_s)
        return DEVICE[None, :]

    tally = CascadeTally()
    params = GenerationParams(seed=0, max_tokens=max_tokens)
    tokens = [
        t
        async for t in cascade.generate(
            plan, CharTokenizer(VOCAB, 4), step, "ab", params, ("tier0:d",), deadline, tally
        )
    ]
    return tokens, tally, deadline - loop.time()


async def test_a_slow_upstream_leaves_the_generation_time_to_finish_locally() -> None:
    upstream = FakeUpstream(EDGE, delay_s=30.0)
    cascade = TokenCascade(TokenCascadeSettings(), upstream, Cascade())
    for mode in ("confidence", "speculative"):
        upstream.calls.clear()
        tokens, tally, left = await _timed_run(cascade, CascadePlan(mode, "big", 1.0, "chosen_prob"), 1.0, 0.01, 20)
        assert len(tokens) == 20 and all(t.origin == TOKEN_LOCAL for t in tokens)
        assert tally.degraded == "upstream_timeout" and len(upstream.calls) == 1
        assert left > 0, "the generation must end before its deadline"
        # The call's timeout left the 19 remaining steps (and the reserve) out of the second it had.
        assert upstream.timeouts[-1] < 1.0 - 19 * 0.01


async def test_too_little_time_for_the_rest_of_the_generation_stops_the_escalations() -> None:
    upstream = FakeUpstream(EDGE)
    cascade = TokenCascade(TokenCascadeSettings(describe_ttl_s=0), upstream, Cascade())
    # 40 steps of 10 ms need 0.4 s here (with its margin, 0.6 s): a deadline of 0.3 s leaves no time to ask.
    tokens, tally, _ = await _timed_run(cascade, CascadePlan("confidence", "big", 1.0, "chosen_prob"), 0.3, 0.01, 40)
    assert tally.degraded == "deadline" and not upstream.calls and upstream.described == 0
    assert len(tokens) == 40 and all(t.origin == TOKEN_LOCAL for t in tokens)


async def test_threshold_zero_never_asks_the_upstream_anything() -> None:
    upstream = FakeUpstream(EDGE, fail=CircuitOpenError("breaker open"))
    cascade = TokenCascade(TokenCascadeSettings(), upstream, Cascade())
    _, tally = await run(cascade, CascadePlan("confidence", "big", 0.0, "chosen_prob"), max_tokens=8)
    assert upstream.described == 0 and not upstream.calls
    assert tally.degraded == "" and tally.tokens_local == 8


async def test_a_cancelled_status_from_the_upstream_degrades_the_generation() -> None:
    cancelled = RequestCancelledError("the upstream cancelled the call")
    cancelled.from_peer = True
    upstream = FakeUpstream(EDGE, fail=cancelled)
    cascade = TokenCascade(TokenCascadeSettings(), upstream, Cascade())
    tokens, tally = await run(cascade, CascadePlan("confidence", "big", 1.0, "chosen_prob"), max_tokens=6)
    assert tally.degraded == "upstream_error" and len(tokens) == 6 and tally.upstream_calls == 1
