"""Attacks on a device's model updates by a hostile edge, through a real edge and region, with the device's updater.

Each test runs the real chain — a region with its registry and fleet service, an
edge with its verifying artifact cache, a device whose updater installs what the
region deploys — and puts :class:`~tests.support.hostile_edge.HostileEdge` between
the device and its edge, as the device's upstream. The device first installs
version 1 of ``lm`` honestly; then a newer version is deployed and the hostile edge
attacks its delivery. An attack ends the same way each time: the device still
serves version 1, the update's journal (what the device reports at check-in) says
why the new version is not installed, and the device keeps nothing it did not
verify — no refused download in staging, no model plaintext anywhere on its disk.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from securesystemslib.signer import CryptoSigner
from tuf.api.metadata import Metadata, Root

from protos.edgecascade.v1 import artifacts_pb2 as artifacts
from protos.edgecascade.v1 import artifacts_pb2_grpc as artifacts_grpc
from protos.edgecascade.v1 import fleet_pb2
from protos.inference import grpc_service_pb2_grpc as inference_grpc
from services.config import load_config
from services.rpc.node import Node
from services.rpc.updates_service import NodeUpdatesService
from services.updates.checkin import InstalledModel
from services.updates.tuf_client import hashed_target_path
from services.updates.updater import Backoff, Updater
from tests.integration.conftest import start_node
from tests.support.hostile_edge import (
    HostileEdge,
    Tamper,
    cut_after,
    rechunk,
    serve,
    serve_from,
    stall_after,
    then_endless,
    trickle,
)
from tests.support.registry import FakeClock, RegistryKit, new_registry
from tests.support.requests import infer_request, output, params
from tests.support.updater_node import (
    PROBE,
    Published,
    grant,
    model_plaintexts,
    plaintext_leaks,
    publish_real,
    run_model,
    this_hardware_class,
)
from tier0_device.app import SPEC as DEVICE
from tier1_edge.app import SPEC as EDGE
from tier2_region.app import SPEC as REGION
from tier2_region.fleet.fleet import Fleet
from tier2_region.fleet_service import FleetControl
from tier2_region.registry.registry import ModelRegistry
from tier2_region.registry.signing_keys import generate_keys, load_keys

DEVICE_ID = "device-1"
TIMESTAMP = "metadata/timestamp.json"


async def until(condition: Callable[[], bool], what: str, timeout_s: float = 20.0) -> None:
    """Waits for ``condition``, polling, for at most ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting until {what}")
        await asyncio.sleep(0.02)


def listing(root: Path) -> list[str]:
    """Every path under ``root``, relative to it."""
    return sorted(str(p.relative_to(root)) for p in root.rglob("*"))


def blob_path(kit: RegistryKit, version: str) -> str:
    """The artifact path of ``lm``'s encrypted blob of a version, as the device asks for it."""
    return "targets/" + hashed_target_path(kit.registry.target("lm", version, "fp32"))


def blob_bytes(kit: RegistryKit, version: str) -> bytes:
    """The genuine encrypted blob of ``lm`` of a version."""
    return (kit.registry.repository_dir / blob_path(kit, version)).read_bytes()


async def edge_caught_up(edge: Node, kit: RegistryKit) -> None:
    """Waits until the edge serves the registry's current timestamp (each request starts a refresh behind it)."""
    current = (kit.registry.repository.metadata_dir / "timestamp.json").read_bytes()
    async with grpc.aio.insecure_channel(edge.address) as channel:
        stub = artifacts_grpc.ArtifactServiceStub(channel)
        for _ in range(500):
            served = b"".join([r.data async for r in stub.Fetch(artifacts.FetchRequest(path=TIMESTAMP), timeout=5)])
            if served == current:
                return
            await asyncio.sleep(0.02)
    raise AssertionError("the edge never served the registry's current timestamp")


