"""The process-wide pool that runs onnxruntime off the event loop.

One pool per process, so the thread budget holds across every model:
``intra_op_threads × slots ≤ cores``. A batcher takes a *slot* before it forms
a batch, which is what makes batching natural: while every slot is busy,
requests accumulate in the queue and the next free slot takes them together.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

T = TypeVar("T")


class RunPool:
    """Bounded execution slots backed by a thread pool.

    Args:
        slots: Runs allowed at once (the configured most; :meth:`set_limit` may allow fewer for a while).
    """

    def __init__(self, slots: int) -> None:
        self.slots = slots
        self._executor = ThreadPoolExecutor(max_workers=slots, thread_name_prefix="onnxruntime")
        self._limit = slots
        self._busy = 0
        self._waiters: deque[asyncio.Future[None]] = deque()

    async def acquire(self) -> None:
        """Waits for a free slot (first come, first served)."""
        if self._busy < self._limit and not self._waiters:
            self._busy += 1
            return
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters.append(waiter)
        try:
            await waiter
        except asyncio.CancelledError:
            if waiter.done() and not waiter.cancelled():
                self.release()  # granted just as the caller left: pass it on
            elif waiter in self._waiters:  # a cancelled waiter may already have been dropped by _grant
                self._waiters.remove(waiter)
            raise

    def release(self) -> None:
        """Returns a slot taken with :meth:`acquire`."""
        self._busy -= 1
        self._grant()

    def set_limit(self, slots: int) -> None:
        """Allows ``slots`` runs at once from now on (1 to the configured :attr:`slots`).

        Runs in progress finish; a lower limit only delays the next ones.
        """
        self._limit = max(1, min(self.slots, slots))
        self._grant()

    @property
    def limit(self) -> int:
        """Runs allowed at once now."""
        return self._limit

    def _grant(self) -> None:
        while self._waiters and self._busy < self._limit:
            waiter = self._waiters.popleft()
            if not waiter.done():
                self._busy += 1
                waiter.set_result(None)

    async def run(self, fn: Callable[[], T]) -> T:
        """Runs ``fn`` in the pool's threads; the caller must hold a slot."""
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn)

    @property
    def busy(self) -> int:
        """Slots in use."""
        return self._busy

    def close(self) -> None:
        """Stops the threads after the runs in progress."""
        self._executor.shutdown(wait=True, cancel_futures=True)
