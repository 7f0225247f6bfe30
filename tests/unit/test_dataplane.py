"""The core owns the answer: local or through the Upstream port, decided in one place (no transport involved)."""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from services.cascade_generation import UpstreamGenerator
from services.dataplane import Dataplane, InferCall, ModelQuery, NoUpstream, Relayed, RequestLimits
from services.engine.batcher import BatchingConfig
from services.engine.model_cache import ModelCache
from services.engine.model_repository import ModelRepository
from services.engine.run_pool import RunPool
from services.errors import ModelNotFoundError, QueueFullError, UpstreamUnavailableError
from services.inference import SERVED_BY, FallbackReason, InferRequest, InferResult, NodeIdentity
from tests.support.onnx_models import linear_model

X = np.ones((1, 4), dtype=np.float32)


@dataclass
class FakeUpstream:
    """Records what the core sends upward and answers with a marker."""

    calls: list[tuple[str, FallbackReason, float, tuple[str, ...]]] = field(default_factory=list)

    def available(self) -> bool:
        return True

    async def infer(self, call: InferCall, reason: FallbackReason, timeout: float, route: Sequence[str]) -> Relayed:
        self.calls.append((call.model_name, reason, timeout, tuple(route)))
        return Relayed(f"answer from above for {call.wire}", reason)

    async def stream(
        self, call: InferCall, reason: FallbackReason, timeout: float, route: Sequence[str]
    ) -> AsyncIterator[Relayed]:
        self.calls.append((call.model_name, reason, timeout, tuple(route)))
        for i in range(2):
            yield Relayed(f"message {i}", reason)

    async def query(self, query: ModelQuery, wire: Any, timeout: float, route: Sequence[str]) -> Any:
        return f"{query.value} from above"

    async def generator(self, model: str, timeout: float, route: Sequence[str]) -> UpstreamGenerator:
        raise UpstreamUnavailableError("no generators above in this test")

    async def distribution(
        self, model: str, version: str, input_ids: np.ndarray[Any, Any], timeout: float, route: Sequence[str]
    ) -> np.ndarray[Any, Any]:
        raise UpstreamUnavailableError("no generators above in this test")


def _call(model: str, decoded: list[str] | None = None, **params: Any) -> InferCall:
    def decode() -> InferRequest:
        if decoded is not None:
            decoded.append(model)
        return InferRequest(model, "", "id-1", {"x": X}, parameters=params)

    return InferCall(model, "", params, decode, wire=f"wire:{model}", grpc_remaining=5.0, route=("tier0:app",))


@pytest.fixture
async def cache(tmp_path: Path) -> AsyncIterator[ModelCache]:
    repo = ModelRepository(tmp_path / "repo")
    repo.add("lin", linear_model(tmp_path / "lin.onnx"))
    cache = ModelCache(repo, RunPool(1), BatchingConfig(max_queue_size=1), 1 << 30)
    yield cache
    await cache.close()


async def test_a_held_model_answers_here_and_decodes_once(cache: ModelCache) -> None:
    upstream = FakeUpstream()
    dp = Dataplane(NodeIdentity("tier0", "d"), cache, upstream, RequestLimits())
    decoded: list[str] = []
    answer = await dp.infer(_call("lin", decoded))
    assert isinstance(answer, InferResult)
    assert answer.parameters[SERVED_BY] == "tier0:d"
    assert decoded == ["lin"] and upstream.calls == []


async def test_a_model_not_held_goes_upward_untouched_with_the_remaining_deadline(cache: ModelCache) -> None:
    upstream = FakeUpstream()
    dp = Dataplane(NodeIdentity("tier0", "d"), cache, upstream, RequestLimits())
    decoded: list[str] = []
    answer = await dp.infer(_call("ghost", decoded))
    assert answer == Relayed("answer from above for wire:ghost", FallbackReason.MODEL_NOT_HELD)
    assert decoded == []  # forwarded as it came: nothing decoded here
    (name, reason, timeout, route) = upstream.calls[0]
    assert (name, reason, route) == ("ghost", FallbackReason.MODEL_NOT_HELD, ("tier0:app", "tier0:d"))
    assert 0 < timeout <= 5.0
    streamed = [m async for m in dp.stream(_call("ghost"))]
    assert [m.message for m in streamed if isinstance(m, Relayed)] == ["message 0", "message 1"]
    assert await dp.ready("ghost", "", "wire", None, ()) == Relayed("ready from above", FallbackReason.MODEL_NOT_HELD)


async def test_a_full_queue_gets_a_second_chance_upward(cache: ModelCache, monkeypatch: pytest.MonkeyPatch) -> None:
    upstream = FakeUpstream()
    dp = Dataplane(NodeIdentity("tier0", "d"), cache, upstream, RequestLimits())

    async def full(*args: Any, **kwargs: Any) -> Any:
        raise QueueFullError("the queue of model 'lin' version 1 is full")

    monkeypatch.setattr(cache, "run", full)
    answer = await dp.infer(_call("lin"))
    assert isinstance(answer, Relayed) and answer.reason is FallbackReason.QUEUE_FULL
    assert upstream.calls[0][1] is FallbackReason.QUEUE_FULL
    at_top = Dataplane(NodeIdentity("tier2", "r"), cache, NoUpstream(), RequestLimits())
    with pytest.raises(QueueFullError):
        await at_top.infer(_call("lin"))


async def test_at_the_top_of_the_chain_a_missing_model_is_not_found(cache: ModelCache) -> None:
    dp = Dataplane(NodeIdentity("tier2", "r"), cache, NoUpstream(), RequestLimits())
    with pytest.raises(ModelNotFoundError, match="not held by tier2:r, the top of the chain"):
        await dp.infer(_call("ghost"))
    assert await dp.ready("ghost", "", None, None, ()) is False