@dataclass
class Chain:
    """Region, edge, the hostile edge in front of it, and the device behind that, serving ``lm`` version 1."""

    tmp: Path
    kit: RegistryKit
    region: Node
    edge: Node
    hostile: HostileEdge
    fleet: Fleet
    v1: Published
    device_updates: dict[str, Any]
    # The registry's metadata files before version 1 was published: genuine, signed, and older than any the device saw.
    first_metadata: dict[str, bytes]
    devices: list[Node] = field(default_factory=list)

    @property
    def device(self) -> Node:
        return self.devices[-1]

    @property
    def state(self) -> Path:
        return self.tmp / "device-state"

    @property
    def staging(self) -> Path:
        return self.state / "tuf" / "staging"

    @property
    def updater(self) -> Updater:
        updater = self.device.component(NodeUpdatesService)._updater
        assert updater is not None
        return updater

    def lm(self) -> InstalledModel:
        """What the device would report for ``lm`` at its next check-in."""
        return next(m for m in self.updater.installed() if m.name == "lm")

    def trusted(self, role: str) -> bytes:
        """The device's trusted metadata of a role (what its TUF client keeps across runs)."""
        return (self.state / "tuf" / "metadata" / f"{role}.json").read_bytes()

    def trusted_version(self, role: str) -> int:
        version: int = json.loads(self.trusted(role))["signed"]["version"]
        return version

    async def publish(self, version: str, seed: int, edge_verifies: bool = True, **options: Any) -> Published:
        """Publishes a version of ``lm`` (answering as the model of ``seed`` does).

        The real edge has verified the new metadata before this returns, so a device's first try meets
        the attack under test, not an edge that has not caught up yet.
        """
        published = publish_real(self.kit, "lm", version, seed=seed, **options)
        if edge_verifies:
            await edge_caught_up(self.edge, self.kit)
        return published

    async def deploy(self, version: str, seed: int, **options: Any) -> Published:
        """Publishes a version of ``lm`` (``options`` as :func:`publish_real` takes them) and deploys it to devices."""
        published = await self.publish(version, seed, **options)
        self.fleet.deploy("lm", version, tier="device")
        return published

    async def start_device(self) -> Node:
        device = await start_node(
            DEVICE, self.tmp / "device-models", DEVICE_ID, upstream=self.hostile.address, updates=self.device_updates
        )
        self.devices.append(device)
        return device

    async def attempt(self, version: str) -> InstalledModel:
        """Waits until the update to ``version`` is committed, refused or failed once; returns the report of ``lm``."""

        def ended() -> bool:
            entry = self.updater.journal.read("lm")
            if entry is None or entry.assignment.version != version:
                return False
            return entry.state.value in ("committed", "refused") or entry.last_error != ""

        await until(ended, f"the device's update to version {version} ended or failed")
        return self.lm()

    async def answer(self) -> np.ndarray[Any, Any]:
        """The device's own answer to the probe (it must not have sent the call upward)."""
        async with grpc.aio.insecure_channel(self.device.address) as channel:
            response = await inference_grpc.GRPCInferenceServiceStub(channel).ModelInfer(
                infer_request("lm", PROBE), timeout=10
            )
        assert params(response).get("edgecascade.served_by") == f"tier0:{DEVICE_ID}"
        return output(response, "probs")

    async def assert_serves(self, published: Published) -> None:
        assert np.allclose(await self.answer(), run_model(published.plaintext, PROBE))

    async def assert_serves_v1_and_kept_nothing_unverified(self) -> None:
        """Version 1 serves and is the only version stored; staging is empty; no plaintext is on the device's disk."""
        await self.assert_serves(self.v1)
        assert [v.version for v in self.updater.store.all("lm")] == ["1"]
        assert self.staged() == []
        assert plaintext_leaks(self.state, model_plaintexts(self.kit.files)) == []

    def staged(self) -> list[str]:
        return sorted(p.name for p in self.staging.iterdir()) if self.staging.is_dir() else []


def keep_the_devices_pace(answer: fleet_pb2.CheckInResponse) -> None:
    """The region asks for a check-in every second at the least; the device's own 0.2 s keeps these tests short."""
    answer.check_interval_s = 0


