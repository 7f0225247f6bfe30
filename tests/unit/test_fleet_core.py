"""The fleet core: one-time tokens, enrollment, signed check-ins, deployments and key grants (issue 9 #1-3).

A real SQLite inventory, a fake clock and a catalog of hand-made variants; the
registry-backed catalog is tested against a real registry at the end.
"""

from __future__ import annotations

import copy
import os
import sqlite3
from dataclasses import dataclass, field, replace
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from services.errors import (
    IntegrityError,
    InvalidArgumentError,
    ModelNotFoundError,
    NotFoundError,
    PermissionDeniedError,
    UnauthenticatedError,
)
from services.updates.identity import NodeKeys
from services.updates.key_grants import unwrap_key
from services.updates.variant_facts import VariantFacts
from tests.support.registry import new_registry, publish_lm
from tier2_region.config import FleetSection
from tier2_region.fleet.assignment import VariantOffer, offer_from_facts
from tier2_region.fleet.catalog import RegistryCatalog
from tier2_region.fleet.domain import (
    CheckInReport,
    Enrollment,
    InstalledModel,
    NodeFacts,
    SignedCheckIn,
)
from tier2_region.fleet.fleet import Fleet
from tier2_region.fleet.inventory import Inventory, summary

MB = 1024 * 1024
T0 = 1_900_000_000.0


@dataclass
class Clock:
    now: float = T0

    def __call__(self) -> float:
        return self.now


@dataclass
class Catalog:
    """Hand-made variants: {(name, version): [offers]} and their content keys."""

    models: dict[tuple[str, str], list[VariantOffer]] = field(default_factory=dict)
    keys: dict[str, bytes] = field(default_factory=dict)

    def add(self, name: str, version: str, *variants: tuple[str, int, float, tuple[str, ...]]) -> None:
        offers = []
        for variant, memory_mb, accuracy, classes in variants:
            key_id = f"{name}-{version}-{variant}"
            self.keys[key_id] = os.urandom(32)
            path = f"models/{name}/{version}/{variant}"
            offers.append(VariantOffer(variant, path, key_id, memory_mb * MB, classes, "1.9", accuracy))
        self.models[(name, version)] = offers

    def offers(self, name: str, version: str) -> list[VariantOffer]:
        return list(self.models.get((name, version), []))

    def content_key(self, key_id: str) -> bytes:
        try:
            return self.keys[key_id]
        except KeyError:
            raise NotFoundError(f"content key {key_id} is not in the registry") from None


@dataclass
class Kit:
    fleet: Fleet
    inventory: Inventory
    catalog: Catalog
    clock: Clock


@pytest.fixture
def kit(tmp_path: Path) -> Kit:
    clock = Clock()
    catalog = Catalog()
    catalog.add("lm", "1", ("fp32", 200, 0.52, ()), ("int8", 60, 0.50, ()))
    catalog.add("lm", "2", ("fp32", 200, 0.55, ()), ("int8", 60, 0.54, ()))
    catalog.add("big", "1", ("fp32", 420, 0.5, ()), ("int8", 210, 0.5, ()))
    catalog.add("arm", "1", ("int8", 10, 0.5, ("cpu-aarch64",)))
    inventory = Inventory(tmp_path / "fleet.sqlite")
    fleet = Fleet(inventory, catalog, FleetSection(check_interval_s=7, clock_skew_s=300, token_ttl_s=600), clock)
    return Kit(fleet, inventory, catalog, clock)


def new_keys() -> NodeKeys:
    return NodeKeys(Ed25519PrivateKey.generate(), X25519PrivateKey.generate())


def facts(node_id: str = "device-1", budget_mb: int = 128, tier: str = "device", cls: str = "cpu-x86_64") -> NodeFacts:
    return NodeFacts(node_id, tier, cls, budget_mb * MB, "1.20.1", 10 * MB)


