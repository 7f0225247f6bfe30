"""Deadline-aware dynamic batching for one model version: queues, futures and the dispatcher task.

Requests wait in one FIFO queue per priority level (level 1 is the most
urgent). A dispatcher loop takes an execution slot from the process-wide
:class:`~services.engine.run_pool.RunPool` *first* and only then forms a batch, so
while every slot is busy requests pile up and the next free slot takes them
together; with a free slot and nothing queued, a request runs at once from its
caller (the fast path, no hand-over to the dispatcher). A model whose runs are
timed within ``inline_run_us`` runs on the event loop itself instead: what
arrives during one loop turn is run as one batch at the end of it, with no
thread hand-off and no task per run (:meth:`DynamicBatcher._drain`).

Who decides what:

* :class:`~services.engine.batch_policy.BatchPolicy` (pure, takes ``now``) decides
  which requests are hopeless, whether a new request is refused, and how long
  the dispatcher may wait for company; it holds the run-time and
  inter-arrival estimates.
* :mod:`services.engine.batch_merge` concatenates a batch's inputs and slices the
  outputs back per request.
* Observers (:class:`BatchEvents`) are told what happened; counting into
  :class:`~services.engine.model_stats.ModelStats` (``batcher.stats``) is one of them,
  metrics another. The batcher updates no counter itself.

Rules, in the order the dispatcher applies them:

* A request whose caller cancelled, or whose deadline has passed or cannot be
  met by the predicted run time, is removed and answered without being
  computed (``CANCELLED`` callers are gone; the others get
  :class:`~services.errors.DeadlineExceededError`). Both are counted in
  ``stats.shed``.
* The batch starts with the most urgent, oldest request and takes requests of
  the same input signature (names, dtypes, shapes after the batch axis) in
  priority order until ``max_batch_size`` rows. A request larger than
  ``max_batch_size`` on its own runs alone.
* The dispatcher waits for more requests only while it can pay off (see
  :meth:`~services.engine.batch_policy.BatchPolicy.company_wait`).
* A full queue (``max_queue_size`` requests) refuses new ones at once with
  :class:`~services.errors.QueueFullError`; so does a queue holding more work
  ahead of a new request than its deadline leaves time for (predicted from
  recent run times; counted as ``overloaded``).
* If a batch fails on its input values, each request is re-run alone so one bad
  request cannot fail its neighbours.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

import numpy as np

from services.engine.batch_merge import merge_inputs, rows_of, signature_of, split_outputs, whole_signature_of
from services.engine.batch_policy import BatchingConfig, BatchPolicy, Refusal
from services.engine.model_stats import ModelStats, StatsObserver
from services.engine.run_pool import RunPool
from services.engine.throttle import Throttle
from services.errors import (
    DeadlineExceededError,
    EdgecascadeError,
    InternalError,
    InvalidArgumentError,
    ModelNotReadyError,
    QueueFullError,
)

__all__ = ["Arrays", "BatchEvents", "BatchObserver", "BatchingConfig", "DynamicBatcher"]

Arrays = dict[str, np.ndarray[Any, Any]]

log = logging.getLogger("edgecascade.batcher")

# How many inline runs' worth of time one drain may hold the loop before it yields for a turn.
INLINE_TURNS = 4

_CANCELLED = "cancelled"
_EXPIRED = "expired"


class BatchObserver(Protocol):
    """Receives a batcher's timings as they happen (the metrics adapter implements it)."""

    def queued(self, seconds: float) -> None:
        """A request waited ``seconds`` before its batch started."""

    def ran(self, rows: int, seconds: float) -> None:
        """A batch of ``rows`` rows ran for ``seconds`` (the model's own time, timed where it ran)."""


@runtime_checkable
class BatchEvents(BatchObserver, Protocol):
    """Receives every event of a batcher: its timings and what became of each request.

    Per answered request: :meth:`queued` then :meth:`answered`; per run: :meth:`ran`
    (before its requests are answered); per request failed after it was queued:
    :meth:`failed`; per request answered without being computed: :meth:`shed`
    (an expired one also :meth:`failed`). Observers are called on the event
    loop, before the caller is answered, and must not block.
    """

    def answered(self, seconds: float) -> None:
        """A request was answered ``seconds`` after it was queued."""

    def failed(self, seconds: float) -> None:
        """A request failed ``seconds`` after it was queued (its deadline passed, or its run failed)."""

    def shed(self, reason: str) -> None:
        """A request was answered without being computed: ``queue_full``, ``overloaded``, ``expired``, ``cancelled``."""