@contextlib.asynccontextmanager
async def running_chain(tmp: Path, kit: RegistryKit | None = None, **device_updates: Any) -> AsyncIterator[Chain]:
    """The chain, with ``lm`` version 1 deployed to and committed on the device (see :class:`Chain`)."""
    kit = kit or new_registry(tmp)
    first_metadata = {p.name: p.read_bytes() for p in kit.registry.repository.metadata_dir.iterdir()}
    v1 = publish_real(kit, "lm", "1", seed=1)
    root = tmp / "root.json"
    root.write_bytes(kit.registry.repository.trusted_root())
    async with contextlib.AsyncExitStack() as stack:
        overrides: dict[str, Mapping[str, Any]] = {
            "server": {"node_id": "region-1", "grace_seconds": 0.2},
            "repository": {"path": str(tmp / "region-models")},
            "registry": {"path": str(kit.registry.directory)},
            "fleet": {"path": str(tmp / "fleet.sqlite"), "check_interval_s": 1},
        }
        region = Node(REGION, load_config(REGION.config_type, env={}, overrides=overrides))
        await region.start()
        stack.push_async_callback(region.stop)
        fleet = region.component(FleetControl).fleet
        assert fleet is not None
        fleet.deploy("lm", "1", tier="device")
        edge = await start_node(
            EDGE,
            tmp / "edge-models",
            "edge-1",
            upstream=region.address,
            artifacts={"cache_dir": str(tmp / "edge-cache"), "trusted_root": str(root), "refresh_interval_s": 0},
        )
        stack.push_async_callback(edge.stop)
        hostile = HostileEdge(edge.address)
        await hostile.start()
        stack.push_async_callback(hostile.stop)
        hostile.rewrite_check_ins(keep_the_devices_pace)
        updates = {
            "state_dir": str(tmp / "device-state"),
            "enrollment_token": fleet.create_token().token,
            "trusted_root": str(root),
            "hardware_class": this_hardware_class(),
            "check_interval_s": 0.2,
            "jitter": 0.0,
            "transfer_timeout_s": 10.0,
            **device_updates,
        }
        chain = Chain(tmp, kit, region, edge, hostile, fleet, v1, updates, first_metadata)

        async def stop_devices() -> None:
            for device in chain.devices:
                await device.stop()

        stack.push_async_callback(stop_devices)
        await chain.start_device()
        row = await chain.attempt("1")
        assert (row.version, row.state, row.last_error) == ("1", "committed", "")
        await chain.assert_serves_v1_and_kept_nothing_unverified()
        # One try per attack: a retry (seconds later, by default) would race what the test checks of the first.
        chain.updater._backoff = Backoff(initial_s=600.0, max_s=600.0)
        yield chain


# -- blobs -----------------------------------------------------------------------------------------------------


async def test_a_blob_of_the_signed_length_with_other_bytes_is_never_installed(tmp_path: Path) -> None:
    async with running_chain(tmp_path) as chain:
        await chain.deploy("2", seed=2)
        genuine = blob_bytes(chain.kit, "2")
        # Version 1's blob, padded to version 2's length: only the signed hash tells them apart.
        forged = blob_bytes(chain.kit, "1")[: len(genuine)].ljust(len(genuine), b"\0")
        chain.hostile.on_fetch(blob_path(chain.kit, "2"), serve(forged))

        row = await chain.attempt("2")

        assert (row.version, row.state) == ("1", "downloading")
        assert "does not match its signed info" in row.last_error
        assert chain.hostile.transfers_of(blob_path(chain.kit, "2"))[0].sent == len(genuine)
        await chain.assert_serves_v1_and_kept_nothing_unverified()


async def test_a_blob_that_never_ends_is_cut_off_at_its_signed_length(tmp_path: Path) -> None:
    async with running_chain(tmp_path) as chain:
        await chain.deploy("2", seed=2)
        path = blob_path(chain.kit, "2")
        chain.hostile.on_fetch(path, then_endless())

        row = await chain.attempt("2")

        assert (row.version, row.state) == ("1", "downloading")
        assert "longer than its signed length" in row.last_error
        # The device hung up: the endless stream ended on the hostile edge's side too.
        [transfer] = chain.hostile.transfers_of(path)
        await asyncio.wait_for(transfer.done.wait(), 10)
        assert transfer.ended == "cancelled"
        await chain.assert_serves_v1_and_kept_nothing_unverified()


