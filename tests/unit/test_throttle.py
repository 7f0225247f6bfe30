"""What a throttled engine does: fewer run slots, smaller batches, an int8 variant preferred.

The run pool and batchers are real (a numpy stand-in model); the cache loads real ONNX files.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from services.engine.batcher import BatchingConfig, DynamicBatcher
from services.engine.model_cache import ModelCache
from services.engine.model_repository import ModelRepository
from services.engine.run_pool import RunPool
from services.engine.throttle import VARIANT_PROPERTY, Throttle, is_int8
from services.inference import FallbackReason
from tests.support.onnx_models import linear_model


def test_each_shrink_step_halves_caps_down_to_the_floors_and_never_above_the_configured() -> None:
    assert (Throttle().rows(64), Throttle().slots(2)) == (64, 2)
    hot = Throttle(shrink_steps=2)
    assert (hot.rows(64), hot.rows(3), hot.slots(8)) == (16, 1, 2)
    floored = Throttle(shrink_steps=12, batch_floor=4, slot_floor=2)
    assert (floored.rows(64), floored.rows(2), floored.slots(8), floored.slots(1)) == (4, 2, 2, 1)
    assert not Throttle().active and Throttle(forward=FallbackReason.THERMAL).active
    assert is_int8("int8") and is_int8("int8-per-channel") and not is_int8("fp32") and not is_int8("int80")


async def test_a_lower_limit_lets_runs_in_progress_finish_and_holds_the_next_back() -> None:
    pool = RunPool(2)
    try:
        await pool.acquire()
        await pool.acquire()
        pool.set_limit(1)
        third = asyncio.create_task(pool.acquire())
        pool.release()  # 1 busy, limit 1: the third still waits
        await asyncio.sleep(0)
        assert not third.done() and pool.busy == 1
        pool.release()
        await asyncio.wait_for(third, 1)
        assert pool.busy == 1 and pool.limit == 1
        pool.set_limit(99)  # never above the configured slots
        assert pool.limit == 2
        await asyncio.wait_for(pool.acquire(), 1)
        assert pool.busy == 2
    finally:
        pool.close()


async def test_a_waiter_that_leaves_keeps_no_slot_and_loses_none() -> None:
    pool = RunPool(1)
    try:
        await pool.acquire()
        leaving = asyncio.create_task(pool.acquire())
        staying = asyncio.create_task(pool.acquire())
        await asyncio.sleep(0)
        leaving.cancel()  # leaves while it waits
        pool.release()
        await asyncio.wait_for(staying, 1)
        assert leaving.cancelled() and pool.busy == 1
        granted = asyncio.create_task(pool.acquire())
        after = asyncio.create_task(pool.acquire())
        await asyncio.sleep(0)
        pool.release()  # the slot goes to `granted` …
        granted.cancel()  # … whose caller leaves before it resumes: the slot passes on
        await asyncio.wait_for(after, 1)
        assert granted.cancelled() and pool.busy == 1
    finally:
        pool.close()


class Doubler:
    """A numpy stand-in model that records its batch sizes and the thread it ran on."""

    def __init__(self) -> None:
        self.batches: list[int] = []
        self.gate = threading.Event()
        self.gate.set()

    def __call__(self, inputs: Mapping[str, np.ndarray[Any, Any]]) -> dict[str, np.ndarray[Any, Any]]:
        self.gate.wait(10)
        self.batches.append(len(inputs["x"]))
        return {"y": inputs["x"] * 2}


async def test_a_throttled_batcher_takes_smaller_batches() -> None:
    pool = RunPool(1)
    throttle = Throttle()
    model = Doubler()
    config = BatchingConfig(max_batch_size=16, inline_run_us=0)  # threads: the gate must not block the loop
    batcher = DynamicBatcher("m v1", config, pool, model, batchable=True, throttle=throttle)
    batcher.start()
    try:
        x = {"x": np.ones((1, 2), np.float32)}
        far = asyncio.get_running_loop().time() + 30

        async def burst() -> None:
            model.gate.clear()
            first = asyncio.create_task(batcher.submit(x, (), far))  # holds the only slot
            for _ in range(1000):
                if pool.busy:
                    break
                await asyncio.sleep(0.001)
            rest = [asyncio.create_task(batcher.submit(x, (), far)) for _ in range(16)]
            await asyncio.sleep(0.02)
            model.gate.set()
            await asyncio.gather(first, *rest)

        await burst()
        assert batcher.max_rows == 16 and model.batches[1:] == [16]
        throttle.shrink_steps = 2
        model.batches.clear()
        await burst()
        assert batcher.max_rows == 4 and model.batches[1:] == [4, 4, 4, 4]
    finally:
        await batcher.close()
        pool.close()


@pytest.fixture
async def cache(tmp_path: Path) -> AsyncIterator[ModelCache]:
    repo = ModelRepository(tmp_path / "repo")
    repo.add("m", linear_model(tmp_path / "a.onnx", seed=0), properties={VARIANT_PROPERTY: "int8"})
    repo.add("m", linear_model(tmp_path / "b.onnx", seed=1), properties={VARIANT_PROPERTY: "fp32"})
    pool = RunPool(2)
    built = ModelCache(repo, pool, BatchingConfig(), 1 << 40)
    yield built
    await built.close()
    pool.close()


async def test_a_throttled_cache_prefers_a_loaded_int8_variant_and_limits_the_pool(cache: ModelCache) -> None:
    await cache.get("m", "2")
    await cache.get("m", "1")  # both loaded, as during a swap or when a version is asked for by number
    assert (await cache.get("m")).version == "2"  # fp32, the newest
    cache.throttle_to(Throttle(shrink_steps=1, prefer_int8=True))
    assert (await cache.get("m")).version == "1"  # the int8 one it has loaded
    assert (await cache.get("m", "2")).version == "2"  # a version asked for is that version
    assert cache.pool.limit == 1
    cache.throttle_to(Throttle())
    assert (await cache.get("m")).version == "2" and cache.pool.limit == 2
