"""Every call to the next tier goes through a circuit breaker, a retry budget and (for inference) a result cache.

:class:`GuardedUpstream` wraps the gRPC adapter (:class:`~services.rpc.upstream.GrpcUpstream`)
behind the same :class:`~services.dataplane.Upstream` port:

* **Breaker** (:mod:`services.circuit_breaker`): while it is open a call fails at
  once with :class:`~services.errors.UpstreamUnavailableError` naming the
  upstream and when it is probed next — no request waits for an upstream timeout.
  Failures that count: unreachable (UNAVAILABLE), timed out, overloaded, internal
  errors, cancelled by the upstream, and a stream whose first message is an error.
  A caller's own mistake (not found, bad input) counts as an answer; so does an
  error the upstream relayed from *its* upstream (:func:`beyond_upstream`). A
  timeout of an attempt given less than the breaker's ``min_timeout_s`` is not
  counted either way (the caller's deadline was too tight to judge the upstream).
* **Retries** (``tenacity``): only UNAVAILABLE, only idempotent calls (inference,
  readiness, metadata and configuration are; a stream is retried only before its
  first message), exponential backoff with jitter, never past the request's
  deadline, and each retry must be allowed by the upstream's
  :class:`~services.retry_budget.RetryBudget` (no retry storm).
* **Result cache** (:mod:`services.result_cache`): ModelInfer answers, keyed by the
  model, the version asked for, and a digest of the request without its id and the
  parameters that do not change the answer (:data:`TRANSPORT_PARAMETERS`). A hit
  is answered with the caller's request id, this call's fallback reason and
  ``edgecascade.cached = true``. A degraded answer (``edgecascade.degraded``) is never stored.

Every error a call through here ends with is marked ``relayed``: a node that sends it on
to its own caller flags it as coming from beyond itself (:mod:`services.rpc.status_table`).
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import numpy as np
from tenacity import (
    AsyncRetrying,
    RetryCallState,
    retry_if_exception,
    stop_after_attempt,
    wait_exponential_jitter,
)
from tenacity.stop import stop_base

from protos.inference import grpc_service_pb2 as pb
from services.cascade import MIN_UPSTREAM_S
from services.cascade_generation import UpstreamGenerator
from services.circuit_breaker import BreakerState, CircuitBreaker, Ticket
from services.dataplane import InferCall, ModelQuery, Relayed, Upstream
from services.errors import (
    CapacityError,
    CircuitOpenError,
    DeadlineExceededError,
    EdgecascadeError,
    InternalError,
    RequestCancelledError,
    UnavailableError,
    UpstreamUnavailableError,
)
from services.inference import DEGRADED, FALLBACK_REASON, FallbackReason
from services.result_cache import ResultCache
from services.retry_budget import RetryBudget, RetrySettings

R = TypeVar("R")

log = logging.getLogger("edgecascade.upstream")

CACHED = "edgecascade.cached"  # response parameter: true on an answer served from this node's result cache
# Request parameters that change when or how an answer is delivered, never what it is.
TRANSPORT_PARAMETERS = frozenset({"priority", "timeout", "triton_enable_empty_final_response"})
# An attempt with less time than this left is not worth sending (the cascade's own floor).
MIN_ATTEMPT_S = MIN_UPSTREAM_S


@dataclass(frozen=True)
class UpstreamStatus:
    """How calls to the upstream fare: its breaker, retries and result cache (``GetTierInfo``, status, metrics)."""

    address: str
    breaker_state: BreakerState
    breaker_opened: int  # times the breaker opened
    breaker_rejected: int  # calls refused at once while it was open or half-open
    breaker_failures: int
    breaker_successes: int
    breaker_retry_in_s: float  # seconds until the next probe (0 unless open)
    last_failure: str
    retries: int  # retries sent
    retries_refused: int  # retries the budget refused
    cache_hits: int
    cache_misses: int
    cache_bytes: int
    cache_entries: int

    @property
    def cache_hit_rate(self) -> float | None:
        """Hits per lookup of the result cache, or None before any lookup."""
        lookups = self.cache_hits + self.cache_misses
        return self.cache_hits / lookups if lookups else None


def log_transition(address: str, old: BreakerState, new: BreakerState, last_failure: str = "") -> None:
    """Logs a breaker's move once: WARNING when it opens, INFO when it closes, DEBUG when it starts probing."""
    if new is BreakerState.OPEN:
        log.warning(
            "circuit to upstream %s opened (%s): calls to it fail at once, local answers are returned degraded",
            address,
            last_failure or "repeated failures",
        )
    elif new is BreakerState.CLOSED:
        log.info("circuit to upstream %s closed: it answers again", address)
    else:
        log.debug("circuit to upstream %s half-open (was %s): probing", address, old.value)


