"""The token-level cascade and cross-tier speculative decoding of a generator (issue 11, items 2 and 3).

A device model that declares a *pairing* — the upstream model it escalates to,
from the node's ``[token_cascade] pairs`` or its signed metadata
(:data:`PAIR_PROPERTY`) — generates in one of two cascade modes, chosen by the
request's ``edgecascade.cascade`` parameter, else the node's ``[cascade] mode``
(both read by :class:`services.cascade.Cascade`, as is the threshold: the
request's ``edgecascade.threshold``, else ``[cascade] thresholds``, else the
signed ``edgecascade.confidence_threshold``, else ``[token_cascade] threshold``).
A model without a pairing generates alone unless the request asks for a
cascade, which is then refused as an invalid argument by the node the client
called (a node the request was forwarded to generates it without the cascade:
the node below accepted its parameters).

``confidence``
    At each step the device samples a token from its own distribution and keeps
    it when its confidence reaches the threshold; otherwise it asks the upstream
    model for that step's distribution (one ``ModelInfer`` on the current
    context, cut to the upstream model's own context length) and samples from
    that. The confidence is the probability the device gave the token it
    sampled (``chosen_prob``, the default) or its distribution's maximum
    (``max_prob``): ``bench/token_signal.py`` measured that with sampling the
    chosen token's probability recovers far more of the edge's accuracy gain at
    any share of local tokens (greedy: the two are the same number).
``speculative``
    The device drafts ``k`` tokens; the upstream scores the ``k + 1`` context
    windows in one call (``k + 1`` never exceeds its ``max_batch_size``); the
    standard rule (:func:`services.engine.speculative.verify`) keeps the
    accepted prefix plus one corrected or bonus token, so the output follows
    the upstream model's sampling distribution exactly; ``k`` adapts to the
    recent acceptance rate (:class:`~services.engine.speculative.AdaptiveK`).

Each token says where it came from (``local`` | ``upstream``) and a
:class:`CascadeTally` adds them up for the final response. When the upstream
fails (unreachable, breaker open, too slow, refuses), the generation goes on
with the local model alone and is marked degraded with the reason; no later
step of that generation waits on the upstream again. Every upstream call leaves
enough of the generation's deadline for the steps still to run here (timed on
the device's own steps, plus the cascade's reserve); when less is left, the
generation stops asking and is marked degraded with ``deadline``. At threshold 0
confidence mode never asks the upstream anything.

The upstream is reached through the data plane's ``Upstream`` port (the two
methods of :class:`GeneratorUpstream`); this module imports no transport.
"""

from __future__ import annotations

import asyncio
import logging
import math
import os
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np

from services.cascade import DEGRADED_DEADLINE, MIN_UPSTREAM_S, Cascade, degraded_reason, reserve
from services.engine import speculative
from services.engine.generation import (
    CharTokenizer,
    GenerationParams,
    choose,
    sampling_distribution,
)
from services.errors import (
    CircuitOpenError,
    DeadlineExceededError,
    EdgecascadeError,
    InvalidArgumentError,
)
from services.hard_examples import Escalation
from services.inference import (
    CASCADE,
    CASCADE_OFF,
    CASCADE_SPECULATIVE,
    TOKEN_LOCAL,
    TOKEN_UPSTREAM,
    ParamValue,
)

log = logging.getLogger("edgecascade.cascade")

Array = np.ndarray[Any, Any]

# Signed metadata of a device generator: the upstream model it escalates to.
PAIR_PROPERTY = "edgecascade.cascade.upstream_model"

# Confidence signals of one step.
SIGNAL_CHOSEN = "chosen_prob"  # the device's probability of the token it sampled (decided after sampling)
SIGNAL_MAX = "max_prob"  # the maximum of the device's distribution (decided before sampling)
SIGNALS = (SIGNAL_CHOSEN, SIGNAL_MAX)

# Values of ``edgecascade.degraded`` on a generation whose upstream failed, besides those of
# :func:`services.cascade.degraded_reason` (circuit_open, upstream_unavailable, upstream_timeout, ...).
DEGRADED_NO_UPSTREAM = "no_upstream"  # this node is the top of the chain
DEGRADED_INCOMPATIBLE = "upstream_incompatible"  # the paired model has another vocabulary, or answered nonsense

# How the time of the device's steps still to run is estimated: a moving average of each step's time
# (this weight on the newest), times a margin.
PACE_WEIGHT = 0.3
LOCAL_MARGIN = 1.5


