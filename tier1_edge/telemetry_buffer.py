"""The edge's buffer of its devices' telemetry on its way to the region: bounded, oldest dropped first.

The relay accepts an export request as soon as it is held here, and a sender
takes requests out, oldest first, to forward them upstream. While the region is
unreachable the buffer fills; beyond ``max_requests`` or ``max_bytes`` the
oldest requests are dropped and counted, so the newest telemetry survives an
outage and memory stays bounded. A request the sender could not deliver goes
back in front (it is still the oldest) and is the first dropped if the buffer
filled meanwhile.

Domain core: bytes in, bytes out, no transport.
"""

from __future__ import annotations

import asyncio
from collections import deque
from dataclasses import dataclass


@dataclass
class RelayStats:
    """What the relay did with its devices' requests, since it started.

    Attributes:
        accepted, accepted_bytes: Requests taken into the buffer.
        forwarded, forwarded_bytes: Requests the upstream accepted.
        dropped, dropped_bytes: Requests dropped as the oldest of a full buffer.
        refused: Requests larger than the whole buffer (refused to the device, never held).
        rejected: Requests the upstream refused for good (malformed, unknown node): not retried.
        rejected_points: Data points (or log records) the upstream refused within requests it otherwise accepted.
        retries: Attempts that failed for a reason worth retrying (upstream unreachable or busy).
    """

    accepted: int = 0
    accepted_bytes: int = 0
    forwarded: int = 0
    forwarded_bytes: int = 0
    dropped: int = 0
    dropped_bytes: int = 0
    refused: int = 0
    rejected: int = 0
    rejected_points: int = 0
    retries: int = 0


class TelemetryBuffer:
    """A bounded FIFO of serialized export requests (see the module docstring).

    Args:
        max_requests: Requests held at most (the one being sent is not counted).
        max_bytes: Bytes held at most.
    """

    def __init__(self, max_requests: int, max_bytes: int) -> None:
        if max_requests < 1 or max_bytes < 1:
            raise ValueError("a telemetry buffer holds at least one request of at least one byte")
        self.max_requests = max_requests
        self.max_bytes = max_bytes
        self.stats = RelayStats()
        self._items: deque[bytes] = deque()
        self._bytes = 0
        self._ready = asyncio.Event()

    def __len__(self) -> int:
        return len(self._items)

    @property
    def held_bytes(self) -> int:
        """Bytes held now."""
        return self._bytes

    def put(self, request: bytes) -> bool:
        """Holds a request, dropping the oldest while over a bound; False (and counted) if it alone exceeds them."""
        if len(request) > self.max_bytes:
            self.stats.refused += 1
            return False
        self._items.append(request)
        self._bytes += len(request)
        self.stats.accepted += 1
        self.stats.accepted_bytes += len(request)
        self._trim()
        self._ready.set()
        return True

    def put_back(self, request: bytes) -> None:
        """Returns an undelivered request to the front: it is the oldest, so the first dropped if the buffer is full."""
        self._items.appendleft(request)
        self._bytes += len(request)
        self._trim()
        if self._items:
            self._ready.set()

    def drop_all(self) -> tuple[int, int]:
        """Drops everything held (the relay stops), counted as dropped; returns the requests and bytes dropped."""
        n, size = len(self._items), self._bytes
        self._items.clear()
        self._bytes = 0
        self.stats.dropped += n
        self.stats.dropped_bytes += size
        return n, size

    async def take(self) -> bytes:
        """Waits for a request and takes the oldest out."""
        while not self._items:
            self._ready.clear()
            await self._ready.wait()
        request = self._items.popleft()
        self._bytes -= len(request)
        return request

    def _trim(self) -> None:
        while len(self._items) > self.max_requests or self._bytes > self.max_bytes:
            oldest = self._items.popleft()
            self._bytes -= len(oldest)
            self.stats.dropped += 1
            self.stats.dropped_bytes += len(oldest)