def enroll(kit: Kit, keys: NodeKeys, node: NodeFacts | None = None, token: str | None = None) -> int:
    token = token if token is not None else kit.fleet.create_token().token
    return kit.fleet.enroll(Enrollment(token, node or facts(), keys.identity_public, keys.agreement_public))


def signed(
    keys: NodeKeys,
    node: NodeFacts | None = None,
    at: float = T0,
    nonce: bytes | None = None,
    installed: tuple[InstalledModel, ...] = (),
) -> SignedCheckIn:
    report = CheckInReport(node or facts(), int(at * 1000), nonce or os.urandom(16), installed)
    # The core verifies the bytes it is given; any stable encoding of the report will do here.
    data = repr(report).encode()
    return SignedCheckIn(data, keys.sign(data), report)


def stored(kit: Kit) -> tuple[list[object], list[object]]:
    return [n.node_id for n in kit.inventory.nodes()], [t.used_at for t in kit.inventory.tokens()]


# Tokens and enrollment


def test_a_token_is_stored_only_as_its_hash_and_expires(kit: Kit, tmp_path: Path) -> None:
    issued = kit.fleet.create_token(ttl_s=60)
    assert issued.expires_at == T0 + 60
    assert kit.fleet.create_token().expires_at == T0 + 600  # [fleet] token_ttl_s
    dump = "\n".join(sqlite3.connect(tmp_path / "fleet.sqlite").iterdump())
    assert issued.token not in dump
    assert kit.inventory.tokens()[0].token_sha256 in dump
    with pytest.raises(InvalidArgumentError, match="positive"):
        kit.fleet.create_token(ttl_s=0)


def test_enrolling_with_a_fresh_token_stores_the_node_and_uses_the_token(kit: Kit) -> None:
    keys = new_keys()
    assert enroll(kit, keys) == 7
    node = kit.inventory.node("device-1")
    assert node is not None and not node.revoked
    assert (node.identity_public_key, node.agreement_public_key) == (keys.identity_public, keys.agreement_public)
    assert node.facts == facts() and node.enrolled_at == T0 and node.last_seen is None
    assert kit.inventory.tokens()[0].used_at == T0 and kit.inventory.tokens()[0].used_by == "device-1"


@pytest.mark.parametrize("token", ["", "not-a-token"])
def test_a_wrong_token_is_refused_and_nothing_is_stored(kit: Kit, token: str) -> None:
    kit.fleet.create_token()
    with pytest.raises(UnauthenticatedError, match="not valid"):
        enroll(kit, new_keys(), token=token)
    assert stored(kit) == ([], [None])
    assert kit.fleet.refusals["token_unknown"] == 1


def test_a_used_token_is_refused_and_nothing_is_stored(kit: Kit) -> None:
    token = kit.fleet.create_token().token
    enroll(kit, new_keys(), token=token)
    with pytest.raises(UnauthenticatedError, match="used already"):
        enroll(kit, new_keys(), facts("device-2"), token=token)
    assert stored(kit) == (["device-1"], [T0])
    assert kit.fleet.refusals["token_used"] == 1


def test_an_expired_token_is_refused_and_stays_unused(kit: Kit) -> None:
    token = kit.fleet.create_token(ttl_s=60).token
    kit.clock.now = T0 + 60
    with pytest.raises(UnauthenticatedError, match="expired"):
        enroll(kit, new_keys(), token=token)
    assert stored(kit) == ([], [None])
    kit.clock.now = T0 + 59  # one second earlier it would have been accepted
    enroll(kit, new_keys(), token=token)


def test_an_id_enrolled_with_other_keys_is_refused_until_revoked(kit: Kit) -> None:
    first, second = new_keys(), new_keys()
    enroll(kit, first)
    token = kit.fleet.create_token().token
    with pytest.raises(PermissionDeniedError, match="edgecascade fleet revoke device-1"):
        enroll(kit, second, token=token)
    node = kit.inventory.node("device-1")
    assert node is not None and node.identity_public_key == first.identity_public
    assert kit.inventory.tokens()[1].used_at is None  # the refused attempt did not use the token
    kit.fleet.revoke("device-1")
    enroll(kit, second, token=token)
    node = kit.inventory.node("device-1")
    assert node is not None and not node.revoked and node.identity_public_key == second.identity_public


