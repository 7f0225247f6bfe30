"""Turns a model version from the repository into parts ready to serve: session, tokenizer, batcher.

Steps of :meth:`ModelLoader.load`, in order (any failure ends the load, and
nothing it made is kept):

1. Refuse metadata whose ``max_batch_size`` is below 1 (activations are
   budgeted at that many rows, and the batcher needs at least one).
2. Estimate the footprint from the stored size (:func:`~services.engine.memory.estimate_footprint`).
3. Inside the caller's *admission* for that estimate (the cache reserves the
   memory, evicting if it must, and loads one model at a time), in a thread of
   its own (not a run slot: serving goes on meanwhile): open the session (from the :class:`SessionOpener`),
   build the tokenizer of a generator, warm the model up on zeros, then call
   :meth:`LoadHooks.opened`. The process's resident memory is read before and
   after, so the hook's runs (golden vectors) count in the footprint too.
4. The measured gain replaces the estimate unless it is smaller than the
   stored size (the allocator reused freed memory and the gain says nothing);
   activations at ``max_batch_size`` rows are added; then
   :meth:`LoadHooks.measured` is called.
5. The tier's batching settings with the model's ``edgecascade.batching.*``
   metadata overrides, ``max_batch_size`` capped at the model's own, make its
   :class:`~services.engine.batcher.DynamicBatcher`, started.

A hook refuses a model by raising :class:`~services.errors.ModelNotReadyError`;
any other :class:`~services.errors.EdgecascadeError` from a hook is turned into
one (so the cache records the version as failed and callers go upstream).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any, Protocol, TypeVar

import numpy as np

from services.engine.batcher import BatchingConfig, BatchObserver, DynamicBatcher
from services.engine.generation import CHAR_LM_TASK, CharTokenizer
from services.engine.memory import activation_bytes, estimate_footprint, process_rss
from services.engine.model_repository import ModelEntry
from services.engine.model_stats import ModelStats
from services.engine.onnx_session import OnnxSession
from services.engine.run_pool import RunPool
from services.engine.throttle import Throttle
from services.errors import ConfigError, EdgecascadeError, ModelNotReadyError
from services.tensors import DATATYPES

BATCHING_PROPERTY_PREFIX = "edgecascade.batching."

T = TypeVar("T")

# Given the estimate, holds the memory for a load while the session opens.
Admission = Callable[[ModelEntry, int], contextlib.AbstractAsyncContextManager[None]]


class SessionOpener(Protocol):
    """Where a model's bytes come from (the repository's file today; decrypted bytes later)."""

    def size(self, entry: ModelEntry) -> int:
        """The model's size as stored, in bytes (for the footprint estimate before loading).

        Raises:
            OSError: The model cannot be read.
        """

    def open(self, entry: ModelEntry, intra_op_threads: int) -> OnnxSession:
        """Opens the model (blocking; runs in the run pool).

        Raises:
            ModelNotReadyError: onnxruntime cannot load it.
        """


class FileOpener:
    """Opens the ``.onnx`` file the repository entry names."""

    def size(self, entry: ModelEntry) -> int:
        """The file's size in bytes.

        Raises:
            OSError: The file cannot be read.
        """
        return entry.model_file.stat().st_size

    def open(self, entry: ModelEntry, intra_op_threads: int) -> OnnxSession:
        """Opens the file with onnxruntime.

        Raises:
            ModelNotReadyError: onnxruntime cannot load it.
        """
        return OnnxSession(entry.model_file, intra_op_threads)


@dataclass(frozen=True)
class Footprint:
    """The memory a model version takes, as the cache will count it.

    Attributes:
        estimate: Predicted before loading (its metadata's peak, or from its size).
        gained: What the process's resident memory grew by while it opened and warmed up.
        total: What the cache counts: ``gained`` (or ``estimate`` when not measured) plus activations.
        measured: Whether ``gained`` was trusted over the estimate.
    """

    estimate: int
    gained: int
    total: int
    measured: bool


class LoadHooks(Protocol):
    """Plug points of a load (an updater checks golden vectors and signed memory figures here)."""

    def opened(self, entry: ModelEntry, session: OnnxSession) -> None:
        """Called after the session opened and warmed up, in a run-pool thread holding a run slot.

        Raises:
            ModelNotReadyError: To refuse the model.
        """

    def measured(self, entry: ModelEntry, footprint: Footprint) -> None:
        """Called on the event loop once the footprint is known.

        Raises:
            ModelNotReadyError: To refuse the model.
        """


class NoHooks:
    """Accepts every model."""

    def opened(self, entry: ModelEntry, session: OnnxSession) -> None:
        """Accepts."""

    def measured(self, entry: ModelEntry, footprint: Footprint) -> None:
        """Accepts."""


@dataclass(frozen=True)
class PreparedModel:
    """What a load produced: a warm session and a started batcher."""

    entry: ModelEntry
    session: OnnxSession
    tokenizer: CharTokenizer | None
    batcher: DynamicBatcher
    footprint: Footprint


class ModelLoader:
    """Opens, warms up, measures and wires up model versions (see the module docstring).

    Args:
        pool: The process-wide run pool (loads and runs share its thread budget).
        batching: Tier-wide batching defaults (a model's metadata may override them).
        intra_op_threads: onnxruntime threads per run.
        rss: Returns the process's resident memory (to measure real footprints).
        observers: Makes the timing observer of one model version (name, version), for metrics.
        hooks: Called during each load; may refuse a model.
        opener: Where the models' bytes come from.
    """

    def __init__(
        self,
        pool: RunPool,
        batching: BatchingConfig,
        intra_op_threads: int = 1,
        rss: Callable[[], int] = process_rss,
        observers: Callable[[str, str], BatchObserver] | None = None,
        hooks: LoadHooks | None = None,
        opener: SessionOpener | None = None,
    ) -> None:
        self.batching = batching
        self.hooks: LoadHooks = hooks or NoHooks()
        self.opener: SessionOpener = opener or FileOpener()
        self._pool = pool
        self._intra_op_threads = intra_op_threads
        self._rss = rss
        self._observers = observers
        # More observers of each version's runs, made from its entry and whether it generates text.
        self.run_observers: list[Callable[[ModelEntry, bool], BatchObserver]] = []
        self.throttle = Throttle()

    async def load(self, entry: ModelEntry, admission: Admission) -> PreparedModel:
        """Loads one model version inside ``admission`` for its estimated footprint.

        Raises:
            ModelNotReadyError: Bad metadata, the model cannot be opened or warmed up, or a hook refused it.
            MemoryBudgetError: From ``admission``: it does not fit.
        """
        what = f"model '{entry.name}' version {entry.version}"
        if entry.max_batch_size < 1:
            # Admission budgets activations at this many rows, and the batcher needs at least one.
            raise ModelNotReadyError(f"{what}: metadata max_batch_size must be at least 1, got {entry.max_batch_size}")
        stored = self.opener.size(entry)
        estimate = estimate_footprint(stored, entry.properties)
        async with admission(entry, estimate):
            # In a thread of its own, not in a run slot: a load (and its warm-up and golden
            # vectors) can take seconds, and on a device with one slot every model's requests
            # would wait behind it. The admission lock keeps loads one at a time.
            before = self._rss()
            session, tokenizer = await asyncio.to_thread(self._open, entry)
            gained = self._rss() - before
        measured = gained >= stored
        total = (gained if measured else estimate) + activation_bytes(session.signature, entry.max_batch_size)
        footprint = Footprint(estimate, gained, total, measured)
        _checked(self.hooks.measured, entry, footprint)
        config = self.batching_config(entry)
        observers = [self._observers(entry.name, entry.version)] if self._observers else []
        observers += [make(entry, tokenizer is not None) for make in self.run_observers]
        batcher = DynamicBatcher(
            f"'{entry.name}' version {entry.version}",
            config,
            self._pool,
            session.run,
            session.signature.batchable,
            ModelStats(),
            observers,
            self.throttle,
        )
        batcher.start()
        return PreparedModel(entry, session, tokenizer, batcher, footprint)

    def batching_config(self, entry: ModelEntry) -> BatchingConfig:
        """The batching settings of ``entry``: the tier's, its metadata's overrides, capped at its max_batch_size.

        Raises:
            ModelNotReadyError: The metadata names an unknown or invalid batching setting.
        """
        overrides = {
            k[len(BATCHING_PROPERTY_PREFIX) :]: int(v)
            for k, v in entry.properties.items()
            if k.startswith(BATCHING_PROPERTY_PREFIX) and v.lstrip("-").isdigit()
        }
        config = self.batching
        if overrides:
            try:
                config = config.with_overrides(overrides, f"model '{entry.name}' version {entry.version} metadata")
            except ConfigError as exc:
                raise ModelNotReadyError(exc.message) from None
        if config.max_batch_size > entry.max_batch_size:
            # Activations are budgeted at the model's max_batch_size: no batch may be larger.
            config = replace(config, max_batch_size=entry.max_batch_size)
        return config

    def _open(self, entry: ModelEntry) -> tuple[OnnxSession, CharTokenizer | None]:
        session = self.opener.open(entry, self._intra_op_threads)
        tokenizer = None
        if entry.task == CHAR_LM_TASK:
            tokenizer = CharTokenizer.from_properties({**session.metadata, **entry.properties})
        _warm_up(session, entry)
        _checked(self.hooks.opened, entry, session)
        return session, tokenizer


def _checked(hook: Callable[[ModelEntry, T], None], entry: ModelEntry, arg: T) -> None:
    """Calls a hook; a refusal of another kind than ModelNotReadyError becomes one."""
    try:
        hook(entry, arg)
    except ModelNotReadyError:
        raise
    except EdgecascadeError as exc:
        raise ModelNotReadyError(f"model '{entry.name}' version {entry.version} was refused: {exc.message}") from exc


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
