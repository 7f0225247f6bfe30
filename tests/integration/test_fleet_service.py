"""The region's fleet service over gRPC: enrollment, signed check-ins, assignment and key grants (issue 9 #1-3).

A real region node on 127.0.0.1:0 with a real registry (tiny char-LM variants
published with hand-made profiles) and a fleet inventory; nodes are played by
key pairs and a FleetService stub.
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import grpc
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from protos.edgecascade.v1 import fleet_pb2 as pb
from protos.edgecascade.v1 import fleet_pb2_grpc as pb_grpc
from protos.edgecascade.v1 import mesh_pb2
from services.config import load_config
from services.errors import IntegrityError
from services.rpc.node import Node
from services.updates.identity import NodeKeys
from services.updates.key_grants import KeyGrant, unwrap_key
from tests.support.registry import RegistryKit, hand_profile, lm_variants, new_registry
from tier2_region.app import SPEC as REGION
from tier2_region.fleet_service import MAX_REPORT_BYTES, FleetControl
from tier2_region.registry.model_inspection import inspect_model
from tier2_region.registry.pipeline import PipelineOptions, publish_model
from tier2_region.registry.profiles import BatchProfile
from tier2_region.registry.registry import VariantSubmission

MB = 1024 * 1024
CLASS = "test-x86"


def publish(kit: RegistryKit, name: str, version: str, memory_mb: dict[str, int], classes: Sequence[str] = ()) -> None:
    """Publishes fp32 and int8 of a tiny char-LM whose signed peak memory (batch 1) is ``memory_mb``."""
    subs = []
    for variant, path in lm_variants(kit.files / f"{name}-{version}", seed=int(version)).items():
        facts = inspect_model(path)
        profile = hand_profile(facts, 0.5 if variant == "fp32" else 0.497, 0.5)
        batches = (
            BatchProfile(1, memory_mb[variant] * MB, 10.0, 20.0),
            BatchProfile(8, 2 * memory_mb[variant] * MB, 15.0, 30.0),
        )
        subs.append(VariantSubmission(variant, facts, replace(profile, batches=batches)))
    options = PipelineOptions(hardware_classes=tuple(classes) or (CLASS,), min_onnxruntime_version="1.9")
    publish_model(kit.registry, kit.keys, name, version, subs, options)


@dataclass
class Region:
    node: Node
    stub: pb_grpc.FleetServiceStub
    kit: RegistryKit

    @property
    def control(self) -> FleetControl:
        return self.node.component(FleetControl)


@pytest.fixture
async def region(tmp_path: Path) -> AsyncIterator[Region]:
    kit = new_registry(tmp_path)
    publish(kit, "lm", "1", {"fp32": 200, "int8": 60})
    publish(kit, "lm", "2", {"fp32": 210, "int8": 70})
    publish(kit, "big", "1", {"fp32": 420, "int8": 210})
    overrides: dict[str, Mapping[str, Any]] = {
        "server": {"node_id": "region-1", "grace_seconds": 0.2},
        "repository": {"path": str(tmp_path / "region-models")},
        "registry": {"path": str(kit.registry.directory)},
        "fleet": {"path": str(tmp_path / "fleet.sqlite"), "check_interval_s": 9},
    }
    node = Node(REGION, load_config(REGION.config_type, env={}, overrides=overrides))
    await node.start()
    try:
        async with grpc.aio.insecure_channel(node.address) as channel:
            yield Region(node, pb_grpc.FleetServiceStub(channel), kit)
    finally:
        await node.stop()
        kit.registry.close()


def new_keys() -> NodeKeys:
    return NodeKeys(Ed25519PrivateKey.generate(), X25519PrivateKey.generate())


def node_facts(
    node_id: str = "device-1", budget_mb: int = 128, tier: int = mesh_pb2.TIER_DEVICE, cls: str = CLASS
) -> pb.NodeFacts:
    return pb.NodeFacts(
        node_id=node_id,
        tier=tier,  # type: ignore[arg-type]
        hardware_class=cls,
        memory_budget_bytes=budget_mb * MB,
        onnxruntime_version="1.20.1",
        free_disk_bytes=MB,
    )


async def enroll(region: Region, keys: NodeKeys, facts: pb.NodeFacts | None = None) -> pb.EnrollResponse:
    token = region.control.fleet.create_token().token  # type: ignore[union-attr]
    response: pb.EnrollResponse = await region.stub.Enroll(
        pb.EnrollRequest(
            token=token,
            facts=facts or node_facts(),
            identity_public_key=keys.identity_public,
            agreement_public_key=keys.agreement_public,
        )
    )
    return response


def check_in_request(
    keys: NodeKeys,
    facts: pb.NodeFacts | None = None,
    at_ms: int | None = None,
    nonce: bytes | None = None,
    installed: Sequence[mesh_pb2.InstalledModel] = (),
) -> pb.CheckInRequest:
    report = pb.CheckInReport(
        facts=facts or node_facts(),
        timestamp_unix_ms=int(time.time() * 1000) if at_ms is None else at_ms,
        nonce=nonce or os.urandom(16),
        installed=list(installed),
    ).SerializeToString()
    return pb.CheckInRequest(report=report, signature=keys.sign(report))


def grant(message: pb.KeyGrant) -> KeyGrant:
    return KeyGrant(message.key_id, message.ephemeral_public_key, message.salt, message.nonce, message.wrapped_key)


async def refused(call: object) -> grpc.aio.AioRpcError:
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await call  # type: ignore[misc]
    return raised.value


async def test_enroll_with_a_token_then_a_signed_check_in_gets_a_grant_only_that_node_can_open(region: Region) -> None:
    keys = new_keys()
    answer = await enroll(region, keys)
    assert (answer.node_id, answer.check_interval_s) == ("device-1", 9)
    region.control.fleet.deploy("lm", "1")  # type: ignore[union-attr]
    installed = [mesh_pb2.InstalledModel(name="lm", version="1", variant="int8", state="downloading")]
    response = await region.stub.CheckIn(check_in_request(keys, installed=installed))
    assert response.check_interval_s == 9
    (assignment,) = response.assignments
    # 128 MB: fp32 (200 MB) does not fit, int8 (60 MB) does.
    assert (assignment.name, assignment.version, assignment.variant) == ("lm", "1", "int8")
    assert assignment.target_path == "models/lm/1/int8"
    key = unwrap_key(grant(assignment.grant), keys.agreement, "device-1", assignment.target_path)
    record = next(r for r in region.kit.registry.variants("lm", "1") if r.variant == "int8")
    assert assignment.grant.key_id == record.key_id
    assert key == region.kit.registry.database.content_key(record.key_id)
    with pytest.raises(IntegrityError):
        unwrap_key(grant(assignment.grant), new_keys().agreement, "device-1", assignment.target_path)
    with pytest.raises(IntegrityError):
        unwrap_key(grant(assignment.grant), keys.agreement, "device-2", assignment.target_path)
    node = region.control.fleet.inventory.node("device-1")  # type: ignore[union-attr]
    assert node is not None and node.update_state == "downloading" and node.last_seen is not None


async def test_a_wrong_or_reused_token_is_unauthenticated_and_nothing_is_stored(region: Region) -> None:
    keys = new_keys()
    request = pb.EnrollRequest(
        token="made-up",
        facts=node_facts(),
        identity_public_key=keys.identity_public,
        agreement_public_key=keys.agreement_public,
    )
    error = await refused(region.stub.Enroll(request))
    assert error.code() == grpc.StatusCode.UNAUTHENTICATED
    assert "enrollment token is not valid" in (error.details() or "")
    fleet = region.control.fleet
    assert fleet is not None and fleet.inventory.nodes() == []
    token = fleet.create_token().token
    await region.stub.Enroll(replace_token(request, token))
    error = await refused(region.stub.Enroll(replace_token(request, token, "device-2")))
    assert error.code() == grpc.StatusCode.UNAUTHENTICATED
    assert [n.node_id for n in fleet.inventory.nodes()] == ["device-1"]
    assert region.control.refusals == {"token_unknown": 1, "token_used": 1}


def replace_token(request: pb.EnrollRequest, token: str, node_id: str = "device-1") -> pb.EnrollRequest:
    copy = pb.EnrollRequest()
    copy.CopyFrom(request)
    copy.token = token
    copy.facts.node_id = node_id
    return copy


async def test_other_keys_for_an_enrolled_id_are_permission_denied_until_revoked(region: Region) -> None:
    await enroll(region, new_keys())
    thief = new_keys()
    error = await refused(enroll(region, thief))
    assert error.code() == grpc.StatusCode.PERMISSION_DENIED
    assert "edgecascade fleet revoke device-1" in (error.details() or "")
    region.control.fleet.revoke("device-1")  # type: ignore[union-attr]
    await enroll(region, thief)
    await region.stub.CheckIn(check_in_request(thief))


async def test_bad_fields_are_invalid_argument(region: Region) -> None:
    error = await refused(enroll(region, new_keys(), node_facts(tier=mesh_pb2.TIER_UNSPECIFIED)))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "tier '(unspecified)' is not valid" in (error.details() or "")
    error = await refused(region.stub.CheckIn(pb.CheckInRequest(report=b"\xff\xff\xff", signature=b"")))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    error = await refused(region.stub.CheckIn(pb.CheckInRequest(report=b"\x00" * (MAX_REPORT_BYTES + 1))))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert f"at most {MAX_REPORT_BYTES}" in (error.details() or "")
    refusals = region.control.refusals
    assert refusals["invalid_enrollment"] == 1
    assert refusals["report_unreadable"] == 1 and refusals["report_too_large"] == 1


async def test_forged_unknown_revoked_stale_and_replayed_check_ins_are_unauthenticated(region: Region) -> None:
    keys = new_keys()
    await enroll(region, keys)
    good = check_in_request(keys)
    forged = pb.CheckInRequest(report=good.report, signature=new_keys().sign(good.report))
    stranger = new_keys()
    now_ms = int(time.time() * 1000)
    for request, words in (
        (forged, "not signed by its enrolled identity key"),
        (check_in_request(stranger, node_facts("device-9")), "device-9 is not enrolled"),
        (check_in_request(keys, at_ms=now_ms - 400_000), "behind the region's clock"),
        (check_in_request(keys, at_ms=now_ms + 400_000), "ahead of the region's clock"),
    ):
        error = await refused(region.stub.CheckIn(request))
        assert error.code() == grpc.StatusCode.UNAUTHENTICATED, words
        assert words in (error.details() or "")
    await region.stub.CheckIn(good)
    error = await refused(region.stub.CheckIn(good))
    assert error.code() == grpc.StatusCode.UNAUTHENTICATED
    assert "reuses a nonce" in (error.details() or "")
    region.control.fleet.revoke("device-1")  # type: ignore[union-attr]
    error = await refused(region.stub.CheckIn(check_in_request(keys)))
    assert error.code() == grpc.StatusCode.UNAUTHENTICATED
    assert "revoked" in (error.details() or "")
    assert region.control.refusals == {
        "bad_signature": 1,
        "unknown_node": 1,
        "stale_timestamp": 2,
        "replayed_nonce": 1,
        "revoked_node": 1,
    }


async def test_a_model_whose_variants_do_not_fit_is_unassigned_with_the_reason(region: Region) -> None:
    keys = new_keys()
    await enroll(region, keys)
    fleet = region.control.fleet
    assert fleet is not None
    fleet.deploy("big", "1")
    fleet.deploy("lm", "1")
    response = await region.stub.CheckIn(check_in_request(keys))
    assert [a.name for a in response.assignments] == ["lm"]
    (unassigned,) = response.unassigned
    assert (unassigned.name, unassigned.version) == ("big", "1")
    assert unassigned.reason == (
        "no variant fits: fp32 needs 420.0 MB, budget 128.0 MB; int8 needs 210.0 MB, budget 128.0 MB"
    )


async def test_deployments_follow_tier_and_hardware_class_and_a_newer_deploy_replaces(region: Region) -> None:
    fleet = region.control.fleet
    assert fleet is not None
    device, edge, other = new_keys(), new_keys(), new_keys()
    await enroll(region, device, node_facts("device-1", 512))
    await enroll(region, edge, node_facts("edge-1", 512, tier=mesh_pb2.TIER_EDGE))
    await enroll(region, other, node_facts("device-2", 512, cls="cpu-other"))
    fleet.deploy("lm", "1", tier="device", hardware_class=CLASS)

    async def assigned(keys: NodeKeys, facts: pb.NodeFacts) -> list[tuple[str, str, str]]:
        response = await region.stub.CheckIn(check_in_request(keys, facts))
        return [(a.name, a.version, a.variant) for a in response.assignments]

    assert await assigned(device, node_facts("device-1", 512)) == [("lm", "1", "fp32")]
    assert await assigned(edge, node_facts("edge-1", 512, tier=mesh_pb2.TIER_EDGE)) == []
    assert await assigned(other, node_facts("device-2", 512, cls="cpu-other")) == []
    fleet.deploy("lm", "2", tier="device", hardware_class=CLASS)
    assert await assigned(device, node_facts("device-1", 512)) == [("lm", "2", "fp32")]
    # A deployment for any class reaches device-2, but the variants are signed for CLASS only.
    fleet.deploy("lm", "1")
    response = await region.stub.CheckIn(check_in_request(other, node_facts("device-2", 512, cls="cpu-other")))
    assert [u.reason for u in response.unassigned] == [
        f"no variant fits: fp32 is for {CLASS}, the node is cpu-other; int8 is for {CLASS}, the node is cpu-other"
    ]


async def test_a_region_without_a_fleet_path_serves_no_fleet(tmp_path: Path) -> None:
    overrides: dict[str, Mapping[str, Any]] = {
        "server": {"node_id": "region-1", "grace_seconds": 0.2},
        "repository": {"path": str(tmp_path / "region-models")},
    }
    node = Node(REGION, load_config(REGION.config_type, env={}, overrides=overrides))
    await node.start()
    try:
        assert node.component(FleetControl).fleet is None
        async with grpc.aio.insecure_channel(node.address) as channel:
            error = await refused(pb_grpc.FleetServiceStub(channel).CheckIn(pb.CheckInRequest()))
        assert error.code() == grpc.StatusCode.UNIMPLEMENTED
    finally:
        await node.stop()


async def test_real_nodes_enroll_through_the_edge_and_get_their_variant(region: Region, tmp_path: Path) -> None:
    """A device process-in-process enrolls via its edge's relay and checks in; the region assigns what fits it."""
    from services.rpc.updates_service import NodeUpdatesService
    from tests.integration.conftest import start_node
    from tier0_device.app import SPEC as DEVICE
    from tier1_edge.app import SPEC as EDGE

    fleet = region.control.fleet
    assert fleet is not None
    fleet.deploy("lm", "2", tier="device")
    updates = {"check_interval_s": 0.2, "jitter": 0.0, "hardware_class": CLASS}
    edge = await start_node(
        EDGE,
        tmp_path / "edge-repo",
        "edge-1",
        upstream=region.node.address,
        updates={**updates, "state_dir": str(tmp_path / "edge"), "enrollment_token": fleet.create_token().token},
    )
    try:
        device = await start_node(
            DEVICE,
            tmp_path / "device-repo",
            "device-1",
            upstream=edge.address,
            cache={"memory_budget_bytes": 128 * MB},
            updates={**updates, "state_dir": str(tmp_path / "dev"), "enrollment_token": fleet.create_token().token},
        )
        try:
            service = device.component(NodeUpdatesService)
            for _ in range(2000):
                if service.desired is not None:
                    break
                await asyncio.sleep(0.01)
            desired = service.desired
            assert desired is not None, f"no desired state; failures {service.failures}"
            (assignment,) = desired.assignments
            # 70 MB int8 fits the 128 MB budget, the 210 MB fp32 does not.
            assert (assignment.name, assignment.version, assignment.variant) == ("lm", "2", "int8")
            content_key = unwrap_key(assignment.grant, service._keys.agreement, "device-1", assignment.target_path)
            key_id = assignment.grant.key_id
            assert content_key == region.kit.registry.database.content_key(key_id)
        finally:
            await device.stop()
    finally:
        await edge.stop()
    listed = {entry.node.node_id: entry for entry in fleet.listing()}
    assert set(listed) == {"device-1", "edge-1"}