def test_enrolling_again_with_the_same_keys_is_idempotent_and_keeps_what_was_reported(kit: Kit) -> None:
    keys = new_keys()
    enroll(kit, keys)
    installed = (InstalledModel("lm", "1", "int8", "committed"),)
    kit.fleet.check_in(signed(keys, installed=installed))
    kit.clock.now = T0 + 5
    enroll(kit, keys, facts(budget_mb=512))
    node = kit.inventory.node("device-1")
    assert node is not None and node.installed == installed and node.enrolled_at == T0
    assert node.facts.memory_budget_bytes == 512 * MB
    with pytest.raises(UnauthenticatedError):  # a fresh token each time, still
        enroll(kit, keys, token=kit.inventory.tokens()[0].token_sha256)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"facts": facts("bad id")}, "node id 'bad id' is not valid"),
        ({"facts": facts("-dash")}, "is not valid"),
        ({"facts": facts(tier="region")}, "tier 'region' is not valid"),
        ({"facts": facts(tier="")}, "tier '\\(unspecified\\)' is not valid"),
        ({"facts": replace(facts(), memory_budget_bytes=-1)}, "memory_budget_bytes must be between 0"),
        ({"facts": replace(facts(), hardware_class="x" * 257)}, "hardware_class is 257 characters long"),
        ({"facts": replace(facts(), onnxruntime_version="1.2\n")}, "control characters"),
        ({"identity_public_key": b"\x01" * 31}, "identity_public_key must be a raw Ed25519 public key of 32 bytes"),
        ({"agreement_public_key": b""}, "agreement_public_key must be a raw X25519 public key of 32 bytes, got 0"),
        ({"token": "t" * 300}, "token is 300 characters long"),
    ],
)
def test_every_field_of_an_enrollment_is_checked_and_nothing_is_stored(
    kit: Kit, change: dict[str, object], message: str
) -> None:
    keys = new_keys()
    good = Enrollment(kit.fleet.create_token().token, facts(), keys.identity_public, keys.agreement_public)
    with pytest.raises(InvalidArgumentError, match=message):
        kit.fleet.enroll(replace(good, **change))  # type: ignore[arg-type]
    assert stored(kit) == ([], [None])


def test_revoking_an_unknown_node_says_so(kit: Kit) -> None:
    with pytest.raises(NotFoundError, match="no node 'ghost'"):
        kit.fleet.revoke("ghost")


# Check-in


def test_a_signed_check_in_is_recorded(kit: Kit) -> None:
    keys = new_keys()
    enroll(kit, keys)
    installed = (
        InstalledModel("lm", "1", "int8", "committed"),
        InstalledModel("other", "3", "fp32", "refused", "golden vectors differ"),
    )
    kit.clock.now = T0 + 10
    desired = kit.fleet.check_in(signed(keys, facts(budget_mb=100), at=T0 + 9, installed=installed))
    assert desired.check_interval_s == 7
    node = kit.inventory.node("device-1")
    assert node is not None
    assert node.last_seen == T0 + 10 and node.installed == installed
    assert node.facts.memory_budget_bytes == 100 * MB
    assert (node.update_state, node.last_error) == ("refused", "golden vectors differ")


def test_update_state_summarises_the_installed_models() -> None:
    done = InstalledModel("a", "1", "fp32", "committed")
    busy = InstalledModel("b", "1", "fp32", "downloading")
    assert summary(()) == ("", "")
    assert summary((done,)) == ("committed", "")
    assert summary((done, busy)) == ("downloading", "")


