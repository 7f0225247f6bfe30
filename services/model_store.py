"""The models a node has loaded, and the pool that runs them.

Invariants:

* One load per model version at a time: concurrent requests for a model that is
  not loaded yet wait for the same load (single flight).
* A version becomes visible to new requests only after it loaded and passed a
  warm-up run, so ``ModelReady`` never reports a model that would fail its first
  request. Reloading a model swaps the new version in only when it is warm;
  requests already running keep the object they started with.
* onnxruntime runs only in the bounded pool, never on the event loop, and a
  request whose deadline has passed is not started.

The memory-budgeted cache and the dynamic batcher (later work) replace the
unbounded dictionary and the one-request-per-run execution here.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

import numpy as np

from services.errors import DeadlineExceededError, EdgecascadeError, ModelNotFoundError, ModelNotReadyError
from services.generation import CHAR_LM_TASK, CharTokenizer
from services.inference import ModelSignature
from services.model_repository import ModelEntry, ModelRepository
from services.onnx_session import OnnxSession
from services.tensors import DATATYPES


class ModelState(StrEnum):
    """Lifecycle state of a model version, as RepositoryIndex reports it."""

    READY = "READY"
    LOADING = "LOADING"
    UNAVAILABLE = "UNAVAILABLE"
    UNLOADING = "UNLOADING"


@dataclass
class Duration:
    """A count and a cumulative duration in nanoseconds."""

    count: int = 0
    ns: int = 0

    def add(self, ns: int) -> None:
        """Counts one event that took ``ns`` nanoseconds."""
        self.count += 1
        self.ns += ns


@dataclass
class ModelStats:
    """Cumulative statistics of one model version (Triton's ModelStatistics)."""

    success: Duration = field(default_factory=Duration)
    fail: Duration = field(default_factory=Duration)
    queue: Duration = field(default_factory=Duration)
    compute_infer: Duration = field(default_factory=Duration)
    inference_count: int = 0
    execution_count: int = 0
    last_inference_ms: int = 0


@dataclass
class LoadedModel:
    """A model version that is loaded, warm and ready."""

    entry: ModelEntry
    session: OnnxSession
    tokenizer: CharTokenizer | None
    stats: ModelStats = field(default_factory=ModelStats)

    @property
    def name(self) -> str:
        """The model name."""
        return self.entry.name

    @property
    def version(self) -> str:
        """The model version."""
        return self.entry.version

    @property
    def signature(self) -> ModelSignature:
        """Inputs and outputs of the model."""
        return self.session.signature


@dataclass(frozen=True)
class IndexEntry:
    """One row of RepositoryIndex."""

    name: str
    version: str
    state: ModelState
    reason: str = ""


class ModelStore:
    """Loads models from a repository on demand and runs them in a bounded pool.

    Args:
        repository: Where the models are.
        intra_op_threads: onnxruntime threads per run.
        max_concurrent_runs: Size of the run pool; intra_op_threads ×
            max_concurrent_runs should not exceed the cores.
    """

    def __init__(self, repository: ModelRepository, intra_op_threads: int = 1, max_concurrent_runs: int = 1) -> None:
        self.repository = repository
        self._intra_op_threads = intra_op_threads
        self._pool = ThreadPoolExecutor(max_workers=max_concurrent_runs, thread_name_prefix="onnxruntime")
        self._loaded: dict[tuple[str, str], LoadedModel] = {}
        self._latest: dict[str, LoadedModel] = {}
        self._loading: dict[tuple[str, str], asyncio.Future[LoadedModel]] = {}
        self._failed: dict[tuple[str, str], str] = {}

    def close(self) -> None:
        """Stops the run pool after the runs in progress."""
        self._pool.shutdown(wait=True, cancel_futures=True)

    def holds(self, name: str) -> bool:
        """Whether the repository has any version of ``name`` (loaded or not)."""
        return name in self._latest or bool(self.repository.versions(name))

    def ready(self, name: str, version: str = "") -> bool:
        """Whether a version (the newest when empty) is loaded and warm."""
        return name in self._latest if not version else (name, version) in self._loaded

    async def get(self, name: str, version: str = "") -> LoadedModel:
        """Returns a ready model version, loading it if needed.

        Raises:
            ModelNotFoundError: The repository does not have it.
            ModelNotReadyError: It exists but cannot be loaded or warmed up.
        """
        if not version and name in self._latest:
            return self._latest[name]
        if version and (name, version) in self._loaded:
            return self._loaded[(name, version)]
        entry = self.repository.resolve(name, version)
        failure = self._failed.get((entry.name, entry.version))
        if failure is not None:
            # A version that failed to load is not retried on every request;
            # RepositoryModelLoad (``load``) retries it explicitly.
            raise ModelNotReadyError(failure)
        return await self._load(entry)

    async def load(self, name: str) -> LoadedModel:
        """Loads (or reloads) the newest version of ``name`` and makes it current once warm.

        Raises:
            ModelNotFoundError: The repository does not have the model.
            ModelNotReadyError: It cannot be loaded or warmed up.
        """
        entry = self.repository.resolve(name)
        return await self._load(entry, force=True)

    def unload(self, name: str) -> None:
        """Drops every loaded version of ``name``; requests in flight finish on what they hold.

        Raises:
            ModelNotFoundError: No version of ``name`` is loaded or in the repository.
        """
        keys = [k for k in self._loaded if k[0] == name]
        if not keys and not self.repository.versions(name):
            raise ModelNotFoundError(f"model '{name}' is not in this repository")
        for key in keys:
            del self._loaded[key]
        self._latest.pop(name, None)

    async def preload(self) -> None:
        """Loads the newest version of every model in the repository; failures are recorded, not raised."""
        for name in self.repository.names():
            try:
                await self.load(name)
            except EdgecascadeError:
                continue

    def index(self) -> list[IndexEntry]:
        """Every model version in the repository with its state."""
        rows: list[IndexEntry] = []
        for entry in self.repository.entries():
            key = (entry.name, entry.version)
            if key in self._loaded:
                rows.append(IndexEntry(entry.name, entry.version, ModelState.READY))
            elif key in self._loading:
                rows.append(IndexEntry(entry.name, entry.version, ModelState.LOADING))
            else:
                rows.append(
                    IndexEntry(entry.name, entry.version, ModelState.UNAVAILABLE, self._failed.get(key, "unloaded"))
                )
        return rows

    def loaded(self) -> list[LoadedModel]:
        """The loaded model versions."""
        return list(self._loaded.values())

    async def run(
        self,
        model: LoadedModel,
        inputs: Mapping[str, np.ndarray[Any, Any]],
        outputs: Sequence[str] = (),
        deadline: float | None = None,
    ) -> dict[str, np.ndarray[Any, Any]]:
        """Runs one request on ``model`` in the pool.

        Args:
            model: A ready model.
            inputs: Validated inputs.
            outputs: Output names (all when empty).
            deadline: ``loop.time()`` by which the answer is needed; None for none.

        Raises:
            DeadlineExceededError: The deadline passed before or during the run.
            InvalidArgumentError: The model rejected the input values.
        """
        loop = asyncio.get_running_loop()
        enqueued = time.perf_counter_ns()
        if deadline is not None and loop.time() >= deadline:
            model.stats.fail.add(0)
            raise DeadlineExceededError(f"deadline passed before model '{model.name}' could run")
        started: list[int] = []

        def call() -> dict[str, np.ndarray[Any, Any]]:
            started.append(time.perf_counter_ns())
            return model.session.run(inputs, outputs)

        future = loop.run_in_executor(self._pool, call)
        try:
            if deadline is None:
                result = await future
            else:
                result = await asyncio.wait_for(future, max(deadline - loop.time(), 0.0))
        except TimeoutError:
            model.stats.fail.add(time.perf_counter_ns() - enqueued)
            raise DeadlineExceededError(f"model '{model.name}' did not answer before the deadline") from None
        except BaseException:
            model.stats.fail.add(time.perf_counter_ns() - enqueued)
            raise
        done = time.perf_counter_ns()
        stats = model.stats
        stats.success.add(done - enqueued)
        stats.queue.add((started[0] if started else done) - enqueued)
        stats.compute_infer.add(done - (started[0] if started else enqueued))
        stats.inference_count += 1
        stats.execution_count += 1
        stats.last_inference_ms = time.time_ns() // 1_000_000
        return result

    async def _load(self, entry: ModelEntry, force: bool = False) -> LoadedModel:
        key = (entry.name, entry.version)
        if not force and key in self._loaded:
            return self._loaded[key]
        pending = self._loading.get(key)
        if pending is not None:
            return await asyncio.shield(pending)
        loop = asyncio.get_running_loop()
        future: asyncio.Future[LoadedModel] = loop.create_future()
        self._loading[key] = future
        try:
            model = await loop.run_in_executor(self._pool, self._load_blocking, entry)
        except EdgecascadeError as exc:
            self._failed[key] = exc.message
            future.set_exception(exc)
            future.exception()  # retrieved here so a load nobody else awaited does not warn
            raise
        except BaseException:
            future.cancel()  # waiters must not hang on a load whose owner was cancelled
            raise
        finally:
            del self._loading[key]
        self._failed.pop(key, None)
        self._loaded[key] = model
        latest = self._latest.get(entry.name)
        if latest is None or int(entry.version) >= int(latest.version):
            self._latest[entry.name] = model
        future.set_result(model)
        return model

    def _load_blocking(self, entry: ModelEntry) -> LoadedModel:
        session = OnnxSession(entry.model_file, self._intra_op_threads)
        tokenizer = None
        if entry.task == CHAR_LM_TASK:
            tokenizer = CharTokenizer.from_properties({**session.metadata, **entry.properties})
        _warm_up(session, entry)
        return LoadedModel(entry=entry, session=session, tokenizer=tokenizer)


def _warm_up(session: OnnxSession, entry: ModelEntry) -> None:
    """Runs the model once on zeros so the first real request pays no first-run cost."""
    feed: dict[str, np.ndarray[Any, Any]] = {}
    for spec in session.signature.inputs:
        if spec.datatype == "BYTES":
            return  # no safe dummy value for text inputs; skip warm-up
        shape = tuple(1 if d < 0 else d for d in spec.shape)
        feed[spec.name] = np.zeros(shape, dtype=DATATYPES[spec.datatype].dtype)
    try:
        session.run(feed)
    except EdgecascadeError as exc:
        raise ModelNotReadyError(f"model '{entry.name}' version {entry.version} failed its warm-up run") from exc
