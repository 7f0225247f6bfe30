"""Periodic work of a node (re-signing metadata; soon check-ins and telemetry) in one shape.

A :class:`Ticker` runs its work in a task of its own, once right away and then
every ``interval_s`` seconds after the previous run ended. A run that fails is
logged with its traceback and the next one runs on time: one bad run never
ends the loop. :meth:`Ticker.stop` is run-once, like OpenTelemetry's periodic
reader: the first call ends the loop (a run in progress is cancelled) and waits
for it; later calls return at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
from collections.abc import Awaitable, Callable

log = logging.getLogger("edgecascade.ticker")


class Ticker:
    """Runs ``work`` periodically until stopped.

    Args:
        name: Names the work in logs and the task.
        interval_s: Seconds from the end of one run to the start of the next.
        work: The work; its exceptions are logged, never raised.
        jitter: Each wait is ``interval_s`` times a random factor in ``1 ± jitter``, so
            that a fleet started together does not call in together.

    Raises:
        ValueError: ``interval_s`` is not positive, or ``jitter`` is not in [0, 1).
    """

    def __init__(self, name: str, interval_s: float, work: Callable[[], Awaitable[None]], jitter: float = 0.0) -> None:
        if interval_s <= 0:
            raise ValueError(f"the interval of {name} must be positive, got {interval_s}")
        if not 0 <= jitter < 1:
            raise ValueError(f"the jitter of {name} must be in [0, 1), got {jitter}")
        self.name = name
        self.interval_s = interval_s
        self.jitter = jitter
        self._work = work
        self._task: asyncio.Task[None] | None = None
        self._stopped = False
        self.runs = 0
        self.failures = 0

    def start(self) -> None:
        """Starts the loop (inside the running event loop); a stopped ticker stays stopped."""
        if self._task is None and not self._stopped:
            self._task = asyncio.create_task(self._loop(), name=self.name)

    async def stop(self) -> None:
        """Ends the loop and waits for it; only the first call does anything."""
        if self._stopped:
            return
        self._stopped = True
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    async def _loop(self) -> None:
        while True:
            try:
                await self._work()
            except Exception:
                self.failures += 1
                log.exception("%s failed; it runs again in %.3g s", self.name, self.interval_s)
            self.runs += 1
            await asyncio.sleep(self.next_wait())

    def next_wait(self) -> float:
        """The seconds until the next run (the interval, jittered)."""
        return self.interval_s * (1 + self.jitter * (2 * random.random() - 1))