def test_a_bad_signature_is_refused_and_nothing_is_recorded(kit: Kit) -> None:
    keys = new_keys()
    enroll(kit, keys)
    good = signed(keys)
    for bad in (
        replace(good, signature=new_keys().sign(good.report_bytes)),  # another key
        replace(good, report_bytes=good.report_bytes + b" "),  # other bytes than were signed
        replace(good, signature=good.signature[:63]),
        replace(good, signature=b""),
    ):
        with pytest.raises(UnauthenticatedError, match="not signed by its enrolled identity key"):
            kit.fleet.check_in(bad)
    node = kit.inventory.node("device-1")
    assert node is not None and node.last_seen is None
    assert kit.inventory.nonce_count() == 0
    assert kit.fleet.refusals["bad_signature"] == 4
    kit.fleet.check_in(good)  # its nonce was not burnt by the forgeries


def test_an_unknown_or_revoked_node_is_refused(kit: Kit) -> None:
    keys = new_keys()
    with pytest.raises(UnauthenticatedError, match="device-1 is not enrolled"):
        kit.fleet.check_in(signed(keys))
    enroll(kit, keys)
    kit.fleet.revoke("device-1")
    with pytest.raises(UnauthenticatedError, match="device-1 is revoked"):
        kit.fleet.check_in(signed(keys))
    assert kit.fleet.refusals["unknown_node"] == 1 and kit.fleet.refusals["revoked_node"] == 1


@pytest.mark.parametrize(("offset", "word"), [(301, "behind"), (-301, "ahead of")])
def test_a_timestamp_outside_the_clock_window_is_refused(kit: Kit, offset: float, word: str) -> None:
    keys = new_keys()
    enroll(kit, keys)
    kit.clock.now = T0 + offset
    with pytest.raises(UnauthenticatedError, match=f"timed 301 s {word} the region's clock; at most 300 s"):
        kit.fleet.check_in(signed(keys, at=T0))
    kit.clock.now = T0 + (300 if offset > 0 else -300)
    kit.fleet.check_in(signed(keys, at=T0))  # the edge of the window is inside it


def test_a_replayed_nonce_is_refused_until_no_report_carrying_it_can_be_fresh(kit: Kit) -> None:
    keys = new_keys()
    enroll(kit, keys)
    first = signed(keys, at=T0)
    kit.fleet.check_in(first)
    with pytest.raises(UnauthenticatedError, match="reuses a nonce"):
        kit.fleet.check_in(first)
    kit.clock.now = T0 + 299
    with pytest.raises(UnauthenticatedError, match="reuses a nonce"):
        kit.fleet.check_in(signed(keys, at=T0 + 299, nonce=first.report.nonce))
    assert kit.fleet.refusals["replayed_nonce"] == 2
    # Another node may use the same nonce: nonces are per node.
    other = new_keys()
    enroll(kit, other, facts("device-2"))
    kit.fleet.check_in(signed(other, facts("device-2"), at=T0 + 299, nonce=first.report.nonce))
    # Past 2 × the window, the nonce is forgotten (and pruned).
    kit.clock.now = T0 + 601
    kit.fleet.check_in(signed(keys, at=T0 + 601, nonce=first.report.nonce))
    assert kit.inventory.nonce_count() == 2  # device-1's new use and device-2's (seen at T0 + 299)


def test_report_fields_are_checked(kit: Kit) -> None:
    keys = new_keys()
    enroll(kit, keys)
    too_many = tuple(InstalledModel(f"m{i}", "1", "fp32", "committed") for i in range(257))
    for bad, message in (
        (signed(keys, nonce=b"short"), "nonce must be 16 random bytes, got 5"),
        (signed(keys, installed=too_many), "lists 257 installed models; at most 256"),
        (signed(keys, installed=(InstalledModel("lm", "1", "fp32", "exploded"),)), "installed\\[0\\].state"),
        (signed(keys, installed=(InstalledModel("", "1", "fp32", ""),)), "installed\\[0\\].name is empty"),
        (signed(keys, installed=(InstalledModel("lm", "1", "fp32", "refused", "e" * 1025),)), "last_error"),
    ):
        with pytest.raises(InvalidArgumentError, match=message):
            kit.fleet.check_in(bad)


