"""A rollout's shadow stage on one node: the shadow version runs beside the serving one, its answers compared.

During a shadow stage the node holds a second version of a model (installed by its
shadow updater into a shadow cache, :meth:`~services.engine.model_cache.ModelCache.shadow_cache`)
that never answers a caller. After a request was answered locally by the serving version,
:meth:`ShadowRunner.offer` samples it with the model's shadow share and, if the node has
room, runs the shadow on the same inputs in a background task; the two answers are
compared (:func:`compare`) and the comparison, the shadow's run time and the serving
run's time on the same request go to a :class:`ShadowRecorder` (the node's fleet metrics).
A request that came as text is tokenized again with the *shadow's* tokenizer (a new
version may bring its own vocabulary or window).

Shadow work never delays or fails the real answer: :meth:`ShadowRunner.offer` is called
after the answer exists, never raises and never awaits; the run is a task nobody waits
for. It yields under load (counted as ``shed``): at most :data:`MAX_IN_FLIGHT` (one)
shadow run per node; none while the serving model has queued work or every run slot is
busy, checked when the request is offered and again right before the shadow is submitted
to its batcher; none when the shadow is not loaded (one background load is started then,
not one per request, and a failed load is not tried again for ``retry_load_s``). The
shadow runs at its batcher's lowest priority with a deadline of
``max(deadline_s, DEADLINE_FACTOR × the serving run's time)``; a shadow run that misses
it, whose queue is full, or whose model is being unloaded is ``shed`` too (the node was
busy, not the version wrong). A shadow that fails otherwise or answers something that
cannot be compared counts as ``error`` and is logged (a warning for a version's first
failure, then debug lines). A request whose *serving* answer holds NaN or infinite values
the shadow's does not share is not counted at all (:class:`ServingNotFiniteError`: nothing
can be said of the shadow).

Residual contention, by design: a shadow run that already started holds its run slot
until it ends (onnxruntime cannot be interrupted), so a serving request arriving then
waits for another slot — on a node with one run slot, for the shadow run; and a shadow
load (the background one, or a shadow install's trial) takes the node's one-at-a-time
load lock like any load, so a serving load waits for it to end.

Domain core: no transport here.
"""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np

from services.engine.generation import INPUT_IDS, TEXT_INPUT, decode_prompt
from services.engine.model_cache import LoadedModel, ModelCache
from services.errors import DeadlineExceededError, EdgecascadeError, ModelNotReadyError, QueueFullError
from services.telemetry_names import ERROR, OK, SHED

log = logging.getLogger("edgecascade.shadow")

MAX_IN_FLIGHT = 1  # shadow runs at once on a node: one run slot at most is ever the shadow's
DEADLINE_S = 1.0  # the least time a shadow run gets
DEADLINE_FACTOR = 10.0  # … and a shadow run may take this many times the serving run's time on the same request
RETRY_LOAD_S = 10.0
MAX_DIFFERENCE = 1e6  # a recorded difference is at most this: one wild answer must not swamp a histogram's sum

Arrays = Mapping[str, np.ndarray[Any, Any]]
# The shadow version installed for a model (version, variant), or None: what a shed run is counted against.
InstalledShadow = Callable[[str], tuple[str, str] | None]


class ShadowMismatchError(Exception):
    """The shadow's answer cannot be compared with the serving one (shapes, kinds, no common output, NaN)."""


class ServingNotFiniteError(Exception):
    """The serving answer holds NaN or infinite values the shadow's does not: the run says nothing of the shadow."""


@dataclass(frozen=True)
class Comparison:
    """How one shadow answer compares with the serving answer to the same request.

    Attributes:
        agreement: Share of rows whose top-1 agrees, in [0, 1]; None when no output has rows to compare.
            A float output of two or more axes has rows: its arrays over the last axis (the class axis;
            top-1 = argmax). A float output of fewer axes (a score per request, whose one axis is the
            batch) or whose last axis has one element has no top-1 and counts only in ``difference``.
            An integer, boolean or BYTES output's rows are its elements (labels: equal or not).
        difference: Mean absolute difference over every numeric element compared, at most
            :data:`MAX_DIFFERENCE`; None when there is none. Equal non-finite values in both answers
            (NaN and NaN, inf and inf) differ by nothing.
        rows: How many rows ``agreement`` is over.
    """

    agreement: float | None
    difference: float | None
    rows: int


