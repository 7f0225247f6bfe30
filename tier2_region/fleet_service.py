"""The region's fleet service: enrollment and signed check-ins over ``edgecascade.v1.FleetService``.

With ``[fleet] path`` the region keeps its fleet inventory there and serves
``FleetService``: :class:`FleetServicer` converts each request to the domain
types of :mod:`tier2_region.fleet.domain`, calls the
:class:`~tier2_region.fleet.fleet.Fleet` core off the event loop, and converts
its answer; domain errors become statuses through the server's error
interceptor. The servicer bounds what it parses (a report of at most
:data:`MAX_REPORT_BYTES`); the core bounds every field. Refusals are counted by
reason in :attr:`FleetControl.refusals`. Without ``[fleet] path`` it serves nothing.

With a fleet, a ticker moves the active rollouts on every :data:`ROLLOUT_TICK_S`
seconds (:meth:`~tier2_region.fleet.rollout_controller.RolloutController.tick`,
off the event loop). Their stages are judged on the region's telemetry store
(``[telemetry] path``, which the OTLP receiver fills; this component reads it
through its own connection) or on figures given to :meth:`FleetControl.use_figures`;
without either every stage waits for data.
"""

from __future__ import annotations

import asyncio
import functools
import sqlite3
from collections import Counter
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TypeVar

from google.protobuf.message import DecodeError  # type: ignore[import-untyped]
from grpc import aio

from protos.edgecascade.v1 import fleet_pb2 as pb
from protos.edgecascade.v1 import fleet_pb2_grpc as pb_grpc
from protos.edgecascade.v1 import mesh_pb2
from services.errors import ConfigError, InvalidArgumentError
from services.rpc.components import NodeContext
from services.rpc.server import ServiceBinding
from services.ticker import Ticker
from tier2_region.config import RegionConfig
from tier2_region.fleet.catalog import RegistryCatalog
from tier2_region.fleet.domain import (
    MAX_INSTALLED,
    CheckInReport,
    DesiredState,
    Enrollment,
    InstalledModel,
    NodeFacts,
    SignedCheckIn,
)
from tier2_region.fleet.figures import FiguresSource
from tier2_region.fleet.fleet import Fleet
from tier2_region.fleet.inventory import Inventory
from tier2_region.fleet.rollout_controller import RolloutController
from tier2_region.registry.registry import ModelRegistry
from tier2_region.telemetry.store import TelemetryStore

FLEET_SERVICE = pb.DESCRIPTOR.services_by_name["FleetService"].full_name
# A report of MAX_INSTALLED models with every string at its limit stays well below this.
MAX_REPORT_BYTES = 1024 * 1024
# A rollout's interval is minutes in production and seconds in a demo; a few seconds' lag on either is fine.
ROLLOUT_TICK_S = 2.0

_TIERS = {mesh_pb2.TIER_DEVICE: "device", mesh_pb2.TIER_EDGE: "edge", mesh_pb2.TIER_REGION: "region"}
T = TypeVar("T")


def _facts(message: pb.NodeFacts) -> NodeFacts:
    return NodeFacts(
        node_id=message.node_id,
        tier=_TIERS.get(message.tier, ""),
        hardware_class=message.hardware_class,
        memory_budget_bytes=message.memory_budget_bytes,
        onnxruntime_version=message.onnxruntime_version,
        free_disk_bytes=message.free_disk_bytes,
    )


def _response(desired: DesiredState) -> pb.CheckInResponse:
    return pb.CheckInResponse(
        assignments=[
            pb.Assignment(
                name=a.name,
                version=a.version,
                variant=a.variant,
                target_path=a.target_path,
                grant=pb.KeyGrant(
                    key_id=a.grant.key_id,
                    ephemeral_public_key=a.grant.ephemeral_public_key,
                    salt=a.grant.salt,
                    nonce=a.grant.nonce,
                    wrapped_key=a.grant.wrapped_key,
                ),
                shadow=a.shadow,
                shadow_share=a.shadow_share,
            )
            for a in desired.assignments
        ],
        unassigned=[pb.Unassigned(name=u.name, version=u.version, reason=u.reason) for u in desired.unassigned],
        check_interval_s=desired.check_interval_s,
    )


