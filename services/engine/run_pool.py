"""The process-wide pool that runs onnxruntime off the event loop.

One pool per process, so the thread budget holds across every model:
``intra_op_threads × slots ≤ cores``. A batcher takes a *slot* before it forms
a batch, which is what makes batching natural: while every slot is busy,
requests accumulate in the queue and the next free slot takes them together.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

T = TypeVar("T")


class RunPool:
    """Bounded execution slots backed by a thread pool.

    Args:
        slots: Runs allowed at once.
    """

    def __init__(self, slots: int) -> None:
        self.slots = slots
        self._executor = ThreadPoolExecutor(max_workers=slots, thread_name_prefix="onnxruntime")
        self._free = asyncio.Semaphore(slots)

    async def acquire(self) -> None:
        """Waits for a free slot."""
        await self._free.acquire()

    def release(self) -> None:
        """Returns a slot taken with :meth:`acquire`."""
        self._free.release()

    async def run(self, fn: Callable[[], T]) -> T:
        """Runs ``fn`` in the pool's threads; the caller must hold a slot."""
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn)

    @property
    def busy(self) -> int:
        """Slots in use."""
        return self.slots - self._free._value  # asyncio.Semaphore exposes no public counter

    def close(self) -> None:
        """Stops the threads after the runs in progress."""
        self._executor.shutdown(wait=True, cancel_futures=True)