def compare(serving: Arrays, shadow: Arrays) -> Comparison:
    """Compares every output present in both answers (see :class:`Comparison`).

    Raises:
        ShadowMismatchError: No output in common, an output of another shape or kind, or NaN or infinite
            values in the shadow's answer where the serving one has finite values.
        ServingNotFiniteError: NaN or infinite values in the serving answer where the shadow's differs.
    """
    names = [name for name in serving if name in shadow]
    if not names:
        raise ShadowMismatchError("the shadow's answer has no output in common with the serving answer")
    agreeing = rows = elements = 0
    total_difference = 0.0
    for name in names:
        a, b = np.asarray(serving[name]), np.asarray(shadow[name])
        if a.shape != b.shape:
            raise ShadowMismatchError(
                f"output '{name}' has shape {list(b.shape)} in the shadow's answer, {list(a.shape)} in the serving one"
            )
        if (a.dtype == object) != (b.dtype == object):
            raise ShadowMismatchError(f"output '{name}' is BYTES in one answer only")
        if a.size == 0:
            continue
        if a.dtype == object:
            agreeing += int(np.count_nonzero(a.reshape(-1) == b.reshape(-1)))
            rows += a.size
            continue
        if a.dtype.kind == "f" and b.dtype.kind == "f":
            if a.ndim >= 2 and a.shape[-1] > 1:
                last = a.shape[-1]
                top_a = a.reshape(-1, last).argmax(axis=1)
                top_b = b.reshape(-1, last).argmax(axis=1)
                agreeing += int(np.count_nonzero(top_a == top_b))
                rows += top_a.size
        elif a.dtype.kind in "iub" and b.dtype.kind in "iub":
            agreeing += int(np.count_nonzero(a == b))
            rows += a.size
        elif a.dtype.kind != b.dtype.kind:
            raise ShadowMismatchError(
                f"output '{name}' is of dtype {b.dtype} in the shadow's answer, {a.dtype} serving"
            )
        total_difference += _difference(name, a.astype(np.float64), b.astype(np.float64))
        elements += a.size
    difference = min(total_difference / elements, MAX_DIFFERENCE) if elements else None
    return Comparison(agreeing / rows if rows else None, difference, rows)


def _difference(name: str, a: np.ndarray[Any, Any], b: np.ndarray[Any, Any]) -> float:
    """The sum of ``|a - b|`` over the elements, each at most :data:`MAX_DIFFERENCE`; equal non-finite ones add 0."""
    finite_a, finite_b = np.isfinite(a), np.isfinite(b)
    if not (finite_a.all() and finite_b.all()):
        same = (a == b) | (np.isnan(a) & np.isnan(b))  # inf == inf; NaN only by the second term
        if np.any(~finite_a & ~same):
            raise ServingNotFiniteError(f"output '{name}' of the serving answer has NaN or infinite values")
        if np.any(~finite_b & ~same):
            raise ShadowMismatchError(f"output '{name}' of the shadow's answer has NaN or infinite values")
        both = finite_a & finite_b
        a, b = a[both], b[both]
    with np.errstate(over="ignore"):  # finite values far apart: their difference is clamped anyway
        return float(np.minimum(np.abs(a - b), MAX_DIFFERENCE).sum())


@dataclass(frozen=True)
class ShadowAssignment:
    """A model's shadow as the node was told: the version to run and the share of requests to run it on."""

    version: str
    share: float


