"""A telemetry request's way from its converted resources to the store, and the counts of what became of it.

For each resource: the node it names must be enrolled (asked through the
``known`` hook, off the event loop, and remembered for a while: a minute when
known, a few seconds when not, so a node enrolled a moment ago is heard soon);
its points or records go through :mod:`~tier2_region.telemetry.admission`; what
is accepted goes to the :class:`~tier2_region.telemetry.write_queue.WriteQueue`
as one batch, and the request waits until it is written. Every point or record
is counted once in :attr:`Ingest.counts`: accepted, ignored, rejected (by
reason) or dropped (the queue was full, or the write failed). Hard examples are
counted with the log records (``logs.*``) and on their own
(``logs.hard_examples.stored``); in the queue each weighs a point per
:data:`HARD_EXAMPLE_POINT_BYTES` of body, so the queue bounds their bytes too,
and a request holding many of their bytes is admitted on a worker thread (their
bodies are parsed).
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from collections.abc import Callable, Collection, Mapping, Sequence
from typing import TypeVar

from services.errors import CapacityError, InvalidArgumentError, UnavailableError
from tier2_region.telemetry import admission
from tier2_region.telemetry.admission import Limits, Receipt
from tier2_region.telemetry.points import (
    Anomaly,
    Batch,
    HardExample,
    LogsBatch,
    MetricsBatch,
    ResourceLogs,
    ResourceMetrics,
)
from tier2_region.telemetry.write_queue import WriteQueue

_Resource = TypeVar("_Resource", ResourceMetrics, ResourceLogs)
_Kept = TypeVar("_Kept")

KNOWN_TTL_S = 60.0
UNKNOWN_TTL_S = 5.0
# Enough for the largest fleet the region holds; beyond it the memory is simply started afresh.
MAX_REMEMBERED_NODES = 100_000
HARD_EXAMPLE_POINT_BYTES = 1024  # a hard example weighs one queue point per this many bytes of body (at least one)
INLINE_BODY_BYTES = 256 * 1024  # log bodies beyond this in one request are admitted on a worker thread


class KnownNodes:
    """Whether nodes are enrolled, asked through ``known`` on a worker thread and remembered for a while.

    Args:
        known: Whether a node id is enrolled (and not revoked); may block (it reads the inventory).
        clock: Monotonic seconds.
    """

    def __init__(self, known: Callable[[str], bool], clock: Callable[[], float] = time.monotonic) -> None:
        self._known = known
        self._clock = clock
        self._answers: dict[str, tuple[bool, float]] = {}

    async def check(self, node_ids: Collection[str]) -> dict[str, bool]:
        """Which of ``node_ids`` are enrolled.

        Raises:
            UnavailableError: The inventory could not be read.
        """
        now = self._clock()
        answers: dict[str, bool] = {}
        ask: list[str] = []
        for node_id in node_ids:
            remembered = self._answers.get(node_id)
            if remembered is not None and remembered[1] > now:
                answers[node_id] = remembered[0]
            else:
                ask.append(node_id)
        if ask:
            try:
                fresh = await asyncio.to_thread(lambda: {n: bool(self._known(n)) for n in ask})
            except Exception as exc:
                raise UnavailableError("the region cannot read its fleet inventory now; retry later") from exc
            if len(self._answers) + len(fresh) > MAX_REMEMBERED_NODES:
                self._answers.clear()
            for node_id, known in fresh.items():
                self._answers[node_id] = (known, now + (KNOWN_TTL_S if known else UNKNOWN_TTL_S))
            answers.update(fresh)
        return answers


class Ingest:
    """Admits converted telemetry and hands it to the writer.

    Args:
        queue: The store's write queue.
        known: Which nodes are enrolled.
        limits: What a request may hold.
        clock: Wall-clock seconds: a batch's time of arrival, which picks its window.
    """

    def __init__(
        self,
        queue: WriteQueue[Batch],
        known: KnownNodes,
        limits: Limits,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._queue = queue
        self._known = known
        self.limits = limits
        self._clock = clock
        self.counts: Counter[str] = Counter()

    def check_size(self, signal: str, points: int, containers: int) -> None:
        """Refuses a request with more data points (or records), or more resources, scopes and metrics, than
        ``limits.max_points_per_request`` (counted before anything in it is read).

        Raises:
            InvalidArgumentError: It is larger.
        """
        try:
            admission.check_request_size(points, containers, self.limits)
        except InvalidArgumentError:
            # Its points were never read: the request is counted, not guessed at.
            self.counts[f"{signal}.requests"] += 1
            self.counts[f"{signal}.requests_refused.too_large"] += 1
            raise

    def count_unreadable(self, signal: str) -> None:
        """Counts a request that was not OTLP at all (refused before anything was read)."""
        self.counts[f"{signal}.requests"] += 1
        self.counts[f"{signal}.requests_refused.unreadable"] += 1

    async def metrics(self, resources: Sequence[ResourceMetrics]) -> Receipt:
        """Admits and stores a metrics request's resources.

        Returns:
            What became of its data points (for the OTLP answer).

        Raises:
            PermissionDeniedError, InvalidArgumentError: Nothing was accepted (:func:`admission.settle`).
            QueueFullError: The writer is too far behind; nothing was stored.
            UnavailableError: The inventory could not be read, or the store could not write.
        """
        self.counts["metrics.requests"] += 1
        received_at = self._clock()
        samples, receipt = await self._admit("data points", resources, admission.admit_points)
        self._tally("metrics", receipt)
        admission.settle(receipt)
        if samples:
            await self._store("metrics", MetricsBatch(received_at, tuple(samples)), len(samples))
        return receipt

    async def logs(self, resources: Sequence[ResourceLogs]) -> Receipt:
        """Admits a logs request's resources and stores their anomalies.

        Returns:
            What became of its log records (for the OTLP answer).

        Raises:
            The same as :meth:`metrics`.
        """
        self.counts["logs.requests"] += 1
        received_at = self._clock()
        body_bytes = sum(len(record.body) for resource in resources for record in resource.records)
        kept, receipt = await self._admit(
            "log records",
            resources,
            lambda node_id, resource: admission.admit_logs(node_id, resource, received_at),
            offload=body_bytes > INLINE_BODY_BYTES,
        )
        self._tally("logs", receipt)
        admission.settle(receipt)
        anomalies = tuple(k for k in kept if isinstance(k, Anomaly))
        examples = tuple(k for k in kept if isinstance(k, HardExample))
        if kept:
            weight = len(anomalies) + sum(1 + len(e.body) // HARD_EXAMPLE_POINT_BYTES for e in examples)
            # Never more than a request may hold: the queue (at least that large) can always take it.
            weight = min(weight, self.limits.max_points_per_request)
            await self._store("logs", LogsBatch(received_at, anomalies, examples), len(kept), weight)
            self.counts["logs.hard_examples.stored"] += len(examples)
        return receipt

    async def _admit(
        self,
        what: str,
        resources: Sequence[_Resource],
        admit: Callable[[str, _Resource], tuple[Sequence[_Kept], Mapping[str, int], int]],
        offload: bool = False,
    ) -> tuple[list[_Kept], Receipt]:
        """Admits each resource of a request from an enrolled node (on a worker thread if ``offload``); the
        rest are rejected whole, by reason."""
        nodes = [admission.node_of(r) for r in resources]
        known = await self._known.check({node for node, _ in nodes if node})
        if offload:
            return await asyncio.to_thread(self._admit_known, what, resources, nodes, known, admit)
        return self._admit_known(what, resources, nodes, known, admit)

    @staticmethod
    def _admit_known(
        what: str,
        resources: Sequence[_Resource],
        nodes: Sequence[tuple[str, str]],
        known: Mapping[str, bool],
        admit: Callable[[str, _Resource], tuple[Sequence[_Kept], Mapping[str, int], int]],
    ) -> tuple[list[_Kept], Receipt]:
        rejected: Counter[str] = Counter()
        kept: list[_Kept] = []
        ignored = 0
        accepted_resources = []
        for i, (resource, (node_id, problem)) in enumerate(zip(resources, nodes, strict=True)):
            if problem or not known.get(node_id, False):
                rejected[problem or "unknown_node"] += resource.total
                continue
            admitted, refused, unread = admit(node_id, resource)
            kept.extend(admitted)
            rejected.update(refused)
            ignored += unread
            accepted_resources.append(i)
        return kept, Receipt(what, len(kept), ignored, dict(rejected), tuple(accepted_resources))

    def _tally(self, signal: str, receipt: Receipt) -> None:
        self.counts[f"{signal}.accepted"] += receipt.accepted
        self.counts[f"{signal}.ignored"] += receipt.ignored
        for reason, count in receipt.rejected.items():
            self.counts[f"{signal}.rejected.{reason}"] += count

    async def _store(self, signal: str, batch: Batch, points: int, weight: int | None = None) -> None:
        """Queues a batch of ``points`` accepted points or records, weighing ``weight`` queue points (default:
        as many)."""
        try:
            await self._queue.submit(batch, points if weight is None else weight)
        except CapacityError:
            self._dropped(signal, "queue_full", points)
            raise
        except UnavailableError:
            self._dropped(signal, "store_unavailable", points)
            raise

    def _dropped(self, signal: str, why: str, points: int) -> None:
        # They were counted accepted at admission; a drop moves them.
        self.counts[f"{signal}.accepted"] -= points
        self.counts[f"{signal}.dropped.{why}"] += points
