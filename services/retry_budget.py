"""A retry budget per upstream: retries may add at most a fixed share to the calls a node sends.

A node that retries every failed call doubles its load on an upstream that is
already failing — a retry storm. The budget follows gRPC's retry throttling:
a pool of ``max_tokens`` tokens, full at start; every first attempt that
succeeds puts back ``token_ratio`` tokens, every failed attempt takes one; a
retry is allowed only while the pool holds more than half of ``max_tokens``.
So while calls succeed, retries are free to happen, and once most calls fail
the retries stop within a few failures, whatever the request rate, until
successes refill the pool. A retry is also never allowed past its request's
deadline (the caller checks that with the time left).

Domain core: counters only; the caller retries.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from services.errors import ConfigError


@dataclass(frozen=True)
class RetrySettings:
    """Which calls are retried and how.

    Attributes:
        attempts: Most attempts of one call (1 = never retry).
        initial_backoff_s: Wait before the first retry (exponential with jitter after it).
        max_backoff_s: Longest wait between two attempts.
        max_tokens: Size of the budget's pool.
        token_ratio: Tokens a successful call puts back (0.1: at most one retry per ten calls once drained).
    """

    attempts: int = 3
    initial_backoff_s: float = 0.02
    max_backoff_s: float = 0.5
    max_tokens: float = 20.0
    token_ratio: float = 0.1

    def __post_init__(self) -> None:
        if not 1 <= self.attempts <= 10:
            raise ConfigError(f"retry attempts must be between 1 and 10, got {self.attempts}")
        for what in ("initial_backoff_s", "max_backoff_s"):
            value = getattr(self, what)
            if not (math.isfinite(value) and 0 < value <= 60):
                raise ConfigError(f"retry {what} must be a number of seconds in (0, 60], got {value}")
        if self.max_backoff_s < self.initial_backoff_s:
            raise ConfigError("retry max_backoff_s must be at least initial_backoff_s")
        if not (math.isfinite(self.max_tokens) and 1 <= self.max_tokens <= 1000):
            raise ConfigError(f"retry max_tokens must be between 1 and 1000, got {self.max_tokens}")
        if not (math.isfinite(self.token_ratio) and 0 < self.token_ratio <= 1):
            raise ConfigError(f"retry token_ratio is in (0, 1], got {self.token_ratio}")


class RetryBudget:
    """The token pool of one upstream (see the module docstring)."""

    def __init__(self, settings: RetrySettings | None = None) -> None:
        self.settings = settings or RetrySettings()
        self._tokens = self.settings.max_tokens
        self.retries = 0  # retries allowed
        self.refused = 0  # retries the budget refused

    @property
    def tokens(self) -> float:
        """Tokens in the pool now."""
        return self._tokens

    def succeeded(self) -> None:
        """An attempt was answered."""
        self._tokens = min(self._tokens + self.settings.token_ratio, self.settings.max_tokens)

    def failed(self) -> None:
        """An attempt failed in a way that would be retried."""
        self._tokens = max(self._tokens - 1, 0.0)

    def allow_retry(self) -> bool:
        """Whether one more retry may be sent now; counts the answer."""
        if self._tokens > self.settings.max_tokens / 2:
            self.retries += 1
            return True
        self.refused += 1
        return False