def beyond_upstream(exc: BaseException) -> bool:
    """Whether the upstream answered with an error of *its* upstream call (flagged ``beyond``), or that its
    upstream is unreachable (its own breaker open, say).

    Such an error says nothing about the upstream itself: it neither counts against its breaker nor is
    retried here (the upstream retried already; retrying at every tier would multiply the calls).
    """
    if not isinstance(exc, EdgecascadeError):
        return False
    return exc.beyond or (isinstance(exc, UpstreamUnavailableError) and exc.from_peer)


def upstream_failure(exc: BaseException) -> bool:
    """Whether an error says the upstream is unwell (and so counts against its breaker).

    A CANCELLED status is the upstream's doing (this node's caller leaving arrives as
    :class:`asyncio.CancelledError` instead), so it counts.
    """
    if beyond_upstream(exc):
        return False
    return isinstance(
        exc, UnavailableError | DeadlineExceededError | CapacityError | InternalError | RequestCancelledError
    )


def retryable(exc: BaseException) -> bool:
    """Whether a failed attempt may be tried again: UNAVAILABLE, not refused by the breaker, not from beyond."""
    return isinstance(exc, UnavailableError) and not isinstance(exc, CircuitOpenError) and not beyond_upstream(exc)


def cache_key(request: pb.ModelInferRequest) -> bytes:
    """The result-cache key of a ModelInfer request: model, version asked for, digest of everything that matters."""
    copy = pb.ModelInferRequest()
    copy.CopyFrom(request)
    copy.id = ""
    for name in TRANSPORT_PARAMETERS:
        if name in copy.parameters:
            del copy.parameters[name]
    digest = hashlib.sha256(copy.SerializeToString(deterministic=True)).digest()
    return b"\0".join((request.model_name.encode(), request.model_version.encode(), digest))


