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
from services.errors import CircuitOpenError, InvalidArgumentError
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

    def available(self) -> bool:
        return True

    async def generator(self, model: str, timeout: float, route: Sequence[str]) -> UpstreamGenerator:
        return UpstreamGenerator(model, self.vocab, self.context_length, self.max_batch_size)

    async def distribution(
        self, model: str, version: str, input_ids: Array, timeout: float, route: Sequence[str]
    ) -> Array:
        self.calls.append(input_ids)
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


async def test_an_upstream_model_with_another_vocabulary_is_not_used() -> None:
    upstream = FakeUpstream(EDGE, vocab=("", "", *"wxyz"))
    cascade = TokenCascade(TokenCascadeSettings(), upstream, Cascade())
    _, tally = await run(cascade, CascadePlan("confidence", "big", 1.0, "chosen_prob"), max_tokens=5)
    assert tally.degraded == DEGRADED_INCOMPATIBLE and not upstream.calls and tally.tokens_local == 5
