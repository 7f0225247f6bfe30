"""The transport-neutral data plane every tier runs: the core that owns each answer.

One entry point per kind of call decides and performs the whole flow: refuse a
call that already came through here (a forwarding loop), read its time budget,
find or load the local model (or the reason to go upward), validate, answer
locally, and — when the local model is absent, cannot load, cannot fit in
memory, or refuses the call because its queue is full — send the same call to
the next tier through the :class:`Upstream` port with the remaining deadline.
Every local answer is labelled with the node that computed it.

The transport converts on both sides and holds no decisions: the gRPC servicer
builds an :class:`InferCall`, calls :meth:`Dataplane.infer` or
:meth:`Dataplane.stream`, and converts what comes back; its :class:`Upstream`
adapter forwards the untouched message. Wrappers of the port (a circuit breaker,
a cascade) change where answers come from without touching the transport.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from enum import StrEnum
from typing import Any, Protocol

import numpy as np

from services.cascade import (
    DEGRADED_DEADLINE,
    DEGRADED_ERROR,
    MIN_UPSTREAM_S,
    Cascade,
    CascadeAsk,
    degraded_reason,
    reserve,
)
from services.cascade_generation import (
    CascadePlan,
    CascadeTally,
    TokenCascade,
    TokenCascadeSettings,
    UpstreamGenerator,
)
from services.engine.generation import (
    GENERATION_PARAMETERS,
    INPUT_IDS,
    PROBS,
    TEXT_INPUT,
    TEXT_OUTPUT,
    GenerationParams,
    GenerationSummary,
    decode_prompt,
    generate,
)
from services.engine.model_cache import LoadedModel, ModelCache
from services.engine.shadow import ShadowRunner
from services.errors import (
    DeadlineExceededError,
    EdgecascadeError,
    ForwardingLoopError,
    InvalidArgumentError,
    MemoryBudgetError,
    ModelNotFoundError,
    ModelNotReadyError,
    QueueFullError,
    UpstreamUnavailableError,
)
from services.hard_examples import HardExampleSink
from services.inference import (
    CASCADE,
    CASCADE_SPECULATIVE,
    CONFIDENCE,
    DEGRADED,
    DRAFTS,
    DRAFTS_ACCEPTED,
    FINAL_RESPONSE,
    FINISH_REASON,
    MIN_TOKEN_PROBABILITY,
    SERVED_BY,
    THRESHOLD,
    TOKEN_ORIGIN,
    TOKEN_PROBABILITY,
    TOKENS,
    TOKENS_ESCALATED,
    TOKENS_LOCAL,
    UPSTREAM_CALLS,
    FallbackReason,
    InferRequest,
    InferResult,
    NodeIdentity,
    ParamValue,
)

# Request parameters every model accepts. Triton clients send the last one on
# streams that want an empty final response.
COMMON_PARAMETERS = frozenset({"priority", "timeout", "triton_enable_empty_final_response", CASCADE, THRESHOLD})


@dataclass(frozen=True)
class InferCall:
    """One inference call as it arrived, before the data plane decides where it is answered.

    Attributes:
        model_name: The model asked for.
        model_version: The version asked for ("" = the newest).
        parameters: The request parameters, parsed once.
        decode: Decodes the tensors; called only when this node answers.
        wire: The transport's own message, forwarded untouched by the :class:`Upstream` adapter.
        grpc_remaining: Seconds left of the caller's deadline when the call arrived (None = none).
        route: The nodes that forwarded the call so far, nearest the client first.
        routed: Told where the call goes as soon as that is decided (before any answer):
            model name, the version that answers here (or the one asked for), and the
            fallback reason when it goes upward ("" when answered here) — for traces.
    """

    model_name: str
    model_version: str
    parameters: Mapping[str, ParamValue]
    decode: Callable[[], InferRequest]
    wire: Any = None
    grpc_remaining: float | None = None
    route: tuple[str, ...] = ()
    routed: Callable[[str, str, str], None] = lambda name, version, reason: None


@dataclass(frozen=True)
class Relayed:
    """An answer from the next tier up, in the transport's own form, already marked as forwarded here."""

    message: Any
    reason: FallbackReason


class ModelQuery(StrEnum):
    """Questions about a model that the upstream answers when this node does not hold it."""

    READY = "ready"
    METADATA = "metadata"
    CONFIG = "config"