async def test_a_slow_edge_is_cut_off_by_the_transfer_deadline_while_the_device_keeps_serving(tmp_path: Path) -> None:
    async with running_chain(tmp_path, transfer_timeout_s=1.0) as chain:
        await chain.deploy("2", seed=2)
        path = blob_path(chain.kit, "2")
        genuine = blob_bytes(chain.kit, "2")
        # Genuine bytes, 64 every 0.2 s: the whole blob would take several times the deadline.
        chain.hostile.on_fetch(path, trickle(0.2, 64))
        await until(lambda: chain.hostile.transfers_of(path) != [], "the device asked for the blob")
        await chain.assert_serves(chain.v1)  # while the transfer crawls

        row = await chain.attempt("2")

        assert (row.version, row.state) == ("1", "downloading")
        assert "deadline exceeded" in row.last_error.lower()
        [transfer] = chain.hostile.transfers_of(path)
        await asyncio.wait_for(transfer.done.wait(), 10)
        assert transfer.ended == "cancelled" and 0 < transfer.sent < len(genuine)
        await chain.assert_serves(chain.v1)
        assert [v.version for v in chain.updater.store.all("lm")] == ["1"]
        # What arrived is kept to resume from, and is nothing but a prefix of the genuine (encrypted) blob.
        sha256 = chain.kit.registry.target("lm", "2", "fp32").hashes["sha256"]
        assert chain.staged() == [f"{sha256}.part"]
        partial = (chain.staging / f"{sha256}.part").read_bytes()
        assert len(partial) <= transfer.sent and genuine.startswith(partial)
        assert plaintext_leaks(chain.state, model_plaintexts(chain.kit.files)) == []


async def test_an_interrupted_download_resumes_from_its_partial_file_after_a_restart(tmp_path: Path) -> None:
    async with running_chain(tmp_path) as chain:
        v2 = await chain.deploy("2", seed=2)
        path = blob_path(chain.kit, "2")
        genuine = blob_bytes(chain.kit, "2")
        sha256 = chain.kit.registry.target("lm", "2", "fp32").hashes["sha256"]
        part = chain.staging / f"{sha256}.part"

        def partial() -> int:
            return part.stat().st_size if part.is_file() else -1

        # The edge drops the transfer after 1 KiB (in 256-byte chunks): the device keeps what arrived.
        chain.hostile.on_fetch(path, cut_after(1024, 256))
        row = await chain.attempt("2")
        assert (row.version, row.state, partial()) == ("1", "downloading", 1024)
        assert "unavailable" in row.last_error

        # Restarted, it asks for the rest only; this time the edge goes silent after 512 more bytes, and the device
        # is stopped in the middle of that transfer.
        await chain.device.stop()
        chain.hostile.on_fetch(path, stall_after(512, 256))
        await chain.start_device()
        await until(lambda: len(chain.hostile.transfers_of(path)) == 2, "the restarted device resumed")
        await until(lambda: chain.hostile.transfers_of(path)[1].sent >= 512, "512 more bytes were sent")
        stopped = chain.updater
        await chain.device.stop()
        await until(lambda: not stopped._flights.in_flight("lm"), "the stopped device's update ended")
        await asyncio.wait_for(chain.hostile.transfers_of(path)[1].done.wait(), 10)
        # The resumed download was recorded (clearing the old error); a stop is no failure and records nothing.
        assert (chain.lm().version, chain.lm().state, chain.lm().last_error) == ("1", "downloading", "")
        kept = partial()

        chain.hostile.honest()
        chain.hostile.on_fetch(path, rechunk(256))
        await chain.start_device()
        await until(lambda: chain.lm().state == "committed", "the restarted device committed version 2")

        assert (chain.lm().version, chain.lm().last_error) == ("2", "")
        cut, stalled, resumed = chain.hostile.transfers_of(path)
        assert (cut.offset, cut.sent, cut.ended) == (0, 1024, "UNAVAILABLE")
        assert (stalled.offset, stalled.ended) == (1024, "cancelled")
        # Each restart asked from the partial file's length: only what never reached the file is fetched again.
        assert 1024 <= kept <= 1024 + stalled.sent
        assert (resumed.offset, resumed.sent, resumed.ended) == (kept, len(genuine) - kept, "complete")
        await chain.assert_serves(v2)
        assert chain.staged() == []
        assert plaintext_leaks(chain.state, model_plaintexts(chain.kit.files)) == []


# -- metadata --------------------------------------------------------------------------------------------------


