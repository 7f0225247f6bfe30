"""Deadline-aware dynamic batching for one model version.

Requests wait in one FIFO queue per priority level (level 1 is the most
urgent). A dispatcher loop takes an execution slot from the process-wide
:class:`~services.run_pool.RunPool` *first* and only then forms a batch, so
while every slot is busy requests pile up and the next free slot takes them
together; with a free slot and one request, that request runs at once.

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
* The dispatcher waits for more requests only while it can pay off: the batch
  is not full, another run is in progress (otherwise nobody else is about to
  send: a closed-loop caller waits on this very batch), ``max_queue_delay_us``
  since the first request has not passed, the tightest deadline in the batch
  still allows the predicted run, and the recent arrival rate says another
  request is likely within that window.
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
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields, replace
from typing import Any, Protocol

import numpy as np

from services.errors import (
    ConfigError,
    DeadlineExceededError,
    EdgecascadeError,
    InternalError,
    InvalidArgumentError,
    ModelNotReadyError,
    QueueFullError,
)
from services.model_stats import ModelStats
from services.run_pool import RunPool

Arrays = dict[str, np.ndarray[Any, Any]]

log = logging.getLogger("edgecascade.batcher")

# Smoothing of the run-time and inter-arrival estimates.
_EWMA = 0.2


class BatchObserver(Protocol):
    """Receives timings as they happen (the metrics adapter implements it)."""

    def queued(self, seconds: float) -> None:
        """A request waited ``seconds`` before its batch started."""

    def ran(self, rows: int, seconds: float) -> None:
        """A batch of ``rows`` rows ran for ``seconds``."""


class _Unobserved:
    def queued(self, seconds: float) -> None:
        pass

    def ran(self, rows: int, seconds: float) -> None:
        pass


@dataclass(frozen=True)
class BatchingConfig:
    """The ``[batching]`` settings (tier defaults, overridable per model).

    Attributes:
        max_batch_size: Most rows merged into one run; 1 turns batching off.
        max_queue_delay_us: Longest a request waits for others to join it.
        max_queue_size: Requests that may wait; more are refused at once.
        priority_levels: Number of priority levels; request priority 1 is the
            most urgent, 0 (or none) means the least urgent level.
        default_timeout_us: Deadline of a request that brings none; a client's
            ``timeout`` parameter or gRPC deadline may shorten it, never lengthen it.
    """

    max_batch_size: int = 32
    max_queue_delay_us: int = 500
    max_queue_size: int = 512
    priority_levels: int = 2
    default_timeout_us: int = 60_000_000

    def __post_init__(self) -> None:
        limits = {
            "max_batch_size": (1, 4096),
            "max_queue_delay_us": (0, 1_000_000),
            "max_queue_size": (1, 1_000_000),
            "priority_levels": (1, 16),
            "default_timeout_us": (1_000, 24 * 3600 * 1_000_000),
        }
        for f in fields(self):
            value = getattr(self, f.name)
            low, high = limits[f.name]
            if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
                raise ConfigError(f"[batching] {f.name} must be an integer from {low} to {high}, got {value!r}")

    def with_overrides(self, overrides: Mapping[str, Any], where: str) -> BatchingConfig:
        """Returns this configuration with per-model overrides applied.

        Raises:
            ConfigError: An unknown key or an invalid value (``where`` names the source).
        """
        known = {f.name for f in fields(self)}
        unknown = set(overrides) - known
        if unknown:
            raise ConfigError(f"{where}: unknown batching setting(s) {', '.join(sorted(unknown))}")
        try:
            return replace(self, **dict(overrides))
        except ConfigError as exc:
            raise ConfigError(f"{where}: {exc.message}") from None


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


@dataclass
class _RunTimes:
    """Predicts how long a run of ``rows`` takes from recent runs."""

    by_rows: dict[int, float] = field(default_factory=dict)

    def observe(self, rows: int, seconds: float) -> None:
        previous = self.by_rows.get(rows)
        self.by_rows[rows] = seconds if previous is None else previous + _EWMA * (seconds - previous)

    def predict(self, rows: int) -> float:
        if rows in self.by_rows:
            return self.by_rows[rows]
        if not self.by_rows:
            return 0.0
        nearest = min(self.by_rows, key=lambda r: abs(r - rows))
        return self.by_rows[nearest] * max(1.0, rows / nearest)


class DynamicBatcher:
    """Queues, batches and runs the requests of one model version.

    Args:
        name: Model name and version, for messages.
        config: Batching settings.
        pool: The process-wide run pool.
        execute: Runs the model on a batch (blocking; called in the pool).
        batchable: Whether the model's inputs and outputs share a leading batch axis.
        stats: Where to count.
        observer: Receives queue and run timings (for metrics).
    """

    def __init__(
        self,
        name: str,
        config: BatchingConfig,
        pool: RunPool,
        execute: Callable[[Mapping[str, np.ndarray[Any, Any]]], Arrays],
        batchable: bool,
        stats: ModelStats,
        observer: BatchObserver | None = None,
    ) -> None:
        self.name = name
        self._observer: BatchObserver = observer or _Unobserved()
        self.config = config
        self.stats = stats
        self._pool = pool
        self._execute = execute
        self._batchable = batchable and config.max_batch_size > 1
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
        self._run_times = _RunTimes()
        self._last_arrival = 0.0
        self._interarrival = 1.0

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
            QueueFullError: The queue is full.
            DeadlineExceededError: The deadline passed, or cannot be met, before the request ran.
            InvalidArgumentError: Bad priority, or the model rejected the input values.
            ModelNotReadyError: The batcher is closing (the model is being unloaded).
        """
        level = self.level_of(priority)
        if self._closing:
            raise ModelNotReadyError(f"model {self.name} is being unloaded")
        if self._size >= self.config.max_queue_size:
            self.stats.shed["queue_full"] += 1
            raise QueueFullError(f"the queue of model {self.name} is full ({self.config.max_queue_size} requests)")
        loop = asyncio.get_running_loop()
        now = loop.time()
        wait = self._predicted_wait(level)
        if wait and now + wait > deadline:
            # Queueing a request that cannot be answered in time only burns
            # compute its caller will never see; refusing now lets a device
            # send it upward while there is still time.
            self.stats.shed["overloaded"] += 1
            raise QueueFullError(
                f"model {self.name} cannot answer within the deadline: "
                f"about {wait * 1000:.0f} ms of work is queued ahead"
            )
        if self._last_arrival:
            gap = now - self._last_arrival
            self._interarrival += _EWMA * (gap - self._interarrival)
        self._last_arrival = now
        first = next(iter(inputs.values()), None)
        rows = int(first.shape[0]) if self._batchable and first is not None and first.ndim else 1
        if self._batchable and any(v.ndim == 0 or v.shape[0] != rows for v in inputs.values()):
            sizes = ", ".join(f"'{k}': {v.shape[0] if v.ndim else 'scalar'}" for k, v in inputs.items())
            raise InvalidArgumentError(f"every input must have the same batch size (first dimension); got {sizes}")
        signature = tuple(sorted((k, v.dtype.str, v.shape[1:]) for k, v in inputs.items())) if self._batchable else ()
        request = _Request(inputs, outputs, rows, signature, deadline, level, now, loop.create_future())
        if not self._size and not self._pool.busy:
            return await self._run_now(request)
        self._queues[level].append(request)
        self._size += 1
        self._rows[level] += rows
        self._arrived.set()
        return await request.future

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

    def _predicted_wait(self, level: int) -> float:
        """Seconds until a new request at ``level`` would start, from the work queued at its level or above."""
        rows = sum(self._rows[: level + 1])
        if not rows or not self._run_times.by_rows:
            return 0.0
        per_batch = self.config.max_batch_size if self._batchable else 1
        batches = -(-rows // per_batch)  # ceiling division
        rounds = -(-batches // self._pool.slots)
        return rounds * self._run_times.predict(min(rows, per_batch))

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
            task = asyncio.create_task(self._run(batch))
            self._runs.add(task)
            task.add_done_callback(self._run_done)

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
        if request.future.done():  # cancelled by its caller
            self.stats.shed["cancelled"] += 1
            return True
        if now + self._run_times.predict(request.rows) >= request.deadline:
            self.stats.shed["expired"] += 1
            self.stats.fail.add(int((now - request.enqueued) * 1e9))
            request.future.set_exception(
                DeadlineExceededError(f"deadline of a request to model {self.name} passed while it was queued")
            )
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
        rows = self._take(head.signature, self.config.max_batch_size, batch, now)
        self._forming = len(batch)
        if not batch or not self._batchable:
            return
        delay = self.config.max_queue_delay_us / 1e6
        # With nothing else in flight, the next request can only come from a
        # caller that is not waiting on us; in a closed loop (one client, or all
        # clients in this batch) waiting would only add latency.
        while rows < self.config.max_batch_size and delay > 0 and self._pool.busy > 1 and not self._closing:
            now = loop.time()
            tightest = min(r.deadline for r in batch)
            window_end = min(head.enqueued + delay, tightest - self._run_times.predict(self.config.max_batch_size))
            if window_end <= now or self._interarrival > window_end - now:
                break  # waiting would not pay off
            self._arrived.clear()
            try:
                await asyncio.wait_for(self._arrived.wait(), window_end - now)
            except TimeoutError:
                break
            rows += self._take(head.signature, self.config.max_batch_size - rows, batch, loop.time())
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
        inputs: Mapping[str, np.ndarray[Any, Any]]
        if len(batch) == 1:
            inputs = batch[0].inputs
        else:
            inputs = {name: np.concatenate([r.inputs[name] for r in batch]) for name in batch[0].inputs}
        try:
            outputs = await self._pool.run(lambda: self._execute(inputs))
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
        finished = loop.time()
        rows = sum(r.rows for r in batch)
        self._run_times.observe(rows, finished - started)
        stats = self.stats
        stats.execution_count += 1
        stats.compute_infer.add(int((finished - started) * 1e9))
        stats.batch(rows, int((finished - started) * 1e9))
        self._observer.ran(rows, finished - started)
        stats.last_inference_ms = time.time_ns() // 1_000_000
        offset = 0
        for request in batch:
            part = {
                name: (value[offset : offset + request.rows] if len(batch) > 1 else value)
                for name, value in outputs.items()
                if not request.outputs or name in request.outputs
            }
            offset += request.rows
            stats.inference_count += 1
            stats.queue.add(int((started - request.enqueued) * 1e9))
            self._observer.queued(started - request.enqueued)
            stats.success.add(int((finished - request.enqueued) * 1e9))
            if not request.future.done():
                request.future.set_result(part)

    def _fail(self, batch: list[_Request], exc: EdgecascadeError, started: float) -> None:
        for request in batch:
            self.stats.fail.add(int((started - request.enqueued) * 1e9))
            if not request.future.done():
                request.future.set_exception(exc)
