"""A bounded queue in front of one writer thread: what keeps ingest off the event loop.

Requests put their batch in the queue and wait for it to be written; the
writer takes everything queued (up to ``max_group`` items) and writes it in one
call on its own thread — one transaction for many requests, so the store's
commit cost is shared as load grows. The queue is bounded by the data points
waiting (submitted and not yet written): past ``capacity`` a request is refused
at once with :class:`~services.errors.QueueFullError` (counted by the caller),
never queued to wait. When a group fails, its items are written again one at a time, so one bad
item cannot fail (and, retried by its clients, keep failing) everybody else's;
an item that fails alone fails its request with
:class:`~services.errors.UnavailableError`, which clients may retry.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Generic, TypeVar

from services.errors import QueueFullError, UnavailableError

log = logging.getLogger("edgecascade.telemetry")

T = TypeVar("T")
R = TypeVar("R")


class WriteQueue(Generic[T]):
    """Items waiting for their writer, bounded by the data points they carry.

    Args:
        name: Names the writer's thread and the queue in messages.
        write: Writes a group of items; runs on the writer's thread and may raise.
        capacity: The most data points waiting at once.
        max_group: The most items written in one call.
    """

    def __init__(self, name: str, write: Callable[[Sequence[T]], None], capacity: int, max_group: int = 512) -> None:
        self.name = name
        self._write = write
        self._capacity = capacity
        self._max_group = max_group
        self._items: deque[tuple[T, int, asyncio.Future[None]]] = deque()
        self._pending = 0
        self._executor = ThreadPoolExecutor(1, thread_name_prefix=name)
        self._task: asyncio.Task[None] | None = None
        self._wake: asyncio.Event | None = None
        self._idle: asyncio.Event | None = None
        self._closed = False
        self.groups = 0

    @property
    def pending_points(self) -> int:
        """Data points submitted and not yet written."""
        return self._pending

    def start(self) -> None:
        """Starts the writer (inside the running event loop)."""
        if self._task is None and not self._closed:
            self._wake = asyncio.Event()
            self._idle = asyncio.Event()
            self._idle.set()
            self._task = asyncio.create_task(self._run(), name=f"{self.name} writer")

    def submit(self, item: T, points: int) -> asyncio.Future[None]:
        """Queues ``item`` (carrying ``points`` data points); the future resolves once it is written.

        Raises:
            QueueFullError: Accepting it would put more than ``capacity`` data points in waiting.
            UnavailableError: The writer is not running (not started yet, or stopping).
        """
        if self._closed or self._wake is None or self._idle is None:
            raise UnavailableError(f"the {self.name} is not taking writes now; retry later")
        if self._pending + points > self._capacity:
            raise QueueFullError(
                f"the {self.name} has {self._pending} data points waiting to be written (at most "
                f"{self._capacity}); retry later"
            )
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._items.append((item, points, future))
        self._pending += points
        self._idle.clear()
        self._wake.set()
        return future

    async def call(self, fn: Callable[[], R]) -> R:
        """Runs ``fn`` on the writer's thread (between writes: pruning, say)."""
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn)

    async def _run(self) -> None:
        assert self._wake is not None
        assert self._idle is not None
        while True:
            await self._wake.wait()
            group = [self._items.popleft() for _ in range(min(len(self._items), self._max_group))]
            if not self._items:
                self._wake.clear()
            try:
                await self._write_group(group)
            except asyncio.CancelledError:
                _fail(group, UnavailableError(f"the {self.name} stopped before this was written; retry later"))
                raise
            finally:
                self._pending -= sum(points for _, points, _ in group)
            if not self._items:
                self._idle.set()

    async def _write_group(self, group: list[tuple[T, int, asyncio.Future[None]]]) -> None:
        loop = asyncio.get_running_loop()
        try:
            await loop.run_in_executor(self._executor, self._write, [item for item, _, _ in group])
        except Exception:
            if len(group) == 1:
                log.exception("the %s could not write a request", self.name)
                _fail(group, UnavailableError(f"the {self.name} could not write; retry later"))
                return
            # Find the culprit: the others are written on their own.
            for one in group:
                await self._write_group([one])
            return
        self.groups += 1
        for _, _, future in group:
            if not future.done():
                future.set_result(None)

    async def stop(self, drain_s: float = 5.0) -> None:
        """Takes no more, writes what is queued (for up to ``drain_s``), fails the rest and ends the writer.

        Safe when :meth:`start` never ran; a write already on the thread finishes first.
        """
        self._closed = True
        if self._task is not None and self._idle is not None:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._idle.wait(), drain_s)
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        left = list(self._items)
        self._items.clear()
        _fail(left, UnavailableError(f"the {self.name} stopped before this was written; retry later"))
        await asyncio.to_thread(self._executor.shutdown, wait=True)


def _fail(group: Sequence[tuple[object, int, asyncio.Future[None]]], error: Exception) -> None:
    for _, _, future in group:
        if not future.done():
            future.set_exception(error)
            # Nobody may be waiting any more (the caller left): do not let asyncio complain about it.
            future.exception()
