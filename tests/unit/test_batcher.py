"""The dynamic batcher, driven with a numpy stand-in for the model (the model is not what is under test)."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import AsyncIterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from services.engine.batcher import BatchingConfig, DynamicBatcher
from services.engine.model_stats import ModelStats
from services.engine.onnx_session import OnnxSession
from services.engine.run_pool import RunPool
from services.errors import (
    ConfigError,
    DeadlineExceededError,
    InternalError,
    InvalidArgumentError,
    QueueFullError,
)
from tests.support.onnx_models import linear_model


class Model:
    """Doubles its input; records every execution; can be held busy."""

    def __init__(self) -> None:
        self.executions: list[np.ndarray[Any, Any]] = []
        self.gate = threading.Event()
        self.gate.set()
        self.delay = 0.0

    def __call__(self, inputs: Mapping[str, np.ndarray[Any, Any]]) -> dict[str, np.ndarray[Any, Any]]:
        self.gate.wait(10)
        time.sleep(self.delay)
        x = inputs["x"]
        if (x < 0).any():
            raise InvalidArgumentError("negative values are not allowed")
        self.executions.append(x.copy())
        return {"y": x * 2, "z": x + 1}

    def seen(self) -> set[float]:
        return {float(v) for e in self.executions for v in e[:, 0]}


@pytest.fixture
async def pool() -> AsyncIterator[RunPool]:
    pool = RunPool(1)
    yield pool
    pool.close()


def make(pool: RunPool, model: Model, **config: Any) -> DynamicBatcher:
    batcher = DynamicBatcher("m v1", BatchingConfig(**config), pool, model, batchable=True, stats=ModelStats())
    batcher.start()
    return batcher


def x(value: float, width: int = 2, rows: int = 1) -> dict[str, np.ndarray[Any, Any]]:
    return {"x": np.full((rows, width), value, dtype=np.float32)}


def far() -> float:
    return asyncio.get_running_loop().time() + 30


async def hold_slot(batcher: DynamicBatcher, model: Model) -> asyncio.Task[Any]:
    """Starts a request and keeps the only slot busy until ``model.gate`` is set."""
    model.gate.clear()
    task = asyncio.create_task(batcher.submit(x(-0.5 + 1000), (), far()))
    for _ in range(1000):
        if not batcher.queue_depth:
            break
        await asyncio.sleep(0.001)
    await asyncio.sleep(0.02)
    return task


async def test_requests_queued_behind_a_busy_slot_run_as_one_batch(pool: RunPool) -> None:
    model = Model()
    batcher = make(pool, model, max_batch_size=16)
    first = await hold_slot(batcher, model)
    waiting = [asyncio.create_task(batcher.submit(x(i), (), far())) for i in range(10)]
    await asyncio.sleep(0.02)
    model.gate.set()
    results = await asyncio.gather(first, *waiting)
    assert [float(r["y"][0, 0]) for r in results[1:]] == [2.0 * i for i in range(10)]
    assert [len(e) for e in model.executions] == [1, 10]
    assert batcher.stats.inference_count == 11 and batcher.stats.execution_count == 2
    assert set(batcher.stats.batches) == {1, 10}
    await batcher.close()


async def test_requested_outputs_are_filtered_per_request(pool: RunPool) -> None:
    batcher = make(pool, Model())
    assert set(await batcher.submit(x(1), ("z",), far())) == {"z"}
    assert set(await batcher.submit(x(1), (), far())) == {"y", "z"}
    await batcher.close()


async def test_expired_and_cancelled_requests_are_never_executed(pool: RunPool) -> None:
    model = Model()
    batcher = make(pool, model)
    first = await hold_slot(batcher, model)
    loop = asyncio.get_running_loop()
    expiring = asyncio.create_task(batcher.submit(x(7), (), loop.time() + 0.01))
    cancelled = asyncio.create_task(batcher.submit(x(8), (), far()))
    survivor = asyncio.create_task(batcher.submit(x(9), (), far()))
    await asyncio.sleep(0.05)
    cancelled.cancel()
    await asyncio.sleep(0.01)
    model.gate.set()
    await first
    with pytest.raises(DeadlineExceededError, match="passed while it was queued"):
        await expiring
    with pytest.raises(asyncio.CancelledError):
        await cancelled
    assert float((await survivor)["y"][0, 0]) == 18.0
    assert 7.0 not in model.seen() and 8.0 not in model.seen()
    assert batcher.stats.shed["expired"] == 1 and batcher.stats.shed["cancelled"] == 1
    await batcher.close()


async def test_priority_order_is_respected_under_contention(pool: RunPool) -> None:
    model = Model()
    batcher = make(pool, model, max_batch_size=1, priority_levels=3)
    first = await hold_slot(batcher, model)
    order = [(0, 1.0), (3, 2.0), (2, 3.0), (1, 4.0), (1, 5.0)]  # (priority, value)
    tasks = [asyncio.create_task(batcher.submit(x(v), (), far(), priority=p)) for p, v in order]
    await asyncio.sleep(0.02)
    model.gate.set()
    await asyncio.gather(first, *tasks)
    ran = [float(e[0, 0]) for e in model.executions[1:]]
    assert ran == [4.0, 5.0, 3.0, 1.0, 2.0]  # level 1, then 2, then 3 (= default 0) in arrival order
    with pytest.raises(InvalidArgumentError, match="priority"):
        await batcher.submit(x(1), (), far(), priority=4)
    await batcher.close()


async def test_a_full_queue_refuses_at_once_and_counts(pool: RunPool) -> None:
    model = Model()
    batcher = make(pool, model, max_queue_size=3)
    first = await hold_slot(batcher, model)
    queued = [asyncio.create_task(batcher.submit(x(i), (), far())) for i in range(3)]
    await asyncio.sleep(0.01)
    with pytest.raises(QueueFullError, match="queue of model m v1 is full"):
        await batcher.submit(x(99), (), far())
    assert batcher.stats.shed["queue_full"] == 1
    model.gate.set()
    await asyncio.gather(first, *queued)
    assert 99.0 not in model.seen()
    await batcher.close()


async def test_mixed_shapes_never_share_a_batch(pool: RunPool) -> None:
    model = Model()
    batcher = make(pool, model)
    first = await hold_slot(batcher, model)
    tasks = [asyncio.create_task(batcher.submit(x(i, width=2 + i % 2), (), far())) for i in range(8)]
    await asyncio.sleep(0.02)
    model.gate.set()
    await asyncio.gather(first, *tasks)
    assert sorted(e.shape for e in model.executions[1:]) == [(4, 2), (4, 3)]


async def test_one_bad_request_does_not_fail_its_batch(pool: RunPool) -> None:
    model = Model()
    batcher = make(pool, model)
    first = await hold_slot(batcher, model)
    good = [asyncio.create_task(batcher.submit(x(i), (), far())) for i in (1, 2)]
    bad = asyncio.create_task(batcher.submit(x(-1), (), far()))
    await asyncio.sleep(0.02)
    model.gate.set()
    await asyncio.gather(first, *good)
    with pytest.raises(InvalidArgumentError, match="negative"):
        await bad
    assert batcher.stats.fail.count == 1
    await batcher.close()


async def test_batching_off_runs_every_request_alone(pool: RunPool) -> None:
    model = Model()
    batcher = make(pool, model, max_batch_size=1)
    first = await hold_slot(batcher, model)
    tasks = [asyncio.create_task(batcher.submit(x(i, rows=2), (), far())) for i in range(4)]
    await asyncio.sleep(0.02)
    model.gate.set()
    await asyncio.gather(first, *tasks)
    assert [len(e) for e in model.executions] == [1, 2, 2, 2, 2]


async def test_a_lone_request_does_not_wait_for_company(pool: RunPool) -> None:
    batcher = make(pool, Model(), max_queue_delay_us=1_000_000)
    started = time.monotonic()
    await asyncio.wait_for(batcher.submit(x(1), (), far()), 5)
    assert time.monotonic() - started < 0.5  # far below the 1 s delay it was allowed to wait
    await batcher.close()


async def test_close_drains_what_is_queued(pool: RunPool) -> None:
    model = Model()
    batcher = make(pool, model)
    first = await hold_slot(batcher, model)
    queued = [asyncio.create_task(batcher.submit(x(i), (), far())) for i in range(3)]
    await asyncio.sleep(0.01)
    closing = asyncio.create_task(batcher.close())
    await asyncio.sleep(0.01)
    model.gate.set()
    await closing
    assert len(await asyncio.gather(first, *queued)) == 4


@pytest.mark.parametrize(
    ("setting", "value"),
    [
        ("max_batch_size", 0),
        ("max_queue_delay_us", -1),
        ("max_queue_size", 0),
        ("priority_levels", 99),
        ("default_timeout_us", 5),
    ],
)
def test_nonsense_batching_values_are_refused(setting: str, value: int) -> None:
    with pytest.raises(ConfigError, match=rf"\[batching\] {setting} must be an integer"):
        BatchingConfig(**{setting: value})


def test_per_model_overrides() -> None:
    base = BatchingConfig()
    assert base.with_overrides({"max_batch_size": 4}, "model m").max_batch_size == 4
    with pytest.raises(ConfigError, match="model m: unknown batching setting"):
        base.with_overrides({"max_batchsize": 4}, "model m")
    with pytest.raises(ConfigError, match="model m: \\[batching\\] max_queue_size"):
        base.with_overrides({"max_queue_size": -3}, "model m")


async def test_a_deadline_the_queue_cannot_meet_is_refused_at_once(pool: RunPool) -> None:
    model = Model()
    model.delay = 0.03
    batcher = make(pool, model, max_batch_size=1, priority_levels=2)
    for i in range(3):  # teach the batcher how long a run takes
        await batcher.submit(x(i), (), far())
    first = await hold_slot(batcher, model)
    queued = [asyncio.create_task(batcher.submit(x(10 + i), (), far())) for i in range(5)]
    await asyncio.sleep(0.01)
    loop = asyncio.get_running_loop()
    with pytest.raises(
        QueueFullError, match=r"cannot answer within the deadline: about 1[0-9]{2} ms of work is queued"
    ):
        await batcher.submit(x(99), (), loop.time() + 0.05)
    assert batcher.stats.shed["overloaded"] == 1
    urgent = asyncio.create_task(batcher.submit(x(50), (), loop.time() + 0.2, priority=1))  # nothing queued ahead of it
    await asyncio.sleep(0.01)
    model.gate.set()
    await asyncio.gather(first, *queued, urgent)
    assert 99.0 not in model.seen() and 50.0 in model.seen()
    await batcher.close()


async def test_close_while_the_dispatcher_waits_for_company_answers_everyone() -> None:
    pool = RunPool(2)
    model = Model()
    batcher = make(pool, model, max_batch_size=32, max_queue_delay_us=1_000_000)
    first = await hold_slot(batcher, model)  # one slot busy, so the dispatcher may wait for company
    model.gate.set()
    model.gate.clear()
    waiting = [asyncio.create_task(batcher.submit(x(i), (), far())) for i in range(5)]
    await asyncio.sleep(0.05)
    assert batcher.in_flight >= 5  # the batch being formed is accounted for (no eviction can take it)
    closing = asyncio.create_task(batcher.close())
    await asyncio.sleep(0.05)
    model.gate.set()
    await asyncio.wait_for(closing, 5)
    results = await asyncio.wait_for(asyncio.gather(first, *waiting), 5)
    assert len(results) == 6
    pool.close()


async def test_inputs_with_different_batch_sizes_are_refused(pool: RunPool) -> None:
    batcher = make(pool, Model())
    inputs = {"x": np.ones((1, 2), np.float32), "w": np.ones((2, 2), np.float32)}
    with pytest.raises(InvalidArgumentError, match="every input must have the same batch size"):
        await batcher.submit(inputs, (), far())
    await batcher.close()


async def test_a_caller_that_gives_up_on_the_fast_path_keeps_the_slot_until_the_run_ends(pool: RunPool) -> None:
    model = Model()
    batcher = make(pool, model)
    model.gate.clear()
    caller = asyncio.create_task(batcher.submit(x(1), (), far()))
    await asyncio.sleep(0.02)
    caller.cancel()
    await asyncio.sleep(0.02)
    assert pool.busy == 1 and batcher.in_flight == 1  # onnxruntime is still running it
    model.gate.set()
    await asyncio.sleep(0.05)
    assert pool.busy == 0 and batcher.in_flight == 0
    await batcher.close()


class Events:
    """Records every batcher event (a full BatchEvents observer)."""

    def __init__(self) -> None:
        self.seen: list[str] = []

    def queued(self, seconds: float) -> None:
        self.seen.append("queued")

    def ran(self, rows: int, seconds: float) -> None:
        self.seen.append(f"ran {rows}")

    def answered(self, seconds: float) -> None:
        self.seen.append("answered")

    def failed(self, seconds: float) -> None:
        self.seen.append("failed")

    def shed(self, reason: str) -> None:
        self.seen.append(f"shed {reason}")


class Timings:
    """Implements only the timings (as the metrics adapter does)."""

    def __init__(self) -> None:
        self.seen: list[str] = []

    def queued(self, seconds: float) -> None:
        self.seen.append("queued")

    def ran(self, rows: int, seconds: float) -> None:
        self.seen.append(f"ran {rows}")


async def test_every_observer_hears_every_event_and_the_statistics_are_one_of_them(pool: RunPool) -> None:
    model = Model()
    events, timings = Events(), Timings()
    stats = ModelStats()
    config = BatchingConfig(max_queue_size=2)
    batcher = DynamicBatcher("m v1", config, pool, model, batchable=True, stats=stats, observers=[events, timings])
    batcher.start()
    first = await hold_slot(batcher, model)
    loop = asyncio.get_running_loop()
    expiring = asyncio.create_task(batcher.submit(x(7), (), loop.time() + 0.01))
    waiting = asyncio.create_task(batcher.submit(x(1, rows=2), (), far()))
    await asyncio.sleep(0.02)
    with pytest.raises(QueueFullError):
        await batcher.submit(x(9), (), far())
    model.gate.set()
    await asyncio.gather(first, waiting)
    with pytest.raises(DeadlineExceededError):
        await expiring
    assert events.seen == [
        "shed queue_full",
        "ran 1",  # the request holding the slot
        "queued",
        "answered",
        "shed expired",
        "failed",
        "ran 2",
        "queued",
        "answered",
    ]
    assert timings.seen == ["ran 1", "queued", "ran 2", "queued"]
    assert batcher.stats is stats and stats.inference_count == 2 and stats.execution_count == 2
    assert stats.shed == {"queue_full": 1, "expired": 1} and stats.fail.count == 1
    await batcher.close()


async def test_an_observer_that_raises_never_leaves_a_caller_waiting(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    class Broken:
        def queued(self, seconds: float) -> None:
            raise RuntimeError("observer bug")

        def ran(self, rows: int, seconds: float) -> None:
            raise RuntimeError("observer bug")

    pool = RunPool(1)
    model = OnnxSession(linear_model(tmp_path / "m.onnx"))
    batcher = DynamicBatcher("m", BatchingConfig(), pool, model.run, True, observers=[Broken()])
    batcher.start()
    try:
        loop = asyncio.get_running_loop()
        out = await asyncio.wait_for(batcher.submit({"x": np.ones((1, 4), np.float32)}, (), loop.time() + 5), 5)
        assert out["y"].shape == (1, 3)
    finally:
        await batcher.close()
        pool.close()
    assert "an observer of model m failed" in caplog.text


class Traced(Model):
    """Also records which thread ran each execution; ``fail`` makes the next run raise a bug."""

    def __init__(self) -> None:
        super().__init__()
        self.threads: list[int] = []
        self.fail = False

    def __call__(self, inputs: Mapping[str, np.ndarray[Any, Any]]) -> dict[str, np.ndarray[Any, Any]]:
        self.threads.append(threading.get_ident())
        if self.fail:
            self.fail = False
            raise RuntimeError("a bug in the model wrapper")
        return super().__call__(inputs)


async def warm(batcher: DynamicBatcher, model: Traced, rows: int) -> None:
    """Runs lone requests of 1 and of ``rows`` rows until each size ran on the loop (a first run is slow)."""
    for size in (1, rows):
        for _ in range(50):
            await batcher.submit(x(1, rows=size), (), far())
            if model.threads[-1] == threading.get_ident():
                break
        else:
            raise AssertionError(f"a {size}-row numpy model never ran inline")
    model.threads.clear()
    model.executions.clear()


async def test_a_tiny_model_runs_on_the_loop_once_timed_and_a_loop_turn_forms_one_batch(pool: RunPool) -> None:
    model = Traced()
    batcher = make(pool, model, max_batch_size=16)
    await batcher.submit(x(1), (), far())  # never timed: a thread
    assert model.threads[0] != threading.get_ident()
    await warm(batcher, model, rows=10)
    counted = batcher.stats.execution_count
    results = await asyncio.gather(*(batcher.submit(x(i), (), far()) for i in range(10)))
    assert [float(r["y"][0, 0]) for r in results] == [2.0 * i for i in range(10)]
    assert model.threads == [threading.get_ident()]  # one run, on the loop's own thread
    assert [len(e) for e in model.executions] == [10]
    assert batcher.stats.execution_count == counted + 1
    await batcher.close()


async def test_a_model_slower_than_inline_run_us_stays_in_the_threads(pool: RunPool) -> None:
    model = Traced()
    model.delay = 0.002  # 2 ms > the default 200 µs
    batcher = make(pool, model, max_batch_size=16)
    for i in range(3):
        await batcher.submit(x(i), (), far())
    assert threading.get_ident() not in model.threads
    await batcher.close()


async def test_inline_run_us_zero_never_runs_on_the_loop(pool: RunPool) -> None:
    model = Traced()
    batcher = make(pool, model, max_batch_size=16, inline_run_us=0)
    for i in range(3):
        await asyncio.gather(*(batcher.submit(x(i), (), far()) for _ in range(4)))
    assert threading.get_ident() not in model.threads
    await batcher.close()


async def test_an_inline_batch_isolates_the_request_the_model_rejects(pool: RunPool) -> None:
    model = Traced()
    batcher = make(pool, model, max_batch_size=16)
    await warm(batcher, model, rows=3)
    results = await asyncio.gather(
        batcher.submit(x(2), (), far()),
        batcher.submit(x(-1), (), far()),
        batcher.submit(x(3), (), far()),
        return_exceptions=True,
    )
    assert float(results[0]["y"][0, 0]) == 4.0 and float(results[2]["y"][0, 0]) == 6.0  # type: ignore[index]
    assert isinstance(results[1], InvalidArgumentError)
    assert set(model.threads) == {threading.get_ident()}
    await batcher.close()


async def test_a_bug_in_an_inline_run_fails_its_batch_and_the_next_requests_are_served(pool: RunPool) -> None:
    model = Traced()
    batcher = make(pool, model, max_batch_size=16)
    await warm(batcher, model, rows=3)
    model.fail = True
    results = await asyncio.gather(*(batcher.submit(x(i), (), far()) for i in range(3)), return_exceptions=True)
    assert all(isinstance(r, InternalError) for r in results) and model.threads == [threading.get_ident()]
    assert float((await batcher.submit(x(5), (), far()))["y"][0, 0]) == 10.0
    await batcher.close()


async def test_a_request_larger_than_its_timed_runs_goes_to_a_thread(pool: RunPool) -> None:
    model = Traced()
    batcher = make(pool, model, max_batch_size=4)
    await warm(batcher, model, rows=1)
    await batcher.submit(x(1, rows=2000), (), far())  # larger than max_batch_size: runs alone, whole
    assert model.threads[-1] != threading.get_ident()
    await batcher.close()


async def test_without_batching_a_request_of_a_shape_never_timed_goes_to_a_thread(pool: RunPool) -> None:
    model = Traced()
    batcher = make(pool, model, max_batch_size=1)
    await warm(batcher, model, rows=1)
    await batcher.submit(x(1, rows=500), (), far())
    assert model.threads[-1] != threading.get_ident()
    await batcher.close()


async def test_a_long_drain_lets_answers_out_before_it_goes_on(pool: RunPool) -> None:
    answered: list[int] = []
    runs_seen: list[int] = []  # answers out when each run started

    class Counting(Traced):
        def __call__(self, inputs: Mapping[str, np.ndarray[Any, Any]]) -> dict[str, np.ndarray[Any, Any]]:
            runs_seen.append(len(answered))
            return super().__call__(inputs)

    model = Counting()
    model.delay = 0.002  # 2 ms a run, inline (within 5 ms): a drain may hold the loop for 4 × 5 ms
    batcher = make(pool, model, max_batch_size=1, inline_run_us=5_000)
    await warm(batcher, model, rows=1)
    runs_seen.clear()

    async def one(i: int) -> None:
        await batcher.submit(x(i), (), far())
        answered.append(i)

    await asyncio.gather(*(one(i) for i in range(30)))
    assert set(model.threads) == {threading.get_ident()} and len(runs_seen) == 30
    # 30 runs of at least 2 ms exceed one drain's 20 ms: answers went out before the last runs.
    assert runs_seen[0] == 0 and runs_seen[-1] > 0
    await batcher.close()