def replay(chain: Chain, role: str) -> tuple[Callable[[str], bool], Tamper]:
    """Serves the registry's first (version 1) metadata of ``role`` in place of whatever version is asked for."""
    if role == "timestamp":
        return (lambda p: p == TIMESTAMP), serve(chain.first_metadata["timestamp.json"])
    return (lambda p: p.endswith(f".{role}.json")), serve(chain.first_metadata[f"1.{role}.json"])


@pytest.mark.parametrize(
    ("role", "reason"),
    [
        pytest.param("timestamp", "New timestamp version 1 must be >= 2 (rollback refused)", id="timestamp"),
        # An older snapshot or targets does not match the length and hash its signed parent gives.
        pytest.param("snapshot", "does not match expected length", id="snapshot"),
        pytest.param("targets", "does not match expected length", id="targets"),
    ],
)
async def test_metadata_rolled_back_to_an_older_version_is_refused(tmp_path: Path, role: str, reason: str) -> None:
    async with running_chain(tmp_path) as chain:
        assert chain.trusted_version(role) == 2
        trusted = chain.trusted(role)
        await chain.deploy("2", seed=2)
        chain.hostile.on_fetch(*replay(chain, role))

        row = await chain.attempt("2")

        assert (row.version, row.state) == ("1", "assigned")
        assert reason in row.last_error
        assert chain.trusted(role) == trusted
        await chain.assert_serves_v1_and_kept_nothing_unverified()


async def test_a_timestamp_past_its_signed_expiry_is_refused(tmp_path: Path) -> None:
    clock = FakeClock(datetime.now(UTC))
    async with running_chain(tmp_path, new_registry(tmp_path, clock)) as chain:
        trusted = chain.trusted("timestamp")
        # A frozen mirror: what the registry signed two days ago, served today. Its timestamp lived a day.
        clock.now = datetime.now(UTC) - timedelta(days=2)
        await chain.publish("2", seed=2, edge_verifies=False)  # the real edge refuses it too
        chain.fleet.deploy("lm", "2", tier="device")
        chain.hostile.on_fetch(lambda path: True, serve_from(chain.kit.registry.repository_dir))

        row = await chain.attempt("2")

        assert (row.version, row.state) == ("1", "assigned")
        assert "timestamp.json is expired" in row.last_error
        assert chain.trusted("timestamp") == trusted
        await chain.assert_serves_v1_and_kept_nothing_unverified()


async def test_targets_of_another_version_than_the_snapshot_names_are_refused(tmp_path: Path) -> None:
    async with running_chain(tmp_path) as chain:
        await chain.publish("2", seed=2)  # targets 3
        await chain.deploy("3", seed=3)  # targets 4, named by snapshot 4
        assert chain.trusted_version("targets") == 2
        metadata = chain.kit.registry.repository.metadata_dir
        # Genuine and newer than what the device trusts, so no rollback check objects; but not what snapshot 4 names.
        chain.hostile.on_fetch("metadata/4.targets.json", serve((metadata / "3.targets.json").read_bytes()))

        row = await chain.attempt("3")

        assert (row.version, row.state) == ("1", "assigned")
        assert "does not match expected length" in row.last_error
        assert chain.trusted_version("targets") == 2
        await chain.assert_serves_v1_and_kept_nothing_unverified()


async def test_metadata_signed_with_another_registrys_keys_is_refused(tmp_path: Path) -> None:
    async with running_chain(tmp_path) as chain:
        trusted = chain.trusted("timestamp")
        await chain.deploy("2", seed=2)
        # A registry of the attacker's own, with its own keys, listing its own version 2 of lm.
        other = new_registry(tmp_path / "other")
        publish_real(other, "lm", "1", seed=1)
        publish_real(other, "lm", "2", seed=7)
        chain.hostile.on_fetch(lambda path: True, serve_from(other.registry.repository_dir))

        row = await chain.attempt("2")

        assert (row.version, row.state) == ("1", "assigned")
        assert "timestamp was signed by 0/1 keys" in row.last_error
        assert chain.trusted("timestamp") == trusted
        await chain.assert_serves_v1_and_kept_nothing_unverified()


