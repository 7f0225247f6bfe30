"""A bounded cache of upstream answers: the same question to the same model version is asked upstream once.

Invariants:

* **Bounded by bytes**: the sum of the stored answers' sizes never exceeds
  ``max_bytes``; the least recently used answers go first. An answer larger than
  ``max_entry_bytes`` is not stored (counted as ``too_large``).
* **Fresh**: an answer older than ``ttl_s`` is never served (it is dropped when met).
* **Never another model's or version's answer**: the key is the caller's (it must
  hold the model name, the version asked for, a digest of the inputs and every
  parameter that changes the answer); each entry also remembers the model and the
  version that *answered*. When an answer for a model arrives from a version other
  than the one its cached answers came from (the upstream was updated), every
  cached answer of that model is dropped before the new one is stored. A request
  that named no version may still get an answer of the *previous* version after the
  upstream moved on, until either a miss for that model brings the new version's
  answer (which drops the old ones) or ``ttl_s`` passes: the staleness is bounded by
  the TTL, not zero. (Knowing at once would take asking the upstream which version
  it serves, which is the call the cache saves.)

Domain core: keys and values are bytes; what they encode is the adapter's.
"""

from __future__ import annotations

import math
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

from services.errors import ConfigError


@dataclass(frozen=True)
class ResultCacheSettings:
    """Size and freshness of the cache (``max_bytes`` 0 turns it off)."""

    max_bytes: int = 8 * 1024 * 1024
    max_entry_bytes: int = 256 * 1024
    ttl_s: float = 60.0

    def __post_init__(self) -> None:
        if self.max_bytes < 0 or self.max_entry_bytes < 0:
            raise ConfigError("result cache max_bytes and max_entry_bytes must be 0 or more")
        if not (math.isfinite(self.ttl_s) and 0 < self.ttl_s <= 86400):
            raise ConfigError(f"result cache ttl_s must be a number of seconds in (0, 86400], got {self.ttl_s}")


@dataclass(frozen=True, slots=True)
class _Entry:
    value: bytes
    model: str
    version: str
    stored_at: float


@dataclass
class ResultCacheStats:
    """Counters: hit rate is hits / (hits + misses)."""

    hits: int = 0
    misses: int = 0
    stored: int = 0
    evicted: int = 0  # dropped to stay within max_bytes
    expired: int = 0  # dropped because older than ttl_s
    invalidated: int = 0  # dropped because their model's upstream version changed
    too_large: int = 0  # answers not stored because larger than max_entry_bytes

    @property
    def hit_rate(self) -> float | None:
        """Hits per lookup, or None before any lookup."""
        lookups = self.hits + self.misses
        return self.hits / lookups if lookups else None


class ResultCache:
    """LRU by bytes with a TTL and per-model version invalidation (see the module docstring)."""

    def __init__(
        self, settings: ResultCacheSettings | None = None, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.settings = settings or ResultCacheSettings()
        self.stats = ResultCacheStats()
        self._clock = clock
        self._entries: OrderedDict[bytes, _Entry] = OrderedDict()
        self._bytes = 0
        self._versions: dict[str, str] = {}  # model → the version its cached answers came from
        self._counts: dict[str, int] = {}  # model → its cached answers (a model with none is forgotten)

    @property
    def enabled(self) -> bool:
        """Whether anything is ever stored."""
        return self.settings.max_bytes > 0

    @property
    def used_bytes(self) -> int:
        """Bytes of the stored answers."""
        return self._bytes

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, key: bytes) -> bytes | None:
        """The stored answer for ``key``, if fresh; counts a hit or a miss."""
        entry = self._entries.get(key)
        if entry is not None and self._clock() - entry.stored_at > self.settings.ttl_s:
            self._drop(key)
            self.stats.expired += 1
            entry = None
        if entry is None:
            self.stats.misses += 1
            return None
        self._entries.move_to_end(key)
        self.stats.hits += 1
        return entry.value

    def put(self, key: bytes, value: bytes, model: str, version: str) -> bool:
        """Stores an answer of ``model`` given by ``version``; returns whether it was stored."""
        if not self.enabled:
            return False
        size = len(key) + len(value)
        if size > min(self.settings.max_entry_bytes, self.settings.max_bytes):
            self.stats.too_large += 1
            return False
        if self._versions.get(model, version) != version:
            self._invalidate(model)
        if key in self._entries:
            self._drop(key)
        while self._entries and self._bytes + size > self.settings.max_bytes:
            oldest = next(iter(self._entries))
            self._drop(oldest)
            self.stats.evicted += 1
        self._entries[key] = _Entry(value, model, version, self._clock())
        self._bytes += size
        self._versions[model] = version
        self._counts[model] = self._counts.get(model, 0) + 1
        self.stats.stored += 1
        return True

    def _invalidate(self, model: str) -> None:
        stale = [k for k, e in self._entries.items() if e.model == model]
        for key in stale:
            self._drop(key)
        self.stats.invalidated += len(stale)

    def _drop(self, key: bytes) -> None:
        entry = self._entries.pop(key)
        self._bytes -= len(key) + len(entry.value)
        left = self._counts[entry.model] - 1
        if left:
            self._counts[entry.model] = left
        else:
            del self._counts[entry.model]
            del self._versions[entry.model]
