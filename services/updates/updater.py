"""The updater: installs assigned model versions on a node, durably, verifiably, without ever bricking it.

One update per model at a time (:class:`~services.single_flight.SingleFlight`
keyed by model name); all blocking work — ngclient, file writes with fsync,
decryption, onnxruntime — runs in worker threads (the model cache runs
onnxruntime in its run pool), never on the event loop. Each step is journalled
(:mod:`services.updates.update_journal`) before the next begins:

1. ``assigned``: the assignment and its wrapped key are recorded.
2. Gates, before a byte of the blob is fetched, from the signed facts
   (:meth:`ModelFetcher.resolve`): the target path is the assignment's, the grant
   is for the signed content key, the hardware class is listed, this node's
   onnxruntime is at least the signed minimum, the signed peak memory (at the
   variant's max batch size) fits the node's budget. Free disk must hold the
   signed length (else the update waits: not the version's fault).
3. ``downloading``: the encrypted blob into staging, resumable, capped at the
   signed length, verified against the signed length and hash; then the golden vectors.
4. ``verified``: the grant is unwrapped with the node's X25519 key, the blob
   decrypted in memory and its plaintext checked against the signed sha256;
   the blob, grant, facts and golden vectors go to the installed store (uncommitted).
5. ``trial``: the model cache loads the version from the store (decrypting in
   memory again, onnxruntime from bytes), warms it up, and :class:`TrialHooks`
   runs the signed golden vectors (signed atol/rtol) and compares the measured
   footprint with the signed peak: at most ``(1 + footprint_tolerance) × peak +
   footprint_slack_bytes`` (defaults 50 % and 16 MiB: the profile was measured on
   another machine, and the first session of a process also pays onnxruntime's
   own start-up). A footprint the loader could not measure (the allocator reused
   freed memory) is accepted. Once warm and accepted, the cache swaps it in: new
   requests go to it, requests in flight finish on the old version.
6. ``committed``: the store's commit marker, then the journal. The previous
   committed version stays in the store (encrypted) for a local revert.

What ends an update:

* A check the version fails (a gate, the grant, decryption, the plaintext
  digest, onnxruntime, warm-up, golden vectors, footprint, malformed signed
  facts) → ``refused`` with its reason; nothing of it is kept, and it is not
  tried again until the assignment (version, variant) changes.
* Anything that is not the version's fault — upstream unreachable, metadata
  expired or refused (rollback, freeze, bad signatures), a blob from the mirror
  that does not match its signed hash, a full disk, a memory budget full of busy
  models — leaves the state as it is with ``last_error`` set, and the update is
  retried by a later :meth:`Updater.apply` once its backoff (exponential, with
  jitter) has passed. Serving never stops for it: expired metadata blocks new
  installs, never what is installed.

Crash safety (:meth:`Updater.recover`, at start): the store serves its last
committed version; uncommitted versions not named by an unfinished journal entry
are removed; a journal entry behind a commit marker is settled as committed; and
unfinished updates resume (downloads resume from their partial file, a verified
version goes to trial again).

Domain core: no transport here. The network is the fetcher's artifact source;
the retry schedule is this module's (``tenacity`` is a transport adapter's tool).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import logging
import random
import re
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from services.engine.memory import megabytes
from services.engine.model_cache import ModelCache
from services.engine.model_loader import Footprint, LoadHooks
from services.engine.model_repository import ModelEntry, check_model_name, check_version
from services.engine.onnx_session import OnnxSession
from services.errors import (
    ConfigError,
    EdgecascadeError,
    IntegrityError,
    InvalidArgumentError,
    MemoryBudgetError,
    ModelNotFoundError,
    ModelNotReadyError,
    PreconditionError,
)
from services.single_flight import SingleFlight
from services.updates.checkin import AssignedVariant, InstalledModel
from services.updates.golden_vectors import GoldenVectors
from services.updates.identity import NodeKeys
from services.updates.installed_store import (
    DecryptingOpener,
    InstalledStore,
    StoredVersion,
    StoreRepository,
    open_plaintext,
    signed_peak_bytes,
)
from services.updates.model_fetcher import ModelFetcher
from services.updates.tuf_client import ModelTarget
from services.updates.update_journal import Assignment, JournalEntry, UpdateJournal, UpdateState
from services.updates.variant_facts import target_path

log = logging.getLogger("edgecascade.updates")

FOOTPRINT_TOLERANCE = 0.5
FOOTPRINT_SLACK_BYTES = 16 * 1024 * 1024

__all__ = [
    "FOOTPRINT_SLACK_BYTES",
    "FOOTPRINT_TOLERANCE",
    "Assignment",
    "Backoff",
    "TrialHooks",
    "UpdateState",
    "Updater",
    "check_golden",
]


@dataclass(frozen=True)
class Backoff:
    """When to try an update again after a failure that was not the version's fault.

    The n-th consecutive failure waits ``min(max_s, initial_s × 2^(n-1))``, times a
    random factor in [0.5, 1] so that a fleet does not retry in step.
    """

    initial_s: float = 2.0
    max_s: float = 300.0

    def delay(self, failures: int) -> float:
        """Seconds to wait after ``failures`` consecutive failures (≥ 1)."""
        base = min(self.max_s, self.initial_s * float(1 << min(max(failures - 1, 0), 30)))
        jitter: float = random.uniform(0.5, 1.0)  # spreads a fleet's retries, not cryptography
        return base * jitter


class _RefusedError(Exception):
    """The version failed a check: refuse it."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class _LaterError(Exception):
    """Not the version's fault: keep the state, try again after the backoff."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def check_golden(session: OnnxSession, golden: GoldenVectors, what: str) -> None:
    """Runs the golden inputs and compares every golden output within the signed tolerance.

    Raises:
        ModelNotReadyError: An output is missing, of another shape, or differs by more than atol + rtol × |expected|.
    """
    names = list(golden.outputs)
    try:
        got = session.run(session.prepare(golden.inputs, names), names)
    except EdgecascadeError as exc:
        raise ModelNotReadyError(f"{what} cannot run its signed golden vectors: {exc.message}") from exc
    for name, expected in golden.outputs.items():
        actual = got[name]
        if actual.shape != expected.shape:
            raise ModelNotReadyError(
                f"{what} failed its golden vectors: output '{name}' has shape {list(actual.shape)}, "
                f"signed {list(expected.shape)}"
            )
        if object in (expected.dtype, actual.dtype):
            if not np.array_equal(actual, expected):
                raise ModelNotReadyError(f"{what} failed its golden vectors: output '{name}' differs")
            continue
        if not np.allclose(actual, expected, atol=golden.atol, rtol=golden.rtol):
            diff = float(np.max(np.abs(actual.astype(np.float64) - expected.astype(np.float64))))
            raise ModelNotReadyError(
                f"{what} failed its golden vectors: output '{name}' differs from the signed one by up to "
                f"{diff:.3g} (tolerance atol {golden.atol}, rtol {golden.rtol})"
            )


@dataclass(frozen=True)
class _Expectation:
    golden: GoldenVectors
    signed_peak: int | None


class TrialHooks:
    """Load hooks that check a version on trial; every load also goes through the hooks they wrap.

    Args:
        inner: The cache's hooks before the updater's.
        tolerance: How much the measured footprint may exceed the signed peak, as a fraction.
        slack_bytes: A fixed allowance on top.
    """

    def __init__(self, inner: LoadHooks, tolerance: float, slack_bytes: int) -> None:
        self.inner = inner
        self.tolerance = tolerance
        self.slack_bytes = slack_bytes
        self._trials: dict[tuple[str, str], _Expectation] = {}

    def expect(self, name: str, version: str, golden: GoldenVectors, signed_peak: int | None) -> None:
        """Checks the next loads of this version."""
        self._trials[(name, version)] = _Expectation(golden, signed_peak)

    def forget(self, name: str, version: str) -> None:
        """Stops checking this version."""
        self._trials.pop((name, version), None)

    def opened(self, entry: ModelEntry, session: OnnxSession) -> None:
        """Runs the golden vectors of a version on trial (in a run-pool thread).

        Raises:
            ModelNotReadyError: They do not match.
        """
        self.inner.opened(entry, session)
        trial = self._trials.get((entry.name, entry.version))
        if trial is not None:
            check_golden(session, trial.golden, f"model '{entry.name}' version {entry.version}")

    def measured(self, entry: ModelEntry, footprint: Footprint) -> None:
        """Compares a version on trial's measured footprint with its signed peak.

        Raises:
            ModelNotReadyError: It takes more than the signed peak allows.
        """
        self.inner.measured(entry, footprint)
        trial = self._trials.get((entry.name, entry.version))
        if trial is None or trial.signed_peak is None or not footprint.measured:
            return
        allowed = int(trial.signed_peak * (1 + self.tolerance)) + self.slack_bytes
        if footprint.total > allowed:
            raise ModelNotReadyError(
                f"model '{entry.name}' version {entry.version} takes {megabytes(footprint.total)} once loaded, "
                f"more than its signed peak of {megabytes(trial.signed_peak)} allows "
                f"({megabytes(allowed)} with the tolerance)"
            )


def _invalid(a: Assignment) -> str:
    """Why an assignment cannot be journalled or installed (its name and version become file names), or ""."""
    try:
        check_model_name(a.name)
        check_version(a.version)
    except InvalidArgumentError as exc:
        return exc.message
    return ""


def _version_tuple(text: str) -> tuple[int, ...]:
    """``1.32.0`` → ``(1, 32, 0)``; reading stops at the first part that does not start with a digit."""
    parts = []
    for part in text.strip().split("."):
        match = re.match(r"[0-9]+", part)
        if match is None:
            break
        parts.append(int(match.group()))
    return tuple(parts)


class Updater:
    """Installs assignments on one node (see the module docstring).

    Args:
        node_id: This node's id (bound into its key grants).
        keys: This node's keys (the X25519 key unwraps grants).
        fetcher: Resolves and downloads signed variants.
        store: The installed store; ``cache`` must read from it (``store.repository()``,
            ``store.opener(node_id, keys.agreement)``).
        cache: The node's model cache; the updater adds its :class:`TrialHooks` to the cache's hooks.
        budget: The node's memory budget in bytes (the signed peak must fit).
        hardware_class: This node's hardware class (``cpu-x86_64``).
        onnxruntime_version: This node's onnxruntime version.
        free_disk_fn: Free bytes where the state directory is.
        journal: The journal (``<store root>/../journal`` by default).
        backoff: The retry schedule for failures that are not the version's.
        clock: Monotonic seconds (tests pass a fake one).
        on_state: Called after each state is durably recorded (tests inject crashes here).
        on_failure: Called with the assignment, ``refused`` or ``internal_error``, and the reason, when an
            update is refused or fails unexpectedly (the node reports it as an anomaly); not for a postponement.
        footprint_tolerance, footprint_slack_bytes: How far the measured footprint may exceed the signed peak.

    Raises:
        ConfigError: The cache does not read from ``store`` through its decrypting opener.
    """

    def __init__(
        self,
        node_id: str,
        keys: NodeKeys,
        fetcher: ModelFetcher,
        store: InstalledStore,
        cache: ModelCache,
        budget: int,
        hardware_class: str,
        onnxruntime_version: str,
        free_disk_fn: Callable[[], int],
        *,
        journal: UpdateJournal | None = None,
        backoff: Backoff | None = None,
        clock: Callable[[], float] = time.monotonic,
        on_state: Callable[[UpdateState, Assignment], None] | None = None,
        on_failure: Callable[[Assignment, str, str], None] | None = None,
        footprint_tolerance: float = FOOTPRINT_TOLERANCE,
        footprint_slack_bytes: int = FOOTPRINT_SLACK_BYTES,
    ) -> None:
        if not isinstance(cache.repository, StoreRepository) or cache.repository.store is not store:
            raise ConfigError("the updater's model cache must read from its installed store (store.repository())")
        opener = cache.loader.opener
        if not isinstance(opener, DecryptingOpener) or opener.store is not store:
            raise ConfigError("the updater's model cache must open models with store.opener(node_id, key)")
        self.node_id = node_id
        self.fetcher = fetcher
        self.store = store
        self.cache = cache
        self.budget = budget
        self.hardware_class = hardware_class
        self.onnxruntime_version = onnxruntime_version
        self.journal = journal or UpdateJournal(store.root.parent / "journal")
        self.hooks = TrialHooks(cache.loader.hooks, footprint_tolerance, footprint_slack_bytes)
        cache.loader.hooks = self.hooks
        self._keys = keys
        self._free_disk = free_disk_fn
        self._backoff = backoff or Backoff()
        self._clock = clock
        self._on_state = on_state
        self._on_failure = on_failure
        self._flights: SingleFlight[str, None] = SingleFlight()
        # name → (assignment key, consecutive failures, monotonic time of the next try)
        self._retry: dict[str, tuple[tuple[str, str], int, float]] = {}

    # -- public ------------------------------------------------------------------------------------------------

    async def apply(self, assignments: Sequence[AssignedVariant | Assignment]) -> None:
        """Works towards the assigned versions: one update per model, in parallel across models.

        Returns once every update it started (or joined) has ended — committed,
        refused, or postponed (see :meth:`installed`). Refused assignments and
        those waiting out their backoff are skipped. Never raises for an update's failure.
        An assignment whose model name or version is not valid (they become file names) is
        ignored; the reason is noted on the model's journal entry when the name is valid.
        (This is :class:`~services.updates.checkin.UpdateTarget`'s ``apply``.)
        """
        wanted = []
        for assigned in assignments:
            a = Assignment.of(assigned)
            problem = _invalid(a)
            if problem:
                await asyncio.to_thread(self._ignore, a, problem)
            else:
                wanted.append(a)
        due = [a for a in wanted if self._flights.in_flight(a.name) or await asyncio.to_thread(self._due, a)]
        await asyncio.gather(
            *(
                self._flights.run(a.name, functools.partial(self._update, a), name=f"update {a.name} v{a.version}")
                for a in due
            )
        )

    def installed(self) -> list[InstalledModel]:
        """What the node reports at check-in, per model.

        ``version`` and ``variant`` are what serves (the committed version; empty when none);
        ``state`` and ``last_error`` are those of the model's latest assignment (the journal's),
        ``committed`` when there is none. The assignment itself is ``journal.read(name)``.
        """
        journal = {e.assignment.name: e for e in self.journal.entries()}
        rows = []
        for name in sorted(set(self.store.names()) | set(journal)):
            committed = self.store.committed(name)
            entry = journal.get(name)
            rows.append(
                InstalledModel(
                    name=name,
                    version=committed.version if committed else "",
                    variant=committed.variant if committed else "",
                    state=entry.state.value if entry else UpdateState.COMMITTED.value,
                    last_error=entry.last_error if entry else "",
                )
            )
        return rows

    async def recover(self, resume: bool = True) -> list[InstalledModel]:
        """Brings the node back after a stop or a crash: serve the committed versions, then finish what was started.

        1. A journal entry whose version the store has committed is settled as committed.
        2. Uncommitted versions in the store that no unfinished ``verified``/``trial`` entry names are removed.
        3. Every model's committed version is loaded (decrypted from its blob); one that no longer
           opens as signed is replaced by the previous committed version (a local revert).
        4. With ``resume``, unfinished updates continue (:meth:`resume`).
        """
        entries = await asyncio.to_thread(self.journal.entries)
        keep: set[tuple[str, str]] = set()
        for entry in entries:
            a = entry.assignment
            committed = self.store.committed(a.name)
            if committed is not None and (committed.version, committed.variant) == a.key:
                if entry.state is not UpdateState.COMMITTED:
                    await self._settle(a, UpdateState.COMMITTED)
                continue
            if entry.state.final:
                continue
            if entry.state in (UpdateState.VERIFIED, UpdateState.TRIAL):
                keep.add((a.name, a.version))
        removed = await asyncio.to_thread(self.store.clean, keep)
        for name, version in removed:
            log.info("model '%s' version %s was not committed before the restart; removed", name, version)
        for name in self.store.names():
            await self._serve_committed(name)
        if resume:
            await self.resume()
        return self.installed()

    async def resume(self) -> None:
        """Continues every unfinished journalled update (:meth:`apply` with their assignments)."""
        entries = await asyncio.to_thread(self.journal.entries)
        await self.apply([e.assignment for e in entries if not e.state.final])

    async def close(self) -> None:
        """Cancels the updates in flight (the node stops); each resumes from its journal at the next start.

        A download blocked in a worker thread ends when its artifact source is closed; its outcome is not recorded.
        """
        await self._flights.cancel_all()

    async def revert(self, name: str) -> InstalledModel:
        """Serves the previous committed version again (from its encrypted blob).

        Raises:
            PreconditionError: There is no previous version.
            ModelNotReadyError, MemoryBudgetError: It cannot be loaded (the current one keeps serving).
        """
        previous = self.store.previous(name)
        if previous is None:
            raise PreconditionError(f"model '{name}' has no previous version on this node to revert to")
        current = self.store.committed(name)
        await asyncio.to_thread(self.store.commit, name, previous.version)
        try:
            await self.cache.load(name)
        except EdgecascadeError:
            if current is not None:
                await asyncio.to_thread(self.store.commit, name, current.version)
            raise
        return next(m for m in self.installed() if m.name == name)

    async def remove(self, name: str) -> bool:
        """Takes a model off this node: unloads it, deletes its journal entry and every installed version.

        For an install that is no longer wanted at all (a shadow whose stage ended). Returns False,
        doing nothing, while an update of the model runs.

        The journal entry goes first, then the store, both in one worker-thread call that a cancelled
        caller does not stop (the thread runs on to its end). After
        a crash in between, what is left is committed versions with no journal entry: they serve as the
        store says until the next call finds them (:meth:`installed` lists them) and removes them. The
        other order could leave an entry saying "committed" for a version that is gone.

        Raises:
            InvalidArgumentError: The name is not valid.
            OSError: The files cannot be deleted.
        """
        if self._flights.in_flight(name):
            return False
        self._retry.pop(name, None)
        with contextlib.suppress(ModelNotFoundError):
            self.cache.unload(name)  # requests holding it finish on it
        removed = await asyncio.shield(asyncio.to_thread(self._remove_files, name))
        log.info("model '%s' removed from %s (versions: %s)", name, self.store.root, ", ".join(removed) or "none")
        return True

    def _remove_files(self, name: str) -> list[str]:
        """The journal entry, then the store's versions (in a worker thread)."""
        self.journal.remove(name)
        return self.store.remove(name)

    def _ignore(self, a: Assignment, problem: str) -> None:
        """Notes why an assignment is not even journalled, on its model's entry (once) when the name is valid."""
        reason = f"an assignment of version {a.version!r} ({a.variant!r}) was ignored: {problem}"
        try:
            entry = self.journal.read(a.name)
        except InvalidArgumentError:
            entry = None
        if entry is not None and entry.last_error == reason:
            return
        log.warning("model %r: %s", a.name, reason)
        if entry is not None:
            self.journal.note(entry, reason)

    # -- one update --------------------------------------------------------------------------------------------

    def _due(self, a: Assignment) -> bool:
        entry = self.journal.read(a.name)
        committed = self.store.committed(a.name)
        serving = committed is not None and (committed.version, committed.variant) == a.key
        if entry is not None and entry.assignment.key == a.key:
            if entry.state is UpdateState.REFUSED:
                return False
            if entry.state is UpdateState.COMMITTED and serving:
                return False
        elif serving:
            self._settle_sync(a, UpdateState.COMMITTED)  # journal lost or replaced: the store's marker is the truth
            return False
        retry = self._retry.get(a.name)
        return retry is None or retry[0] != a.key or self._clock() >= retry[2]

    async def _update(self, a: Assignment) -> None:
        what = f"model '{a.name}' version {a.version} ({a.variant})"
        try:
            entry = await asyncio.to_thread(self.journal.read, a.name)
            if entry is None or entry.assignment.key != a.key:
                entry = await self._record(a, UpdateState.ASSIGNED)
            elif entry.state.final:  # committed by the journal, but the store does not serve it: again
                entry = await self._settle(a, UpdateState.ASSIGNED)
            stored = self.store.get(a.name, a.version)
            # A rollback to the version kept from before (the previous committed one) needs no download.
            kept = stored is not None and stored.variant == a.variant and stored.commit_seq is not None
            usable = stored is not None and stored.variant == a.variant
            if entry.state in (UpdateState.VERIFIED, UpdateState.TRIAL) and not usable:
                log.warning("%s: its verified files are gone; starting the update again", what)
                entry = await self._record(a, UpdateState.ASSIGNED)
            if kept and entry.state in (UpdateState.ASSIGNED, UpdateState.DOWNLOADING):
                assert stored is not None
                await self._recheck_kept(a, stored, what)
            elif entry.state in (UpdateState.ASSIGNED, UpdateState.DOWNLOADING):
                stored = await self._fetch(a, what)
            assert stored is not None
            await self._trial(a, stored, what)
        except _RefusedError as refused:
            await self._refuse(a, refused.reason)
        except _LaterError as later:
            await self._postpone(a, later.reason)
        except Exception as exc:  # a bug or an unexpected failure: keep serving, retry later
            log.exception("%s: the update failed unexpectedly", what)
            reason = f"internal error ({type(exc).__name__}); see the node's log"
            if self._on_failure is not None:
                self._on_failure(a, "internal_error", reason)
            await self._postpone(a, reason)

    async def _fetch(self, a: Assignment, what: str) -> StoredVersion:
        installed = self.store.get(a.name, a.version)
        if installed is not None and installed.commit_seq is not None and installed.variant != a.variant:
            raise _RefusedError(
                f"{what}: version {a.version} is installed here as variant {installed.variant}; "
                "a variant change needs a new version"
            )
        target = await self._network(what, self.fetcher.resolve, a.name, a.version, a.variant)
        self._gate(a, target, what)
        await self._record(a, UpdateState.DOWNLOADING)
        download = await self._network(what, self.fetcher.download, target)
        golden = await self._network(what, self.fetcher.golden_vectors, target)
        facts = target.custom
        try:
            await asyncio.to_thread(self._check_plaintext, a, download.path, facts)
        except IntegrityError as exc:
            download.path.unlink(missing_ok=True)
            raise _RefusedError(exc.message) from exc
        golden_bytes = json.dumps(golden.to_json(), sort_keys=True).encode()
        stored = await asyncio.to_thread(
            self.store.add,
            a.name,
            a.version,
            a.variant,
            a.target_path,
            download.path,
            a.grant,
            facts,
            target.length,
            target.sha256,
            golden_bytes,
        )
        await self._record(a, UpdateState.VERIFIED)
        return stored

    async def _recheck_kept(self, a: Assignment, stored: StoredVersion, what: str) -> None:
        """Checks a kept version against the registry's current metadata before it serves again.

        Its blob was verified when it was first installed; the registry must still list the
        same blob for it (a version withdrawn or re-signed since is not rolled back to), and
        the gates apply as to any install.
        """
        target = await self._network(what, self.fetcher.resolve, a.name, a.version, a.variant)
        self._gate(a, target, what, download=False)  # a full disk is no reason not to roll back
        if (target.length, target.sha256) != (stored.length, stored.sha256):
            raise _RefusedError(f"{what}: the registry now signs another blob for this version than the one kept here")
        await self._record(a, UpdateState.VERIFIED)
        log.info("%s: rolling back to the version kept on this node", what)

    def _check_plaintext(self, a: Assignment, blob: Path, facts: dict[str, Any]) -> None:
        plaintext = open_plaintext(blob.read_bytes(), a.grant, facts, self.node_id, self._keys.agreement, a.target_path)
        del plaintext  # only checked here; the cache decrypts again when it opens the version

    def _gate(self, a: Assignment, target: ModelTarget, what: str, download: bool = True) -> None:
        facts = target.custom
        if a.target_path != target_path(a.name, a.version, a.variant) or target.target_path != a.target_path:
            raise _RefusedError(f"{what}: the assignment's target path {a.target_path!r} is not the variant's")
        classes = facts.get("hardware_classes")
        if isinstance(classes, list) and classes and self.hardware_class not in classes:
            raise _RefusedError(
                f"{what} is signed for hardware classes {', '.join(map(str, classes))}; "
                f"this node is {self.hardware_class}"
            )
        minimum = str(facts.get("min_onnxruntime_version") or "")
        if minimum and _version_tuple(self.onnxruntime_version) < _version_tuple(minimum):
            raise _RefusedError(
                f"{what} needs onnxruntime {minimum} or later; this node has {self.onnxruntime_version}"
            )
        peak = signed_peak_bytes(facts)
        if peak is None:
            raise _RefusedError(f"{what} has no signed memory profile")
        if peak > self.budget:
            raise _RefusedError(
                f"{what} needs {megabytes(peak)} at its signed peak, more than this node's budget of "
                f"{megabytes(self.budget)}"
            )
        encryption = facts.get("encryption")
        key_id = encryption.get("key_id") if isinstance(encryption, dict) else None
        if key_id != a.grant.key_id:
            raise _RefusedError(
                f"{what}: the key grant is for key {a.grant.key_id!r}, the variant is encrypted with {key_id!r}"
            )
        free = self._free_disk() if download else target.length  # a kept version is on disk already
        if free < target.length:
            raise _LaterError(f"{what} needs {megabytes(target.length)} of disk; {megabytes(free)} is free")

    async def _trial(self, a: Assignment, stored: StoredVersion, what: str) -> None:
        try:
            golden = GoldenVectors.from_json(json.loads(await asyncio.to_thread(stored.golden.read_bytes)))
        except (ValueError, InvalidArgumentError) as exc:
            raise _RefusedError(f"{what}: its signed golden vectors are malformed") from exc
        await self._record(a, UpdateState.TRIAL)
        self.hooks.expect(a.name, a.version, golden, signed_peak_bytes(stored.facts))
        self.store.begin_trial(a.name, a.version)
        try:
            await self.cache.load(a.name)
        except MemoryBudgetError as exc:
            self.store.end_trial(a.name)
            raise _LaterError(exc.message) from exc
        except EdgecascadeError as exc:
            self.store.end_trial(a.name)
            raise _RefusedError(exc.message) from exc
        finally:
            self.hooks.forget(a.name, a.version)
        # It serves now; the marker makes it what serves after a restart too.
        await asyncio.to_thread(self.store.commit, a.name, a.version)
        self.store.end_trial(a.name)
        await self._record(a, UpdateState.COMMITTED)
        self._retry.pop(a.name, None)
        log.info("%s is installed and serves", what)

    async def _network(self, what: str, fn: Callable[..., Any], *args: Any) -> Any:
        try:
            return await asyncio.to_thread(fn, *args)
        except InvalidArgumentError as exc:  # an unsafe path or malformed signed golden vectors
            raise _RefusedError(f"{what}: {exc.message}") from exc
        except EdgecascadeError as exc:  # upstream down, metadata expired or refused, a wrong blob from the mirror
            raise _LaterError(f"{what}: {exc.message}") from exc
        except OSError as exc:
            raise _LaterError(f"{what}: {exc.strerror or exc}") from exc

    # -- records -----------------------------------------------------------------------------------------------

    async def _record(self, a: Assignment, state: UpdateState, last_error: str = "") -> JournalEntry:
        entry = await asyncio.to_thread(self.journal.record, a, state, last_error)
        if self._on_state is not None:
            self._on_state(state, a)
        return entry

    def _settle_sync(self, a: Assignment, state: UpdateState) -> None:
        self.journal.settle(a, state)

    async def _settle(self, a: Assignment, state: UpdateState) -> JournalEntry:
        entry = await asyncio.to_thread(self.journal.settle, a, state)
        if self._on_state is not None:
            self._on_state(state, a)
        return entry

    async def _refuse(self, a: Assignment, reason: str) -> None:
        log.warning("model '%s' version %s (%s) refused: %s", a.name, a.version, a.variant, reason)
        self._retry.pop(a.name, None)
        if self.store.on_trial(a.name) == a.version:
            self.store.end_trial(a.name)
        await asyncio.to_thread(self.store.discard, a.name, a.version)
        await self._record(a, UpdateState.REFUSED, reason)
        if self._on_failure is not None:
            self._on_failure(a, "refused", reason)

    async def _postpone(self, a: Assignment, reason: str) -> None:
        previous = self._retry.get(a.name)
        failures = previous[1] + 1 if previous is not None and previous[0] == a.key else 1
        delay = self._backoff.delay(failures)
        self._retry[a.name] = (a.key, failures, self._clock() + delay)
        log.warning("model '%s' version %s: %s; trying again in %.0f s", a.name, a.version, reason, delay)
        entry = await asyncio.to_thread(self.journal.read, a.name)
        if entry is not None and entry.assignment.key == a.key:
            await asyncio.to_thread(self.journal.note, entry, reason)

    async def _serve_committed(self, name: str) -> None:
        try:
            await self.cache.load(name)
            return
        except MemoryBudgetError as exc:
            log.warning("model '%s' is not loaded at start: %s (it loads on demand)", name, exc.message)
            return
        except EdgecascadeError as exc:
            failed = self.store.committed(name)
            previous = self.store.previous(name)
            if failed is None or previous is None:
                log.error("model '%s' cannot serve: %s", name, exc.message)
                return
            log.error(
                "model '%s' version %s no longer opens as signed (%s); reverting to version %s",
                name,
                failed.version,
                exc.message,
                previous.version,
            )
        await asyncio.to_thread(self.store.commit, name, previous.version)
        try:
            await self.cache.load(name)
        except EdgecascadeError as exc:
            log.error("model '%s' cannot serve: %s", name, exc.message)