class ShadowRecorder(Protocol):
    """Where shadow runs are counted (the node's fleet metrics implement it); called on the event loop."""

    def shadow_run(
        self,
        name: str,
        version: str,
        variant: str,
        outcome: str,
        comparison: Comparison | None = None,
        shadow_seconds: float = 0.0,
        serving_seconds: float = 0.0,
    ) -> None:
        """Records one sampled request: ``ok`` (with its comparison and both run times), ``error`` or ``shed``.

        ``version`` and ``variant`` are the *shadow's*.
        """


class ShadowRunner:
    """Samples locally answered requests and runs them on the model's shadow (see the module docstring).

    Args:
        serving: The node's serving cache (its run pool tells whether the node is busy).
        recorder: Where runs are counted (None: nowhere).
        deadline_s: The least deadline of one shadow run; it gets ``DEADLINE_FACTOR`` times the serving run's time
            when that is longer.
        retry_load_s: After a failed background load of a shadow, how long before the next try.
        sample: Returns a float in [0, 1) per offered request (a request is sampled when below the share).
    """

    def __init__(
        self,
        serving: ModelCache,
        recorder: ShadowRecorder | None = None,
        deadline_s: float = DEADLINE_S,
        retry_load_s: float = RETRY_LOAD_S,
        sample: Callable[[], float] = random.random,
    ) -> None:
        self.serving = serving
        self.recorder = recorder
        self.deadline_s = deadline_s
        self.retry_load_s = retry_load_s
        self._sample = sample
        self._cache: ModelCache | None = None
        self._installed: InstalledShadow = lambda name: None
        self._variant_of: Callable[[str, str], str] = lambda name, version: ""
        self._assigned: dict[str, ShadowAssignment] = {}
        self._runs: set[asyncio.Task[None]] = set()
        self._loading: asyncio.Task[None] | None = None
        self._load_after: dict[str, float] = {}  # model → loop time before which no background load is tried
        self._warned: set[tuple[str, str, str]] = set()  # (model, version, what) already logged as a warning

    # -- wiring (the node's shadow updater) --------------------------------------------------------------------

    def attach(self, cache: ModelCache, installed: InstalledShadow, variant_of: Callable[[str, str], str]) -> None:
        """Runs shadows from ``cache``; ``installed`` and ``variant_of`` read the shadow store."""
        self._cache = cache
        self._installed = installed
        self._variant_of = variant_of

    def assign(self, shadows: Mapping[str, ShadowAssignment]) -> None:
        """The models that have a shadow now, its version and share (the others stop at once).

        Only that version runs: another one still loaded or installed (the previous shadow) is never run.
        """
        self._assigned = {name: a for name, a in shadows.items() if 0 < a.share <= 1}
        current = {(name, a.version) for name, a in self._assigned.items()}
        self._warned = {w for w in self._warned if w[:2] in current}  # bounded over the node's lifetime

    @property
    def assigned(self) -> dict[str, ShadowAssignment]:
        """The models with a shadow, by name."""
        return dict(self._assigned)

    @property
    def in_flight(self) -> int:
        """Shadow runs in progress."""
        return len(self._runs)

    def deadline_after(self, serving_seconds: float) -> float:
        """How long a shadow run may take when the serving run took ``serving_seconds``.

        ``max(deadline_s, DEADLINE_FACTOR × serving_seconds)``: a version several times slower than the
        serving one still gets compared (its run time is what the rollout judges), while a node too busy
        to run it in that time sheds it.
        """
        return max(self.deadline_s, DEADLINE_FACTOR * max(serving_seconds, 0.0))

    async def close(self) -> None:
        """Stops sampling and cancels the shadow runs and the load in progress (their outcome is not recorded)."""
        self._assigned = {}
        tasks = [*self._runs, *([self._loading] if self._loading is not None else [])]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self._runs.clear()
        self._loading = None

    # -- the data plane's side ---------------------------------------------------------------------------------

    def offer(
        self, served: LoadedModel, inputs: Arrays, outputs: Arrays, serving_seconds: float
    ) -> asyncio.Task[None] | None:
        """Offers a request the serving version answered here; returns the shadow run's task when one started.

        Never raises and never waits: the answer is the caller's already.

        Args:
            served: The serving version that answered.
            inputs: The request's inputs as the caller sent them: before the serving model prepared them,
                and a text request's ``text_input`` before the serving tokenizer replaced it (the shadow
                tokenizes it with its own).
            outputs: The serving answer.
            serving_seconds: How long the serving run took (from its submission to its answer).
        """
        assigned = self._assigned.get(served.name)
        if assigned is None or self._cache is None:
            return None
        try:
            return self._offer(served, assigned, inputs, outputs, serving_seconds)
        except Exception:  # a bug here must cost the shadow, never the answer
            log.exception("the shadow of model '%s' failed to start", served.name)
            return None

    def _offer(
        self, served: LoadedModel, assigned: ShadowAssignment, inputs: Arrays, outputs: Arrays, serving_seconds: float
    ) -> asyncio.Task[None] | None:
        cache = self._cache
        assert cache is not None
        if self._sample() >= assigned.share:
            return None
        name, version = served.name, assigned.version
        shadow = cache.loaded_model(name)
        if shadow is not None and shadow.version == version:
            variant = self._variant_of(name, version)
        else:
            shadow = None
            installed = self._installed(name)
            if installed is None or installed[0] != version:
                return None  # the assigned shadow is not installed (yet): nothing to count
            variant = installed[1]
        busy = len(self._runs) >= MAX_IN_FLIGHT or served.batcher.queue_depth > 0 or not self._slot_free()
        if busy or shadow is None:
            self._record(name, version, variant, SHED)
            if shadow is None and not busy:
                self._load(cache, name)
            return None
        task = asyncio.create_task(
            self._run(cache, shadow, variant, dict(inputs), dict(outputs), serving_seconds),
            name=f"shadow {name} v{shadow.version}",
        )
        self._runs.add(task)
        task.add_done_callback(self._runs.discard)
        return task

    def _slot_free(self) -> bool:
        """Whether the node's run pool has a free slot now."""
        pool = self.serving.pool
        return pool.busy < pool.limit

    def _load(self, cache: ModelCache, name: str) -> None:
        """Starts one background load of a shadow (none while another runs, or before its retry time).

        A load that ends after its version stopped being assigned (the shadow was withdrawn or replaced,
        and maybe removed, meanwhile) is unloaded at once: nothing would ever run it.
        """
        loop = asyncio.get_running_loop()
        if self._loading is not None or loop.time() < self._load_after.get(name, 0.0):
            return

        async def load() -> None:
            try:
                model = await cache.get(name)
            except EdgecascadeError as exc:
                self._load_after[name] = loop.time() + self.retry_load_s
                log.info("the shadow of model '%s' is not loaded: %s", name, exc.message)
                return
            finally:
                self._loading = None
            assigned = self._assigned.get(name)
            if assigned is None or assigned.version != model.version:
                log.info(
                    "the shadow of model '%s' version %s loaded after it stopped being assigned; unloaded",
                    name,
                    model.version,
                )
                cache.release(model)

        self._loading = asyncio.create_task(load(), name=f"load shadow {name}")

    async def _run(
        self,
        cache: ModelCache,
        shadow: LoadedModel,
        variant: str,
        inputs: Arrays,
        served: Arrays,
        serving_seconds: float,
    ) -> None:
        loop = asyncio.get_running_loop()
        name, version = shadow.name, shadow.version
        try:
            async with cache.use(shadow):
                produced = {spec.name for spec in shadow.signature.outputs}
                wanted = tuple(n for n in served if n in produced)
                if not wanted:
                    raise ShadowMismatchError("the shadow has none of the outputs of the serving answer")
                inputs = _tokenized(shadow, inputs)
                _check_rows(shadow, inputs)
                prepared = shadow.session.prepare(inputs, wanted)
                if not self._slot_free():
                    raise _BusyError  # serving took the slots meanwhile: do not queue behind (or ahead of) it
                started = loop.time()
                deadline = started + self.deadline_after(serving_seconds)
                answer = await cache.run(shadow, prepared, wanted, deadline, shadow.batcher.config.priority_levels)
                shadow_seconds = loop.time() - started
            comparison = compare(served, answer)
        except (_BusyError, QueueFullError, DeadlineExceededError, ModelNotReadyError):
            # The node was busy (no free slot, a full queue, a missed deadline) or the shadow is being unloaded.
            self._record(name, version, variant, SHED)
            return
        except ServingNotFiniteError as exc:
            self._log_once(name, version, "serving", "a shadow run of model '%s' version %s is not counted: %s", exc)
            return
        except (EdgecascadeError, ShadowMismatchError) as exc:
            message = exc.message if isinstance(exc, EdgecascadeError) else str(exc)
            self._log_once(name, version, "failed", "the shadow run of model '%s' version %s failed: %s", message)
            self._record(name, version, variant, ERROR)
            return
        except Exception as exc:
            self._log_once(
                name, version, "bug", "the shadow run of model '%s' version %s failed unexpectedly: %r", exc, exc
            )
            self._record(name, version, variant, ERROR)
            return
        self._record(name, version, variant, OK, comparison, shadow_seconds, serving_seconds)

    def _log_once(
        self, name: str, version: str, what: str, message: str, detail: object, exc: BaseException | None = None
    ) -> None:
        """Logs a shadow run's failure: a warning (with ``exc``'s traceback) the first time for a version, then
        a debug line: a shadow failing on every sampled request must not flood the log."""
        first = (name, version, what) not in self._warned
        self._warned.add((name, version, what))
        if first:
            log.warning(message, name, version, detail, exc_info=exc)
        else:
            log.debug(message, name, version, detail)

    def _record(
        self,
        name: str,
        version: str,
        variant: str,
        outcome: str,
        comparison: Comparison | None = None,
        shadow_seconds: float = 0.0,
        serving_seconds: float = 0.0,
    ) -> None:
        if self.recorder is None:
            return
        try:
            self.recorder.shadow_run(name, version, variant, outcome, comparison, shadow_seconds, serving_seconds)
        except Exception:
            log.exception("recording a shadow run of model '%s' failed", name)


