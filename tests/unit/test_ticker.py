"""The ticker: periodic work that survives a failed run and stops once."""

from __future__ import annotations

import asyncio

import pytest

from services.ticker import Ticker


async def test_runs_at_once_then_periodically_and_survives_failures() -> None:
    seen: list[int] = []
    enough = asyncio.Event()

    async def work() -> None:
        seen.append(len(seen))
        if len(seen) == 2:
            raise OSError("disk full")  # a failed run must not end the loop
        if len(seen) == 4:
            enough.set()

    ticker = Ticker("test work", 0.001, work)
    ticker.start()
    await asyncio.wait_for(enough.wait(), 5)
    await ticker.stop()
    assert seen[:4] == [0, 1, 2, 3]
    assert ticker.failures == 1
    after = len(seen)
    await asyncio.sleep(0.01)
    assert len(seen) == after  # stopped: no more runs


async def test_stop_is_run_once_and_cancels_a_run_in_progress() -> None:
    started = asyncio.Event()
    cancelled = asyncio.Event()

    async def slow() -> None:
        started.set()
        try:
            await asyncio.sleep(3600)
        except asyncio.CancelledError:
            cancelled.set()
            raise

    ticker = Ticker("slow work", 60, slow)
    ticker.start()
    await asyncio.wait_for(started.wait(), 5)
    await asyncio.gather(ticker.stop(), ticker.stop())
    assert cancelled.is_set()
    ticker.start()  # a stopped ticker stays stopped
    await ticker.stop()


def test_the_interval_must_be_positive() -> None:
    async def work() -> None:
        return None

    with pytest.raises(ValueError, match="must be positive"):
        Ticker("bad", 0, work)


def test_jitter_spreads_the_waits_within_its_bounds() -> None:
    async def work() -> None:
        return None

    ticker = Ticker("check-in", 10.0, work, jitter=0.2)
    waits = [ticker.next_wait() for _ in range(500)]
    assert all(8.0 <= w <= 12.0 for w in waits)
    assert max(waits) - min(waits) > 2.0  # spread, not constant
    assert Ticker("steady", 10.0, work).next_wait() == 10.0
    with pytest.raises(ValueError, match="jitter"):
        Ticker("bad", 10.0, work, jitter=1.0)
