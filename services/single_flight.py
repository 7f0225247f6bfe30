"""Run a piece of work once per key, however many callers ask for it at the same time.

Invariants:

* At most one piece of work per key is in flight. The first caller for a key
  starts it as a task of its own; a caller arriving while it runs joins it and
  gets the same result or the same exception.
* The work belongs to no caller: a caller that gives up (is cancelled) leaves
  alone, neither cancelling the work nor the other callers' wait. Work whose
  callers all left still runs to its end.
* The key is freed as soon as the work ends (whatever its outcome), so the next
  caller starts afresh; results are not cached here.
* The outcome is always retrieved, so work that failed after every caller left
  is never reported as a never-retrieved exception.
"""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Callable, Coroutine, Hashable
from typing import Any, Generic, TypeVar

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")


class SingleFlight(Generic[K, V]):
    """One task per key in flight, shared by every caller that asks for the key meanwhile."""

    def __init__(self) -> None:
        self._tasks: dict[K, asyncio.Task[V]] = {}

    async def run(self, key: K, factory: Callable[[], Coroutine[Any, Any, V]], name: str | None = None) -> V:
        """Returns the outcome of the work for ``key``, starting it with ``factory`` unless it is in flight.

        Args:
            key: What the work is for.
            factory: Makes the work's coroutine; called only by the caller that starts it.
            name: Name of the task, for debugging.

        Raises:
            asyncio.CancelledError: This caller was cancelled (the work goes on), or the work itself was.
            Exception: Whatever the work raised, to every caller that waited for it.
        """
        task = self._tasks.get(key)
        if task is None:
            task = asyncio.create_task(factory(), name=name)
            self._tasks[key] = task
            task.add_done_callback(functools.partial(self._done, key))
        return await asyncio.shield(task)

    def in_flight(self, key: K) -> bool:
        """Whether work for ``key`` is running."""
        return key in self._tasks

    def keys(self) -> list[K]:
        """The keys with work in flight."""
        return list(self._tasks)

    async def cancel_all(self) -> None:
        """Cancels all work in flight and waits for it to end (at shutdown)."""
        tasks = list(self._tasks.values())
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    def _done(self, key: K, task: asyncio.Task[V]) -> None:
        if self._tasks.get(key) is task:
            del self._tasks[key]
        if not task.cancelled():
            task.exception()  # retrieved, so work whose callers all left does not warn