class _BusyError(Exception):
    """No run slot was free when the shadow was about to be submitted."""


def _tokenized(model: LoadedModel, inputs: Arrays) -> Arrays:
    """The inputs with a text request's prompt tokenized by ``model``'s own tokenizer (as the data plane does).

    Raises:
        ShadowMismatchError: The prompt is not one BYTES element.
        InvalidArgumentError: It is not UTF-8 or too long (the serving version took it, though).
    """
    if model.tokenizer is None or TEXT_INPUT not in inputs or INPUT_IDS in inputs:
        return inputs
    tokenized = dict(inputs)
    text = np.asarray(tokenized.pop(TEXT_INPUT))
    if text.dtype != object or text.size != 1:
        raise ShadowMismatchError(f"input '{TEXT_INPUT}' is not one BYTES element")
    prompt = decode_prompt(bytes(text.reshape(-1)[0]))
    tokenized[INPUT_IDS] = model.tokenizer.window(model.tokenizer.encode(prompt))
    return tokenized


def _check_rows(model: LoadedModel, inputs: Arrays) -> None:
    """Refuses more rows than the shadow's ``max_batch_size`` (its memory was admitted for that many).

    Raises:
        ShadowMismatchError: An input with a variable first axis has more rows.
    """
    limit = model.entry.max_batch_size
    for spec in model.signature.inputs:
        array = inputs.get(spec.name)
        if array is not None and spec.shape and spec.shape[0] == -1 and array.ndim and array.shape[0] > limit:
            raise ShadowMismatchError(
                f"input '{spec.name}' has {array.shape[0]} rows; the shadow takes at most {limit} per request"
            )
