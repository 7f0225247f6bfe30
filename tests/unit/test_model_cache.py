"""The model cache: single-flight loads, warm-up and load hooks before visibility, memory admission, hot swap."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import numpy as np
import pytest

from services.engine.batcher import BatchingConfig
from services.engine.memory import FIXED_OVERHEAD_BYTES
from services.engine.model_cache import ModelCache, ModelState
from services.engine.model_loader import FileOpener, Footprint
from services.engine.model_repository import ModelEntry, ModelRepository
from services.engine.onnx_session import OnnxSession
from services.engine.run_pool import RunPool
from services.errors import (
    DeadlineExceededError,
    EdgecascadeError,
    IntegrityError,
    MemoryBudgetError,
    ModelNotFoundError,
    ModelNotReadyError,
)
from tests.support.onnx_models import linear_model

MB = 1024 * 1024
X = {"x": np.ones((1, 4), np.float32)}


class FakeRss:
    """Process memory as the cache sees it: a boundary we do not own, scripted per load."""

    def __init__(self) -> None:
        self.value = 100 * MB
        self.gain_per_load = 0
        self.calls = 0

    def __call__(self) -> int:
        self.calls += 1
        if self.calls % 2 == 0:  # read before and after each load: the second read sees the gain
            self.value += self.gain_per_load
        return self.value


@pytest.fixture
async def make(tmp_path: Path) -> AsyncIterator[Callable[..., ModelCache]]:
    pools: list[RunPool] = []
    caches: list[ModelCache] = []

    def build(
        budget: int = 1 << 40, names: tuple[str, ...] = ("m",), rss: Callable[[], int] | None = None
    ) -> ModelCache:
        repo = ModelRepository(tmp_path / "repo")
        for i, name in enumerate(names):
            if not repo.versions(name):
                repo.add(name, linear_model(tmp_path / f"{name}.onnx", seed=i))
        pool = RunPool(2)
        pools.append(pool)
        cache = ModelCache(repo, pool, BatchingConfig(), budget, rss=rss or FakeRss())
        caches.append(cache)
        return cache

    yield build
    for cache in caches:
        await cache.close()
    for pool in pools:
        pool.close()


async def test_concurrent_requests_share_one_load(make: Callable[..., ModelCache]) -> None:
    cache = make()
    models = await asyncio.gather(*(cache.get("m") for _ in range(8)))
    assert all(m is models[0] for m in models)
    assert cache.ready("m") and cache.ready("m", "1")
    assert [r.state for r in cache.index()] == [ModelState.READY]
    assert cache.stats.loads == 1
    assert cache.stats.misses + cache.stats.hits == 8


async def test_a_failed_load_is_remembered_until_an_explicit_load(
    make: Callable[..., ModelCache], tmp_path: Path
) -> None:
    cache = make()
    model_file = tmp_path / "repo" / "m" / "1" / "model.onnx"
    good = model_file.read_bytes()
    model_file.write_bytes(b"corrupt")
    with pytest.raises(ModelNotReadyError, match="cannot be loaded"):
        await cache.get("m")
    model_file.write_bytes(good)
    with pytest.raises(ModelNotReadyError):
        await cache.get("m")  # not retried on every request
    assert cache.index()[0].state == ModelState.UNAVAILABLE
    assert (await cache.load("m")).version == "1"
    assert cache.index()[0].state == ModelState.READY


async def test_hot_swap_new_requests_go_to_the_new_version_old_holders_finish(
    make: Callable[..., ModelCache], tmp_path: Path
) -> None:
    cache = make()
    old = await cache.get("m")
    cache.repository.add("m", linear_model(tmp_path / "m2.onnx", seed=5))
    new = await cache.load("m")
    assert (old.version, new.version) == ("1", "2")
    assert (await cache.get("m")) is new
    assert old.retired and not cache.ready("m", "1")
    cache.unload("m")
    assert not cache.ready("m")
    with pytest.raises(ModelNotFoundError):
        cache.unload("absent")


async def test_a_request_past_its_deadline_is_never_run(make: Callable[..., ModelCache]) -> None:
    cache = make()
    model = await cache.get("m")
    loop = asyncio.get_running_loop()
    with pytest.raises(DeadlineExceededError):
        await cache.run(model, X, deadline=loop.time() - 1)
    assert model.stats.execution_count == 0
    assert model.stats.shed["expired"] == 1


async def test_measured_footprint_replaces_the_estimate(make: Callable[..., ModelCache]) -> None:
    rss = FakeRss()
    rss.gain_per_load = 30 * MB
    cache = make(rss=rss)
    model = await cache.get("m")
    assert model.measured
    assert 30 * MB <= model.footprint_bytes < 31 * MB
    assert cache.used_bytes == model.footprint_bytes


async def test_least_recently_used_idle_model_is_evicted_to_make_room(make: Callable[..., ModelCache]) -> None:
    rss = FakeRss()
    rss.gain_per_load = 20 * MB
    cache = make(budget=45 * MB, names=("a", "b", "c"), rss=rss)
    a = await cache.get("a")
    await cache.get("b")
    await cache.get("a")  # b is now the least recently used
    await cache.get("c")
    assert cache.ready("a") and cache.ready("c") and not cache.ready("b")
    assert cache.stats.evictions == 1
    assert cache.used_bytes <= cache.budget
    rows = {r.name: r for r in cache.index()}
    assert rows["b"].state == ModelState.UNAVAILABLE and rows["b"].reason == "evicted to make room"
    assert a is (await cache.get("a"))


async def test_busy_models_are_never_evicted_and_the_load_is_refused(make: Callable[..., ModelCache]) -> None:
    rss = FakeRss()
    rss.gain_per_load = 20 * MB
    cache = make(budget=45 * MB, names=("a", "b", "c"), rss=rss)
    a = await cache.get("a")
    b = await cache.get("b")
    async with cache.use(a), cache.use(b):
        with pytest.raises(MemoryBudgetError, match="every loaded model is in use"):
            await cache.get("c")
    assert cache.stats.refusals == 1 and cache.stats.evictions == 0
    assert (await cache.get("c")).name == "c"  # once idle, eviction makes room


async def test_a_model_larger_than_the_budget_is_refused_clearly(make: Callable[..., ModelCache]) -> None:
    cache = make(budget=FIXED_OVERHEAD_BYTES)  # the fixed overhead alone fills it
    with pytest.raises(MemoryBudgetError, match=r"more than this node's memory budget of 10\.0 MB"):
        await cache.get("m")
    assert cache.stats.refusals == 1
    assert cache.used_bytes == 0


async def test_batching_can_be_overridden_per_model_from_its_metadata(
    make: Callable[..., ModelCache], tmp_path: Path
) -> None:
    cache = make()
    tuned = {"edgecascade.batching.max_batch_size": "4"}
    cache.repository.add("tuned", linear_model(tmp_path / "t.onnx"), properties=tuned)
    broken = {"edgecascade.batching.max_batch_size": "0"}
    cache.repository.add("broken", linear_model(tmp_path / "b.onnx"), properties=broken)
    assert (await cache.get("tuned")).batcher.config.max_batch_size == 4
    assert (await cache.get("m")).batcher.config.max_batch_size == BatchingConfig().max_batch_size
    with pytest.raises(ModelNotReadyError, match=r"model 'broken' version 1 metadata: \[batching\] max_batch_size"):
        await cache.get("broken")


async def test_a_caller_giving_up_does_not_cancel_the_shared_load(make: Callable[..., ModelCache]) -> None:
    cache = make()
    impatient = asyncio.create_task(cache.get("m"))
    patient = asyncio.create_task(cache.get("m"))
    await asyncio.sleep(0)
    impatient.cancel()
    model = await asyncio.wait_for(patient, 10)
    assert model.name == "m" and cache.stats.loads == 1
    assert cache.used_bytes == model.footprint_bytes  # nothing left reserved


async def test_a_stream_pinning_the_old_version_survives_a_hot_swap(
    make: Callable[..., ModelCache], tmp_path: Path
) -> None:
    cache = make()
    old = await cache.get("m")
    async with cache.use(old):
        cache.repository.add("m", linear_model(tmp_path / "m2.onnx", seed=7))
        new = await cache.load("m")
        assert (await cache.get("m")) is new
        assert (await cache.run(old, X))["y"].shape == (1, 3)  # the pinned stream's next step still runs on v1
        assert cache.used_bytes == old.footprint_bytes + new.footprint_bytes  # v1 still counted while it drains
    await asyncio.sleep(0.05)
    assert cache.used_bytes == new.footprint_bytes


class Refuse:
    """Load hooks that refuse at one point (as golden vectors or a signed memory figure would)."""

    def __init__(self, at: str, error: EdgecascadeError) -> None:
        self.at = at
        self.error = error
        self.calls: list[str] = []

    def opened(self, entry: ModelEntry, session: OnnxSession) -> None:
        where = "the loop" if threading.current_thread() is threading.main_thread() else "a worker thread"
        self.calls.append(f"opened {entry.name} v{entry.version} in {where}")
        if self.at == "opened":
            session.run({"x": np.ones((1, 4), np.float32)})  # a hook may run the session (golden vectors)
            raise self.error

    def measured(self, entry: ModelEntry, footprint: Footprint) -> None:
        self.calls.append(f"measured {footprint.total > 0}")
        if self.at == "measured":
            raise self.error


@pytest.mark.parametrize("at", ["opened", "measured"])
async def test_a_load_hook_that_refuses_fails_the_load_and_leaks_nothing(tmp_path: Path, at: str) -> None:
    repo = ModelRepository(tmp_path / "repo")
    repo.add("m", linear_model(tmp_path / "m.onnx"))
    hooks = Refuse(at, ModelNotReadyError("golden vectors do not match"))
    pool = RunPool(2)
    cache = ModelCache(repo, pool, BatchingConfig(), 1 << 40, rss=FakeRss(), hooks=hooks)
    try:
        with pytest.raises(ModelNotReadyError, match="golden vectors do not match"):
            await cache.get("m")
        assert hooks.calls[0] == "opened m v1 in a worker thread"  # off the loop, after warm-up
        assert cache.used_bytes == 0 and pool.busy == 0 and cache.loaded() == []
        assert cache.index()[0].state == ModelState.UNAVAILABLE
        assert cache.index()[0].reason == "golden vectors do not match"
        with pytest.raises(ModelNotReadyError):
            await cache.get("m")  # recorded as failed: not retried on every request
        hooks.at = ""
        assert (await cache.load("m")).version == "1"  # an explicit load retries
        assert cache.stats.loads == 1
    finally:
        await cache.close()
        pool.close()


async def test_another_refusal_from_a_hook_becomes_model_not_ready(tmp_path: Path) -> None:
    repo = ModelRepository(tmp_path / "repo")
    repo.add("m", linear_model(tmp_path / "m.onnx"))
    pool = RunPool(1)
    hooks = Refuse("measured", IntegrityError("measured 40 MB, signed 20 MB"))
    cache = ModelCache(repo, pool, BatchingConfig(), 1 << 40, rss=FakeRss(), hooks=hooks)
    try:
        with pytest.raises(ModelNotReadyError, match=r"model 'm' version 1 was refused: measured 40 MB") as caught:
            await cache.get("m")
        assert isinstance(caught.value.__cause__, IntegrityError)
        assert cache.used_bytes == 0
    finally:
        await cache.close()
        pool.close()


async def test_the_source_of_a_model_is_pluggable(tmp_path: Path) -> None:
    repo = ModelRepository(tmp_path / "repo")
    repo.add("m", linear_model(tmp_path / "m.onnx"))
    opened: list[str] = []

    class Recording(FileOpener):
        def open(self, entry: ModelEntry, intra_op_threads: int) -> OnnxSession:
            opened.append(f"{entry.name} v{entry.version} threads={intra_op_threads}")
            return super().open(entry, intra_op_threads)

    pool = RunPool(1)
    cache = ModelCache(repo, pool, BatchingConfig(), 1 << 40, intra_op_threads=1, opener=Recording())
    try:
        model = await cache.get("m")
        assert opened == ["m v1 threads=1"]
        assert (await cache.run(model, X))["y"].shape == (1, 3)
    finally:
        await cache.close()
        pool.close()


class SlowToOpen:
    """Load hooks whose golden-vector check of model "slow" takes as long as the test holds it."""

    def __init__(self) -> None:
        self.release = threading.Event()

    def opened(self, entry: ModelEntry, session: OnnxSession) -> None:
        if entry.name == "slow":
            self.release.wait(10)

    def measured(self, entry: ModelEntry, footprint: Footprint) -> None:
        pass


async def test_a_load_does_not_hold_a_run_slot_while_models_serve(tmp_path: Path) -> None:
    repo = ModelRepository(tmp_path / "repo")
    repo.add("fast", linear_model(tmp_path / "fast.onnx", seed=1))
    repo.add("slow", linear_model(tmp_path / "slow.onnx", seed=2))
    pool = RunPool(1)  # one slot, as on a 2-core device by default
    hooks = SlowToOpen()
    cache = ModelCache(repo, pool, BatchingConfig(inline_run_us=0), 1 << 40, rss=FakeRss(), hooks=hooks)
    try:
        fast = await cache.get("fast")
        loading = asyncio.create_task(cache.get("slow"))
        await asyncio.sleep(0.05)
        assert not loading.done()
        deadline = asyncio.get_running_loop().time() + 2
        answer = await asyncio.wait_for(cache.run(fast, X, deadline=deadline), 2)  # served while the load runs
        assert answer["y"].shape == (1, 3) and not loading.done()
        hooks.release.set()
        assert (await loading).name == "slow"
    finally:
        hooks.release.set()
        await cache.close()
        pool.close()
