"""A rollout's shadow stage on a node: comparing answers, sampling, shedding, and the shared memory budget.

The caches, sessions and batchers are real (tiny linear models through onnxruntime); the
recorder is a list (the fleet metrics' side is tested with the SDK in test_shadow_metrics).
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from services.dataplane import Dataplane, InferCall, NoUpstream, RequestLimits
from services.engine.batcher import BatchingConfig
from services.engine.model_cache import LoadedModel, ModelCache
from services.engine.model_loader import FileOpener
from services.engine.model_repository import ModelRepository
from services.engine.run_pool import RunPool
from services.engine.shadow import (
    DEADLINE_S,
    MAX_DIFFERENCE,
    MAX_IN_FLIGHT,
    Comparison,
    ServingNotFiniteError,
    ShadowAssignment,
    ShadowMismatchError,
    ShadowRunner,
    compare,
)
from services.errors import DeadlineExceededError, EdgecascadeError, MemoryBudgetError, ModelNotReadyError
from services.inference import SERVED_BY, InferRequest, InferResult, NodeIdentity
from services.telemetry_names import ERROR, OK, SHED
from tests.support.onnx_models import linear_model, tiny_char_lm

MB = 1024 * 1024
X = np.array([[1.0, 2.0, 3.0, 4.0], [0.5, -1.0, 2.0, 0.0], [-3.0, 1.0, 0.0, 2.0]], np.float32)


# -- comparison ------------------------------------------------------------------------------------------------


def test_identical_answers_agree_wholly_and_differ_by_nothing() -> None:
    y = np.array([[0.1, 0.7, 0.2], [0.5, 0.3, 0.2]], np.float32)
    assert compare({"y": y}, {"y": y.copy()}) == Comparison(1.0, 0.0, 2)


def test_agreement_is_the_share_of_rows_with_the_same_top1_and_difference_the_mean_absolute_one() -> None:
    serving = np.array([[0.1, 0.7, 0.2], [0.5, 0.3, 0.2], [0.2, 0.2, 0.6], [0.4, 0.4, 0.2]], np.float32)
    shadow = serving.copy()
    shadow[1] = [0.3, 0.5, 0.2]  # top-1 moves from 0 to 1
    shadow[2] = [0.2, 0.3, 0.5]  # same top-1, other values
    got = compare({"y": serving}, {"y": shadow})
    assert got.rows == 4 and got.agreement == pytest.approx(0.75)
    expected = np.abs(serving.astype(np.float64) - shadow.astype(np.float64)).mean()
    assert got.difference == pytest.approx(expected)


def test_rows_are_taken_over_the_last_axis_of_every_output_present_in_both() -> None:
    serving: dict[str, np.ndarray[Any, Any]] = {
        "a": np.zeros((2, 3, 4), np.float32),
        "b": np.eye(2, dtype=np.float32),
        "only_serving": np.ones(3),
    }
    serving["a"][..., 1] = 1.0  # every row's top-1 is 1
    shadow: dict[str, np.ndarray[Any, Any]] = {
        "a": serving["a"].copy(),
        "b": np.array([[0, 1], [0, 1]], np.float32),
        "only_shadow": np.ones(2),
    }
    shadow["a"][0, 0] = [0, 0, 0, 1]
    got = compare(serving, shadow)
    # a: 6 rows, 5 agree; b: 2 rows, 1 agrees
    assert got.rows == 8 and got.agreement == pytest.approx(6 / 8)
    assert got.difference == pytest.approx((2.0 + 2.0) / (24 + 4))


def test_integer_outputs_are_labels_compared_element_by_element() -> None:
    got = compare({"ids": np.array([[3, 1, 4], [1, 5, 9]], np.int64)}, {"ids": np.array([[3, 1, 4], [2, 5, 9]])})
    assert got.rows == 6 and got.agreement == pytest.approx(5 / 6)
    assert got.difference == pytest.approx(1 / 6)


def test_a_float_output_without_a_top1_counts_only_in_the_difference() -> None:
    got = compare({"score": np.array([[0.5], [0.25]], np.float32)}, {"score": np.array([[0.5], [0.75]], np.float32)})
    assert got.agreement is None and got.rows == 0
    assert got.difference == pytest.approx(0.25)


def test_bytes_outputs_agree_by_equality_and_have_no_difference() -> None:
    got = compare({"t": np.array([b"a", b"b"], dtype=object)}, {"t": np.array([b"a", b"c"], dtype=object)})
    assert got == Comparison(0.5, None, 2)


@pytest.mark.parametrize(
    ("serving", "shadow", "message"),
    [
        ({"y": np.zeros((2, 3), np.float32)}, {"y": np.zeros((2, 4), np.float32)}, "shape"),
        ({"y": np.zeros((2, 3), np.float32)}, {"z": np.zeros((2, 3), np.float32)}, "no output in common"),
        ({"y": np.zeros((2, 3), np.float32)}, {"y": np.zeros((2, 3), np.int64)}, "dtype"),
        ({"y": np.zeros(2, np.float32)}, {"y": np.array([b"a", b"b"], dtype=object)}, "BYTES"),
        ({"y": np.zeros((1, 3), np.float32)}, {"y": np.array([[np.nan, 0, 0]], np.float32)}, "NaN or infinite"),
        ({"y": np.zeros((1, 3), np.float32)}, {"y": np.array([[0, -np.inf, 0]], np.float32)}, "NaN or infinite"),
    ],
)
def test_answers_that_cannot_be_compared_are_refused_not_crashed_on(
    serving: dict[str, np.ndarray[Any, Any]], shadow: dict[str, np.ndarray[Any, Any]], message: str
) -> None:
    with pytest.raises(ShadowMismatchError, match=message):
        compare(serving, shadow)


# -- the runner ------------------------------------------------------------------------------------------------


@dataclass
class Runs:
    """A recorder that keeps every shadow run."""

    runs: list[tuple[str, str, str, str, Comparison | None, float, float]] = field(default_factory=list)

    def shadow_run(
        self,
        name: str,
        version: str,
        variant: str,
        outcome: str,
        comparison: Comparison | None = None,
        shadow_seconds: float = 0.0,
        serving_seconds: float = 0.0,
    ) -> None:
        self.runs.append((name, version, variant, outcome, comparison, shadow_seconds, serving_seconds))

    def outcomes(self) -> list[str]:
        return [r[3] for r in self.runs]


class FakeRss:
    """Process memory as the caches see it (read before and after each load), growing by ``gain`` a load."""

    def __init__(self, gain: int = 0) -> None:
        self.value = 100 * MB
        self.gain = gain
        self.calls = 0

    def __call__(self) -> int:
        self.calls += 1
        if self.calls % 2 == 0:
            self.value += self.gain
        return self.value


@dataclass
class Node:
    serving: ModelCache
    shadow: ModelCache
    runs: Runs
    pool: RunPool

    def runner(self, **options: Any) -> ShadowRunner:
        runner = ShadowRunner(self.serving, self.runs, **options)
        runner.attach(self.shadow, lambda name: ("2", "fp32") if self.shadow.holds(name) else None, _fp32)
        return runner


def _fp32(name: str, version: str) -> str:
    return "fp32"


@pytest.fixture
async def make(tmp_path: Path) -> AsyncIterator[Callable[..., Node]]:
    built: list[tuple[Node, list[ShadowRunner]]] = []

    def build(budget: int = 1 << 40, rss: FakeRss | None = None, shadow_seed: int = 0, **models: int) -> Node:
        serving_repo = ModelRepository(tmp_path / f"serving{len(built)}")
        shadow_repo = ModelRepository(tmp_path / f"shadow{len(built)}")
        for name, seed in {"m": 0, **models}.items():
            serving_repo.add(name, linear_model(tmp_path / f"{name}-{seed}.onnx", seed=seed), version="1")
        shadow_repo.add("m", linear_model(tmp_path / f"m-shadow-{shadow_seed}.onnx", seed=shadow_seed), version="2")
        pool = RunPool(2)
        serving = ModelCache(serving_repo, pool, BatchingConfig(), budget, rss=rss or FakeRss())
        node = Node(serving, serving.shadow_cache(shadow_repo, FileOpener()), Runs(), pool)
        built.append((node, []))
        return node

    yield build
    for node, _ in built:
        await node.shadow.close()
        await node.serving.close()
        node.pool.close()


async def _answer(node: Node, inputs: dict[str, np.ndarray[Any, Any]]) -> tuple[LoadedModel, dict[str, Any]]:
    model = await node.serving.get("m")
    return model, await node.serving.run(model, model.session.prepare(inputs, ()))


async def test_an_identical_shadow_agrees_wholly_and_another_one_does_not(make: Callable[..., Node]) -> None:
    for seed, identical in ((0, True), (7, False)):
        node = make(shadow_seed=seed)
        runner = node.runner(sample=lambda: 0.0)
        runner.assign({"m": ShadowAssignment("2", 1.0)})
        await node.shadow.get("m")
        served, outputs = await _answer(node, {"x": X})
        task = runner.offer(served, {"x": X}, outputs, 0.004)
        assert task is not None
        await task
        [(name, version, variant, outcome, comparison, shadow_s, serving_s)] = node.runs.runs
        assert (name, version, variant, outcome) == ("m", "2", "fp32", OK)
        assert comparison is not None and comparison.rows == 3
        assert shadow_s > 0 and serving_s == 0.004
        if identical:
            assert (comparison.agreement, comparison.difference) == (1.0, 0.0)
        else:
            assert comparison.difference is not None and comparison.difference > 1e-3


async def test_only_the_assigned_share_of_requests_is_sampled(make: Callable[..., Node]) -> None:
    node = make()
    runner = node.runner(sample=random.Random(7).random)
    runner.assign({"m": ShadowAssignment("2", 0.25)})
    await node.shadow.get("m")
    served, outputs = await _answer(node, {"x": X})
    for _ in range(400):  # one at a time: a shadow run in flight sheds the next sampled request
        task = runner.offer(served, {"x": X}, outputs, 0.001)
        if task is not None:
            await task
    draws = random.Random(7)
    expected = sum(draws.random() < 0.25 for _ in range(400))
    assert 60 < expected < 140
    assert len(node.runs.runs) == expected  # every sampled request is counted once, the others not at all
    assert set(node.runs.outcomes()) == {OK}


async def test_a_model_without_a_shadow_share_is_never_sampled(make: Callable[..., Node]) -> None:
    node = make(other=3)
    runner = node.runner(sample=lambda: 0.0)
    runner.assign({"other": ShadowAssignment("2", 1.0)})
    served, outputs = await _answer(node, {"x": X})
    assert runner.offer(served, {"x": X}, outputs, 0.001) is None
    runner.assign({"m": ShadowAssignment("2", 1.0)})
    runner.assign({})  # the stage ended
    assert runner.offer(served, {"x": X}, outputs, 0.001) is None
    assert node.runs.runs == []


async def test_only_the_assigned_version_runs_as_the_shadow(make: Callable[..., Node]) -> None:
    node = make()
    runner = node.runner(sample=lambda: 0.0)
    await node.shadow.get("m")  # version 2, the previous shadow
    runner.assign({"m": ShadowAssignment("3", 1.0)})  # not installed yet
    served, outputs = await _answer(node, {"x": X})
    assert runner.offer(served, {"x": X}, outputs, 0.001) is None
    assert node.runs.runs == [] and node.shadow.stats.loads == 1
    runner.assign({"m": ShadowAssignment("2", 1.0)})
    task = runner.offer(served, {"x": X}, outputs, 0.001)
    assert task is not None
    await task
    assert node.runs.outcomes() == [OK]


async def test_one_shadow_run_at_a_time_and_the_rest_is_shed(make: Callable[..., Node]) -> None:
    assert MAX_IN_FLIGHT == 1  # a shadow never holds more than one of the node's run slots
    node = make()
    runner = node.runner(sample=lambda: 0.0)
    runner.assign({"m": ShadowAssignment("2", 1.0)})
    await node.shadow.get("m")
    served, outputs = await _answer(node, {"x": X})
    tasks = [runner.offer(served, {"x": X}, outputs, 0.001) for _ in range(10)]
    started = [t for t in tasks if t is not None]
    assert len(started) == 1 and runner.in_flight == 1
    await asyncio.gather(*started)
    assert sorted(node.runs.outcomes()) == [OK] + [SHED] * 9
    assert runner.offer(served, {"x": X}, outputs, 0.001) is not None  # room again once they ended


async def test_a_node_whose_run_slots_are_all_busy_sheds_the_shadow(make: Callable[..., Node]) -> None:
    node = make()
    runner = node.runner(sample=lambda: 0.0)
    runner.assign({"m": ShadowAssignment("2", 1.0)})
    await node.shadow.get("m")
    served, outputs = await _answer(node, {"x": X})
    for _ in range(node.pool.slots):
        await node.pool.acquire()
    try:
        assert runner.offer(served, {"x": X}, outputs, 0.001) is None
    finally:
        for _ in range(node.pool.slots):
            node.pool.release()
    assert node.runs.outcomes() == [SHED]


async def test_a_serving_model_with_queued_work_sheds_the_shadow(make: Callable[..., Node]) -> None:
    node = make()
    runner = node.runner(sample=lambda: 0.0)
    runner.assign({"m": ShadowAssignment("2", 1.0)})
    await node.shadow.get("m")
    served, outputs = await _answer(node, {"x": X})
    for _ in range(node.pool.slots):
        await node.pool.acquire()
    queued = asyncio.create_task(node.serving.run(served, served.session.prepare({"x": X}, ())))
    for _ in range(5):
        await asyncio.sleep(0)  # the request waits in the queue for a run slot
    for _ in range(node.pool.slots):
        node.pool.release()
    assert served.batcher.queue_depth == 1 and node.pool.busy < node.pool.slots
    assert runner.offer(served, {"x": X}, outputs, 0.001) is None
    await queued
    assert node.runs.outcomes() == [SHED]


async def test_a_shadow_not_loaded_is_shed_and_loaded_once_in_the_background(make: Callable[..., Node]) -> None:
    node = make()
    runner = node.runner(sample=lambda: 0.0)
    runner.assign({"m": ShadowAssignment("2", 1.0)})
    served, outputs = await _answer(node, {"x": X})
    assert all(runner.offer(served, {"x": X}, outputs, 0.001) is None for _ in range(5))
    assert node.runs.outcomes() == [SHED] * 5
    for _ in range(200):
        if node.shadow.ready("m"):
            break
        await asyncio.sleep(0.01)
    assert node.shadow.ready("m") and node.shadow.stats.loads == 1 and node.shadow.stats.misses == 1
    task = runner.offer(served, {"x": X}, outputs, 0.001)
    assert task is not None
    await task
    assert node.runs.outcomes()[-1] == OK


async def test_a_failing_shadow_counts_an_error_and_never_reaches_the_caller(
    make: Callable[..., Node], tmp_path: Path
) -> None:
    node = make()
    dataplane = Dataplane(NodeIdentity("tier0", "device-1"), node.serving, NoUpstream(), RequestLimits())
    runner = node.runner(sample=lambda: 0.0)
    dataplane.shadows = runner
    runner.assign({"m": ShadowAssignment("3", 1.0)})
    # A shadow that takes five features where the serving version takes four: it cannot run these inputs.
    node.shadow.repository.add("m", linear_model(tmp_path / "wide.onnx", in_dim=5), version="3")
    await node.shadow.load("m")
    result = await dataplane.infer(_call({"x": X}))
    assert isinstance(result, InferResult)
    assert (result.model_version, result.parameters[SERVED_BY]) == ("1", "tier0:device-1")
    assert runner.in_flight == 1  # the answer came back before the shadow ran
    for _ in range(200):
        if node.runs.runs:
            break
        await asyncio.sleep(0.01)
    assert [(r[1], r[3]) for r in node.runs.runs] == [("3", ERROR)]


async def test_the_data_plane_offers_its_local_answers_with_the_serving_run_time(make: Callable[..., Node]) -> None:
    node = make()
    runner = node.runner(sample=lambda: 0.0)
    runner.assign({"m": ShadowAssignment("2", 1.0)})
    await node.shadow.get("m")
    dataplane = Dataplane(NodeIdentity("tier0", "device-1"), node.serving, NoUpstream(), RequestLimits(), runner)
    result = await dataplane.infer(_call({"x": X}))
    assert isinstance(result, InferResult) and result.model_version == "1"
    for _ in range(200):
        if node.runs.runs:
            break
        await asyncio.sleep(0.01)
    [(_, version, _, outcome, comparison, shadow_s, serving_s)] = node.runs.runs
    assert (version, outcome) == ("2", OK)
    assert comparison is not None and comparison.agreement == 1.0
    assert 0 < serving_s < 5 and 0 < shadow_s < 5


def _call(inputs: dict[str, np.ndarray[Any, Any]]) -> InferCall:
    return InferCall("m", "", {}, lambda: InferRequest("m", "", "id", inputs), grpc_remaining=5.0)


# -- one memory budget for serving and shadow ------------------------------------------------------------------


async def test_the_serving_cache_evicts_an_idle_shadow_before_its_own_models(make: Callable[..., Node]) -> None:
    node = make(budget=45 * MB, rss=FakeRss(gain=20 * MB), b=1)
    await node.serving.get("m")  # the least recently used of all
    await node.shadow.get("m")
    assert node.serving.budget_used_bytes == node.shadow.budget_used_bytes == 40 * MB + _activations(node)
    await node.serving.get("b")  # needs room: the shadow yields, the older serving model stays
    assert node.serving.ready("m") and node.serving.ready("b") and not node.shadow.ready("m")
    assert node.shadow.stats.evictions == 1 and node.serving.stats.evictions == 0
    assert node.serving.budget_used_bytes <= node.serving.budget


async def test_a_shadow_never_evicts_a_serving_model(make: Callable[..., Node]) -> None:
    node = make(budget=45 * MB, rss=FakeRss(gain=20 * MB), b=1)
    await node.serving.get("m")
    await node.serving.get("b")
    with pytest.raises(MemoryBudgetError, match=r"the serving models hold .* and shadow work yields"):
        await node.shadow.get("m")
    assert node.serving.ready("m") and node.serving.ready("b")
    assert node.serving.stats.evictions == 0 and node.shadow.stats.refusals == 1
    node.serving.unload("b")
    await asyncio.sleep(0.05)  # its batcher drains, then its memory is free
    assert (await node.shadow.get("m")).version == "2"


def _activations(node: Node) -> int:
    return sum(m.footprint_bytes for m in (*node.serving.loaded(), *node.shadow.loaded())) - 40 * MB


# -- the review's fixes: comparison edge cases -------------------------------------------------------------------


def test_a_float_output_of_one_axis_has_no_top1_its_axis_is_the_batch() -> None:
    # One score per request: argmax over the batch would compare which request scored highest.
    got = compare({"s": np.array([0.1, 0.9, 0.3], np.float32)}, {"s": np.array([0.9, 0.1, 0.3], np.float32)})
    assert got.agreement is None and got.rows == 0
    assert got.difference == pytest.approx(1.6 / 3)
    assert compare({"s": np.array(0.5, np.float32)}, {"s": np.array(0.25, np.float32)}) == Comparison(None, 0.25, 0)


def test_equal_non_finite_values_in_both_answers_are_no_difference() -> None:
    serving = np.array([[np.inf, 0.0, 1.0], [np.nan, 2.0, 0.0], [-np.inf, 0.0, 3.0]], np.float32)
    got = compare({"y": serving}, {"y": serving.copy()})
    assert got.difference == 0.0 and got.rows == 3


def test_non_finite_values_only_in_the_serving_answer_are_not_the_shadows_fault() -> None:
    serving = np.array([[np.nan, 0.0, 1.0]], np.float32)
    with pytest.raises(ServingNotFiniteError):
        compare({"y": serving}, {"y": np.array([[0.0, 0.0, 1.0]], np.float32)})
    with pytest.raises(ServingNotFiniteError):  # NaN serving, inf shadow: still the serving answer's NaN
        compare({"y": serving}, {"y": np.array([[np.inf, 0.0, 1.0]], np.float32)})


def test_a_huge_difference_is_clamped() -> None:
    got = compare({"y": np.array([[1e30, 1e30]], np.float32)}, {"y": np.array([[-1e30, 1e30]], np.float32)})
    assert got.difference == MAX_DIFFERENCE / 2  # each element's difference is clamped, then averaged
    # Finite float64 values whose difference overflows are not "non-finite" either.
    got = compare({"y": np.array([1e308, 0.0])}, {"y": np.array([-1e308, 0.0])})
    assert got.difference is not None and got.difference <= MAX_DIFFERENCE


# -- the review's fixes: the runner ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "error",
    [
        DeadlineExceededError("deadline of a request to model m passed while it was queued"),
        ModelNotReadyError("model m is being unloaded"),
    ],
)
async def test_a_shadow_run_that_misses_its_deadline_or_loses_its_model_is_shed_not_an_error(
    make: Callable[..., Node], monkeypatch: pytest.MonkeyPatch, error: EdgecascadeError
) -> None:
    node = make()
    runner = node.runner(sample=lambda: 0.0)
    runner.assign({"m": ShadowAssignment("2", 1.0)})
    await node.shadow.get("m")
    served, outputs = await _answer(node, {"x": X})
    loop = asyncio.get_running_loop()
    deadlines: list[float] = []

    async def busy(model: LoadedModel, inputs: Any, wanted: Any, deadline: float, priority: int) -> Any:
        deadlines.append(deadline - loop.time())
        raise error

    monkeypatch.setattr(node.shadow, "run", busy)
    task = runner.offer(served, {"x": X}, outputs, 0.5)
    assert task is not None
    await task
    assert node.runs.outcomes() == [SHED]
    # The deadline follows the serving run's time: ten times its 0.5 s here, at least DEADLINE_S.
    assert deadlines[0] == pytest.approx(5.0, abs=0.05)
    assert runner.deadline_after(0.001) == DEADLINE_S and runner.deadline_after(0.5) == 5.0


async def test_a_serving_answer_with_nan_is_not_counted_against_the_shadow(make: Callable[..., Node]) -> None:
    node = make()
    runner = node.runner(sample=lambda: 0.0)
    runner.assign({"m": ShadowAssignment("2", 1.0)})
    await node.shadow.get("m")
    served, outputs = await _answer(node, {"x": X})
    poisoned = {name: np.full_like(value, np.nan) for name, value in outputs.items()}
    task = runner.offer(served, {"x": X}, poisoned, 0.001)
    assert task is not None
    await task
    assert node.runs.runs == []  # neither an error nor a comparison: the run says nothing of the shadow


async def test_an_unexpected_shadow_failure_is_logged_once_with_its_traceback(
    make: Callable[..., Node], monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    node = make()
    runner = node.runner(sample=lambda: 0.0)
    runner.assign({"m": ShadowAssignment("2", 1.0)})
    await node.shadow.get("m")
    served, outputs = await _answer(node, {"x": X})

    async def bug(*args: Any) -> Any:
        raise RuntimeError("a bug")

    monkeypatch.setattr(node.shadow, "run", bug)
    caplog.set_level("DEBUG", logger="edgecascade.shadow")
    for _ in range(5):
        task = runner.offer(served, {"x": X}, outputs, 0.001)
        assert task is not None
        await task
    assert node.runs.outcomes() == [ERROR] * 5
    failures = [r for r in caplog.records if "failed unexpectedly" in r.getMessage()]
    assert [r.levelname for r in failures] == ["WARNING"] + ["DEBUG"] * 4
    assert failures[0].exc_info is not None and all(r.exc_info is None for r in failures[1:])


async def test_a_shadow_is_shed_when_serving_took_every_slot_before_it_was_submitted(
    make: Callable[..., Node], monkeypatch: pytest.MonkeyPatch
) -> None:
    node = make()
    runner = node.runner(sample=lambda: 0.0)
    runner.assign({"m": ShadowAssignment("2", 1.0)})
    shadow = await node.shadow.get("m")
    served, outputs = await _answer(node, {"x": X})
    submitted: list[int] = []
    real_run = node.shadow.run

    async def spy(*args: Any) -> Any:
        submitted.append(1)
        return await real_run(*args)

    monkeypatch.setattr(node.shadow, "run", spy)
    task = runner.offer(served, {"x": X}, outputs, 0.001)  # a slot was free when offered …
    assert task is not None
    for _ in range(node.pool.slots):  # … and serving took them all before the shadow task ran
        await node.pool.acquire()
    try:
        await task
        assert submitted == [] and shadow.batcher.queue_depth == 0  # it never queued for a slot
    finally:
        for _ in range(node.pool.slots):
            node.pool.release()
    assert node.runs.outcomes() == [SHED]


async def test_a_background_load_that_ends_after_the_shadow_was_withdrawn_is_unloaded(
    make: Callable[..., Node],
) -> None:
    node = make()
    runner = node.runner(sample=lambda: 0.0)
    runner.assign({"m": ShadowAssignment("2", 1.0)})
    served, outputs = await _answer(node, {"x": X})
    assert runner.offer(served, {"x": X}, outputs, 0.001) is None  # not loaded: shed, and a load starts
    runner.assign({})  # withdrawn while it loads
    for _ in range(200):
        if node.shadow.stats.loads:
            break
        await asyncio.sleep(0.01)
    await asyncio.sleep(0.01)
    assert node.shadow.stats.loads == 1 and not node.shadow.ready("m") and node.shadow.loaded() == []


async def test_a_text_request_is_tokenized_by_the_shadows_own_tokenizer(tmp_path: Path) -> None:
    # The shadow reads a window of 8 characters, the serving version one of 4: the serving input_ids cannot run it.
    serving_repo, shadow_repo = ModelRepository(tmp_path / "serving"), ModelRepository(tmp_path / "shadow")
    serving_repo.add("lm", tiny_char_lm(tmp_path / "lm4.onnx", context=4), version="1")
    shadow_repo.add("lm", tiny_char_lm(tmp_path / "lm8.onnx", context=8), version="2")
    pool = RunPool(2)
    serving = ModelCache(serving_repo, pool, BatchingConfig(), 1 << 40, rss=FakeRss())
    shadow_cache = serving.shadow_cache(shadow_repo, FileOpener())
    runs = Runs()
    runner = ShadowRunner(serving, runs, sample=lambda: 0.0)
    runner.attach(shadow_cache, lambda name: ("2", "fp32"), _fp32)
    runner.assign({"lm": ShadowAssignment("2", 1.0)})
    try:
        await shadow_cache.get("lm")
        dataplane = Dataplane(NodeIdentity("tier0", "device-1"), serving, NoUpstream(), RequestLimits(), runner)
        prompt = np.array([b"abc de"], dtype=object)
        call = InferCall("lm", "", {}, lambda: InferRequest("lm", "", "id", {"text_input": prompt}), grpc_remaining=5)
        result = await dataplane.infer(call)
        assert isinstance(result, InferResult) and result.model_version == "1"
        for _ in range(200):
            if runs.runs:
                break
            await asyncio.sleep(0.01)
        [(_, version, _, outcome, comparison, _, _)] = runs.runs
        assert (version, outcome) == ("2", OK)
        assert comparison is not None and comparison.rows == 1
    finally:
        await runner.close()
        await shadow_cache.close()
        await serving.close()
        pool.close()
