"""When the dynamic batcher refuses, drops and waits: pure decisions over an explicit ``now``.

Nothing here reads a clock, touches asyncio or runs a model: every decision
takes the current time as an argument and the state it needs (queue size,
rows queued ahead, the batch being formed) from its caller, so a test steps a
fake ``now`` instead of sleeping. :class:`~services.engine.batcher.DynamicBatcher`
owns the queues, futures and tasks and asks this policy at each step.

Rules (times are in seconds on the caller's monotonic clock):

* **Hopeless.** A queued request is dropped when ``now`` plus the predicted
  run time of its rows reaches its deadline.
* **Refusal** of a new request, checked in this order: the queue holds
  ``max_queue_size`` requests (:attr:`Refusal.QUEUE_FULL`); or runs have been
  timed, work is queued at the request's level or above, and ``now`` plus the
  predicted wait for that work is past its deadline (:attr:`Refusal.OVERLOADED`).
  The wait is whole rounds of batches over the run slots, each as long as the
  predicted run of a batch.
* **Waiting for company.** The dispatcher may keep a batch open only while it
  is not full, ``max_queue_delay_us`` is not zero and another run is in
  progress (otherwise nobody else is about to send). The window ends at the
  earlier of ``head.enqueued + max_queue_delay`` and the tightest deadline in
  the batch minus the predicted run of a full batch; it waits only if the
  window is still open and the recent inter-arrival time fits in what is left.
* **Inline runs.** A batch whose predicted run is at most ``inline_run_us``
  runs on the event loop when no other run is in flight; a model never timed
  (or an input shape never seen) goes to a thread first. The prediction is the
  fastest recent run of that many rows of that input signature, timed where it
  ran (:class:`FastestRuns`): the loop's backlog and the wait for the GIL are not
  the model's cost.
* **Estimates** are exponentially weighted moving averages (weight
  :data:`EWMA`): run time per row count (a count never seen is predicted from
  the nearest one seen, scaled up by the row ratio, never down), and the time
  between admitted requests (starting at one second, so no wait pays before
  arrivals are seen).
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping, Sequence
from dataclasses import dataclass, field, fields, replace
from enum import StrEnum
from typing import Any, Protocol

from services.errors import ConfigError

# Smoothing of the run-time and inter-arrival estimates.
EWMA = 0.2
# How fast the fastest-run estimate follows slower runs.
DRIFT = 0.01
# Input signatures whose run times a batcher keeps for the inline decision.
MAX_SIGNATURES = 64


@dataclass(frozen=True)
class BatchingConfig:
    """The ``[batching]`` settings (tier defaults, overridable per model).

    Attributes:
        max_batch_size: Most rows merged into one run; 1 turns batching off.
        max_queue_delay_us: Longest a request waits for others to join it.
        max_queue_size: Requests that may wait; more are refused at once.
        priority_levels: Number of priority levels; request priority 1 is the
            most urgent, 0 (or none) means the least urgent level.
        default_timeout_us: Deadline of a request that brings none; a client's
            ``timeout`` parameter or gRPC deadline may shorten it, never lengthen it.
        inline_run_us: A batch whose predicted run is at most this long runs on the
            event loop itself when no other run is in flight: handing a model of a few
            microseconds to a thread costs more than running it. 0 never runs inline.

    Raises:
        ConfigError: A value is not an integer within its limits.
    """

    max_batch_size: int = 32
    max_queue_delay_us: int = 500
    max_queue_size: int = 512
    priority_levels: int = 2
    default_timeout_us: int = 60_000_000
    inline_run_us: int = 200

    def __post_init__(self) -> None:
        limits = {
            "max_batch_size": (1, 4096),
            "max_queue_delay_us": (0, 1_000_000),
            "max_queue_size": (1, 1_000_000),
            "priority_levels": (1, 16),
            "default_timeout_us": (1_000, 24 * 3600 * 1_000_000),
            "inline_run_us": (0, 10_000),
        }
        for f in fields(self):
            value = getattr(self, f.name)
            low, high = limits[f.name]
            if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
                raise ConfigError(f"[batching] {f.name} must be an integer from {low} to {high}, got {value!r}")

    def with_overrides(self, overrides: Mapping[str, Any], where: str) -> BatchingConfig:
        """Returns this configuration with per-model overrides applied.

        Raises:
            ConfigError: An unknown key or an invalid value (``where`` names the source).
        """
        known = {f.name for f in fields(self)}
        unknown = set(overrides) - known
        if unknown:
            raise ConfigError(f"{where}: unknown batching setting(s) {', '.join(sorted(unknown))}")
        try:
            return replace(self, **dict(overrides))
        except ConfigError as exc:
            raise ConfigError(f"{where}: {exc.message}") from None


class Queued(Protocol):
    """What the policy reads of a queued request."""

    @property
    def rows(self) -> int:
        """Rows the request adds to a batch."""

    @property
    def deadline(self) -> float:
        """When its answer is due."""

    @property
    def enqueued(self) -> float:
        """When it was admitted."""


class Refusal(StrEnum):
    """Why a new request is refused at once (the value is its ``shed`` counter)."""

    QUEUE_FULL = "queue_full"
    OVERLOADED = "overloaded"


@dataclass
class RunTimes:
    """Predicts how long a run of ``rows`` takes from recent runs."""

    by_rows: dict[int, float] = field(default_factory=dict)

    def observe(self, rows: int, seconds: float) -> None:
        """Folds a run of ``rows`` that took ``seconds`` into the estimate for that row count."""
        previous = self.by_rows.get(rows)
        self.by_rows[rows] = seconds if previous is None else previous + EWMA * (seconds - previous)

    def predict(self, rows: int) -> float:
        """Seconds a run of ``rows`` is expected to take (0 before any run was timed)."""
        if rows in self.by_rows:
            return self.by_rows[rows]
        if not self.by_rows:
            return 0.0
        nearest = min(self.by_rows, key=lambda r: abs(r - rows))
        return self.by_rows[nearest] * max(1.0, rows / nearest)


@dataclass
class FastestRuns(RunTimes):
    """The fastest recent run per row count, following slower runs only slowly (:data:`DRIFT` per run).

    Waiting for a core or for the GIL only ever adds to a run's time, so the
    fastest run is the model's own cost; the drift lets a model that really got
    slower (a hot device, a busier machine) be followed.
    """

    def observe(self, rows: int, seconds: float) -> None:
        """Folds a run of ``rows`` that took ``seconds`` into the estimate for that row count."""
        previous = self.by_rows.get(rows)
        faster = previous is None or seconds < previous
        self.by_rows[rows] = seconds if faster else previous + DRIFT * (seconds - previous)  # type: ignore[operator]


@dataclass
class Arrivals:
    """Estimates the time between admitted requests.

    Attributes:
        interval: The estimate in seconds (one second until two arrivals were seen).
        last: When the last request arrived (0 before the first).
    """

    interval: float = 1.0
    last: float = 0.0

    def observe(self, now: float) -> None:
        """Counts a request admitted at ``now``."""
        if self.last:
            self.interval += EWMA * ((now - self.last) - self.interval)
        self.last = now


class BatchPolicy:
    """The admission, drop and wait rules of one batcher (see the module docstring).

    Args:
        config: The model's batching settings.
        batchable: Whether requests may share a run (more than one row per batch).
        slots: Runs the process may do at once (the run pool's slots).
    """

    def __init__(self, config: BatchingConfig, batchable: bool, slots: int) -> None:
        self.config = config
        self.slots = slots
        self.per_batch = config.max_batch_size if batchable else 1
        self.delay = config.max_queue_delay_us / 1e6
        self.inline = config.inline_run_us / 1e6
        self.run_times = RunTimes()  # start to answer, as the loop sees it: what waits are predicted from
        # The model's own time per input signature, measured where it ran: what decides inline runs.
        self.compute_times: dict[Hashable, FastestRuns] = {}
        self.arrivals = Arrivals()

    def capacity(self, per_batch: int, slots: int) -> None:
        """The rows per batch and the run slots in force now (fewer while the node is throttled)."""
        self.per_batch = per_batch
        self.slots = slots

    def hopeless(self, request: Queued, now: float) -> bool:
        """Whether ``request`` can no longer be answered by its deadline if it ran now."""
        return now + self.run_times.predict(request.rows) >= request.deadline

    def runs_inline(self, signature: Hashable, rows: int, others_running: bool) -> bool:
        """Whether a batch of ``rows`` rows of one input ``signature`` runs on the event loop.

        Only when nothing else runs and runs of that signature were timed (a model, or a
        shape of it, never seen goes to a thread first), within ``inline_run_us``.
        """
        if others_running or not self.inline:
            return False
        times = self.compute_times.get(signature)
        return times is not None and times.predict(rows) <= self.inline

    def computed(self, signature: Hashable, rows: int, seconds: float) -> None:
        """Counts a run's own time (measured where it ran) for the inline decision."""
        times = self.compute_times.get(signature)
        if times is None:
            if len(self.compute_times) >= MAX_SIGNATURES:
                # Shapes can vary without end (text lengths): keep the most recently new ones.
                del self.compute_times[next(iter(self.compute_times))]
            times = self.compute_times[signature] = FastestRuns()
        times.observe(rows, seconds)

    def predicted_wait(self, rows_ahead: int) -> float:
        """Seconds until a new request would start behind ``rows_ahead`` queued rows (0 when unknown)."""
        if not rows_ahead or not self.run_times.by_rows:
            return 0.0
        batches = -(-rows_ahead // self.per_batch)  # ceiling division
        rounds = -(-batches // self.slots)
        return rounds * self.run_times.predict(min(rows_ahead, self.per_batch))

    def refusal(self, queued: int, rows_ahead: int, deadline: float, now: float) -> Refusal | None:
        """Why a new request must be refused at once, or None to queue it.

        Args:
            queued: Requests waiting now.
            rows_ahead: Rows queued at the new request's priority level or above.
            deadline: The new request's deadline.
            now: The current time.
        """
        if queued >= self.config.max_queue_size:
            return Refusal.QUEUE_FULL
        wait = self.predicted_wait(rows_ahead)
        if wait and now + wait > deadline:
            # Queueing a request that cannot be answered in time only burns
            # compute its caller will never see; refusing now lets a device
            # send it upward while there is still time.
            return Refusal.OVERLOADED
        return None

    def window_end(self, head: Queued, tightest_deadline: float) -> float:
        """When the dispatcher must stop waiting for company for a batch led by ``head``."""
        return min(head.enqueued + self.delay, tightest_deadline - self.run_times.predict(self.config.max_batch_size))

    def company_wait(self, head: Queued, batch: Sequence[Queued], rows: int, others_running: bool, now: float) -> float:
        """Seconds the dispatcher may wait for more requests to join ``batch``; 0 means run it now.

        Args:
            head: The request the batch was formed around (the most urgent, oldest).
            batch: The requests in the batch so far.
            rows: Their rows.
            others_running: Whether another run is in progress (in any batcher).
            now: The current time.
        """
        # With nothing else in flight, the next request can only come from a
        # caller that is not waiting on us; in a closed loop (one client, or all
        # clients in this batch) waiting would only add latency.
        if rows >= self.config.max_batch_size or self.delay <= 0 or not others_running:
            return 0.0
        left = self.window_end(head, min(r.deadline for r in batch)) - now
        if left <= 0 or self.arrivals.interval > left:
            return 0.0  # waiting would not pay off
        return left