class GuardedUpstream:
    """The :class:`~services.dataplane.Upstream` port with a breaker, retries and a result cache around ``inner``.

    Args:
        inner: The upstream adapter that makes the calls.
        breaker: This upstream's breaker.
        budget: This upstream's retry budget.
        retry: Attempts and backoff.
        cache: The result cache (``ResultCacheSettings(max_bytes=0)`` turns it off).
    """

    def __init__(
        self,
        inner: Upstream,
        breaker: CircuitBreaker,
        budget: RetryBudget,
        retry: RetrySettings,
        cache: ResultCache,
    ) -> None:
        self.inner = inner
        self.breaker = breaker
        self.budget = budget
        self.retry = retry
        self.cache = cache

    def available(self) -> bool:
        """Whether there is a next tier (an open breaker does not change that: the call fails fast instead)."""
        return self.inner.available()

    async def infer(self, call: InferCall, reason: FallbackReason, timeout: float, route: Sequence[str]) -> Relayed:
        """ModelInfer upward, answered from the result cache when the same question was answered recently."""
        key = cache_key(call.wire) if self.cache.enabled and isinstance(call.wire, pb.ModelInferRequest) else None
        if key is not None:
            stored = self.cache.get(key)
            if stored is not None:
                response = pb.ModelInferResponse.FromString(stored)
                response.id = call.wire.id
                response.parameters[FALLBACK_REASON].string_param = reason  # this call's reason, not the first's
                response.parameters[CACHED].bool_param = True
                return Relayed(response, reason)
        relayed = await self._guarded(lambda left: self.inner.infer(call, reason, left, route), timeout)
        message = relayed.message
        if key is not None and isinstance(message, pb.ModelInferResponse) and DEGRADED not in message.parameters:
            # A degraded answer stands in for a better one the upstream could not give this time: not kept.
            self.cache.put(key, message.SerializeToString(), message.model_name, message.model_version)
        return relayed

    async def stream(
        self, call: InferCall, reason: FallbackReason, timeout: float, route: Sequence[str]
    ) -> AsyncIterator[Relayed]:
        """ModelStreamInfer upward: guarded by the breaker; retried only if it fails before its first message.

        A first message that is an error (``error_message``, answered in-band with status OK) is neither an
        answer nor a failure for the breaker: it carries no error class, so it may well be the caller's own
        mistake (a bad input), and counting it would let any client open the breaker for everyone. The
        probe slot is released; a half-open breaker waits for the next probe.
        """
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        attempt = 0
        while True:
            attempt += 1
            left = deadline - loop.time()
            try:
                ticket = self._admit(left)
            except EdgecascadeError as exc:
                _relayed(exc)
                raise
            started = False
            reported = False  # whether the breaker heard this attempt's outcome
            try:
                async for relayed in self.inner.stream(call, reason, left, route):
                    if not started:
                        started = True
                        if getattr(relayed.message, "error_message", ""):
                            self.breaker.released(ticket)
                        else:
                            self._answered(ticket)
                        reported = True
                    yield relayed
                if not started:
                    self._answered(ticket)
                    reported = True
                return
            except EdgecascadeError as exc:
                if started:
                    _relayed(exc)
                    raise  # part of the answer went out: the caller sees the failure
                self._failed(ticket, exc, left)
                reported = True
                if not self._may_retry(exc, attempt, deadline - loop.time()):
                    _relayed(exc)
                    raise
            finally:
                if not reported:
                    self.breaker.released(ticket)  # cancelled, or an unexpected error: no outcome
            await asyncio.sleep(self._backoff(attempt))

    async def query(self, query: ModelQuery, wire: Any, timeout: float, route: Sequence[str]) -> Any:
        """ModelReady, ModelMetadata or ModelConfig upward (idempotent: retried like inference)."""
        return await self._guarded(lambda left: self.inner.query(query, wire, left, route), timeout)

    def status(self) -> UpstreamStatus:
        """The breaker's state and the counters of retries and of the result cache, now (from any thread)."""
        breaker = self.breaker  # read without moving it: metric readers call this from their own thread
        stats = self.cache.stats
        return UpstreamStatus(
            address=breaker.name,
            breaker_state=breaker.observed_state(),
            breaker_opened=breaker.opened,
            breaker_rejected=breaker.rejected,
            breaker_failures=breaker.failures,
            breaker_successes=breaker.successes,
            breaker_retry_in_s=breaker.retry_in(),
            last_failure=breaker.last_failure,
            retries=self.budget.retries,
            retries_refused=self.budget.refused,
            cache_hits=stats.hits,
            cache_misses=stats.misses,
            cache_bytes=self.cache.used_bytes,
            cache_entries=len(self.cache),
        )

    async def generator(self, model: str, timeout: float, route: Sequence[str]) -> UpstreamGenerator:
        """Describes an upstream generator (its ModelConfig; idempotent: retried like inference)."""
        return await self._guarded(lambda left: self.inner.generator(model, left, route), timeout)

    async def distribution(
        self, model: str, version: str, input_ids: np.ndarray[Any, Any], timeout: float, route: Sequence[str]
    ) -> np.ndarray[Any, Any]:
        """One step of a token-level cascade upward: guarded and retried like inference, never cached
        (each call is counted as an upstream call of the generation)."""
        return await self._guarded(
            lambda left: self.inner.distribution(model, version, input_ids, left, route), timeout
        )

    async def close(self) -> None:
        """Closes the inner adapter."""
        close: Callable[[], Awaitable[None]] | None = getattr(self.inner, "close", None)
        if close is not None:
            await close()

    # -- internals ---------------------------------------------------------------------------------------------

    async def _guarded(self, attempt: Callable[[float], Awaitable[R]], timeout: float) -> R:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout

        retrying = AsyncRetrying(
            retry=retry_if_exception(retryable),
            # The budget is asked last, once nothing else stops the retry: it counts only retries sent.
            stop=stop_after_attempt(self.retry.attempts) | _PastDeadline(loop, deadline) | _OverBudget(self.budget),
            wait=wait_exponential_jitter(
                multiplier=self.retry.initial_backoff_s,
                max=self.retry.max_backoff_s,
                jitter=self.retry.initial_backoff_s,
            ),
            reraise=True,
        )
        try:
            async for trial in retrying:
                with trial:
                    return await self._once(attempt, max(deadline - loop.time(), 0.0))
        except EdgecascadeError as exc:
            _relayed(exc)
            raise
        raise AssertionError("unreachable: tenacity re-raises the last failure")  # pragma: no cover

    async def _once(self, attempt: Callable[[float], Awaitable[R]], left: float) -> R:
        ticket = self._admit(left)
        reported = False  # whether the breaker heard this attempt's outcome
        try:
            result = await attempt(left)
            self._answered(ticket)
            reported = True
            return result
        except EdgecascadeError as exc:
            self._failed(ticket, exc, left)
            reported = True
            raise
        finally:
            if not reported:
                self.breaker.released(ticket)  # cancelled by this node's caller, or an unexpected error

    def _admit(self, left: float) -> Ticket:
        """The breaker's ticket for one attempt with ``left`` seconds.

        Raises:
            DeadlineExceededError: Too little time is left to send it (nothing is sent).
            CircuitOpenError: The breaker refuses it.
        """
        if left < MIN_ATTEMPT_S:
            raise DeadlineExceededError(
                f"too little of the deadline was left to call upstream {self.breaker.name} ({left * 1000:.1f} ms)"
            )
        ticket = self.breaker.allow()
        if ticket is None:
            raise CircuitOpenError(self.breaker.refusal())
        return ticket

    def _answered(self, ticket: Ticket) -> None:
        self.breaker.succeeded(ticket)
        self.budget.succeeded()

    def _failed(self, ticket: Ticket, exc: EdgecascadeError, timeout: float) -> None:
        if isinstance(exc, DeadlineExceededError) and timeout < self.breaker.settings.min_timeout_s:
            self.breaker.released(ticket)  # the caller's deadline was too tight to say anything about the upstream
        elif upstream_failure(exc):
            self.breaker.failed(ticket, exc.message)
        else:
            self.breaker.succeeded(ticket)  # the upstream answered; the question was wrong
        if retryable(exc):
            self.budget.failed()

    def _may_retry(self, exc: EdgecascadeError, attempt: int, left: float) -> bool:
        return (
            retryable(exc)
            and attempt < self.retry.attempts
            and left > self._backoff(attempt) + MIN_ATTEMPT_S
            and self.budget.allow_retry()
        )

    def _backoff(self, attempt: int) -> float:
        return min(self.retry.initial_backoff_s * 2.0 ** (attempt - 1), self.retry.max_backoff_s)


def _relayed(exc: EdgecascadeError) -> None:
    """Marks an error of this node's upstream call, for the node's own caller (see the module docstring)."""
    exc.relayed = True


class _OverBudget(stop_base):
    """Stops retrying when the retry budget refuses one more retry (asked only for a retry about to be sent)."""

    def __init__(self, budget: RetryBudget) -> None:
        self.budget = budget

    def __call__(self, retry_state: RetryCallState) -> bool:
        return not self.budget.allow_retry()


class _PastDeadline(stop_base):
    """Stops retrying when the wait before the next attempt would leave it no time before the deadline."""

    def __init__(self, loop: asyncio.AbstractEventLoop, deadline: float) -> None:
        self.loop = loop
        self.deadline = deadline

    def __call__(self, retry_state: RetryCallState) -> bool:
        return self.loop.time() + retry_state.upcoming_sleep + MIN_ATTEMPT_S >= self.deadline