def registry_with_two_root_keys(tmp: Path) -> RegistryKit:
    """A registry whose root needs two of its two root keys (the test kit's default is one of one)."""
    key_dir = tmp / "keys"
    generate_keys(key_dir, root_keys=2)
    registry = ModelRegistry(tmp / "registry")
    registry.create(load_keys(key_dir, key_dir), 2, key_dir, key_dir)
    return RegistryKit(registry, load_keys(key_dir, key_dir), key_dir, tmp / "files")


def attackers_root(kit: RegistryKit, attacker: CryptoSigner, signers: list[CryptoSigner]) -> Metadata[Root]:
    """Root version 2 handing timestamp, snapshot and targets to the attacker's key, signed by ``signers``."""
    root = Metadata[Root].from_bytes(kit.registry.repository.trusted_root())
    root.signed.version = 2
    for role in ("timestamp", "snapshot", "targets"):
        for keyid in list(root.signed.roles[role].keyids):
            root.signed.revoke_key(keyid, role)
        root.signed.add_key(attacker.public_key, role)
    root.signatures.clear()
    for signer in signers:
        root.sign(signer, append=True)
    return root


def forged_root(kit: RegistryKit, how: str) -> bytes:
    attacker = CryptoSigner.generate_ed25519()
    first, _ = kit.keys.root
    if how == "one root key of two":
        return attackers_root(kit, attacker, [first]).to_bytes()
    if how == "one root key and a key root does not list":
        return attackers_root(kit, attacker, [first, attacker]).to_bytes()
    assert how == "one root key's signature twice"
    envelope = json.loads(attackers_root(kit, attacker, [first]).to_bytes())
    envelope["signatures"] *= 2
    return json.dumps(envelope).encode()


@pytest.mark.parametrize(
    ("how", "reason"),
    [
        pytest.param("one root key of two", "root was signed by 1/2 keys", id="one-of-two"),
        pytest.param("one root key and a key root does not list", "root was signed by 1/2 keys", id="plus-stranger"),
        # A second copy of one key's signature is no second signer: the file is refused as malformed.
        pytest.param("one root key's signature twice", "metadata refused", id="same-key-twice"),
    ],
)
async def test_a_root_with_fewer_signatures_than_its_threshold_is_refused(
    tmp_path: Path, how: str, reason: str
) -> None:
    kit = registry_with_two_root_keys(tmp_path)
    async with running_chain(tmp_path, kit) as chain:
        await chain.deploy("2", seed=2)
        chain.hostile.on_fetch("metadata/2.root.json", serve(forged_root(kit, how)))

        row = await chain.attempt("2")

        assert (row.version, row.state) == ("1", "assigned")
        assert reason in row.last_error
        assert chain.trusted_version("root") == 1
        await chain.assert_serves_v1_and_kept_nothing_unverified()


async def test_a_root_signed_by_its_threshold_of_keys_is_trusted_so_the_threshold_is_what_refuses_fewer(
    tmp_path: Path,
) -> None:
    kit = registry_with_two_root_keys(tmp_path)
    async with running_chain(tmp_path, kit) as chain:
        await chain.deploy("2", seed=2)
        rotation = attackers_root(kit, CryptoSigner.generate_ed25519(), list(kit.keys.root)).to_bytes()
        chain.hostile.on_fetch("metadata/2.root.json", serve(rotation))

        row = await chain.attempt("2")

        # Both root keys rotate trust to the new keys: the registry's own timestamp no longer counts.
        assert chain.trusted_version("root") == 2
        assert (row.version, row.state) == ("1", "assigned")
        assert "timestamp was signed by 0/1 keys" in row.last_error
        await chain.assert_serves_v1_and_kept_nothing_unverified()


# -- the check-in answer ---------------------------------------------------------------------------------------


TRAVERSALS: dict[str, tuple[str, str, str]] = {
    # field: (value, the device's state for lm, its recorded reason)
    "name": ("../../escape", "committed", ""),
    "version": ("../../../escape", "committed", "is not valid: versions are positive integers"),
    "variant": ("../../../../escape", "refused", "is not a plain relative path"),
    "target_path": ("models/lm/2/../../../../../escape", "refused", "is not the variant's"),
}


