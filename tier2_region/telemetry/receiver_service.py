"""The region's telemetry receiver: OTLP metrics and logs from enrolled nodes into the telemetry store.

With ``[telemetry] path`` the region serves the OTLP ``MetricsService`` and
``LogsService`` on its own port (a node's stock OTLP exporter, or an
OpenTelemetry Collector in front, points at the region's address), admits what
enrolled nodes send, folds it into the :class:`~.store.TelemetryStore`
(which answers the rollout controller's
:class:`~tier2_region.fleet.figures.FiguresSource` queries), prunes it every
minute and, with ``forward_endpoint``, sends a copy to an external collector.
What became of every request, point and record is in :attr:`TelemetryReceiver.counts`.
Without ``[telemetry] path`` it serves nothing.
"""

from __future__ import annotations

import asyncio
import sqlite3
import time
from collections import Counter
from collections.abc import Callable, Sequence
from pathlib import Path

from services.errors import ConfigError
from services.rpc.components import NodeContext
from services.rpc.server import ServiceBinding
from services.ticker import Ticker
from tier2_region.config import RegionConfig
from tier2_region.fleet.inventory import Inventory
from tier2_region.telemetry.admission import Limits
from tier2_region.telemetry.forwarder_service import OtlpForwarder
from tier2_region.telemetry.ingest import Ingest, KnownNodes
from tier2_region.telemetry.otlp_servicer import LogsServicer, MetricsServicer, logs_binding, metrics_binding
from tier2_region.telemetry.points import Batch
from tier2_region.telemetry.store import TelemetryStore
from tier2_region.telemetry.write_queue import WriteQueue

PRUNE_INTERVAL_S = 60.0


class TelemetryReceiver:
    """The OTLP receiver and telemetry store as the region runs them.

    Args:
        context: The node's context; its configuration is a :class:`RegionConfig`.
        known: Whether a node id is enrolled (tests); by default the fleet inventory at
            ``[fleet] path`` is asked (enrolled and not revoked).

    Raises:
        ConfigError: The store or the inventory cannot be opened.
    """

    def __init__(self, context: NodeContext, known: Callable[[str], bool] | None = None) -> None:
        config = context.config
        assert isinstance(config, RegionConfig), "the telemetry receiver runs on the region"
        settings = config.telemetry
        self.store: TelemetryStore | None = None
        self.ingest: Ingest | None = None
        self._inventory: Inventory | None = None
        self._queue: WriteQueue[Batch] | None = None
        self._forwarder: OtlpForwarder | None = None
        self._pruner: Ticker | None = None
        self._bindings: list[ServiceBinding] = []
        if not settings.path:
            return
        try:
            self.store = TelemetryStore(Path(settings.path), settings)
            if known is None:
                # Its own handle on the inventory, read only here: the fleet service writes through its own.
                self._inventory = Inventory(Path(config.fleet.path))
                known = self._enrolled
        except (OSError, sqlite3.Error) as exc:
            if self.store is not None:
                self.store.close()
            raise ConfigError(f"[telemetry] path {settings.path} or [fleet] path is not usable: {exc}") from None
        store = self.store
        self._queue = WriteQueue("telemetry store", store.write, settings.queue_points)
        limits = Limits(
            max_points_per_request=settings.max_points_per_request,
            max_attributes=settings.max_attributes,
            max_hard_example_bytes=settings.hard_examples_max_bytes,
        )
        self.ingest = Ingest(self._queue, KnownNodes(known), limits)
        if settings.forward_endpoint:
            self._forwarder = OtlpForwarder(
                settings.forward_endpoint, settings.forward_queue, config.server.max_message_bytes
            )
        forwarder = self._forwarder
        self._bindings = [
            metrics_binding(MetricsServicer(self.ingest, forwarder.metrics if forwarder else None)),
            logs_binding(LogsServicer(self.ingest, forwarder.logs if forwarder else None)),
        ]
        queue = self._queue

        async def prune() -> None:
            await queue.call(lambda: store.prune(time.time()))

        self._pruner = Ticker("telemetry pruner", PRUNE_INTERVAL_S, prune)

    def _enrolled(self, node_id: str) -> bool:
        assert self._inventory is not None
        record = self._inventory.node(node_id)
        return record is not None and not record.revoked

    @property
    def bindings(self) -> Sequence[ServiceBinding]:
        """The OTLP metrics and logs services, when a store is configured."""
        return self._bindings

    @property
    def counts(self) -> dict[str, int]:
        """What became of what was sent so far: requests, points and records accepted, ignored,
        rejected and dropped (by reason), what the store folded, and what was forwarded."""
        merged: Counter[str] = Counter()
        if self.ingest is not None:
            merged.update(self.ingest.counts)
        if self.store is not None:
            merged.update({f"store.{k}": v for k, v in self.store.stats.items()})
        if self._forwarder is not None:
            merged.update(self._forwarder.counts)
        if self._queue is not None:
            merged["queue.pending_points"] = self._queue.pending_points
        return dict(merged)

    async def start(self) -> None:
        """Starts the writer, the pruner and the forwarder."""
        if self._queue is not None:
            self._queue.start()
        if self._pruner is not None:
            self._pruner.start()
        if self._forwarder is not None:
            self._forwarder.start()

    async def stop(self) -> None:
        """Writes what is queued, stops forwarding and closes the store and the inventory."""
        if self._pruner is not None:
            await self._pruner.stop()
        if self._queue is not None:
            await self._queue.stop()
        if self._forwarder is not None:
            await self._forwarder.stop()
        if self.store is not None:
            await asyncio.to_thread(self.store.close)
        if self._inventory is not None:
            self._inventory.close()
