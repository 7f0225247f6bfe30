"""SingleFlight: one task per key, joined by later callers, owned by none of them."""

from __future__ import annotations

import asyncio
import gc

import pytest

from services.single_flight import SingleFlight


class Work:
    def __init__(self) -> None:
        self.started = 0
        self.release = asyncio.Event()
        self.error: Exception | None = None

    async def __call__(self) -> str:
        self.started += 1
        await self.release.wait()
        if self.error is not None:
            raise self.error
        return f"result {self.started}"


async def test_callers_for_the_same_key_join_one_run() -> None:
    flight: SingleFlight[str, str] = SingleFlight()
    work = Work()
    callers = [asyncio.create_task(flight.run("k", work)) for _ in range(5)]
    await asyncio.sleep(0)
    assert flight.in_flight("k") and flight.keys() == ["k"] and not flight.in_flight("other")
    work.release.set()
    assert await asyncio.gather(*callers) == ["result 1"] * 5
    assert work.started == 1


async def test_different_keys_run_apart() -> None:
    flight: SingleFlight[int, str] = SingleFlight()
    work = Work()
    work.release.set()
    assert list(await asyncio.gather(flight.run(1, work), flight.run(2, work))) == ["result 1", "result 2"]


async def test_a_cancelled_caller_cancels_neither_the_work_nor_the_others() -> None:
    flight: SingleFlight[str, str] = SingleFlight()
    work = Work()
    impatient = asyncio.create_task(flight.run("k", work))
    patient = asyncio.create_task(flight.run("k", work))
    await asyncio.sleep(0)
    impatient.cancel()
    with pytest.raises(asyncio.CancelledError):
        await impatient
    assert flight.in_flight("k")
    work.release.set()
    assert await patient == "result 1"


async def test_work_whose_callers_all_left_runs_to_its_end() -> None:
    unhandled: list[dict[str, object]] = []
    asyncio.get_running_loop().set_exception_handler(lambda loop, context: unhandled.append(context))
    flight: SingleFlight[str, str] = SingleFlight()
    work = Work()
    caller = asyncio.create_task(flight.run("k", work))
    await asyncio.sleep(0)
    caller.cancel()
    await asyncio.sleep(0)
    work.error = RuntimeError("nobody is listening")
    work.release.set()
    for _ in range(3):
        await asyncio.sleep(0)
    assert not flight.in_flight("k") and work.started == 1
    del caller
    gc.collect()  # a task whose exception was never retrieved reports it when collected
    assert unhandled == []


async def test_an_exception_reaches_every_caller_and_frees_the_key() -> None:
    flight: SingleFlight[str, str] = SingleFlight()
    work = Work()
    work.error = ValueError("broken")
    callers = [asyncio.create_task(flight.run("k", work)) for _ in range(3)]
    await asyncio.sleep(0)
    work.release.set()
    results: list[BaseException | str] = await asyncio.gather(*callers, return_exceptions=True)
    assert all(isinstance(r, ValueError) and str(r) == "broken" for r in results)
    assert not flight.in_flight("k") and flight.keys() == []
    work.error = None
    assert await flight.run("k", work) == "result 2"  # the next caller starts afresh


async def test_the_key_is_freed_after_success_and_results_are_not_cached() -> None:
    flight: SingleFlight[str, str] = SingleFlight()
    work = Work()
    work.release.set()
    assert await flight.run("k", work, name="load k") == "result 1"
    assert not flight.in_flight("k")
    assert await flight.run("k", work) == "result 2"


async def test_cancel_all_ends_the_work_and_its_callers() -> None:
    flight: SingleFlight[str, str] = SingleFlight()
    work = Work()  # never released: only cancellation ends it
    caller = asyncio.create_task(flight.run("k", work))
    await asyncio.sleep(0)
    assert flight.in_flight("k")
    await flight.cancel_all()
    assert flight.keys() == []
    with pytest.raises(asyncio.CancelledError):
        await caller