class _TimingsOnly:
    """Lets an observer of timings alone receive every event (the others are ignored)."""

    def __init__(self, timings: BatchObserver) -> None:
        # Bound once, so forwarding a timing costs no extra call.
        self.queued: Callable[[float], None] = timings.queued
        self.ran: Callable[[int, float], None] = timings.ran

    def answered(self, seconds: float) -> None:
        pass

    def failed(self, seconds: float) -> None:
        pass

    def shed(self, reason: str) -> None:
        pass


def _events(observer: BatchObserver) -> BatchEvents:
    return observer if isinstance(observer, BatchEvents) else _TimingsOnly(observer)


@dataclass(eq=False)
class _Request:
    inputs: Mapping[str, np.ndarray[Any, Any]]
    outputs: tuple[str, ...]
    rows: int
    signature: tuple[Any, ...]
    deadline: float
    level: int
    enqueued: float
    future: asyncio.Future[Arrays]


class DynamicBatcher:
    """Queues, batches and runs the requests of one model version.

    Args:
        name: Model name and version, for messages.
        config: Batching settings.
        pool: The process-wide run pool.
        execute: Runs the model on a batch (blocking; called in the pool).
        batchable: Whether the model's inputs and outputs share a leading batch axis.
        stats: Where the statistics observer counts (a new one when None); ``self.stats``.
        observers: Also told every event (in order, after the statistics); one
            that implements only :class:`BatchObserver` receives the timings.
        throttle: Limits in force now (a hot device's smaller batches); none when None.
    """

    def __init__(
        self,
        name: str,
        config: BatchingConfig,
        pool: RunPool,
        execute: Callable[[Mapping[str, np.ndarray[Any, Any]]], Arrays],
        batchable: bool,
        stats: ModelStats | None = None,
        observers: Sequence[BatchObserver] = (),
        throttle: Throttle | None = None,
    ) -> None:
        self.name = name
        self.config = config
        self.stats = stats if stats is not None else ModelStats()
        self._observers: tuple[BatchEvents, ...] = (StatsObserver(self.stats), *map(_events, observers))
        self._pool = pool
        self._execute = execute
        self._batchable = batchable and config.max_batch_size > 1
        self._policy = BatchPolicy(config, self._batchable, pool.slots)
        self._queues: list[deque[_Request]] = [deque() for _ in range(config.priority_levels)]
        self._size = 0
        self._rows = [0] * config.priority_levels  # queued rows per level, for the wait prediction
        self._inline = 0  # requests on the fast path (see _run_now)
        self._forming = 0  # requests in the batch the dispatcher is forming
        self._arrived = asyncio.Event()
        # Set whenever a run ends or the queue shrinks, so close() can wait for the drain.
        self._progress = asyncio.Event()
        self._runs: set[asyncio.Task[None]] = set()
        self._loop_task: asyncio.Task[None] | None = None
        self._closing = False
        self._throttle = throttle or Throttle()
        self._drain_pending = False  # a call of _drain is scheduled (inline runs)

    @property
    def max_rows(self) -> int:
        """The most rows a batch takes now: ``max_batch_size``, or less while the node is throttled."""
        return self._throttle.rows(self.config.max_batch_size)

    @property
    def queue_depth(self) -> int:
        """Requests waiting."""
        return self._size

    @property
    def in_flight(self) -> int:
        """Requests waiting or running."""
        return self._size + self._forming + self._inline + sum(1 for t in self._runs if not t.done())

    def start(self) -> None:
        """Starts the dispatcher (inside the running loop)."""
        if self._loop_task is None:
            self._loop_task = asyncio.create_task(self._dispatch(), name=f"batcher {self.name}")

    async def close(self) -> None:
        """Stops taking requests, finishes everything queued or running, then stops."""
        self._closing = True
        self._arrived.set()
        if self._loop_task is not None:
            # The dispatcher leaves by itself once the queue is empty; it is
            # not cancelled, so a batch it is forming is never dropped.
            await self._loop_task
            # Drop the finished task so nothing keeps this batcher (and its
            # session) alive until the next cyclic garbage collection.
            self._loop_task = None
        while self._runs or self._inline:
            self._progress.clear()
            await self._progress.wait()

    def level_of(self, priority: int) -> int:
        """Maps a request's ``priority`` parameter to a queue index (0 = most urgent).

        Raises:
            InvalidArgumentError: The priority is beyond ``priority_levels``.
        """
        levels = self.config.priority_levels
        if priority == 0:
            return levels - 1
        if not 1 <= priority <= levels:
            raise InvalidArgumentError(
                f"parameter 'priority' must be 0 (default) or 1 to {levels} for model {self.name}, got {priority}"
            )
        return priority - 1

    async def submit(
        self, inputs: Mapping[str, np.ndarray[Any, Any]], outputs: tuple[str, ...], deadline: float, priority: int = 0
    ) -> Arrays:
        """Queues one validated request and returns its outputs.

        Args:
            inputs: Inputs that passed the model's signature check.
            outputs: Output names wanted (all when empty).
            deadline: ``loop.time()`` by which the answer is needed.
            priority: The request's ``priority`` parameter.

        Raises:
            QueueFullError: The queue is full, or the work queued ahead cannot finish before the deadline.
            DeadlineExceededError: The deadline passed, or cannot be met, before the request ran.
            InvalidArgumentError: Bad priority, or the model rejected the input values.
            ModelNotReadyError: The batcher is closing (the model is being unloaded).
        """
        level = self.level_of(priority)
        if self._closing:
            raise ModelNotReadyError(f"model {self.name} is being unloaded")
        loop = asyncio.get_running_loop()
        now = loop.time()
        rows_ahead = sum(self._rows[: level + 1]) if self._size else 0
        if self._size:
            # A throttled node runs smaller batches on fewer slots: the wait ahead is longer.
            self._policy.capacity(self.max_rows if self._batchable else 1, self._pool.limit)
        refusal = self._policy.refusal(self._size, rows_ahead, deadline, now)
        if refusal is not None:
            self._refuse(refusal, rows_ahead)
        self._policy.arrivals.observe(now)
        if self._batchable:
            rows = rows_of(inputs)
            key = signature_of(inputs)
        else:
            # Never merged: each request is a run of its own, so its whole shape is what its run time depends on.
            rows, key = 1, whole_signature_of(inputs)
        request = _Request(inputs, outputs, rows, key, deadline, level, now, loop.create_future())
        if not self._drain_pending:
            if self._size or self._pool.busy:
                self._arrived.set()  # the dispatcher's: it batches what queues while the slots are busy
            elif self._policy.runs_inline(key, rows, others_running=False):
                # Run on the loop at the end of this turn, with whatever else arrives in it.
                self._drain_pending = True
                loop.call_soon(self._drain)
            else:
                return await self._run_now(request)
        self._queues[level].append(request)
        self._size += 1
        self._rows[level] += rows
        return await request.future

    def _observe(self, event: Callable[[BatchEvents], None]) -> None:
        """Tells every observer of an event; one that raises costs its own count, never a caller's answer."""
        for observer in self._observers:
            try:
                event(observer)
            except Exception:
                log.exception("an observer of model %s failed", self.name)

    def _refuse(self, refusal: Refusal, rows_ahead: int) -> None:
        self._observe(lambda observer: observer.shed(refusal.value))
        if refusal is Refusal.QUEUE_FULL:
            raise QueueFullError(f"the queue of model {self.name} is full ({self.config.max_queue_size} requests)")
        wait = self._policy.predicted_wait(rows_ahead)
        raise QueueFullError(
            f"model {self.name} cannot answer within the deadline: about {wait * 1000:.0f} ms of work is queued ahead"
        )

    async def _run_now(self, request: _Request) -> Arrays:
        """Runs a request at once: nothing is queued and every slot is free.

        This skips the hand-over to the dispatcher task for the common case of
        a lone request; there is nothing to batch it with and no one ahead of
        it. The run is its own task, shielded from the caller, so a caller that
        gives up does not free the slot while onnxruntime is still busy with it.
        """
        await self._pool.acquire()  # a slot is free, so this does not suspend
        self._inline += 1
        run = asyncio.create_task(self._run([request]))
        run.add_done_callback(self._inline_done)
        try:
            await asyncio.shield(run)
        except asyncio.CancelledError:
            request.future.cancel()  # the caller left: nobody is to be answered
            raise
        return request.future.result()

    def _inline_done(self, task: asyncio.Task[None]) -> None:
        self._inline -= 1
        self._progress.set()

    def _dequeued(self, request: _Request) -> None:
        self._size -= 1
        self._rows[request.level] -= request.rows

    async def _dispatch(self) -> None:
        while True:
            if not self._size:
                if self._closing:
                    return
                self._arrived.clear()
                await self._arrived.wait()
                continue
            await self._pool.acquire()
            batch: list[_Request] = []
            try:
                await self._form_batch(batch)
            except Exception:
                # A bug here must not kill the dispatcher (every later request
                # would hang): fail this batch and go on.
                log.exception("model %s failed to form a batch", self.name)
                now = asyncio.get_running_loop().time()
                self._fail(batch, InternalError(f"model {self.name} failed to schedule a request"), now)
                batch = []
            except BaseException:
                self._fail(batch, ModelNotReadyError(f"model {self.name} stopped"), asyncio.get_running_loop().time())
                self._forming = 0
                self._pool.release()
                raise
            self._forming = 0
            self._progress.set()
            if not batch:
                self._pool.release()
                continue
            rows = sum(r.rows for r in batch)
            if self._policy.runs_inline(batch[0].signature, rows, others_running=self._pool.busy > 1):
                self._run_here(batch)
                continue
            task = asyncio.create_task(self._run(batch))
            self._runs.add(task)
            task.add_done_callback(self._run_done)

    def _run_here(self, batch: list[_Request]) -> None:
        """Runs a formed batch on the loop (its slot held) instead of in a thread: it is predicted to be tiny."""
        try:
            now = asyncio.get_running_loop().time()
            live = [r for r in batch if not self._dead(r, now)]
            if live:
                self._run_inline(live)
        finally:
            self._pool.release()
            self._progress.set()

    def _run_done(self, task: asyncio.Task[None]) -> None:
        self._runs.discard(task)
        self._progress.set()

    def _head(self, now: float) -> _Request | None:
        """The most urgent, oldest live request; dead ones met on the way are answered and dropped."""
        for queue in self._queues:
            while queue:
                if not self._dead(queue[0], now):
                    return queue[0]
                self._dequeued(queue.popleft())
        return None

    def _dead(self, request: _Request, now: float) -> bool:
        """Whether ``request`` is not to be run (its caller left, or the policy finds it hopeless); answers it if so."""
        if request.future.done():  # cancelled by its caller
            self._observe(lambda observer: observer.shed(_CANCELLED))
            return True
        if self._policy.hopeless(request, now):
            request.future.set_exception(
                DeadlineExceededError(f"deadline of a request to model {self.name} passed while it was queued")
            )
            waited = now - request.enqueued

            def expired(observer: BatchEvents) -> None:
                observer.shed(_EXPIRED)
                observer.failed(waited)

            self._observe(expired)
            return True
        return False

    def _take(self, signature: tuple[Any, ...], room: int, batch: list[_Request], now: float) -> int:
        """Moves queued requests of ``signature`` into ``batch``, most urgent first; returns rows taken.

        The same pass drops (and answers) every dead request it meets, so a
        request whose caller gave up is never computed.
        """
        taken = 0
        for queue in self._queues:
            keep: deque[_Request] = deque()
            while queue:
                request = queue.popleft()
                if self._dead(request, now):
                    self._dequeued(request)
                    continue
                fits = request.signature == signature and (taken + request.rows <= room or not batch)
                if fits and (self._batchable or not batch):
                    batch.append(request)
                    taken += request.rows
                    self._dequeued(request)
                else:
                    keep.append(request)
            queue.extend(keep)
        return taken

    async def _form_batch(self, batch: list[_Request]) -> None:
        """Fills ``batch`` (the dispatcher's, so it is accounted for while this waits)."""
        loop = asyncio.get_running_loop()
        now = loop.time()
        head = self._head(now)
        if head is None:
            return
        cap = self.max_rows
        rows = self._take(head.signature, cap, batch, now)
        self._forming = len(batch)
        if not batch or not self._batchable:
            return
        while not self._closing and rows < cap:
            now = loop.time()
            wait = self._policy.company_wait(head, batch, rows, self._pool.busy > 1, now)
            if wait <= 0:
                break
            self._arrived.clear()
            try:
                await asyncio.wait_for(self._arrived.wait(), wait)
            except TimeoutError:
                break
            rows += self._take(head.signature, cap - rows, batch, loop.time())
            self._forming = len(batch)

    async def _run(self, batch: list[_Request]) -> None:
        loop = asyncio.get_running_loop()
        try:
            now = loop.time()
            live = [r for r in batch if not self._dead(r, now)]
            if live:
                await self._execute_batch(live)
        finally:
            self._pool.release()

    async def _execute_batch(self, batch: list[_Request]) -> None:
        loop = asyncio.get_running_loop()
        started = loop.time()
        inputs = merge_inputs(batch)

        def timed() -> tuple[Arrays, float]:
            # Timed in the thread: the loop's view adds the hand-off and its own backlog.
            begun = time.perf_counter()
            answer = self._execute(inputs)
            return answer, time.perf_counter() - begun

        try:
            outputs, compute = await self._pool.run(timed)
        except InvalidArgumentError as exc:
            if len(batch) > 1:
                for request in batch:  # isolate the request whose values the model rejects
                    if not self._dead(request, loop.time()):
                        await self._execute_batch([request])
                return
            self._fail(batch, exc, started)
            return
        except EdgecascadeError as exc:
            self._fail(batch, exc, started)
            return
        except Exception:
            # Every waiting caller must get an answer, even for a bug.
            log.exception("model %s failed to run a batch of %d", self.name, len(batch))
            self._fail(batch, InternalError(f"model {self.name} failed to run"), started)
            return
        self._answer(batch, outputs, started, loop.time(), compute)

    def _drain(self) -> None:
        """Runs what queued during one loop turn on the loop itself, as batches, while runs stay tiny.

        Scheduled by :meth:`submit` for a model whose runs are predicted within
        ``inline_run_us``. Once a batch would be too long, or a run is in flight
        elsewhere, the rest goes to the dispatcher (and the threads). After
        :data:`INLINE_TURNS` × ``inline_run_us`` on the loop it yields (the answers
        ready so far go out) and goes on in the next turn.
        """
        self._drain_pending = False
        loop = asyncio.get_running_loop()
        batch: list[_Request] = []
        begun = time.perf_counter()
        budget = INLINE_TURNS * self._policy.inline
        try:
            while self._size:
                now = loop.time()
                head = self._head(now)
                if head is None:
                    return
                if time.perf_counter() - begun > budget:
                    # Long enough on the loop: let the answers go out, then go on.
                    self._drain_pending = True
                    loop.call_soon(self._drain)
                    return
                cap = self.max_rows
                # What the batch will hold at most: a request larger than the cap runs alone, whole.
                if not self._batchable:
                    rows = 1  # one request per run; its whole shape is in its signature
                elif head.rows >= cap:
                    rows = head.rows
                else:
                    rows = min(sum(self._rows), cap)
                if self._pool.busy or not self._policy.runs_inline(head.signature, rows, others_running=False):
                    self._arrived.set()
                    return
                batch = []
                self._take(head.signature, cap, batch, now)
                if batch:
                    self._run_inline(batch)
                    batch = []
        except Exception:
            # A bug in the scheduling here must not leave callers waiting for ever (runs catch their own).
            log.exception("model %s failed to schedule a batch on the loop", self.name)
            self._fail(batch, InternalError(f"model {self.name} failed to schedule a request"), loop.time())
            self._arrived.set()
        finally:
            self._progress.set()

    def _run_inline(self, batch: list[_Request]) -> None:
        """Runs a batch on the event loop (it is predicted to take a few microseconds) and answers it."""
        loop = asyncio.get_running_loop()
        started = loop.time()
        begun = time.perf_counter()
        try:
            outputs = self._execute(merge_inputs(batch))
        except InvalidArgumentError as exc:
            if len(batch) > 1:
                for request in batch:  # isolate the request whose values the model rejects
                    if not self._dead(request, loop.time()):
                        self._run_inline([request])
                return
            self._fail(batch, exc, started)
            return
        except EdgecascadeError as exc:
            self._fail(batch, exc, started)
            return
        except Exception:
            # Every waiting caller must get an answer, even for a bug (as in a thread's run).
            log.exception("model %s failed to run a batch of %d on the loop", self.name, len(batch))
            self._fail(batch, InternalError(f"model {self.name} failed to run"), started)
            return
        self._answer(batch, outputs, started, loop.time(), time.perf_counter() - begun)

    def _answer(self, batch: list[_Request], outputs: Arrays, started: float, finished: float, compute: float) -> None:
        """Answers each request of a batch, then tells the observers.

        The batch was handed over at ``started`` and back at ``finished`` (loop time: what
        waits are predicted from); the model itself took ``compute`` seconds where it ran
        (what observers are told, and what decides inline runs).
        """
        observers = self._observers
        rows = sum(r.rows for r in batch)
        self._policy.run_times.observe(rows, finished - started)
        self._policy.computed(batch[0].signature, rows, compute)
        # Answers first: an observer that raises must not leave a caller waiting.
        for request, answer in zip(batch, split_outputs(outputs, batch), strict=True):
            if not request.future.done():
                request.future.set_result(answer)
        try:
            for observer in observers:
                observer.ran(rows, compute)
            for request in batch:
                for observer in observers:
                    observer.queued(started - request.enqueued)
                    observer.answered(finished - request.enqueued)
        except Exception:
            log.exception("an observer of model %s failed", self.name)

    def _fail(self, batch: list[_Request], exc: EdgecascadeError, started: float) -> None:
        for request in batch:
            if not request.future.done():
                request.future.set_exception(exc)
        waits = [started - request.enqueued for request in batch]

        def failed(observer: BatchEvents) -> None:
            for waited in waits:
                observer.failed(waited)

        self._observe(failed)
