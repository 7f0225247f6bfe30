"""The models a node has loaded, within a memory budget in bytes.

Invariants:

* The sum of the footprints of loaded models (plus loads in progress) never
  exceeds the budget. A load is admitted only if it fits after evicting idle
  models, least recently used first; a model with requests queued, running or
  streaming is never evicted. A model that cannot fit even alone is refused
  with :class:`~services.errors.MemoryBudgetError` (counted).
* One load per model version at a time (single flight: a
  :class:`~services.single_flight.SingleFlight` keyed by name and version),
  and one load at a time per node, so the memory a load really took can be
  measured.
* A shadow cache (:meth:`ModelCache.shadow_cache`: a rollout's shadow versions,
  run beside the serving ones) shares the node's budget, run pool and load
  lock: each counts the other's used bytes against the one budget. The serving
  cache evicts idle shadow models first to make room (shadow work yields); the
  shadow cache never evicts a serving model (its load is refused instead).
* A version becomes visible to new requests only after it loaded, passed a
  warm-up run and was accepted by the load hooks (opening, warming up and
  measuring are :mod:`services.engine.model_loader`'s). Loading a new version while
  an old one serves swaps the new one in once warm; requests already holding
  the old one finish on it, then it is released (hot swap).
* A version that failed to load is not retried on every request; an explicit
  :meth:`ModelCache.load` retries it.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from dataclasses import dataclass, field, fields
from enum import StrEnum
from typing import Any

import numpy as np

from services.engine.batcher import BatchingConfig, BatchObserver, DynamicBatcher
from services.engine.generation import CharTokenizer
from services.engine.memory import megabytes, process_rss
from services.engine.model_loader import LoadHooks, ModelLoader, SessionOpener
from services.engine.model_repository import ModelEntry, ModelRepository
from services.engine.model_stats import ModelStats
from services.engine.onnx_session import OnnxSession
from services.engine.run_pool import RunPool
from services.engine.throttle import VARIANT_PROPERTY, Throttle, is_int8
from services.errors import ConfigError, EdgecascadeError, MemoryBudgetError, ModelNotFoundError, ModelNotReadyError
from services.inference import ModelSignature
from services.single_flight import SingleFlight


class ModelState(StrEnum):
    """Lifecycle state of a model version, as RepositoryIndex reports it."""

    READY = "READY"
    LOADING = "LOADING"
    UNAVAILABLE = "UNAVAILABLE"
    UNLOADING = "UNLOADING"


@dataclass
class ModelCacheStats:
    """Counters of the model cache: hit rate is hits / (hits + misses)."""

    hits: int = 0
    misses: int = 0
    loads: int = 0
    evictions: int = 0
    refusals: int = 0


@dataclass(eq=False)
class LoadedModel:
    """A model version that is loaded, warm and ready."""

    entry: ModelEntry
    session: OnnxSession
    tokenizer: CharTokenizer | None
    batcher: DynamicBatcher
    footprint_bytes: int
    measured: bool
    last_used: float = 0.0
    pins: int = 0
    retired: bool = field(default=False)
    draining: bool = field(default=False)

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

    @property
    def stats(self) -> ModelStats:
        """Cumulative statistics of this version."""
        return self.batcher.stats

    @property
    def busy(self) -> bool:
        """Whether requests hold this model (queued, running or streaming)."""
        return self.pins > 0 or self.batcher.in_flight > 0


@dataclass(frozen=True)
class _Victim:
    """An idle model chosen for eviction, and the cache that holds it."""

    cache: ModelCache
    model: LoadedModel

    def evict(self) -> None:
        self.cache._evict(self.model)


@dataclass(frozen=True)
class IndexEntry:
    """One row of RepositoryIndex."""

    name: str
    version: str
    state: ModelState
    reason: str = ""


class ModelCache:
    """Loads models from a repository on demand and keeps them within a memory budget.

    Opening, warming up and measuring a version is the :class:`~services.engine.model_loader.ModelLoader`'s;
    the cache decides when (single flight, one at a time), whether it fits (admission, eviction) and
    when a version serves and stops serving (hot swap, drain).

    Args:
        repository: Where the models are.
        pool: The process-wide run pool (loads and runs share its thread budget).
        batching: Tier-wide batching defaults (a model's metadata may override them).
        memory_budget_bytes: The budget.
        intra_op_threads: onnxruntime threads per run.
        rss: Returns the process's resident memory (to measure real footprints).
        observers: Makes the timing observer of one model version (name, version), for metrics.
        hooks: Called during each load; may refuse a model (see :class:`~services.engine.model_loader.LoadHooks`).
        opener: Where the models' bytes come from (the repository's files by default).
    """

    def __init__(
        self,
        repository: ModelRepository,
        pool: RunPool,
        batching: BatchingConfig,
        memory_budget_bytes: int,
        intra_op_threads: int = 1,
        rss: Callable[[], int] = process_rss,
        observers: Callable[[str, str], BatchObserver] | None = None,
        hooks: LoadHooks | None = None,
        opener: SessionOpener | None = None,
    ) -> None:
        self.repository = repository
        self.budget = memory_budget_bytes
        self.pool = pool
        self.stats = ModelCacheStats()
        self.loader = ModelLoader(pool, batching, intra_op_threads, rss, observers, hooks, opener)
        self._intra_op_threads = intra_op_threads
        self._rss = rss
        self._neighbour: ModelCache | None = None  # the cache sharing this one's budget (serving ⇄ shadow)
        self._evicts_neighbour = False  # whether this cache may evict the neighbour's idle models
        self._loaded: dict[tuple[str, str], LoadedModel] = {}
        self._latest: dict[str, LoadedModel] = {}
        self._loads: SingleFlight[tuple[str, str], LoadedModel] = SingleFlight()
        self._failed: dict[tuple[str, str], str] = {}
        self._evicted: set[tuple[str, str]] = set()
        self._load_lock = asyncio.Lock()
        self._reserved = 0
        self._drain_tasks: set[asyncio.Task[None]] = set()
        self._draining: set[LoadedModel] = set()

    def use_source(self, repository: ModelRepository, opener: SessionOpener) -> None:
        """Serves models from another repository, opened another way (a node's encrypted installed store).

        Raises:
            ConfigError: A model is already loaded or loading from the current source.
        """
        if self._loaded or self._draining or self._loads.keys():
            raise ConfigError("the model cache's source can only change before any model is loaded")
        self.repository = repository
        self.loader.opener = opener

    def shadow_cache(self, repository: ModelRepository, opener: SessionOpener) -> ModelCache:
        """A cache of shadow versions beside this one, sharing its budget, run pool and load lock.

        Each cache counts the other's used bytes against the budget; this one may evict the
        shadow cache's idle models (shadow work yields first), the shadow cache never evicts
        this one's (its load is refused with :class:`~services.errors.MemoryBudgetError`).
        Its batchers are not observed by this cache's metrics.

        Raises:
            ConfigError: This cache already has a shadow cache, or is one.
        """
        if self._neighbour is not None:
            raise ConfigError("a model cache has at most one shadow cache")
        shadow = ModelCache(
            repository, self.pool, self.batching, self.budget, self._intra_op_threads, self._rss, opener=opener
        )
        shadow._load_lock = self._load_lock  # one load at a time per node: footprints stay measurable
        shadow.loader.throttle = self.loader.throttle  # a hot node's shadows shrink with its serving models
        shadow.loader.run_observers = self.loader.run_observers  # and their runs count (energy) like any other
        shadow._neighbour, self._neighbour = self, shadow
        self._evicts_neighbour = True
        return shadow

    @property
    def throttle(self) -> Throttle:
        """The limits in force on this node's engine (shared with its shadow cache)."""
        return self.loader.throttle

    def throttle_to(self, throttle: Throttle) -> None:
        """Puts ``throttle``'s limits in force: batch caps from the next batch, run slots from the next run.

        The node's batchers and its shadow cache keep reading the same object, so it is updated in place.
        """
        current = self.loader.throttle
        for limit in fields(Throttle):  # every field, so a new limit cannot be forgotten here
            setattr(current, limit.name, getattr(throttle, limit.name))
        self.pool.set_limit(current.slots(self.pool.slots))

    @property
    def budget_used_bytes(self) -> int:
        """What counts against the budget: :attr:`used_bytes` plus those of the cache sharing the budget."""
        return self.used_bytes + (self._neighbour.used_bytes if self._neighbour is not None else 0)

    def loaded_model(self, name: str) -> LoadedModel | None:
        """The newest loaded version of ``name``, or None; loads nothing and counts no hit."""
        return self._latest.get(name)

    @property
    def batching(self) -> BatchingConfig:
        """The tier-wide batching defaults (before any model's overrides)."""
        return self.loader.batching

    @property
    def used_bytes(self) -> int:
        """Footprints of the loaded models, of retired ones still draining, and of loads in progress."""
        loaded = sum(m.footprint_bytes for m in self._loaded.values())
        return loaded + sum(m.footprint_bytes for m in self._draining) + self._reserved

    async def close(self) -> None:
        """Drains every batcher (at shutdown, pinned models too)."""
        for model in list(self._loaded.values()):
            self._retire(model)
        for model in list(self._draining):
            self._drain(model)
        await asyncio.gather(*self._drain_tasks, return_exceptions=True)

    def holds(self, name: str) -> bool:
        """Whether the repository has any version of ``name`` (loaded or not)."""
        return name in self._latest or bool(self.repository.versions(name))

    def ready(self, name: str, version: str = "") -> bool:
        """Whether a version (the newest loaded when empty) is loaded and warm."""
        return name in self._latest if not version else (name, version) in self._loaded

    async def get(self, name: str, version: str = "") -> LoadedModel:
        """Returns a ready model version, loading it if needed.

        Raises:
            InvalidArgumentError: The name or version is malformed.
            ModelNotFoundError: The repository does not have it.
            ModelNotReadyError: It exists but cannot be loaded or warmed up.
            MemoryBudgetError: It does not fit in the memory budget now.
        """
        model = self._latest.get(name) if not version else self._loaded.get((name, version))
        if model is not None and not version and self.loader.throttle.prefer_int8:
            preferred = self._int8_of(name)
            if preferred is not None and preferred is not model:
                # The newest stays as recently used as the variant serving for it: it serves
                # again once the node cools, so it must not become the idle one to evict.
                model.last_used = asyncio.get_running_loop().time()
                model = preferred
        if model is not None:
            self.stats.hits += 1
            model.last_used = asyncio.get_running_loop().time()
            return model
        entry = self.repository.resolve(name, version)
        failure = self._failed.get((entry.name, entry.version))
        if failure is not None:
            raise ModelNotReadyError(failure)
        self.stats.misses += 1
        return await self._load(entry)

    def _int8_of(self, name: str) -> LoadedModel | None:
        """The newest loaded int8 variant of ``name`` (its signed ``edgecascade.variant``), if any."""
        int8 = [
            m
            for (held, _), m in self._loaded.items()
            if held == name and is_int8(m.entry.properties.get(VARIANT_PROPERTY, ""))
        ]
        return max(int8, key=lambda m: int(m.version)) if int8 else None

    async def load(self, name: str) -> LoadedModel:
        """Loads (or reloads) the newest version of ``name``; swaps it in once warm.

        "Newest" is the repository's to say (its default for ``resolve``): a repository may name a
        lower version than one loaded (an installed store reverting), and that one then serves.

        Raises:
            ModelNotFoundError: The repository does not have the model.
            ModelNotReadyError: It cannot be loaded or warmed up.
            MemoryBudgetError: It does not fit in the memory budget now.
        """
        return await self._load(self.repository.resolve(name), force=True)

    def unload(self, name: str) -> None:
        """Releases every loaded version of ``name``; requests holding one finish on it.

        Raises:
            ModelNotFoundError: ``name`` is neither loaded nor in the repository.
        """
        models = [m for k, m in self._loaded.items() if k[0] == name]
        if not models and not self.repository.versions(name):
            raise ModelNotFoundError(f"model '{name}' is not in this repository")
        for model in models:
            self._retire(model)

    def release(self, model: LoadedModel) -> None:
        """Releases one loaded version (:meth:`unload` releases them all); nothing when it is not loaded."""
        if self._loaded.get((model.name, model.version)) is model:
            self._retire(model)

    async def preload(self) -> None:
        """Loads the newest version of every model not loaded yet; failures are recorded, not raised."""
        for name in self.repository.names():
            if name in self._latest:
                continue  # already serving (an updater's recovery loaded it)
            with contextlib.suppress(EdgecascadeError):
                await self.load(name)

    def index(self) -> list[IndexEntry]:
        """Every model version in the repository with its state."""
        rows: list[IndexEntry] = []
        for entry in self.repository.entries():
            key = (entry.name, entry.version)
            if key in self._loaded:
                rows.append(IndexEntry(entry.name, entry.version, ModelState.READY))
            elif self._loads.in_flight(key):
                rows.append(IndexEntry(entry.name, entry.version, ModelState.LOADING))
            else:
                reason = self._failed.get(key) or ("evicted to make room" if key in self._evicted else "not loaded")
                rows.append(IndexEntry(entry.name, entry.version, ModelState.UNAVAILABLE, reason))
        return rows

    def loaded(self) -> list[LoadedModel]:
        """The loaded model versions."""
        return list(self._loaded.values())

    @contextlib.asynccontextmanager
    async def use(self, model: LoadedModel) -> AsyncIterator[LoadedModel]:
        """Pins a model (no eviction) for the duration of a multi-step request such as a stream."""
        model.pins += 1
        try:
            yield model
        finally:
            model.pins -= 1
            model.last_used = asyncio.get_running_loop().time()
            if model.retired and not model.pins:
                self._drain(model)

    async def run(
        self,
        model: LoadedModel,
        inputs: Mapping[str, np.ndarray[Any, Any]],
        outputs: Sequence[str] = (),
        deadline: float | None = None,
        priority: int = 0,
    ) -> dict[str, np.ndarray[Any, Any]]:
        """Runs one request through the model's batcher.

        Raises:
            QueueFullError: The model's queue is full.
            DeadlineExceededError: The deadline passed, or could not be met, before it ran.
            InvalidArgumentError: Bad priority, or the model rejected the input values.
        """
        loop = asyncio.get_running_loop()
        if deadline is None:
            deadline = loop.time() + model.batcher.config.default_timeout_us / 1e6
        model.last_used = loop.time()
        return await model.batcher.submit(inputs, tuple(outputs), deadline, priority)

    def _admit(self, entry: ModelEntry, footprint: int) -> None:
        what = f"model '{entry.name}' version {entry.version}"
        if footprint > self.budget:
            self.stats.refusals += 1
            raise MemoryBudgetError(
                f"{what} needs about {megabytes(footprint)}, "
                f"more than this node's memory budget of {megabytes(self.budget)}"
            )
        while self.budget_used_bytes + footprint > self.budget:
            victim = self._victim()
            if victim is None:
                self.stats.refusals += 1
                free = max(self.budget - self.budget_used_bytes, 0)
                held = "every loaded model is in use"
                if self._neighbour is not None and not self._evicts_neighbour and self._neighbour.used_bytes:
                    held = f"the serving models hold {megabytes(self._neighbour.used_bytes)} and shadow work yields"
                raise MemoryBudgetError(
                    f"{what} needs about {megabytes(footprint)}; only {megabytes(free)} of the budget is free "
                    f"and {held}"
                )
            victim.evict()

    def _victim(self) -> _Victim | None:
        """The idle model to evict next: the neighbour's (shadow) ones first when this cache may, then its own, LRU."""
        caches = [self._neighbour, self] if self._neighbour is not None and self._evicts_neighbour else [self]
        for cache in caches:
            assert cache is not None
            idle = [m for m in cache._loaded.values() if not m.busy]
            if idle:
                return _Victim(cache, min(idle, key=lambda m: m.last_used))
        return None

    def _evict(self, model: LoadedModel) -> None:
        self._evicted.add((model.name, model.version))
        self.stats.evictions += 1
        self._retire(model)

    def _retire(self, model: LoadedModel) -> None:
        """Takes a version out of service; its batcher drains, then memory is released."""
        key = (model.name, model.version)
        if self._loaded.get(key) is model:
            del self._loaded[key]
        if self._latest.get(model.name) is model:
            del self._latest[model.name]
            newest = max(
                (m for k, m in self._loaded.items() if k[0] == model.name), key=lambda m: int(m.version), default=None
            )
            if newest is not None:
                self._latest[model.name] = newest
        model.retired = True
        # A busy model's memory stays counted until its drain ends (an idle one
        # has nothing to finish); a model pinned by a stream keeps serving that
        # stream and drains when the last pin goes.
        if model.busy:
            self._draining.add(model)
        if not model.pins:
            self._drain(model)

    def _drain(self, model: LoadedModel) -> None:
        if model.draining:
            return
        model.draining = True

        async def drain() -> None:
            try:
                await model.batcher.close()
            finally:
                self._draining.discard(model)

        task = asyncio.create_task(drain(), name=f"drain {model.name} v{model.version}")
        self._drain_tasks.add(task)
        task.add_done_callback(self._drain_tasks.discard)

    async def _load(self, entry: ModelEntry, force: bool = False) -> LoadedModel:
        key = (entry.name, entry.version)
        if not force and key in self._loaded:
            return self._loaded[key]
        # The load is a task of its own: a caller that gives up (its deadline
        # passed) neither cancels it nor the other callers' wait.
        return await self._loads.run(
            key, lambda: self._load_and_install(entry, newest=force), name=f"load {entry.name} v{entry.version}"
        )

    async def _load_and_install(self, entry: ModelEntry, newest: bool = False) -> LoadedModel:
        key = (entry.name, entry.version)
        try:
            model = await self._load_admitted(entry)
        except EdgecascadeError as exc:
            if not isinstance(exc, MemoryBudgetError):
                self._failed[key] = exc.message
            raise
        self._failed.pop(key, None)
        self._evicted.discard(key)
        previous = self._loaded.get(key)
        self._loaded[key] = model
        latest = self._latest.get(entry.name)
        if latest is None or newest or int(entry.version) >= int(latest.version):
            self._latest[entry.name] = model
            if latest is not None and latest is not model:
                self._retire(latest)  # hot swap: the old version drains, then is released
        if previous is not None and previous is not model and not previous.retired:
            self._retire(previous)
        model.last_used = asyncio.get_running_loop().time()
        self.stats.loads += 1
        return model

    async def _load_admitted(self, entry: ModelEntry) -> LoadedModel:
        loaded = await self.loader.load(entry, self._admission)
        footprint = loaded.footprint
        return LoadedModel(entry, loaded.session, loaded.tokenizer, loaded.batcher, footprint.total, footprint.measured)

    @contextlib.asynccontextmanager
    async def _admission(self, entry: ModelEntry, estimate: int) -> AsyncIterator[None]:
        """Holds ``estimate`` bytes of the budget (evicting if needed) while a load opens; one load at a time."""
        async with self._load_lock:
            self._admit(entry, estimate)
            self._reserved += estimate
            try:
                yield
            finally:
                self._reserved -= estimate