class FleetServicer(pb_grpc.FleetServiceServicer):
    """Converts ``FleetService`` calls for the fleet core.

    Args:
        fleet: The core.
        refusals: Where refusals of what it cannot even parse are counted.
    """

    def __init__(self, fleet: Fleet, refusals: Counter[str]) -> None:
        self._fleet = fleet
        self._refusals = refusals
        # The inventory's writes wait for fsync: they get threads of their own, not the loop's default executor.
        self._executor = ThreadPoolExecutor(2, thread_name_prefix="fleet")

    def close(self) -> None:
        """Releases the worker threads."""
        self._executor.shutdown(wait=False, cancel_futures=True)

    async def _run(self, fn: Callable[..., T], *args: object) -> T:
        return await asyncio.get_running_loop().run_in_executor(self._executor, functools.partial(fn, *args))

    async def Enroll(
        self, request: pb.EnrollRequest, context: aio.ServicerContext[object, object]
    ) -> pb.EnrollResponse:
        enrollment = Enrollment(
            token=request.token,
            facts=_facts(request.facts),
            identity_public_key=request.identity_public_key,
            agreement_public_key=request.agreement_public_key,
        )
        interval = await self._run(self._fleet.enroll, enrollment)
        return pb.EnrollResponse(node_id=enrollment.facts.node_id, check_interval_s=interval)

    async def CheckIn(
        self, request: pb.CheckInRequest, context: aio.ServicerContext[object, object]
    ) -> pb.CheckInResponse:
        if len(request.report) > MAX_REPORT_BYTES:
            self._refusals["report_too_large"] += 1
            raise InvalidArgumentError(
                f"the check-in report is {len(request.report)} bytes; at most {MAX_REPORT_BYTES} are accepted"
            )
        try:
            message = pb.CheckInReport.FromString(request.report)
        except DecodeError:
            self._refusals["report_unreadable"] += 1
            raise InvalidArgumentError("the check-in report is not a serialized CheckInReport") from None
        if len(message.installed) > MAX_INSTALLED:
            self._refusals["invalid_report"] += 1
            raise InvalidArgumentError(
                f"the report lists {len(message.installed)} installed models; at most {MAX_INSTALLED} are accepted"
            )
        report = CheckInReport(
            facts=_facts(message.facts),
            timestamp_unix_ms=message.timestamp_unix_ms,
            nonce=message.nonce,
            installed=tuple(
                InstalledModel(m.name, m.version, m.variant, m.state, m.last_error, m.shadow) for m in message.installed
            ),
        )
        desired = await self._run(self._fleet.check_in, SignedCheckIn(request.report, request.signature, report))
        return _response(desired)


class FleetControl:
    """The fleet as the region serves it.

    Args:
        context: The node's context; its configuration is a :class:`RegionConfig`.

    Raises:
        ConfigError: The inventory cannot be opened or created at ``[fleet] path``.
    """

    def __init__(self, context: NodeContext) -> None:
        config = context.config
        assert isinstance(config, RegionConfig), "the fleet service runs on the region"
        settings = config.fleet
        self.fleet: Fleet | None = None
        self._registry: ModelRegistry | None = None
        self._servicer: FleetServicer | None = None
        self._refusals: Counter[str] = Counter()
        self.rollouts: RolloutController | None = None
        self._ticker: Ticker | None = None
        self._rollout_thread: ThreadPoolExecutor | None = None
        self._figures: TelemetryStore | None = None
        if not settings.path:
            return
        # Its own handle on the registry (read only here): the artifact origin's is used by its re-signer's thread.
        self._registry = ModelRegistry(Path(config.registry.path), config.registry.expiry)
        try:
            inventory = Inventory(Path(settings.path))
        except (OSError, sqlite3.Error) as exc:
            self._registry.close()
            raise ConfigError(f"[fleet] path {settings.path} is not usable: {exc}") from None
        self.fleet = Fleet(inventory, RegistryCatalog(self._registry), settings)
        self._servicer = FleetServicer(self.fleet, self._refusals)
        self.rollouts = RolloutController(self.fleet)
        if config.telemetry.path:
            # Its own handle on the telemetry store (the receiver writes it; WAL lets both in): gates read it.
            try:
                self._figures = TelemetryStore(Path(config.telemetry.path), config.telemetry)
            except (OSError, sqlite3.Error) as exc:
                self.fleet.inventory.close()
                self._registry.close()
                raise ConfigError(f"[telemetry] path {config.telemetry.path} is not usable: {exc}") from None
            self.rollouts.figures = self._figures
        # One thread: ticks never overlap, and they do not queue behind check-ins for the servicer's threads.
        self._rollout_thread = ThreadPoolExecutor(1, thread_name_prefix="rollouts")
        self._ticker = Ticker("rollouts", ROLLOUT_TICK_S, self.tick_rollouts)

    def use_figures(self, figures: FiguresSource) -> None:
        """Judges rollout stages on ``figures`` (the region's telemetry store) from the next tick on."""
        if self.rollouts is not None:
            self.rollouts.figures = figures

    async def tick_rollouts(self) -> None:
        """Moves the active rollouts on once (the ticker's work)."""
        if self.rollouts is not None and self._rollout_thread is not None:
            await asyncio.get_running_loop().run_in_executor(self._rollout_thread, self.rollouts.tick)

    @property
    def refusals(self) -> dict[str, int]:
        """Refused enrollments and check-ins so far, by reason (for telemetry)."""
        merged = Counter(self._refusals)
        if self.fleet is not None:
            merged.update(self.fleet.refusals)
        return dict(merged)

    @property
    def bindings(self) -> Sequence[ServiceBinding]:
        """The fleet service, when an inventory is configured."""
        servicer = self._servicer
        if servicer is None:
            return []
        return [ServiceBinding(FLEET_SERVICE, lambda s: pb_grpc.add_FleetServiceServicer_to_server(servicer, s))]

    async def start(self) -> None:
        """Starts the rollout ticker (check-ins come to it)."""
        if self._ticker is not None:
            self._ticker.start()

    async def stop(self) -> None:
        """Stops the rollout ticker, then closes the inventory and the registry's files."""
        if self._ticker is not None:
            await self._ticker.stop()
        if self._rollout_thread is not None:
            # A tick already in its thread finishes its transaction before the inventory closes.
            await asyncio.to_thread(functools.partial(self._rollout_thread.shutdown, wait=True, cancel_futures=True))
        if self._servicer is not None:
            self._servicer.close()
        if self._figures is not None:
            self._figures.close()
        if self.fleet is not None:
            self.fleet.inventory.close()
        if self._registry is not None:
            self._registry.close()