# Desired state


def test_a_deployed_model_is_assigned_the_most_accurate_variant_that_fits_with_a_grant_for_this_node_only(
    kit: Kit,
) -> None:
    keys, other = new_keys(), new_keys()
    enroll(kit, keys, facts(budget_mb=512))
    kit.fleet.deploy("lm", "1")
    desired = kit.fleet.check_in(signed(keys, facts(budget_mb=512)))
    (assignment,) = desired.assignments
    assert (assignment.name, assignment.version, assignment.variant) == ("lm", "1", "fp32")
    assert assignment.target_path == "models/lm/1/fp32"
    key = unwrap_key(assignment.grant, keys.agreement, "device-1", "models/lm/1/fp32")
    assert key == kit.catalog.keys["lm-1-fp32"]
    with pytest.raises(IntegrityError):
        unwrap_key(assignment.grant, other.agreement, "device-1", "models/lm/1/fp32")
    with pytest.raises(IntegrityError):
        unwrap_key(assignment.grant, keys.agreement, "device-2", "models/lm/1/fp32")
    with pytest.raises(IntegrityError):
        unwrap_key(assignment.grant, keys.agreement, "device-1", "models/lm/1/int8")
    # The budget the node reports now decides: fp32 (200 MB) no longer fits, int8 does.
    desired = kit.fleet.check_in(signed(keys, facts(budget_mb=128)))
    assert [a.variant for a in desired.assignments] == ["int8"]


def test_a_model_none_of_whose_variants_fit_is_unassigned_with_the_reason(kit: Kit) -> None:
    keys = new_keys()
    enroll(kit, keys)
    kit.fleet.deploy("big", "1")
    kit.fleet.deploy("lm", "1")
    desired = kit.fleet.check_in(signed(keys))
    assert [a.name for a in desired.assignments] == ["lm"]
    (unassigned,) = desired.unassigned
    assert (unassigned.name, unassigned.version) == ("big", "1")
    assert unassigned.reason == (
        "no variant fits: fp32 needs 420.0 MB, budget 128.0 MB; int8 needs 210.0 MB, budget 128.0 MB"
    )


def test_deployments_apply_by_tier_and_hardware_class_and_the_most_specific_wins(kit: Kit) -> None:
    device, edge, arm = new_keys(), new_keys(), new_keys()
    enroll(kit, device, facts("device-1", 512))
    enroll(kit, edge, facts("edge-1", 512, tier="edge"))
    enroll(kit, arm, facts("device-arm", 512, cls="cpu-aarch64"))
    kit.fleet.deploy("lm", "1", tier="device")
    kit.fleet.deploy("lm", "2", tier="device", hardware_class="cpu-aarch64")
    kit.fleet.deploy("arm", "1", hardware_class="cpu-aarch64")

    def got(keys: NodeKeys, node: NodeFacts) -> list[tuple[str, str, str]]:
        kit.clock.now += 1
        desired = kit.fleet.check_in(signed(keys, node, at=kit.clock.now))
        return [(a.name, a.version, a.variant) for a in desired.assignments]

    assert got(device, facts("device-1", 512)) == [("lm", "1", "fp32")]
    assert got(edge, facts("edge-1", 512, tier="edge")) == []
    assert got(arm, facts("device-arm", 512, cls="cpu-aarch64")) == [("arm", "1", "int8"), ("lm", "2", "fp32")]
    listing = {e.node.node_id: [(d.name, d.version) for d in e.desired] for e in kit.fleet.listing()}
    assert listing == {"device-1": [("lm", "1")], "edge-1": [], "device-arm": [("arm", "1"), ("lm", "2")]}