class Upstream(Protocol):
    """The next tier up, as the core sees it (a port; the gRPC adapter lives in ``services.rpc``).

    Each call gets the seconds left of the caller's deadline and the route to
    pass on (this node last); failures arrive as domain errors.
    """

    def available(self) -> bool:
        """Whether there is a next tier to send calls to."""
        ...

    async def infer(self, call: InferCall, reason: FallbackReason, timeout: float, route: Sequence[str]) -> Relayed:
        """Sends one inference call upward and returns its answer."""
        ...

    def stream(
        self, call: InferCall, reason: FallbackReason, timeout: float, route: Sequence[str]
    ) -> AsyncIterator[Relayed]:
        """Sends one call upward on a stream and yields every message of its answer."""
        ...

    async def query(self, query: ModelQuery, wire: Any, timeout: float, route: Sequence[str]) -> Any:
        """Asks the upstream about a model (readiness, metadata or configuration); returns its answer as it came."""
        ...

    async def generator(self, model: str, timeout: float, route: Sequence[str]) -> UpstreamGenerator:
        """Describes a generator model the upstream serves (vocabulary, context length, rows per call).

        Raises:
            InvalidArgumentError: The model is not a generator.
        """
        ...

    async def distribution(
        self, model: str, version: str, input_ids: np.ndarray[Any, Any], timeout: float, route: Sequence[str]
    ) -> np.ndarray[Any, Any]:
        """Runs a generator model upstream on ``input_ids`` ``[n, C]`` in one ModelInfer; returns ``probs`` ``[n, V]``.

        The token-level cascade's escalations and speculative verifications (:mod:`services.cascade_generation`).
        """
        ...


class NoUpstream:
    """The top of the chain: nothing above to ask."""

    def available(self) -> bool:
        """Always False."""
        return False

    async def infer(self, call: InferCall, reason: FallbackReason, timeout: float, route: Sequence[str]) -> Relayed:
        """Never called: the core asks :meth:`available` first."""
        raise AssertionError("the data plane forwards only when an upstream is available")

    def stream(
        self, call: InferCall, reason: FallbackReason, timeout: float, route: Sequence[str]
    ) -> AsyncIterator[Relayed]:
        """Never called: the core asks :meth:`available` first."""
        raise AssertionError("the data plane forwards only when an upstream is available")

    async def query(self, query: ModelQuery, wire: Any, timeout: float, route: Sequence[str]) -> Any:
        """Never called: the core asks :meth:`available` first."""
        raise AssertionError("the data plane forwards only when an upstream is available")

    async def generator(self, model: str, timeout: float, route: Sequence[str]) -> UpstreamGenerator:
        """Never called: the core asks :meth:`available` first."""
        raise AssertionError("the data plane forwards only when an upstream is available")

    async def distribution(
        self, model: str, version: str, input_ids: np.ndarray[Any, Any], timeout: float, route: Sequence[str]
    ) -> np.ndarray[Any, Any]:
        """Never called: the core asks :meth:`available` first."""
        raise AssertionError("the data plane forwards only when an upstream is available")


@dataclass(frozen=True)
class RequestLimits:
    """Bounds on what a request may ask for.

    Attributes:
        max_timeout_us: The largest ``timeout`` parameter accepted.
        max_hops: How many times a request may be forwarded before a node refuses it.
    """

    max_timeout_us: int = 3_600_000_000
    max_hops: int = 4


@dataclass(frozen=True)
class TimeBudget:
    """What a request brought about its deadline, read when it arrived.

    The default that applies (the model's or the tier's) is known only once the
    request is routed, so the absolute deadline is derived later by
    :meth:`Dataplane.deadline`, counted from the arrival.
    """

    arrived: float
    timeout_us: int
    grpc_remaining: float | None