@pytest.mark.parametrize("where", list(TRAVERSALS))
async def test_a_path_traversal_in_an_assignment_never_reaches_the_disk(
    tmp_path: Path, where: str, caplog: pytest.LogCaptureFixture
) -> None:
    value, state, reason = TRAVERSALS[where]
    async with running_chain(tmp_path) as chain:
        before = listing(chain.state)

        def traverse(answer: fleet_pb2.CheckInResponse) -> None:
            for assigned in answer.assignments:
                if assigned.version == "2":
                    setattr(assigned, where, value)
                    if where != "target_path":
                        assigned.target_path = f"models/{assigned.name}/{assigned.version}/{assigned.variant}"

        chain.hostile.rewrite_check_ins(traverse)
        with caplog.at_level(logging.WARNING, logger="edgecascade.updates"):
            await chain.deploy("2", seed=2)
            if where == "name":  # nothing can be journalled under such a name: the log says why
                await until(lambda: "'../../escape'" in caplog.text, "the device ignored the assignment")
            elif where == "version":  # nor with such a version: the reason is noted on lm's journal entry
                await until(lambda: chain.lm().last_error != "", "the device noted why it ignored the assignment")
            else:
                await chain.attempt("2")
        row = chain.lm()

        assert (row.version, row.state) == ("1", state)
        if reason:
            assert reason in row.last_error
        else:  # the name case: lm's own entry is untouched, and the log named the ignored assignment
            assert row.last_error == "" and "'../../escape'" in caplog.text
        # Each value would land in tmp_path had it been used as a path under the device's state directory.
        assert [p for p in listing(tmp_path) if "escape" in p] == []
        assert listing(chain.state) == before
        await chain.assert_serves_v1_and_kept_nothing_unverified()


async def test_a_key_grant_made_for_another_node_is_refused(tmp_path: Path) -> None:
    async with running_chain(tmp_path) as chain:
        v2 = await chain.deploy("2", seed=2)
        # What the region granted device-2 for version 2, handed to device-1 by the edge that relayed both.
        stranger = X25519PrivateKey.generate().public_key().public_bytes_raw()
        theirs = grant(chain.kit, v2, "device-2", stranger)

        def swap(answer: fleet_pb2.CheckInResponse) -> None:
            for assigned in answer.assignments:
                if assigned.version == "2":
                    assigned.grant.ephemeral_public_key = theirs.ephemeral_public_key
                    assigned.grant.salt = theirs.salt
                    assigned.grant.nonce = theirs.nonce
                    assigned.grant.wrapped_key = theirs.wrapped_key

        chain.hostile.rewrite_check_ins(swap)

        row = await chain.attempt("2")

        assert (row.version, row.state) == ("1", "refused")
        assert "does not open for node device-1" in row.last_error
        await chain.assert_serves_v1_and_kept_nothing_unverified()


async def test_a_version_whose_golden_vectors_fail_on_the_device_is_refused(tmp_path: Path) -> None:
    async with running_chain(tmp_path) as chain:
        await chain.deploy("2", seed=2, golden_seed=99)  # signed golden vectors of another model

        row = await chain.attempt("2")

        assert (row.version, row.state) == ("1", "refused")
        assert "failed its golden vectors" in row.last_error
        await chain.assert_serves_v1_and_kept_nothing_unverified()


@pytest.mark.parametrize(
    ("options", "reason"),
    [
        pytest.param({"hardware_classes": ("gpu-h100",)}, "is for gpu-h100", id="hardware-class"),
        pytest.param({"peak_bytes": 1 << 40}, "budget", id="memory-profile"),
    ],
)
async def test_a_version_with_no_variant_for_the_device_is_not_assigned_and_never_downloaded(
    tmp_path: Path, options: dict[str, Any], reason: str
) -> None:
    async with running_chain(tmp_path) as chain:
        await chain.deploy("2", seed=2, **options)
        service = chain.device.component(NodeUpdatesService)

        def told_why() -> bool:
            return service.desired is not None and any(u.version == "2" for u in service.desired.unassigned)

        await until(told_why, "the region told the device why version 2 is not for it")

        assert service.desired is not None
        [why] = [u for u in service.desired.unassigned if u.version == "2"]
        assert reason in why.reason
        assert (chain.lm().version, chain.lm().state) == ("1", "committed")
        assert not [t for t in chain.hostile.transfers if "/lm/2/" in t.path]  # not a byte of it was fetched
        await chain.assert_serves_v1_and_kept_nothing_unverified()
