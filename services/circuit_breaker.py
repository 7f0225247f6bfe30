"""A circuit breaker per upstream: stop calling a tier that keeps failing, probe it, come back when it answers.

States::

    closed ──N consecutive failures, or failure share ≥ R over the window (≥ M calls)──▶ open
    open ──cool-down over──▶ half_open ──probe succeeds (all P of them)──▶ closed
                                 └──────probe fails──────────────────────▶ open (cool-down again, doubled up to a cap)

* **Closed**: every call is allowed; outcomes are counted in a sliding window of
  ``window_s`` (one-second buckets, so memory stays bounded whatever the rate).
* **Open**: no call is allowed, so no request waits for an upstream timeout;
  :meth:`CircuitBreaker.allow` answers at once with how long until the next probe.
* **Half-open**: at most ``probes`` calls are let through at a time; the others
  are refused as while open. A failed probe opens the breaker again with a longer
  cool-down (exponential, capped), so a flapping upstream is not hammered.

Only failures that say something about the upstream count (the caller decides:
unreachable, timed out, internal error); a caller's own mistake — a model the
upstream does not hold, a bad input — is a success for the breaker.

Every admitted call holds a :class:`Ticket`: the breaker's epoch when it was
admitted and whether it is a probe. Only a probe of the current half-open epoch
moves the probe bookkeeping; a call admitted before the breaker opened that ends
late never closes it, frees a probe slot or reopens it, and its outcome feeds the
closed state's window only while the breaker is closed.

Domain core: no transport here; the clock is injected so tests drive it.
"""

from __future__ import annotations

import math
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from enum import StrEnum

from services.errors import ConfigError


class BreakerState(StrEnum):
    """Where a breaker stands (as ``GetTierInfo``, status and metrics show it)."""

    CLOSED = "closed"
    OPEN = "open"
    HALF_OPEN = "half_open"


@dataclass(frozen=True)
class Ticket:
    """An admitted call: the breaker's epoch when it was admitted, and whether it is a half-open probe."""

    epoch: int
    probe: bool = False


@dataclass(frozen=True)
class BreakerSettings:
    """When a breaker opens and how it probes.

    Attributes:
        consecutive_failures: Failures in a row that open it.
        failure_rate: Share of failed calls over the window that opens it (with at least ``min_calls``).
        min_calls: Calls in the window before the failure rate is judged.
        window_s: Length of the sliding window, in seconds.
        open_s: First cool-down before a probe, in seconds.
        max_open_s: Longest cool-down after repeated failed probes.
        probes: Calls allowed at a time while half-open; that many successes close it.
        min_timeout_s: A call given less time than this that times out says nothing about the upstream
            (the caller's deadline was too tight): its timeout is not counted as a failure.
    """

    consecutive_failures: int = 5
    failure_rate: float = 0.5
    min_calls: int = 20
    window_s: float = 10.0
    open_s: float = 2.0
    max_open_s: float = 30.0
    probes: int = 1
    min_timeout_s: float = 0.05

    def __post_init__(self) -> None:
        if self.consecutive_failures < 1:
            raise ConfigError(f"breaker consecutive_failures must be at least 1, got {self.consecutive_failures}")
        if not (math.isfinite(self.failure_rate) and 0 < self.failure_rate <= 1):
            raise ConfigError(f"breaker failure_rate is a share in (0, 1], got {self.failure_rate}")
        if self.min_calls < 1:
            raise ConfigError(f"breaker min_calls must be at least 1, got {self.min_calls}")
        for what in ("window_s", "open_s", "max_open_s"):
            value = getattr(self, what)
            if not (math.isfinite(value) and 0 < value <= 3600):
                raise ConfigError(f"breaker {what} must be a number of seconds in (0, 3600], got {value}")
        if self.max_open_s < self.open_s:
            raise ConfigError(f"breaker max_open_s ({self.max_open_s}) must be at least open_s ({self.open_s})")
        if self.probes < 1:
            raise ConfigError(f"breaker probes must be at least 1, got {self.probes}")
        if not (math.isfinite(self.min_timeout_s) and 0 <= self.min_timeout_s <= 60):
            raise ConfigError(f"breaker min_timeout_s must be a number of seconds in [0, 60], got {self.min_timeout_s}")


@dataclass(frozen=True)
class BreakerSnapshot:
    """A breaker's state and counters, for status and metrics."""

    name: str
    state: BreakerState
    opened: int  # times it opened
    rejected: int  # calls refused while open or half-open
    failures: int  # failures counted in total
    successes: int
    retry_in_s: float  # seconds until the next probe (0 unless open)
    last_failure: str


