"""The transport-neutral data plane every tier runs.

For each request it decides where the answer comes from: this node's own
model, or the next tier up (the same call, forwarded with the remaining
deadline). It validates request parameters, derives the deadline (the tightest
of the gRPC deadline, the ``timeout`` parameter and the configured default),
runs local inference and token-by-token generation, and labels every answer
with the node that computed it.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from services.errors import (
    DeadlineExceededError,
    ForwardingLoopError,
    InvalidArgumentError,
    MemoryBudgetError,
    ModelNotFoundError,
    ModelNotReadyError,
    QueueFullError,
)
from services.generation import (
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
from services.inference import (
    FINAL_RESPONSE,
    SERVED_BY,
    TOKEN_PROBABILITY,
    InferRequest,
    InferResult,
    NodeIdentity,
    ParamValue,
)
from services.model_cache import LoadedModel, ModelCache

# Request parameters every model accepts. Triton clients send the last one on
# streams that want an empty final response.
COMMON_PARAMETERS = frozenset({"priority", "timeout", "triton_enable_empty_final_response"})


class FallbackReason:
    """Values of ``edgecascade.fallback_reason``."""

    MODEL_NOT_HELD = "model_not_held"
    MODEL_UNAVAILABLE = "model_unavailable"
    MEMORY = "memory"
    QUEUE_FULL = "queue_full"


@dataclass(frozen=True)
class Forward:
    """The decision to send a request to the next tier up."""

    reason: str


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
    """Routes, validates and answers inference requests for one node.

    Args:
        identity: This node, for ``edgecascade.served_by``.
        cache: The node's loaded models.
        has_upstream: Whether a next tier exists to forward to.
        limits: Request bounds.
    """

    def __init__(self, identity: NodeIdentity, cache: ModelCache, has_upstream: bool, limits: RequestLimits) -> None:
        self.identity = identity
        self.cache = cache
        self.has_upstream = has_upstream
        self.limits = limits

    async def route(self, name: str, version: str = "") -> LoadedModel | Forward:
        """Returns the local model that answers, or a :class:`Forward` decision.

        Raises:
            ModelNotFoundError: Nobody here or above holds the model.
            ModelNotReadyError: The model is here but cannot load, and there is no upstream.
            MemoryBudgetError: The model does not fit in memory, and there is no upstream.
        """
        if not name:
            raise InvalidArgumentError("model name is empty")
        try:
            return await self.cache.get(name, version)
        except MemoryBudgetError:
            if self.has_upstream:
                return Forward(FallbackReason.MEMORY)
            raise
        except ModelNotFoundError as exc:
            if self.has_upstream:
                return Forward(FallbackReason.MODEL_NOT_HELD)
            what = f"model '{name}'" + (f" version {version}" if version else "")
            raise ModelNotFoundError(f"{what} is not held by {self.identity.served_by}, the top of the chain") from exc
        except ModelNotReadyError:
            if self.has_upstream:
                return Forward(FallbackReason.MODEL_UNAVAILABLE)
            raise

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

    async def infer(self, model: LoadedModel, request: InferRequest, deadline: float) -> InferResult | Forward:
        """Answers one request with a local model, or decides to forward it when the queue is full.

        A generator also accepts a ``text_input`` prompt instead of ``input_ids``
        and answers the next-character distribution after it.

        Raises:
            InvalidArgumentError: The inputs do not fit the model.
            DeadlineExceededError: The deadline passed.
            QueueFullError: The model's queue is full and there is no upstream.
        """
        self.check_parameters(request.parameters, model)
        inputs = dict(request.inputs)
        if model.tokenizer is not None and TEXT_INPUT in inputs and INPUT_IDS not in inputs:
            prompt = self._prompt(inputs.pop(TEXT_INPUT))
            inputs[INPUT_IDS] = model.tokenizer.window(model.tokenizer.encode(prompt))
        # Rows first: a request too large to run should not pay for decoding its text.
        self._check_rows(model, inputs)
        inputs = model.session.prepare(inputs, request.requested_outputs)
        try:
            outputs = await self.cache.run(model, inputs, request.requested_outputs, deadline, _priority(request))
        except QueueFullError:
            if self.has_upstream:
                return Forward(FallbackReason.QUEUE_FULL)
            raise
        return InferResult(
            model_name=model.name,
            model_version=model.version,
            request_id=request.request_id,
            outputs=outputs,
            parameters={SERVED_BY: self.identity.served_by},
        )

    async def generate(self, model: LoadedModel, request: InferRequest, deadline: float) -> AsyncIterator[InferResult]:
        """Streams a generation: one result per token, then a final result.

        The final result carries no outputs and the parameters
        ``triton_final_response``, ``edgecascade.tokens``,
        ``edgecascade.finish_reason`` and ``edgecascade.confidence`` (mean token
        probability).

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
        loop = asyncio.get_running_loop()

        priority = _priority(request)

        async def step(ids: np.ndarray[Any, Any]) -> np.ndarray[Any, Any]:
            # Each decoding step is one request to the batcher, so the steps of
            # concurrent streams run together.
            return (await self.cache.run(model, {INPUT_IDS: ids}, (PROBS,), deadline, priority))[PROBS]

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
                "edgecascade.tokens": done.tokens,
                "edgecascade.finish_reason": done.finish_reason,
                "edgecascade.confidence": done.mean_probability,
                "edgecascade.min_token_probability": done.min_probability,
            },
        )

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


def _priority(request: InferRequest) -> int:
    value = request.parameters.get("priority", 0)
    return value if isinstance(value, int) and not isinstance(value, bool) else 0
