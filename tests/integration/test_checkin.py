"""Devices and edges enroll once and check in, signed, on their own; the edge relays its devices' calls.

A stand-in region FleetService (a real gRPC server on loopback, this test's own)
records what arrives and checks every signature with the enrolled key, so the
node side is tested against the contract; the region's own service has tests of
its own.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import pytest
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PublicKey

from protos.edgecascade.v1 import fleet_pb2 as pb
from protos.edgecascade.v1 import fleet_pb2_grpc as pb_grpc
from services.rpc.node import Node
from services.rpc.updates_service import ENROLLMENT_FILE, NodeUpdatesService
from services.updates.checkin import AssignedVariant, InstalledModel
from services.updates.key_grants import unwrap_key, wrap_key
from tests.integration.conftest import start_node
from tier0_device.app import SPEC as DEVICE
from tier1_edge.app import SPEC as EDGE

TOKEN = "enroll-me-once"
CONTENT_KEY = bytes(range(32))


@dataclass
class FakeRegion(pb_grpc.FleetServiceServicer):
    """Enrolls with one token and answers check-ins with one assignment, verifying every signature."""

    enrolled: dict[str, tuple[bytes, bytes]] = field(default_factory=dict)
    reports: list[pb.CheckInReport] = field(default_factory=list)
    refused: list[str] = field(default_factory=list)
    arrived: asyncio.Event = field(default_factory=asyncio.Event)

    async def Enroll(self, request: pb.EnrollRequest, context: Any) -> pb.EnrollResponse:
        if request.token != TOKEN:
            self.refused.append("token")
            self.arrived.set()
            await context.abort(grpc.StatusCode.UNAUTHENTICATED, "wrong enrollment token")
        self.enrolled[request.facts.node_id] = (request.identity_public_key, request.agreement_public_key)
        return pb.EnrollResponse(node_id=request.facts.node_id, check_interval_s=0)

    async def CheckIn(self, request: pb.CheckInRequest, context: Any) -> pb.CheckInResponse:
        report = pb.CheckInReport.FromString(request.report)
        keys = self.enrolled.get(report.facts.node_id)
        if keys is None:
            self.refused.append("unknown")
            await context.abort(grpc.StatusCode.UNAUTHENTICATED, "unknown node")
        assert keys is not None
        try:
            Ed25519PublicKey.from_public_bytes(keys[0]).verify(request.signature, request.report)
        except InvalidSignature:
            self.refused.append("signature")
            await context.abort(grpc.StatusCode.UNAUTHENTICATED, "bad signature")
        self.reports.append(report)
        self.arrived.set()
        grant = wrap_key(CONTENT_KEY, keys[1], report.facts.node_id, "models/lm/1/int8", "k1")
        return pb.CheckInResponse(
            assignments=[
                pb.Assignment(
                    name="lm",
                    version="1",
                    variant="int8",
                    target_path="models/lm/1/int8",
                    grant=pb.KeyGrant(
                        key_id=grant.key_id,
                        ephemeral_public_key=grant.ephemeral_public_key,
                        salt=grant.salt,
                        nonce=grant.nonce,
                        wrapped_key=grant.wrapped_key,
                    ),
                )
            ],
            unassigned=[pb.Unassigned(name="big", version="3", reason="no variant fits: 2 GB > 1 GB")],
        )

    async def wait_for(self, condition: Callable[[], bool], timeout: float = 20.0) -> None:
        async with asyncio.timeout(timeout):
            while not condition():
                self.arrived.clear()
                await self.arrived.wait()


@pytest.fixture
async def region() -> AsyncIterator[tuple[FakeRegion, str]]:
    fake = FakeRegion()
    server = grpc.aio.server()
    pb_grpc.add_FleetServiceServicer_to_server(fake, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        yield fake, f"127.0.0.1:{port}"
    finally:
        await server.stop(0)


@dataclass
class RecordingUpdater:
    """An UpdateTarget that records what it was asked to apply."""

    applied: list[tuple[AssignedVariant, ...]] = field(default_factory=list)

    async def apply(self, assignments: Any) -> None:
        self.applied.append(tuple(assignments))

    def installed(self) -> list[InstalledModel]:
        return [InstalledModel("lm", "1", "int8", "committed")]


async def eventually(condition: Callable[[], bool], timeout: float = 20.0) -> None:
    """Waits, bounded, for something another task (a node's check-in loop) makes true."""
    for _ in range(int(timeout / 0.01)):
        if condition():
            return
        await asyncio.sleep(0.01)
    raise AssertionError("the condition did not become true in time")


def _updates(tmp: Path, **extra: Any) -> dict[str, Any]:
    return {"state_dir": str(tmp), "check_interval_s": 0.2, "jitter": 0.0, **extra}


async def test_a_device_enrolls_once_and_checks_in_signed(tmp_path: Path, region: tuple[FakeRegion, str]) -> None:
    fake, address = region
    state = tmp_path / "device-state"
    device = await start_node(
        DEVICE, tmp_path / "repo", "device-1", upstream=address, updates=_updates(state, enrollment_token=TOKEN)
    )
    try:
        service = device.component(NodeUpdatesService)
        await eventually(lambda: service.check_ins >= 2)
        assert service.enrolled and (state / ENROLLMENT_FILE).is_file()
        assert oct((state / "keys").stat().st_mode & 0o777) == "0o700"
        report = fake.reports[-1]
        assert report.facts.node_id == "device-1" and report.facts.memory_budget_bytes > 0
        assert len(report.nonce) == 16 and len({r.nonce for r in fake.reports}) == len(fake.reports)
        desired = service.desired
        assert desired is not None and [a.name for a in desired.assignments] == ["lm"]
        assert [u.reason for u in desired.unassigned] == ["no variant fits: 2 GB > 1 GB"]
    finally:
        await device.stop()
    assert list(fake.enrolled) == ["device-1"] and fake.refused == []
    # A restart does not enroll again: the token was single-use, and the keys are the same.
    keys_before = fake.enrolled["device-1"]
    fake.reports.clear()
    again = await start_node(DEVICE, tmp_path / "repo", "device-1", upstream=address, updates=_updates(state))
    try:
        await fake.wait_for(lambda: len(fake.reports) >= 1)
    finally:
        await again.stop()
    assert fake.enrolled["device-1"] == keys_before and fake.refused == []


async def test_the_grant_in_the_answer_opens_only_with_this_node_s_key(
    tmp_path: Path, region: tuple[FakeRegion, str]
) -> None:
    fake, address = region
    state = tmp_path / "state"
    device = await start_node(
        DEVICE, tmp_path / "repo", "device-1", upstream=address, updates=_updates(state, enrollment_token=TOKEN)
    )
    try:
        service = device.component(NodeUpdatesService)
        await eventually(lambda: service.desired is not None)
        assert service.desired is not None
        grant = service.desired.assignments[0].grant
        keys = service._keys
        assert unwrap_key(grant, keys.agreement, "device-1", "models/lm/1/int8") == CONTENT_KEY
        assert X25519PublicKey.from_public_bytes(fake.enrolled["device-1"][1]).public_bytes_raw() == (
            keys.agreement_public
        )
    finally:
        await device.stop()


async def test_a_wrong_token_is_refused_and_the_node_keeps_serving(
    tmp_path: Path, region: tuple[FakeRegion, str]
) -> None:
    fake, address = region
    device = await start_node(
        DEVICE, tmp_path / "repo", "device-1", upstream=address, updates=_updates(tmp_path / "s", enrollment_token="x")
    )
    try:
        service = device.component(NodeUpdatesService)
        await eventually(lambda: service.failures >= 1)
        assert not service.enrolled and fake.refused and fake.reports == []
        async with grpc.aio.insecure_channel(device.address) as channel:
            from protos.inference import grpc_service_pb2 as ipb
            from protos.inference import grpc_service_pb2_grpc as ipb_grpc

            live = await ipb_grpc.GRPCInferenceServiceStub(channel).ServerLive(ipb.ServerLiveRequest())
            assert live.live
    finally:
        await device.stop()


async def test_the_updater_gets_the_assignments_and_reports_what_it_runs(
    tmp_path: Path, region: tuple[FakeRegion, str]
) -> None:
    from services.config import load_config
    from services.rpc.components import NodeContext

    fake, address = region
    node_config = load_config(
        DEVICE.config_type,
        env={},
        overrides={
            "server": {"node_id": "device-9"},
            "upstream": {"address": address},
            "updates": _updates(tmp_path / "s", enrollment_token=TOKEN),
        },
    )
    from opentelemetry.sdk.trace import TracerProvider

    from services.inference import NodeIdentity

    updater = RecordingUpdater()
    service = NodeUpdatesService(NodeContext(node_config, NodeIdentity("tier0", "device-9"), TracerProvider()), updater)
    await service.start()
    try:
        await eventually(lambda: bool(updater.applied) and len(fake.reports) >= 2)
    finally:
        await service.stop()
    assert [a.target_path for a in updater.applied[0]] == ["models/lm/1/int8"]
    assert [(m.name, m.state) for m in fake.reports[-1].installed] == [("lm", "committed")]


async def test_the_edge_relays_its_devices_calls_and_checks_in_itself(
    tmp_path: Path, region: tuple[FakeRegion, str]
) -> None:
    fake, address = region
    edge = await start_node(
        EDGE,
        tmp_path / "edge-repo",
        "edge-1",
        upstream=address,
        updates=_updates(tmp_path / "e", enrollment_token=TOKEN),
    )
    nodes: list[Node] = [edge]
    try:
        device = await start_node(
            DEVICE,
            tmp_path / "device-repo",
            "device-1",
            upstream=edge.address,
            updates=_updates(tmp_path / "d", enrollment_token=TOKEN),
        )
        nodes.append(device)
        await fake.wait_for(lambda: {r.facts.node_id for r in fake.reports} >= {"edge-1", "device-1"})
    finally:
        for node in reversed(nodes):
            await node.stop()
    tiers = {r.facts.node_id: r.facts.tier for r in fake.reports}
    assert tiers["device-1"] != tiers["edge-1"]
    assert fake.refused == []  # the relayed, signed reports verified with the device's own key