class CircuitBreaker:
    """The breaker of one upstream (see the module docstring).

    Use: ``ticket = breaker.allow()``; if it is not None, call, then ``breaker.succeeded(ticket)`` or
    ``breaker.failed(ticket, reason)``; every admitted call must report exactly one outcome with its
    ticket (or :meth:`released` when it ended without one, e.g. cancelled).

    Args:
        name: The upstream it guards (its address), named in messages.
        settings: Thresholds and timings.
        clock: Monotonic seconds.
        on_change: Called with (old, new) state on every transition (metrics, logs).
    """

    def __init__(
        self,
        name: str,
        settings: BreakerSettings | None = None,
        clock: Callable[[], float] = time.monotonic,
        on_change: Callable[[BreakerState, BreakerState], None] | None = None,
    ) -> None:
        self.name = name
        self.settings = settings or BreakerSettings()
        self._clock = clock
        self._on_change = on_change
        self._state = BreakerState.CLOSED
        self._epoch = 0  # moves on every transition: a ticket of another epoch was admitted in another state
        self._consecutive = 0
        # (second, calls, failures) buckets of the sliding window, oldest first.
        self._buckets: deque[list[int]] = deque()
        self._open_until = 0.0
        self._cooldown = self.settings.open_s
        self._probes_in_flight = 0
        self._probe_successes = 0
        self.opened = 0
        self.rejected = 0
        self.failures = 0
        self.successes = 0
        self.last_failure = ""

    @property
    def state(self) -> BreakerState:
        """The state now (an open breaker whose cool-down is over reads as half-open)."""
        if self._state is BreakerState.OPEN and self._clock() >= self._open_until:
            self._move(BreakerState.HALF_OPEN)
        return self._state

    def observed_state(self) -> BreakerState:
        """The state now, as :attr:`state` reads it, but without moving the breaker (for metric readers' threads)."""
        if self._state is BreakerState.OPEN and self._clock() >= self._open_until:
            return BreakerState.HALF_OPEN
        return self._state

    def retry_in(self) -> float:
        """Seconds until an open breaker lets a probe through (0 when not open)."""
        return max(self._open_until - self._clock(), 0.0) if self.observed_state() is BreakerState.OPEN else 0.0

    def allow(self) -> Ticket | None:
        """A ticket when a call may go to the upstream now, else None (a refused call is counted)."""
        state = self.state
        if state is BreakerState.CLOSED:
            return Ticket(self._epoch)
        if state is BreakerState.HALF_OPEN and self._probes_in_flight < self.settings.probes:
            self._probes_in_flight += 1
            return Ticket(self._epoch, probe=True)
        self.rejected += 1
        return None

    def succeeded(self, ticket: Ticket) -> None:
        """The admitted call was answered (or failed for a reason that is not the upstream's)."""
        self.successes += 1
        if self._current_probe(ticket):
            self._probes_in_flight = max(self._probes_in_flight - 1, 0)
            self._probe_successes += 1
            if self._probe_successes >= self.settings.probes:
                self._cooldown = self.settings.open_s
                self._move(BreakerState.CLOSED)
            return
        if self._state is BreakerState.CLOSED and not ticket.probe:
            self._consecutive = 0
            self._count(failed=False)
        # Otherwise a call admitted in an earlier state ended late: it says nothing about the probes.

    def failed(self, ticket: Ticket, reason: str = "") -> None:
        """The admitted call failed because of the upstream (unreachable, timed out, internal error)."""
        self.failures += 1
        self.last_failure = reason
        if self._current_probe(ticket):
            self._probes_in_flight = max(self._probes_in_flight - 1, 0)
            self._cooldown = min(self._cooldown * 2, self.settings.max_open_s)
            self._open()
            return
        if self._state is not BreakerState.CLOSED or ticket.probe:
            return  # admitted before it opened (or a probe of an earlier epoch), ending late: already judged
        self._consecutive += 1
        calls, failures = self._count(failed=True)
        s = self.settings
        if self._consecutive >= s.consecutive_failures or (calls >= s.min_calls and failures / calls >= s.failure_rate):
            self._open()

    def released(self, ticket: Ticket) -> None:
        """The admitted call ended without an outcome (cancelled by its caller): frees its probe slot."""
        if self._current_probe(ticket):
            self._probes_in_flight = max(self._probes_in_flight - 1, 0)

    def snapshot(self) -> BreakerSnapshot:
        """State and counters now."""
        return BreakerSnapshot(
            self.name,
            self.state,
            self.opened,
            self.rejected,
            self.failures,
            self.successes,
            self.retry_in(),
            self.last_failure,
        )

    def refusal(self) -> str:
        """Why a call was refused, for the person who gets the error."""
        if self.state is BreakerState.OPEN:
            return (
                f"the circuit to upstream {self.name} is open after repeated failures "
                f"({self.last_failure or 'no answer'}); the next probe is in {self.retry_in():.1f} s"
            )
        return f"the circuit to upstream {self.name} is half-open: a probe call is in flight, others wait for it"

    # -- internals ---------------------------------------------------------------------------------------------

    def _current_probe(self, ticket: Ticket) -> bool:
        """Whether ``ticket`` is a probe of the half-open state the breaker is in now."""
        return ticket.probe and ticket.epoch == self._epoch and self._state is BreakerState.HALF_OPEN

    def _open(self) -> None:
        self._open_until = self._clock() + self._cooldown
        self._consecutive = 0
        self._buckets.clear()
        self.opened += 1
        self._move(BreakerState.OPEN)

    def _move(self, new: BreakerState) -> None:
        old, self._state = self._state, new
        if old is not new:
            self._epoch += 1
        if new is BreakerState.HALF_OPEN:
            self._probes_in_flight = 0
            self._probe_successes = 0
        if old is not new and self._on_change is not None:
            self._on_change(old, new)

    def _count(self, failed: bool) -> tuple[int, int]:
        """Adds one outcome to the window; returns the window's (calls, failures)."""
        now = int(self._clock())
        horizon = now - math.ceil(self.settings.window_s)
        while self._buckets and self._buckets[0][0] <= horizon:
            self._buckets.popleft()
        if self._buckets and self._buckets[-1][0] == now:
            bucket = self._buckets[-1]
        else:
            bucket = [now, 0, 0]
            self._buckets.append(bucket)
        bucket[1] += 1
        bucket[2] += int(failed)
        return sum(b[1] for b in self._buckets), sum(b[2] for b in self._buckets)