class Dataplane:
    """Decides, performs and labels the answer to every inference call of one node.

    Args:
        identity: This node, for ``edgecascade.served_by`` and the forwarding route.
        cache: The node's loaded models.
        upstream: The next tier up (:class:`NoUpstream` at the top of the chain).
        limits: Request bounds.
        shadows: Runs a rollout's shadow versions on a sample of the requests answered here (None: never).
        cascade: The confidence cascade's policy (:mod:`services.cascade`; default: its default settings).
        token_cascade: How generators cascade token by token (:mod:`services.cascade_generation`; default: no pairs).
        hard_examples: Where escalations answered upstream are offered as hard examples for retraining
            (:mod:`services.hard_examples`; None: nowhere, the default).
    """

    def __init__(
        self,
        identity: NodeIdentity,
        cache: ModelCache,
        upstream: Upstream,
        limits: RequestLimits,
        shadows: ShadowRunner | None = None,
        cascade: Cascade | None = None,
        token_cascade: TokenCascadeSettings | None = None,
        hard_examples: HardExampleSink | None = None,
    ) -> None:
        self.identity = identity
        self.cache = cache
        self.upstream = upstream
        self.limits = limits
        self.shadows = shadows
        self.cascade = cascade or Cascade()
        self.token_cascade = TokenCascade(token_cascade or TokenCascadeSettings(), upstream, self.cascade)
        self.hard_examples = hard_examples

    # --- entry points -----------------------------------------------------------------------------

    async def infer(self, call: InferCall) -> InferResult | Relayed:
        """Answers one inference call, here or through the upstream.

        A generator also accepts a ``text_input`` prompt instead of ``input_ids``
        and answers the next-character distribution after it.

        Raises:
            ForwardingLoopError: The call already came through this node, or too many nodes.
            InvalidArgumentError: Bad parameters, or inputs that do not fit the model.
            ModelNotFoundError: Nobody here or above holds the model.
            ModelNotReadyError, MemoryBudgetError, QueueFullError: The model cannot answer and there is no upstream.
            DeadlineExceededError: The deadline passed.
            EdgecascadeError: The upstream's error, for a call it refused.
        """
        route = self.check_route(call.route)
        budget = self.budget(call.parameters, call.grpc_remaining)
        ask = self.cascade.ask(call.parameters)
        throttled = await self._throttled(call, budget, route)
        if isinstance(throttled, Relayed):
            return throttled
        served = await self._local_model(call.model_name, call.model_version)
        if isinstance(served, FallbackReason):
            if throttled is not None:
                raise _nowhere(call, served, throttled)
            return await self._relay(call, served, self.deadline(budget), route)
        call.routed(served.name, served.version, "")
        deadline = self.deadline(budget, served)
        request = call.decode()
        try:
            result = await self._infer_local(served, request, deadline)
        except QueueFullError as full:
            # The second chance: a full queue here sends the call upward.
            if self.upstream.available() and throttled is None:
                return await self._second_chance(call, served, request, deadline, route, full)
            raise
        if throttled is None:
            return await self._cascade(call, served, request, result, ask, deadline, route)
        return self._declined_here(served, result, throttled)

    def _declined_here(self, model: LoadedModel, result: InferResult, declined: _Declined) -> InferResult:
        """A local answer to a call the throttle sent upward in vain: labelled, marked degraded, not sent up again."""
        result = self._labelled(model, result)[0]
        return result if declined.not_held else _with(result, {DEGRADED: declined.reason})

    def _forwarding(self, call: InferCall) -> FallbackReason | None:
        """Why a call for a model held here goes upward first (a critical device), or None.

        Only while an upstream is available, and only for a model this node holds: one it
        does not hold goes upward anyway, and is not loaded for it.
        """
        reason = self.cache.throttle.forward
        if reason is None or not self.upstream.available():
            return None
        held = self.cache.loaded_model(call.model_name) is not None or self.cache.holds(call.model_name)
        return reason if held else None

    def _forward_deadline(self, call: InferCall, budget: TimeBudget) -> float:
        """The deadline of a call sent upward before a local model was chosen: its loaded model's, if any."""
        loaded = self.cache.loaded_model(call.model_name)
        if loaded is not None and call.model_version not in ("", loaded.version):
            loaded = None
        return self.deadline(budget, loaded)

    async def _throttled(self, call: InferCall, budget: TimeBudget, route: Sequence[str]) -> Relayed | _Declined | None:
        """Sends new work for a model held here upward while the engine's throttle says so (a critical device).

        Returns the upstream's answer; or why it gave none (the call is then served here,
        marked degraded, and not sent upward again); or None when the call is not throttled
        or no upstream is available (what cannot go up is served here).
        """
        reason = self._forwarding(call)
        if reason is None:
            return None
        return await self._ask_upward(call, reason, self._forward_deadline(call, budget), route)

    async def stream(self, call: InferCall) -> AsyncIterator[InferResult | Relayed]:
        """Answers one call of a stream: a generation token by token, or one inference, here or upward.

        A generator given a ``text_input`` streams one result per token and then
        a final one (see :meth:`_generate`); anything else gets one answer.

        Raises:
            The errors of :meth:`infer`; a generation's errors end only its own answer.
        """
        route = self.check_route(call.route)
        budget = self.budget(call.parameters, call.grpc_remaining)
        ask = self.cascade.ask(call.parameters)
        refusals: list[_Declined] = []
        reason = self._forwarding(call)
        if reason is not None:
            sent = False
            async for message in self._forward_stream(call, budget, route, reason, refusals):
                sent = True
                yield message
            if sent:
                return
        declined = refusals[0] if refusals else None
        served = await self._local_model(call.model_name, call.model_version)
        if isinstance(served, FallbackReason):
            if declined is not None:
                raise _nowhere(call, served, declined)
            async for message in self._relay_stream(call, served, self.deadline(budget), route):
                yield message
            return
        call.routed(served.name, served.version, "")
        deadline = self.deadline(budget, served)
        request = call.decode()
        if served.tokenizer is not None and TEXT_INPUT in request.inputs:
            async for token in self._generate(served, request, deadline, route):
                yield token
            return
        # One answer, as on ModelInfer (the cascade's upward call is a ModelInfer; the transport wraps its answer).
        try:
            result = await self._infer_local(served, request, deadline)
        except QueueFullError as full:
            if not self.upstream.available() or declined is not None:
                raise
            yield await self._second_chance(call, served, request, deadline, route, full)
            return
        if declined is not None:
            yield self._declined_here(served, result, declined)
            return
        yield await self._cascade(call, served, request, result, ask, deadline, route)

    async def describe(
        self, query: ModelQuery, name: str, version: str, wire: Any, grpc_remaining: float | None, route: Sequence[str]
    ) -> LoadedModel | Relayed:
        """Returns the local model that describes itself (metadata, configuration), or the upstream's answer.

        Raises:
            The routing errors of :meth:`infer`.
        """
        onward = self.check_route(route)
        served = await self._local_model(name, version)
        if isinstance(served, FallbackReason):
            remaining = self._remaining(self.deadline(self.budget({}, grpc_remaining)))
            return Relayed(await self.upstream.query(query, wire, remaining, onward), served)
        return served

    async def ready(
        self, name: str, version: str, wire: Any, grpc_remaining: float | None, route: Sequence[str]
    ) -> bool | Relayed:
        """Whether a model is ready here; for a model this node does not hold, the upstream's answer (never loads)."""
        onward = self.check_route(route)
        if self.cache.holds(name):
            return self.cache.ready(name, version)
        if not self.upstream.available():
            return False
        remaining = self._remaining(self.deadline(self.budget({}, grpc_remaining)))
        return Relayed(
            await self.upstream.query(ModelQuery.READY, wire, remaining, onward), FallbackReason.MODEL_NOT_HELD
        )

    # --- the steps --------------------------------------------------------------------------------

    async def _local_model(self, name: str, version: str) -> LoadedModel | FallbackReason:
        """Finds (loading it, which may evict idle models) the local model, or the reason to go upward.

        Raises:
            ModelNotFoundError: Nobody here or above holds the model.
            ModelNotReadyError: The model is here but cannot load, and there is no upstream.
            MemoryBudgetError: The model does not fit in memory, and there is no upstream.
        """
        if not name:
            raise InvalidArgumentError("model name is empty")
        upward = self.upstream.available()
        try:
            return await self.cache.get(name, version)
        except MemoryBudgetError:
            if upward:
                return FallbackReason.MEMORY
            raise
        except ModelNotFoundError as exc:
            if upward:
                return FallbackReason.MODEL_NOT_HELD
            what = f"model '{name}'" + (f" version {version}" if version else "")
            raise ModelNotFoundError(f"{what} is not held by {self.identity.served_by}, the top of the chain") from exc
        except ModelNotReadyError:
            if upward:
                return FallbackReason.MODEL_UNAVAILABLE
            raise

    async def _relay(self, call: InferCall, reason: FallbackReason, deadline: float, route: Sequence[str]) -> Relayed:
        call.routed(call.model_name, call.model_version, reason)
        return await self.upstream.infer(call, reason, self._remaining(deadline), route)

    async def _forward_stream(
        self,
        call: InferCall,
        budget: TimeBudget,
        route: Sequence[str],
        reason: FallbackReason,
        refusals: list[_Declined],
    ) -> AsyncIterator[Relayed]:
        """A critical device's new stream call, sent upward; yields nothing and adds to ``refusals`` if refused.

        One answer goes as ModelInfer (keeping a reserve of the deadline to answer here, and
        remembering an upstream that does not hold the model); a generation is relayed as a
        stream, and one the upstream refuses before its first token (an error, or an in-band
        error message) is left to be served here.
        """
        request = call.decode()
        if TEXT_INPUT not in request.inputs:
            answer = await self._ask_upward(call, reason, self._forward_deadline(call, budget), route)
            if isinstance(answer, Relayed):
                yield answer
            else:
                refusals.append(answer)
            return
        forwarded = self._forward_deadline(call, budget)
        remaining = forwarded - asyncio.get_running_loop().time()
        async with contextlib.aclosing(
            self._relay_stream(call, reason, forwarded - reserve(remaining), route)
        ) as relayed:
            try:
                first = await anext(relayed, None)
            except EdgecascadeError as exc:
                refusals.append(_Declined(degraded_reason(exc), exc.message))
                return
            if first is None or _in_band_error(first):
                refusals.append(_Declined(DEGRADED_ERROR, "the upstream refused the stream"))
                return
            yield first
            async for message in relayed:
                yield message

    async def _relay_stream(
        self, call: InferCall, reason: FallbackReason, deadline: float, route: Sequence[str]
    ) -> AsyncGenerator[Relayed, None]:
        call.routed(call.model_name, call.model_version, reason)
        messages = self.upstream.stream(call, reason, self._remaining(deadline), route)
        try:
            async for message in messages:
                yield message
        finally:
            close = getattr(messages, "aclose", None)
            if close is not None:
                await close()  # at once, not when the garbage collector gets to it

    async def _cascade(
        self,
        call: InferCall,
        model: LoadedModel,
        request: InferRequest,
        result: InferResult,
        ask: CascadeAsk,
        deadline: float,
        route: Sequence[str],
    ) -> InferResult | Relayed:
        """The request-level cascade: labels a local answer with its confidence and, below the threshold, asks upward.

        The upstream gets the deadline's remainder less a small reserve; if it fails
        (unreachable, breaker open, too slow, overloaded …), the local answer is
        returned marked ``edgecascade.degraded`` with the reason. An upstream that
        does not hold the model leaves the local answer as it is (nothing better exists).
        An answer from upstream is offered as a hard example (inputs, local and upstream answers).
        """
        result, confidence = self._labelled(model, result)
        threshold = None if confidence is None else self._escalation_threshold(model, confidence, ask)
        if confidence is None or threshold is None:
            return result
        answer = await self._ask_upward(call, FallbackReason.LOW_CONFIDENCE, deadline, route)
        if isinstance(answer, Relayed):
            if self.hard_examples is not None:
                self.hard_examples.request(
                    (model.name, model.version), request.inputs, result.outputs, confidence, threshold, answer
                )
            return answer
        call.routed(model.name, model.version, "")  # answered here after all
        return result if answer.not_held else _with(result, {DEGRADED: answer.reason})

    def _labelled(self, model: LoadedModel, result: InferResult) -> tuple[InferResult, float | None]:
        """A local answer with its ``edgecascade.confidence`` (when its model has a classifier-style output)."""
        entry = model.entry
        confidence = self.cascade.confidence(entry.name, entry.properties, model.signature.outputs, result.outputs)
        return (result, None) if confidence is None else (_with(result, {CONFIDENCE: confidence}), confidence)

    def _escalation_threshold(self, model: LoadedModel, confidence: float, ask: CascadeAsk) -> float | None:
        """The threshold a local answer of this confidence is under, if it goes upward (cascade on, an upstream).

        None: it stays here.
        """
        if not ask.on or not self.upstream.available():
            return None
        threshold = self.cascade.threshold(model.name, model.entry.properties, ask)
        return threshold if threshold is not None and confidence < threshold else None

    async def _second_chance(
        self,
        call: InferCall,
        model: LoadedModel,
        request: InferRequest,
        deadline: float,
        route: Sequence[str],
        full: QueueFullError,
    ) -> InferResult | Relayed:
        """A full local queue sends the call upward; if the upstream fails, the local model is tried once more.

        An answer computed here after all is marked ``edgecascade.degraded`` (with the
        upstream's failure) and carries its confidence, but is not escalated again.

        Raises:
            QueueFullError: The local queue is still full (naming the upstream's failure too).
            DeadlineExceededError: No time was left for the local try.
        """
        answer = await self._ask_upward(call, FallbackReason.QUEUE_FULL, deadline, route)
        if isinstance(answer, Relayed):
            return answer
        try:
            result = await self._infer_local(model, request, deadline)
        except QueueFullError:
            raise QueueFullError(f"{full.message}; and the upstream did not answer: {answer.why}") from None
        call.routed(model.name, model.version, "")
        result = self._labelled(model, result)[0]
        return result if answer.not_held else _with(result, {DEGRADED: answer.reason})

    async def _ask_upward(
        self, call: InferCall, reason: FallbackReason, deadline: float, route: Sequence[str]
    ) -> Relayed | _Declined:
        """Sends a call upward when a local answer is at hand or can be computed; says why not when that fails.

        A little of the time left is kept back (:func:`~services.cascade.reserve`), so that a
        slow upstream still leaves time to answer here. An upstream that does not hold the
        model is remembered for a while and not asked again about it. A CANCELLED status from the
        upstream is its failure like any other (this node's caller leaving is :class:`asyncio.CancelledError`).
        """
        if self.cascade.upstream_lacks(call.model_name, call.model_version):
            return _Declined(DEGRADED_ERROR, "it does not hold the model", not_held=True)
        remaining = deadline - asyncio.get_running_loop().time()
        timeout = remaining - reserve(remaining)
        if timeout < MIN_UPSTREAM_S:
            return _Declined(DEGRADED_DEADLINE, f"too little time was left to ask it ({remaining * 1000:.0f} ms)")
        call.routed(call.model_name, call.model_version, reason)
        try:
            return await self.upstream.infer(call, reason, timeout, route)
        except EdgecascadeError as exc:
            held = not self.cascade.not_held(call.model_name, call.model_version, exc)
            return _Declined(degraded_reason(exc), exc.message, not_held=not held)

    @staticmethod
    def _remaining(deadline: float) -> float:
        remaining = deadline - asyncio.get_running_loop().time()
        if remaining < MIN_UPSTREAM_S:
            # Not worth sending: the upstream could not answer in time, and a timeout it cannot help would
            # count against it.
            raise DeadlineExceededError(
                "deadline passed before the request could be forwarded"
                if remaining <= 0
                else f"too little of the deadline was left to forward the request ({remaining * 1000:.1f} ms)"
            )
        return remaining

    def budget(self, parameters: Mapping[str, ParamValue], grpc_remaining: float | None) -> TimeBudget:
        """Reads the time a request allows, at its arrival.

        Args:
            parameters: Request parameters (``timeout`` in microseconds, 0 = none).
            grpc_remaining: Seconds left of the gRPC deadline, None if none was set.

        Raises:
            InvalidArgumentError: ``timeout`` is not a non-negative integer within the limit.
        """
        timeout = parameters.get("timeout", 0)
        if isinstance(timeout, bool) or not isinstance(timeout, int):
            raise InvalidArgumentError(
                f"parameter 'timeout' must be an integer number of microseconds, got {timeout!r}"
            )
        if timeout < 0:
            raise InvalidArgumentError(f"parameter 'timeout' must not be negative, got {timeout} µs")
        if timeout > self.limits.max_timeout_us:
            raise InvalidArgumentError(
                f"parameter 'timeout' of {timeout} µs exceeds the limit of {self.limits.max_timeout_us} µs"
            )
        return TimeBudget(asyncio.get_running_loop().time(), timeout, grpc_remaining)

    def deadline(self, budget: TimeBudget, model: LoadedModel | None = None) -> float:
        """Returns the absolute ``loop.time()`` deadline of a request.

        The tightest of the gRPC deadline, the ``timeout`` parameter and the
        default timeout: that of ``model`` (its ``edgecascade.batching.default_timeout_us``
        override, else the tier's ``[batching] default_timeout_us``) when a
        local model was chosen — it stays the deadline if that model's queue
        then sends the request upward — and the tier's when no local model
        was. A default never exceeds ``max_timeout_us``, the most a client may ask for.
        """
        config = model.batcher.config if model is not None else self.cache.batching
        candidates = [min(config.default_timeout_us, self.limits.max_timeout_us) / 1e6]
        if budget.timeout_us:
            candidates.append(budget.timeout_us / 1e6)
        if budget.grpc_remaining is not None:
            candidates.append(budget.grpc_remaining)
        return budget.arrived + min(candidates)

    def check_route(self, route: Sequence[str]) -> tuple[str, ...]:
        """Checks the nodes a request was forwarded through and returns the route to pass upward.

        Args:
            route: The nodes that forwarded the request so far, nearest the client first.

        Raises:
            ForwardingLoopError: This node is already on the route, or reaching
                it took more than ``max_hops`` forwards.
        """
        here = self.identity.served_by
        if here in route:
            raise ForwardingLoopError(f"forwarding loop: {' > '.join((*route, here))}")
        if len(route) > self.limits.max_hops:
            raise ForwardingLoopError(
                f"forwarding chain longer than {self.limits.max_hops} hops: {' > '.join((*route, here))}; "
                "check the [upstream] address of these nodes"
            )
        return (*route, here)

    def check_parameters(self, parameters: Mapping[str, ParamValue], model: LoadedModel | None) -> None:
        """Rejects request parameters the target does not understand.

        Raises:
            InvalidArgumentError: A parameter is unknown, or ``priority`` is not a non-negative integer.
        """
        allowed = COMMON_PARAMETERS | (GENERATION_PARAMETERS if model is None or model.tokenizer else frozenset())
        for key in parameters:
            if key not in allowed:
                raise InvalidArgumentError(
                    f"request parameter '{key}' is not supported here; supported: {', '.join(sorted(allowed))}"
                )
        priority = parameters.get("priority", 0)
        if isinstance(priority, bool) or not isinstance(priority, int) or priority < 0:
            raise InvalidArgumentError(f"parameter 'priority' must be a non-negative integer, got {priority!r}")

    async def _infer_local(self, model: LoadedModel, request: InferRequest, deadline: float) -> InferResult:
        """Answers one request with a local model.

        Once answered, the request is offered to the model's shadow (a rollout's shadow stage), which may
        run it in the background on the same inputs; that never delays or fails this answer.

        Raises:
            InvalidArgumentError: The inputs do not fit the model.
            DeadlineExceededError: The deadline passed.
            QueueFullError: The model's queue is full.
        """
        self.check_parameters(request.parameters, model)
        inputs = dict(request.inputs)
        if model.tokenizer is not None and TEXT_INPUT in inputs and INPUT_IDS not in inputs:
            prompt = self._prompt(inputs.pop(TEXT_INPUT))
            inputs[INPUT_IDS] = model.tokenizer.window(model.tokenizer.encode(prompt))
        # Rows first: a request too large to run should not pay for decoding its text.
        self._check_rows(model, inputs)
        prepared = model.session.prepare(inputs, request.requested_outputs)
        loop = asyncio.get_running_loop()
        started = loop.time()
        outputs = await self.cache.run(model, prepared, request.requested_outputs, deadline, _priority(request))
        if self.shadows is not None:
            # The inputs as sent: a text request's shadow tokenizes the prompt with its own tokenizer.
            self.shadows.offer(model, request.inputs, outputs, loop.time() - started)
        return InferResult(
            model_name=model.name,
            model_version=model.version,
            request_id=request.request_id,
            outputs=outputs,
            parameters={SERVED_BY: self.identity.served_by},
        )

    async def _generate(
        self, model: LoadedModel, request: InferRequest, deadline: float, route: Sequence[str] = ()
    ) -> AsyncIterator[InferResult]:
        """Streams a generation: one result per token, then a final result.

        The final result carries no outputs and the parameters
        ``triton_final_response``, ``edgecascade.tokens``,
        ``edgecascade.finish_reason`` and ``edgecascade.confidence`` (mean token
        probability). A generator paired with an upstream model cascades token by
        token or decodes speculatively (:mod:`services.cascade_generation`): each
        token then also says its ``edgecascade.token_origin``, and the final result
        adds the tallies (see :meth:`_generate_cascaded`).

        Raises:
            InvalidArgumentError: The model is not a generator, or the prompt or parameters are bad.
            DeadlineExceededError: The deadline passed between tokens.
        """
        if model.tokenizer is None:
            raise InvalidArgumentError(f"model '{model.name}' is not a generator; use ModelInfer")
        self.check_parameters(request.parameters, model)
        if set(request.inputs) != {TEXT_INPUT}:
            raise InvalidArgumentError(f"generation takes exactly one input, '{TEXT_INPUT}' (BYTES, shape [1])")
        prompt = self._prompt(request.inputs[TEXT_INPUT])
        params = GenerationParams.from_parameters(request.parameters)
        plan = self.token_cascade.plan(model.name, model.entry.properties, request.parameters, len(route) > 1)
        loop = asyncio.get_running_loop()

        priority = _priority(request)

        async def step(ids: np.ndarray[Any, Any]) -> np.ndarray[Any, Any]:
            # Each decoding step is one request to the batcher, so the steps of
            # concurrent streams run together.
            return (await self.cache.run(model, {INPUT_IDS: ids}, (PROBS,), deadline, priority))[PROBS]

        if plan is not None:
            async for result in self._generate_cascaded(model, request, plan, step, prompt, params, deadline, route):
                yield result
            return
        summary: list[GenerationSummary] = []
        async with self.cache.use(model):
            async for token in generate(model.tokenizer, step, prompt, params, summary):
                yield self._result(
                    model,
                    request,
                    {TEXT_OUTPUT: np.array([token.text.encode("utf-8")], dtype=object)},
                    {TOKEN_PROBABILITY: token.probability},
                )
                if loop.time() >= deadline:
                    raise DeadlineExceededError(f"generation with model '{model.name}' ran past its deadline")
        done = summary[0]
        yield self._result(
            model,
            request,
            {},
            {
                FINAL_RESPONSE: True,
                TOKENS: done.tokens,
                FINISH_REASON: done.finish_reason,
                CONFIDENCE: done.mean_probability,
                MIN_TOKEN_PROBABILITY: done.min_probability,
            },
        )

    async def _generate_cascaded(
        self,
        model: LoadedModel,
        request: InferRequest,
        plan: CascadePlan,
        step: Callable[[np.ndarray[Any, Any]], Awaitable[np.ndarray[Any, Any]]],
        prompt: str,
        params: GenerationParams,
        deadline: float,
        route: Sequence[str],
    ) -> AsyncIterator[InferResult]:
        """Streams a generation that cascades to the upstream's paired model.

        Each token carries ``edgecascade.token_origin`` (``local`` | ``upstream``),
        ``edgecascade.token_probability`` and, in confidence mode, the device's
        ``edgecascade.confidence`` at that step. The final result adds
        ``edgecascade.cascade`` (the mode), ``edgecascade.threshold``,
        ``edgecascade.tokens_local``, ``edgecascade.tokens_escalated``,
        ``edgecascade.upstream_calls``, in speculative mode ``edgecascade.drafts``
        and ``edgecascade.drafts_accepted``, and ``edgecascade.degraded`` (the
        reason) when the upstream could not help and the rest was generated here;
        its ``edgecascade.confidence`` is the mean device confidence (confidence
        mode) or mean token probability (speculative).
        """
        assert model.tokenizer is not None
        loop = asyncio.get_running_loop()
        tally = CascadeTally(keep_escalations=self.hard_examples is not None)
        text: list[str] = []
        async with self.cache.use(model):
            tokens = self.token_cascade.generate(plan, model.tokenizer, step, prompt, params, route, deadline, tally)
            async for token in tokens:
                text.append(token.text)
                parameters: dict[str, ParamValue] = {
                    TOKEN_PROBABILITY: token.probability,
                    TOKEN_ORIGIN: token.origin,
                }
                if token.confidence is not None:
                    parameters[CONFIDENCE] = token.confidence
                yield self._result(
                    model, request, {TEXT_OUTPUT: np.array([token.text.encode("utf-8")], dtype=object)}, parameters
                )
                if loop.time() >= deadline:
                    raise DeadlineExceededError(f"generation with model '{model.name}' ran past its deadline")
        final: dict[str, ParamValue] = {
            FINAL_RESPONSE: True,
            TOKENS: tally.tokens,
            FINISH_REASON: tally.finish_reason,
            CONFIDENCE: tally.mean_confidence,
            MIN_TOKEN_PROBABILITY: tally.min_probability,
            CASCADE: plan.mode,
            THRESHOLD: plan.threshold,
            TOKENS_LOCAL: tally.tokens_local,
            TOKENS_ESCALATED: tally.tokens_escalated,
            UPSTREAM_CALLS: tally.upstream_calls,
        }
        if plan.mode == CASCADE_SPECULATIVE:
            final[DRAFTS] = tally.drafted
            final[DRAFTS_ACCEPTED] = tally.accepted
        if tally.degraded:
            final[DEGRADED] = tally.degraded
        if self.hard_examples is not None and tally.escalations:
            self.hard_examples.generation(
                (model.name, model.version),
                plan.upstream_model,
                plan.mode,
                plan.threshold,
                tally.mean_confidence,
                prompt,
                "".join(text),
                tally.escalations,
            )
        yield self._result(model, request, {}, final)

    def _result(
        self,
        model: LoadedModel,
        request: InferRequest,
        outputs: Mapping[str, np.ndarray[Any, Any]],
        parameters: Mapping[str, ParamValue],
    ) -> InferResult:
        return InferResult(
            model_name=model.name,
            model_version=model.version,
            request_id=request.request_id,
            outputs=outputs,
            parameters={SERVED_BY: self.identity.served_by, **parameters},
        )

    @staticmethod
    def _check_rows(model: LoadedModel, inputs: Mapping[str, np.ndarray[Any, Any]]) -> None:
        """Refuses a request with more rows than the model's ``max_batch_size``.

        Memory admission budgets the activations of every input whose first
        dimension is variable at that many rows, so a larger request would take
        memory nobody accounted for. Refused here, on whichever tier holds the
        model, it is never forwarded upward.
        """
        limit = model.entry.max_batch_size
        for spec in model.signature.inputs:
            array = inputs.get(spec.name)
            if array is None or not spec.shape or spec.shape[0] != -1 or not array.ndim:
                continue  # missing or fixed-size: the signature check speaks for it
            if array.shape[0] > limit:
                raise InvalidArgumentError(
                    f"input '{spec.name}' has {array.shape[0]} rows; model '{model.name}' version {model.version} "
                    f"takes at most {limit} (max_batch_size) per request: split the request"
                )

    @staticmethod
    def _prompt(array: np.ndarray[Any, Any]) -> str:
        if array.dtype != object or array.size != 1:
            raise InvalidArgumentError(f"input '{TEXT_INPUT}' must be BYTES with exactly one element")
        return decode_prompt(bytes(array.reshape(-1)[0]))


