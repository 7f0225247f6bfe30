"""The decisions of a node's adaptive logging: what to send, how much, and at what detail.

Issue 10's "adaptive logging": anomalies (errors, fallbacks, slow outliers, failed
updates) are sent at once but rate-limited per node (:class:`TokenBucket`); routine
records are sampled, and a node that just saw an anomaly samples more of them for a
while (:class:`DetailLevel`); a request is a slow outlier when it took longer than a
multiple of its model version's running p99 (:class:`SlowOutliers`).

Domain core: plain numbers and an injected ``now``; the transport
(:mod:`services.rpc.anomaly_log`) builds and sends the records.
"""

from __future__ import annotations

from dataclasses import dataclass


class TokenBucket:
    """Admits events at ``rate_per_s`` on average, up to ``burst`` at once.

    Starts full, so a node's first burst of anomalies is sent whole.

    Args:
        rate_per_s: Tokens added per second (> 0).
        burst: Tokens held at most (>= 1).
        now: The clock's reading at creation.
    """

    __slots__ = ("_at", "_tokens", "burst", "rate_per_s")

    def __init__(self, rate_per_s: float, burst: int, now: float) -> None:
        if rate_per_s <= 0 or burst < 1:
            raise ValueError("a token bucket needs a positive rate and a burst of at least 1")
        self.rate_per_s = rate_per_s
        self.burst = burst
        self._tokens = float(burst)
        self._at = now

    def take(self, now: float) -> bool:
        """Takes one token if there is one; False means the event is over the limit."""
        # max(): a clock read on another thread may be a hair behind the last one.
        elapsed = max(0.0, now - self._at)
        self._at = max(self._at, now)
        self._tokens = min(float(self.burst), self._tokens + elapsed * self.rate_per_s)
        if self._tokens >= 1.0:
            self._tokens -= 1.0
            return True
        return False


@dataclass
class DetailLevel:
    """The node's routine sample rate: raised for ``elevated_s`` after each anomaly, then lowered.

    :attr:`rate` is a plain attribute so the hot path reads it without a clock; the
    caller lowers it on time by calling :meth:`settle` when :meth:`anomaly` said so.

    Attributes:
        routine_rate: The share of routine records sampled normally.
        elevated_rate: The share sampled after an anomaly.
        elevated_s: How long after the latest anomaly the detail stays raised.
        rate: The share to sample now.
        raised, lowered: Transitions so far (each is counted once, however many anomalies extend it).
    """

    routine_rate: float
    elevated_rate: float
    elevated_s: float
    rate: float = -1.0
    raised: int = 0
    lowered: int = 0
    _until: float = 0.0
    _elevated: bool = False

    def __post_init__(self) -> None:
        self.rate = self.routine_rate

    @property
    def elevated(self) -> bool:
        """Whether the detail is raised now (until :meth:`settle` lowers it)."""
        return self._elevated

    def anomaly(self, now: float) -> bool:
        """Raises the detail (or extends it) from ``now``; True when it was normal until then."""
        self._until = now + self.elevated_s
        if self._elevated:
            return False
        self._elevated = True
        self.rate = self.elevated_rate
        self.raised += 1
        return True

    def settle(self, now: float) -> float:
        """Lowers the detail once its time is up; returns the seconds it stays raised (0: it is normal)."""
        if not self._elevated:
            return 0.0
        left = self._until - now
        if left > 0:
            return left
        self._elevated = False
        self.rate = self.routine_rate
        self.lowered += 1
        return 0.0


class SlowOutliers:
    """One model version's running p99 from a ring of its recent latencies, and the outliers above it.

    Recording is a ring write and a comparison; the p99 is recomputed (a sort of the
    ring) only every ``refresh_every`` latencies, so its cost is spread thin. Nothing
    is judged before ``min_samples`` latencies were seen, nor below ``floor_ms`` (a
    sub-millisecond model's p99 is within a scheduler's jitter).

    Args:
        factor: A latency above ``factor`` × the p99 is an outlier.
        size: Latencies kept.
        refresh_every: Latencies between two recomputations of the p99.
        min_samples: Latencies seen before any is judged.
        floor_ms: Latencies at or below this are never outliers.
    """

    __slots__ = (
        "_count",
        "_next",
        "_ring",
        "factor",
        "floor_ms",
        "min_samples",
        "p99_ms",
        "refresh_every",
        "threshold_ms",
    )

    def __init__(
        self,
        factor: float,
        size: int = 256,
        refresh_every: int = 32,
        min_samples: int = 64,
        floor_ms: float = 1.0,
    ) -> None:
        if factor < 1 or size < 1 or refresh_every < 1 or not 1 <= min_samples <= size:
            raise ValueError("slow outliers need factor >= 1, a ring, a refresh interval and 1 <= min_samples <= size")
        self.factor = factor
        self.floor_ms = floor_ms
        self.min_samples = min_samples
        self.refresh_every = refresh_every
        self._ring = [0.0] * size
        self._next = 0
        self._count = 0
        self.p99_ms = 0.0  # 0 until min_samples were seen
        self.threshold_ms = float("inf")  # latencies above it are outliers

    def observe(self, ms: float) -> bool:
        """Records one latency; True when it is an outlier against the p99 before it."""
        outlier = ms > self.threshold_ms
        ring = self._ring
        ring[self._next] = ms
        self._next = (self._next + 1) % len(ring)
        self._count += 1
        if self._count % self.refresh_every == 0 and self._count >= self.min_samples:
            self._refresh()
        return outlier

    def _refresh(self) -> None:
        held = sorted(self._ring[: self._count] if self._count < len(self._ring) else self._ring)
        self.p99_ms = held[min(len(held) - 1, int(0.99 * len(held)))]
        self.threshold_ms = max(self.floor_ms, self.factor * self.p99_ms)