@dataclass(frozen=True)
class UpstreamGenerator:
    """What the token cascade needs to know of the upstream's paired model.

    Attributes:
        name: The model name.
        vocab: Its vocabulary (must equal the device model's).
        context_length: Its context length: each window sent is cut or padded to it.
        max_batch_size: The most rows one call may carry (at least 1).
    """

    name: str
    vocab: tuple[str, ...]
    context_length: int
    max_batch_size: int


class GeneratorUpstream(Protocol):
    """The part of the data plane's ``Upstream`` port the token cascade uses."""

    def available(self) -> bool:
        """Whether there is a next tier."""
        ...

    async def generator(self, model: str, timeout: float, route: Sequence[str]) -> UpstreamGenerator:
        """Describes a generator model the upstream serves."""
        ...

    async def distribution(
        self, model: str, version: str, input_ids: Array, timeout: float, route: Sequence[str]
    ) -> Array:
        """Runs the upstream's ``model`` on ``input_ids`` ``[n, C]`` (one ModelInfer); returns ``probs`` ``[n, V]``."""
        ...


@dataclass(frozen=True)
class TokenCascadeSettings:
    """How a node runs the token-level cascade and speculative decoding of its generators.

    Attributes:
        pairs: Device model → the upstream model it escalates to (beats :data:`PAIR_PROPERTY`).
        threshold: The threshold of a paired model that has none from the request, ``[cascade]`` or its metadata.
        signal: The confidence signal, one of :data:`SIGNALS`.
        k_min: Fewest drafts per speculative block.
        k_max: Most drafts per speculative block (also bounded by the upstream's ``max_batch_size - 1``).
        draft_cost_ratio: Time of one draft step ÷ time of one upstream call (for choosing ``k``).
        call_timeout_s: The most one upstream call may take before the generation goes on alone.
        describe_ttl_s: How long the description of an upstream model is reused.
    """

    pairs: Mapping[str, str] = field(default_factory=dict)
    threshold: float = 0.4
    signal: str = SIGNAL_CHOSEN
    k_min: int = 1
    k_max: int = 8
    draft_cost_ratio: float = 0.1
    call_timeout_s: float = 2.0
    describe_ttl_s: float = 60.0

    def __post_init__(self) -> None:
        if not (math.isfinite(self.threshold) and 0.0 <= self.threshold <= 1.0):
            raise ValueError(f"token cascade threshold must be between 0 and 1, got {self.threshold}")
        if self.signal not in SIGNALS:
            raise ValueError(f"token cascade signal must be one of {', '.join(SIGNALS)}, got {self.signal!r}")
        if not 1 <= self.k_min <= self.k_max:
            raise ValueError(f"token cascade needs 1 <= k_min <= k_max, got {self.k_min} and {self.k_max}")
        if self.draft_cost_ratio <= 0 or self.call_timeout_s <= 0 or self.describe_ttl_s < 0:
            raise ValueError("token cascade draft_cost_ratio and call_timeout_s must be positive")


@dataclass(frozen=True)
class CascadePlan:
    """How one generation cascades."""

    mode: str  # CASCADE_CONFIDENCE or CASCADE_SPECULATIVE
    upstream_model: str
    threshold: float
    signal: str


@dataclass(frozen=True)
class CascadeToken:
    """One generated token.

    Attributes:
        index: Its position in the generation.
        text: Its text.
        probability: The probability of the distribution it was drawn from (the device's for a local
            token in confidence mode, the upstream's otherwise).
        origin: ``local`` or ``upstream``.
        confidence: The device's confidence at this step (confidence mode), else None.
    """

    index: int
    text: str
    probability: float
    origin: str
    confidence: float | None = None