@dataclass(frozen=True)
class _Declined:
    """Why a call sent upward with a local answer at hand got no answer from there.

    Attributes:
        reason: The ``edgecascade.degraded`` value.
        why: For people (the upstream's message).
        not_held: The upstream does not hold the model: the local answer is the best there is (not degraded).
    """

    reason: str
    why: str
    not_held: bool = False


def _nowhere(call: InferCall, local: FallbackReason, declined: _Declined) -> EdgecascadeError:
    """The error of a call a critical device sent upward in vain and cannot serve itself either."""
    what = f"model '{call.model_name}'" + (f" version {call.model_version}" if call.model_version else "")
    if declined.not_held:
        return ModelNotFoundError(f"{what} is held neither here ({local.value}) nor upstream")
    return UpstreamUnavailableError(
        f"{what}: this device is too hot to take new work, the upstream did not answer ({declined.why}) "
        f"and it cannot be served here ({local.value})"
    )


def _in_band_error(message: Relayed) -> bool:
    """Whether a relayed stream message is an error the upstream sent on an open stream (Triton's way)."""
    return bool(getattr(message.message, "error_message", ""))


def _with(result: InferResult, parameters: Mapping[str, ParamValue]) -> InferResult:
    """``result`` with more response parameters."""
    return replace(result, parameters={**result.parameters, **parameters})


def _priority(request: InferRequest) -> int:
    value = request.parameters.get("priority", 0)
    return value if isinstance(value, int) and not isinstance(value, bool) else 0
