"""The parts a tier adds to the node every tier runs.

A :class:`Component` is built from the node's :class:`NodeContext` before the
server starts (so its gRPC services are bound), started once the server
listens, in the order its tier lists it, and stopped in reverse after the
server stopped taking calls. Each ``tierN_*/app.py`` lists its tier's
components in its :class:`~services.rpc.node.TierSpec`; the node itself knows
no tier by name.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.trace import TracerProvider

from services.engine.model_cache import ModelCache
from services.engine.shadow import ShadowRunner
from services.inference import NodeIdentity
from services.rpc.fleet_metrics import FleetMetrics
from services.rpc.server import ServiceBinding
from services.tier_config import TierConfig


@dataclass(frozen=True)
class NodeContext:
    """What a component may build itself from."""

    config: TierConfig
    identity: NodeIdentity
    tracer_provider: TracerProvider
    cache: ModelCache | None = None  # the node's engine (None in tests of components that need none)
    meter_provider: MeterProvider | None = None  # where a component's own metrics go (None: it keeps none)
    fleet_metrics: FleetMetrics | None = None  # what the region reads of the node (an updater reports to it)
    shadows: ShadowRunner | None = None  # runs a rollout's shadow versions beside the serving ones (an updater's)


class Component(Protocol):
    """A part of a node with a lifetime: services it binds, a start and a stop."""

    @property
    def bindings(self) -> Sequence[ServiceBinding]:
        """The gRPC services it serves (none is fine)."""
        ...

    async def start(self) -> None:
        """Starts its background work; the server already listens."""
        ...

    async def stop(self) -> None:
        """Stops its work and releases what it holds; called once, after the server stopped.

        It must also be safe when :meth:`start` never ran: a node whose start fails
        releases every part built so far.
        """
        ...


ComponentFactory = Callable[[NodeContext], Component]