@dataclass
class CascadeTally:
    """What one cascaded generation did, for its final response.

    With ``keep_escalations`` it also keeps each token the upstream decided against the device
    (:attr:`escalations`: confidence mode's escalated steps, speculative mode's corrected drafts), for a
    hard example (:mod:`services.hard_examples`).
    """

    tokens_local: int = 0
    tokens_escalated: int = 0
    upstream_calls: int = 0
    drafted: int = 0
    accepted: int = 0
    degraded: str = ""
    finish_reason: str = "length"
    confidences: list[float] = field(default_factory=list)
    probabilities: list[float] = field(default_factory=list)
    keep_escalations: bool = False
    escalations: list[Escalation] = field(default_factory=list)

    def escalated(self, escalation: Escalation) -> None:
        """Keeps one token the upstream decided (when asked to)."""
        if self.keep_escalations:
            self.escalations.append(escalation)

    @property
    def tokens(self) -> int:
        """Tokens emitted."""
        return self.tokens_local + self.tokens_escalated

    @property
    def mean_confidence(self) -> float:
        """The mean device confidence (confidence mode) or mean token probability (speculative)."""
        values = self.confidences or self.probabilities
        return float(np.mean(values)) if values else 0.0

    @property
    def min_probability(self) -> float:
        """The smallest token probability."""
        return float(np.min(self.probabilities)) if self.probabilities else 0.0


