"""The model store: single-flight loads, warm-up before visibility, failures remembered, deadlines."""

from __future__ import annotations

import asyncio
from pathlib import Path

import numpy as np
import pytest

from services.errors import DeadlineExceededError, ModelNotFoundError, ModelNotReadyError
from services.model_repository import ModelRepository
from services.model_store import ModelState, ModelStore
from tests.support.onnx_models import linear_model


@pytest.fixture
def store(tmp_path: Path) -> ModelStore:
    repo = ModelRepository(tmp_path / "repo")
    repo.add("m", linear_model(tmp_path / "m.onnx"))
    return ModelStore(repo, max_concurrent_runs=2)


async def test_concurrent_requests_share_one_load(store: ModelStore) -> None:
    models = await asyncio.gather(*(store.get("m") for _ in range(8)))
    assert all(m is models[0] for m in models)
    assert store.ready("m") and store.ready("m", "1")
    assert [r.state for r in store.index()] == [ModelState.READY]
    store.close()


async def test_a_failed_load_is_remembered_until_an_explicit_load(store: ModelStore, tmp_path: Path) -> None:
    version_dir = tmp_path / "repo" / "m" / "1"
    good = (version_dir / "model.onnx").read_bytes()
    (version_dir / "model.onnx").write_bytes(b"corrupt")
    with pytest.raises(ModelNotReadyError, match="cannot be loaded"):
        await store.get("m")
    (version_dir / "model.onnx").write_bytes(good)
    with pytest.raises(ModelNotReadyError):
        await store.get("m")  # not retried on every request
    assert store.index()[0].state == ModelState.UNAVAILABLE
    assert (await store.load("m")).version == "1"
    assert store.index()[0].state == ModelState.READY
    store.close()


async def test_reload_swaps_in_the_new_version_and_old_holders_keep_theirs(store: ModelStore, tmp_path: Path) -> None:
    old = await store.get("m")
    store.repository.add("m", linear_model(tmp_path / "m2.onnx", seed=5))
    new = await store.load("m")
    assert (old.version, new.version) == ("1", "2")
    assert (await store.get("m")) is new
    x = {"x": np.ones((1, 4), np.float32)}
    assert (await store.run(old, x))["y"].shape == (1, 3)  # a request holding v1 still finishes on v1
    store.unload("m")
    assert not store.ready("m")
    with pytest.raises(ModelNotFoundError):
        store.unload("absent")
    store.close()


async def test_a_request_past_its_deadline_is_never_run(store: ModelStore) -> None:
    model = await store.get("m")
    loop = asyncio.get_running_loop()
    before = model.stats.execution_count
    with pytest.raises(DeadlineExceededError, match="before model 'm' could run"):
        await store.run(model, {"x": np.ones((1, 4), np.float32)}, deadline=loop.time() - 1)
    assert model.stats.execution_count == before
    assert model.stats.fail.count == 1
    store.close()