def test_a_newer_deploy_of_the_same_model_and_filters_replaces_the_older(kit: Kit) -> None:
    keys = new_keys()
    enroll(kit, keys, facts(budget_mb=512))
    assert kit.fleet.deploy("lm", "1", tier="device") is None
    kit.clock.now += 1
    replaced = kit.fleet.deploy("lm", "2", tier="device")
    assert replaced is not None and replaced.version == "1"
    assert [(d.name, d.version) for d in kit.inventory.deployments()] == [("lm", "2")]
    desired = kit.fleet.check_in(signed(keys, facts(budget_mb=512), at=kit.clock.now))
    assert [(a.version, a.variant) for a in desired.assignments] == [("2", "fp32")]


def test_a_deploy_the_registry_cannot_serve_is_refused(kit: Kit) -> None:
    with pytest.raises(ModelNotFoundError, match="no model 'lm' version 9"):
        kit.fleet.deploy("lm", "9")
    for name, version, tier, cls in (("../x", "1", "", ""), ("lm", "01", "", ""), ("lm", "1", "region", "")):
        with pytest.raises(InvalidArgumentError):
            kit.fleet.deploy(name, version, tier, cls)
    assert kit.inventory.deployments() == []


def test_a_deployed_version_gone_from_the_registry_is_unassigned(kit: Kit) -> None:
    keys = new_keys()
    enroll(kit, keys)
    kit.fleet.deploy("lm", "1")
    del kit.catalog.models[("lm", "1")]
    (unassigned,) = kit.fleet.check_in(signed(keys)).unassigned
    assert unassigned.reason == "model 'lm' version 1 is not in the registry"


# The registry as catalog


def test_the_registry_catalog_reads_the_signed_facts_and_keys(tmp_path: Path) -> None:
    registry = new_registry(tmp_path)
    published = publish_lm(registry)
    catalog = RegistryCatalog(registry.registry)
    offers = {o.variant: o for o in catalog.offers("lm", "1")}
    assert set(offers) == {"fp32", "int8"}
    fp32 = offers["fp32"]
    signed_custom = registry.registry.target("lm", "1", "fp32").custom
    assert fp32.target_path == "models/lm/1/fp32"
    assert fp32.key_id == signed_custom["encryption"]["key_id"]
    assert fp32.peak_memory_bytes == 10_000_000  # batch size 1 of the hand-made profile (8 is 12 MB)
    assert fp32.hardware_classes == tuple(signed_custom["hardware_classes"])
    assert len(catalog.content_key(fp32.key_id)) == 32
    assert catalog.offers("lm", "2") == [] and len(published) == 2


def test_peak_memory_is_read_at_batch_size_1_or_else_the_smallest_profiled(tmp_path: Path) -> None:
    registry = new_registry(tmp_path)
    publish_lm(registry)
    custom = copy.deepcopy(registry.registry.target("lm", "1", "fp32").custom)
    assert offer_from_facts(VariantFacts.from_dict(custom)).peak_memory_bytes == 10_000_000
    custom["peak_memory_bytes"] = {"4": 11_000_000, "16": 13_000_000}
    custom["latency_us"] = {"4": {"p50": 1, "p99": 2}, "16": {"p50": 1, "p99": 2}}
    assert offer_from_facts(VariantFacts.from_dict(custom)).peak_memory_bytes == 11_000_000


def test_a_hardware_class_deployment_does_not_reach_a_node_that_states_no_class(kit: Kit) -> None:
    keys = new_keys()
    enroll(kit, keys, facts(cls=""))
    kit.fleet.deploy("arm", "1", hardware_class="cpu-aarch64")
    assert kit.fleet.check_in(signed(keys, facts(cls=""))).assignments == ()
    kit.fleet.deploy("arm", "1")  # deployed to every class: the class-less node takes the variant for aarch64
    kit.clock.now += 1
    (assignment,) = kit.fleet.check_in(signed(keys, facts(cls=""), at=kit.clock.now)).assignments
    assert assignment.variant == "int8"