class _UpstreamFailedError(Exception):
    """The upstream could not help with this step; the generation goes on alone."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class _Text:
    """Tracks the end of the text for stop strings."""

    def __init__(self, params: GenerationParams) -> None:
        self._stops = params.stop
        self._keep = max((len(s) for s in params.stop), default=0)
        self._tail = ""

    def stopped_after(self, piece: str) -> bool:
        """Adds ``piece``; whether the text now ends with a stop string."""
        if not self._keep:
            return False
        self._tail = (self._tail + piece)[-self._keep :]
        return any(self._tail.endswith(s) for s in self._stops)


class TokenCascade:
    """Plans and runs the cascaded generations of one node.

    Args:
        settings: Pairings, the default threshold and speculative settings.
        upstream: The next tier up.
        policy: The node's cascade policy: reads the request's mode and threshold, and the model's threshold.
    """

    def __init__(self, settings: TokenCascadeSettings, upstream: GeneratorUpstream, policy: Cascade) -> None:
        self.settings = settings
        self.upstream = upstream
        self.policy = policy
        self._described: dict[str, tuple[float, UpstreamGenerator]] = {}

    def pairing(self, model: str, properties: Mapping[str, str]) -> str:
        """The upstream model ``model`` escalates to ("" = none): config first, then signed metadata."""
        return self.settings.pairs.get(model) or properties.get(PAIR_PROPERTY, "")

    def plan(
        self,
        model: str,
        properties: Mapping[str, str],
        parameters: Mapping[str, ParamValue],
        forwarded: bool = False,
    ) -> CascadePlan | None:
        """Decides how one generation of ``model`` cascades (None: it does not).

        Args:
            model: The generator.
            properties: Its properties (signed metadata).
            parameters: The request's parameters.
            forwarded: The request came from another node (which accepted its cascade parameters):
                without a pairing here it is generated without the cascade rather than refused.

        Raises:
            InvalidArgumentError: Bad cascade parameters, or a cascade asked of a model with no pairing
                by the client itself.
        """
        ask = self.policy.ask(parameters)
        upstream_model = self.pairing(model, properties)
        if not ask.on:
            return None
        if not upstream_model:
            if CASCADE not in parameters or forwarded:
                return None  # the node's default mode, or a node below asked: nothing to cascade to here
            raise InvalidArgumentError(
                f"model '{model}' has no upstream model to cascade to ({CASCADE} = {ask.mode}): declare one in the "
                f"node's [token_cascade] pairs or its metadata ({PAIR_PROPERTY}), or send {CASCADE} = {CASCADE_OFF}"
            )
        threshold = self.policy.threshold(model, properties, ask)
        if threshold is None:
            threshold = self.settings.threshold
        return CascadePlan(ask.mode, upstream_model, threshold, self.settings.signal)

    async def generate(
        self,
        plan: CascadePlan,
        tokenizer: CharTokenizer,
        step: Callable[[Array], Awaitable[Array]],
        prompt: str,
        params: GenerationParams,
        route: Sequence[str],
        deadline: float,
        tally: CascadeTally,
    ) -> AsyncIterator[CascadeToken]:
        """Yields the tokens of one cascaded generation and adds them up in ``tally``.

        Args:
            plan: From :meth:`plan`.
            tokenizer: The device model's tokenizer.
            step: Runs the device model on ``[1, C]`` ids and returns ``[1, V]`` probabilities.
            prompt: The text to continue.
            params: Sampling settings (the seed makes the whole stream reproducible, given the same upstream).
            route: The forwarding route to send upward (this node last).
            deadline: The generation's ``loop.time()`` deadline; no upstream call runs past it.
            tally: Receives the counts, the degraded reason and the finish reason.
        """
        seed = params.seed if params.seed is not None else int.from_bytes(os.urandom(4), "little")
        rng = np.random.default_rng(seed)
        step = pace = _Pace(step)
        link: _Link | None = None
        # At threshold 0 no confidence is below it: confidence mode never escalates, so nothing is asked upward.
        if plan.mode == CASCADE_SPECULATIVE or plan.threshold > 0:
            first = tokenizer.window(tokenizer.encode(prompt))
            link = await self._link(plan, tokenizer, route, deadline, tally, pace, first, params.max_tokens)
        if plan.mode == CASCADE_SPECULATIVE:
            tokens = self._speculative(plan, link, tokenizer, step, prompt, params, rng, tally)
        else:
            tokens = self._confidence(plan, link, tokenizer, step, prompt, params, rng, tally)
        async for token in tokens:
            yield token

    # --- confidence mode ----------------------------------------------------------------------------

    async def _confidence(
        self,
        plan: CascadePlan,
        link: _Link | None,
        tokenizer: CharTokenizer,
        step: Callable[[Array], Awaitable[Array]],
        prompt: str,
        params: GenerationParams,
        rng: np.random.Generator,
        tally: CascadeTally,
    ) -> AsyncIterator[CascadeToken]:
        ids = tokenizer.encode(prompt)
        text = _Text(params)
        for index in range(params.max_tokens):
            q = (await step(tokenizer.window(ids)))[0]
            token = -1
            if plan.signal == SIGNAL_CHOSEN:
                token = choose(q, params, rng)
                confidence = float(q[token])
            else:
                confidence = float(np.max(q))
            origin, probability = TOKEN_LOCAL, 0.0
            if confidence < plan.threshold and link is not None:
                try:
                    p = (await link.distributions([ids], params.max_tokens - index - 1))[0]
                except _UpstreamFailedError as failed:
                    link = self._give_up(tally, failed.reason)
                else:
                    device_token = token if token >= 0 else int(np.argmax(q))
                    token = choose(p, params, rng)
                    origin, probability = TOKEN_UPSTREAM, float(p[token])
                    tally.escalated(
                        Escalation(
                            index, tokenizer.decode(device_token), confidence, tokenizer.decode(token), probability
                        )
                    )
            if origin == TOKEN_LOCAL:
                if token < 0:
                    token = choose(q, params, rng)
                probability = float(q[token])
            ids.append(token)
            piece = tokenizer.decode(token)
            tally.confidences.append(confidence)
            stopped = self._count(tally, origin, probability, text, piece)
            yield CascadeToken(index, piece, probability, origin, confidence)
            if stopped:
                return

    # --- speculative mode ---------------------------------------------------------------------------

    async def _speculative(
        self,
        plan: CascadePlan,
        link: _Link | None,
        tokenizer: CharTokenizer,
        step: Callable[[Array], Awaitable[Array]],
        prompt: str,
        params: GenerationParams,
        rng: np.random.Generator,
        tally: CascadeTally,
    ) -> AsyncIterator[CascadeToken]:
        ids = tokenizer.encode(prompt)
        text = _Text(params)
        adaptive = self._adaptive_k(link)
        index = 0
        while index < params.max_tokens:
            remaining = params.max_tokens - index
            if link is None or adaptive is None:
                # Alone: plain local sampling.
                q = (await step(tokenizer.window(ids)))[0]
                token = choose(q, params, rng)
                ids.append(token)
                piece = tokenizer.decode(token)
                stopped = self._count(tally, TOKEN_LOCAL, float(q[token]), text, piece)
                yield CascadeToken(index, piece, float(q[token]), TOKEN_LOCAL)
                index += 1
                if stopped:
                    return
                continue
            # Draft k tokens (one bonus token may follow; with one token left, its draft is still verified).
            k = min(adaptive.k, max(1, remaining - 1))
            drafts: list[int] = []
            draft_dists: list[Array] = []
            draft_probs: list[float] = []
            for _ in range(k):
                q = (await step(tokenizer.window(ids + drafts)))[0]
                q_sampled = sampling_distribution(q, params)
                token = speculative.sample(q_sampled, rng)
                drafts.append(token)
                draft_dists.append(q_sampled)
                draft_probs.append(float(q[token]))
            try:
                p = await link.distributions([ids + drafts[:j] for j in range(k + 1)], remaining - 1)
            except _UpstreamFailedError as failed:
                link = self._give_up(tally, failed.reason)
                # The drafts are honest samples of the device's model: keep them as local tokens.
                emitted = [(tok, prob, TOKEN_LOCAL) for tok, prob in zip(drafts, draft_probs, strict=True)]
            else:
                p_sampled = np.stack([sampling_distribution(row, params) for row in p])
                result = speculative.verify(drafts, np.stack(draft_dists), p_sampled, rng)
                adaptive.update(result)
                tally.drafted += result.drafted
                tally.accepted += result.accepted
                emitted = [
                    (tok, float(p[j, tok]), TOKEN_LOCAL if j < result.accepted else TOKEN_UPSTREAM)
                    for j, tok in enumerate(result.tokens)
                ]
                if result.accepted < min(len(drafts), len(result.tokens), remaining):  # a draft was corrected
                    j = result.accepted
                    tally.escalated(
                        Escalation(
                            index + j,
                            tokenizer.decode(drafts[j]),
                            draft_probs[j],
                            tokenizer.decode(result.tokens[j]),
                            float(p[j, result.tokens[j]]),
                        )
                    )
            for token, probability, origin in emitted[:remaining]:
                ids.append(token)
                piece = tokenizer.decode(token)
                stopped = self._count(tally, origin, probability, text, piece)
                yield CascadeToken(index, piece, probability, origin)
                index += 1
                if stopped:
                    return

    def _adaptive_k(self, link: _Link | None) -> speculative.AdaptiveK | None:
        if link is None:
            return None
        # k drafts need k + 1 rows in the one verification call.
        room = max(1, link.info.max_batch_size - 1)
        k_max = min(self.settings.k_max, room)
        return speculative.AdaptiveK(self.settings.draft_cost_ratio, min(self.settings.k_min, k_max), k_max)

    # --- shared -------------------------------------------------------------------------------------

    @staticmethod
    def _count(tally: CascadeTally, origin: str, probability: float, text: _Text, piece: str) -> bool:
        """Adds one emitted token to the tally; whether it ends the generation at a stop string."""
        if origin == TOKEN_LOCAL:
            tally.tokens_local += 1
        else:
            tally.tokens_escalated += 1
        tally.probabilities.append(probability)
        if text.stopped_after(piece):
            tally.finish_reason = "stop"
            return True
        return False

    @staticmethod
    def _give_up(tally: CascadeTally, reason: str) -> None:
        tally.degraded = tally.degraded or reason

    async def _link(
        self,
        plan: CascadePlan,
        tokenizer: CharTokenizer,
        route: Sequence[str],
        deadline: float,
        tally: CascadeTally,
        pace: _Pace,
        first: Array,
        steps: int,
    ) -> _Link | None:
        """Describes the paired upstream model (cached) and checks it fits; None (degraded) if it cannot help.

        Before a description is asked for, the device's first step (``first``, its ids) runs, so that the
        call leaves time for all ``steps`` steps to run here if the upstream does not answer.
        """
        if not self.upstream.available():
            return self._give_up(tally, DEGRADED_NO_UPSTREAM)
        loop = asyncio.get_running_loop()
        cached = self._described.get(plan.upstream_model)
        info = cached[1] if cached is not None and loop.time() - cached[0] < self.settings.describe_ttl_s else None
        if info is None:
            await pace.warm(first)
            try:
                timeout = _call_timeout(deadline, self.settings.call_timeout_s, pace.local_s(steps - 1))
                info = await self.upstream.generator(plan.upstream_model, timeout, route)
            except _UpstreamFailedError as failed:
                return self._give_up(tally, failed.reason)
            except EdgecascadeError as exc:
                log.warning("token cascade: upstream model %s not usable: %s", plan.upstream_model, exc.message)
                return self._give_up(tally, degraded_reason(exc))
            self._described[plan.upstream_model] = (loop.time(), info)
        if list(info.vocab) != list(tokenizer.vocab):
            log.warning("token cascade: upstream model %s has another vocabulary; generating alone", info.name)
            return self._give_up(tally, DEGRADED_INCOMPATIBLE)
        return _Link(self.upstream, info, route, deadline, self.settings.call_timeout_s, tally, pace)


def _call_timeout(deadline: float, cap: float, local_s: float) -> float:
    """Seconds one upstream call may take: what is left of the generation's deadline less the time the
    steps still to run here need (``local_s``) and the cascade's reserve (:func:`services.cascade.reserve`),
    at most ``cap`` — so that a slow upstream still leaves the generation time to finish here.

    Raises:
        DeadlineExceededError: Nothing is left (the generation itself is over, not the upstream).
        _UpstreamFailedError: Too little is left to ask the upstream and still finish here (``deadline``).
    """
    left = deadline - asyncio.get_running_loop().time()
    if left <= 0:
        raise DeadlineExceededError("generation ran past its deadline")
    timeout = min(left - local_s - reserve(left), cap)
    if timeout < MIN_UPSTREAM_S:
        raise _UpstreamFailedError(DEGRADED_DEADLINE)
    return timeout


class _Pace:
    """The device's step, timed: how long the steps still to run here will take.

    :meth:`warm` runs one step ahead (to time it before the first upstream call); its answer is
    given again to the first call with the same ids.
    """

    def __init__(self, step: Callable[[Array], Awaitable[Array]]) -> None:
        self._step = step
        self.step_s = 0.0  # moving average of a step's time (0 before the first)
        self._kept: tuple[Array, Array] | None = None

    async def __call__(self, ids: Array) -> Array:
        kept, self._kept = self._kept, None
        if kept is not None and np.array_equal(kept[0], ids):
            return kept[1]
        loop = asyncio.get_running_loop()
        started = loop.time()
        probs = await self._step(ids)
        took = loop.time() - started
        self.step_s = took if self.step_s == 0 else (1 - PACE_WEIGHT) * self.step_s + PACE_WEIGHT * took
        return probs

    async def warm(self, ids: Array) -> None:
        """Runs (and times) the step on ``ids`` now; the next call with these ids gets its answer."""
        self._kept = (ids, await self(ids))

    def local_s(self, steps: int) -> float:
        """Seconds ``steps`` more steps here are expected to take (with a margin)."""
        return max(steps, 0) * self.step_s * LOCAL_MARGIN


class _Link:
    """The upstream's paired model for one generation: its windows and its distributions."""

    def __init__(
        self,
        upstream: GeneratorUpstream,
        info: UpstreamGenerator,
        route: Sequence[str],
        deadline: float,
        call_timeout_s: float,
        tally: CascadeTally,
        pace: _Pace,
    ) -> None:
        self.upstream = upstream
        self.info = info
        self.route = route
        self.deadline = deadline
        self.call_timeout_s = call_timeout_s
        self.tally = tally
        self.pace = pace
        self._windows = CharTokenizer(list(info.vocab), info.context_length)

    async def distributions(self, contexts: Sequence[Sequence[int]], local_steps: int) -> Array:
        """Returns the upstream model's ``probs`` ``[n, V]`` after each context, ``max_batch_size`` rows per call.

        Each call leaves the time ``local_steps`` more device steps need (the rest of the generation, should
        it go on here alone).

        Raises:
            _UpstreamFailedError: A call failed or answered something else than ``[rows, V]`` probabilities,
                or too little time was left to ask (a CANCELLED status from the upstream is a failure too).
            DeadlineExceededError: The generation's deadline passed.
        """
        windows = np.concatenate([self._windows.window(list(c)) for c in contexts])
        rows = max(1, self.info.max_batch_size)
        parts: list[Array] = []
        for start in range(0, len(windows), rows):
            chunk = windows[start : start + rows]
            timeout = _call_timeout(self.deadline, self.call_timeout_s, self.pace.local_s(local_steps))
            try:
                probs = await self.upstream.distribution(self.info.name, "", chunk, timeout, self.route)
            except EdgecascadeError as exc:
                if not (isinstance(exc, CircuitOpenError) and not exc.from_peer):
                    self.tally.upstream_calls += 1  # sent (this node's breaker did not refuse it)
                log.warning("token cascade: upstream model %s failed: %s", self.info.name, exc.message)
                raise _UpstreamFailedError(degraded_reason(exc)) from None
            self.tally.upstream_calls += 1
            probs = np.asarray(probs, dtype=np.float64)
            if probs.shape != (len(chunk), len(self.info.vocab)) or not np.all(np.isfinite(probs)):
                log.warning("token cascade: upstream model %s answered probs of shape %s", self.info.name, probs.shape)
                raise _UpstreamFailedError(DEGRADED_INCOMPATIBLE)
            parts.append(probs)
        return np.concatenate(parts)
