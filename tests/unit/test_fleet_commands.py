"""``edgecascade fleet``, ``fleet token``, ``fleet revoke`` and ``deploy`` (issue 9 #1-2)."""

from __future__ import annotations

import json
import os
import sqlite3
import time
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from edgecascade import __main__ as cli
from edgecascade import fleet_commands
from services.updates.identity import NodeKeys
from tests.support.registry import RegistryKit, new_registry, publish_lm
from tier2_region.config import FleetSection, TelemetrySection
from tier2_region.fleet.catalog import RegistryCatalog
from tier2_region.fleet.domain import CheckInReport, Enrollment, InstalledModel, NodeFacts, SignedCheckIn
from tier2_region.fleet.figures import MODEL_NAME, MODEL_VARIANT, MODEL_VERSION, NODE_ID, OUTCOME, REQUESTS
from tier2_region.fleet.fleet import Fleet
from tier2_region.fleet.inventory import Inventory, token_digest
from tier2_region.registry.registry import ModelRegistry
from tier2_region.registry.signing_keys import load_keys
from tier2_region.telemetry.admission import admit_points
from tier2_region.telemetry.points import MetricPoint, MetricsBatch, ResourceMetrics, SumPoint, Temporality
from tier2_region.telemetry.store import TelemetryStore

MB = 1024 * 1024


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str]:
    code = cli.main(list(argv))
    out = capsys.readouterr().out
    return code, out


@pytest.fixture
def state(tmp_path: Path) -> Path:
    """A state directory laid out as `edgecascade up` does: region-1/registry with lm 1 published."""
    kit = new_registry(tmp_path / "state" / "region-1")
    publish_lm(kit)
    kit.registry.close()
    return tmp_path / "state"


def enroll_and_check_in(state: Path, token: str, node_id: str = "device-1") -> NodeKeys:
    keys = NodeKeys(Ed25519PrivateKey.generate(), X25519PrivateKey.generate())
    registry = ModelRegistry(state / "region-1" / "registry")
    inventory = Inventory(state / "region-1" / "fleet.sqlite")
    try:
        fleet = Fleet(inventory, RegistryCatalog(registry), FleetSection())
        facts = NodeFacts(node_id, "device", "cpu-x86_64", 256 * MB, "1.40.0")
        fleet.enroll(Enrollment(token, facts, keys.identity_public, keys.agreement_public))
        installed = (InstalledModel("lm", "1", "int8", "refused", "golden vectors differ"),)
        report = CheckInReport(facts, int(time.time() * 1000), os.urandom(16), installed)
        data = repr(report).encode()
        fleet.check_in(SignedCheckIn(data, keys.sign(data), report))
    finally:
        inventory.close()
        registry.close()
    return keys


def test_the_fleet_verbs_are_declared_with_their_handlers() -> None:
    parser = cli._parser()
    for argv, handler in (
        (["fleet"], fleet_commands.list_fleet),
        (["fleet", "--json"], fleet_commands.list_fleet),
        (["fleet", "token"], fleet_commands.create_token),
        (["fleet", "revoke", "x"], fleet_commands.revoke_node),
        (["deploy", "lm", "1"], fleet_commands.deploy_model),
    ):
        assert parser.parse_args(argv).handler is handler


def test_token_is_printed_once_and_only_its_hash_is_stored(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    path = tmp_path / "fleet.sqlite"
    code, out = run(capsys, "fleet", "token", "--fleet", str(path), "--ttl-s", "60")
    assert code == 0, out
    token = out.splitlines()[0]
    assert len(token) >= 40 and "one-time enrollment token, valid until" in out
    with sqlite3.connect(path) as db:
        dump = "\n".join(db.iterdump())
        (expires, created) = db.execute("SELECT expires_at, created_at FROM tokens").fetchone()
    assert token not in dump and token_digest(token) in dump
    assert expires - created == 60


def test_fleet_options_given_before_the_verb_are_kept(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    code, _ = run(capsys, "fleet", "--state-dir", str(tmp_path / "s"), "token")
    assert code == 0
    assert (tmp_path / "s" / "region-1" / "fleet.sqlite").is_file()


def test_deploy_refuses_a_version_the_registry_does_not_have(capsys: pytest.CaptureFixture[str], state: Path) -> None:
    code, out = run(capsys, "deploy", "lm", "7", "--state-dir", str(state))
    assert code == 2
    assert "the registry has no model 'lm' version 7" in " ".join(out.split())
    code, out = run(capsys, "deploy", "lm", "1", "--state-dir", str(state / "nowhere"))
    assert code == 2 and "no registry in" in out
    code, out = run(capsys, "fleet", "--json", "--state-dir", str(state))
    assert code == 0 and json.loads(out) == {"window_s": None, "nodes": [], "versions": []}


def test_a_newer_deploy_of_the_same_model_and_filters_replaces_the_older(
    capsys: pytest.CaptureFixture[str], state: Path
) -> None:
    publish_lm_version_2(state)
    code, out = run(capsys, "deploy", "lm", "1", "--tier", "device", "--state-dir", str(state))
    assert code == 0, out
    assert "deployed lm version 1 to devices; 0 enrolled node(s)" in " ".join(out.split())
    code, out = run(capsys, "deploy", "lm", "2", "--tier", "device", "--state-dir", str(state))
    assert code == 0 and "(was version 1)" in out
    inventory = Inventory(state / "region-1" / "fleet.sqlite")
    try:
        assert [(d.name, d.version, d.tier) for d in inventory.deployments()] == [("lm", "2", "device")]
    finally:
        inventory.close()


def publish_lm_version_2(state: Path) -> None:
    registry = ModelRegistry(state / "region-1" / "registry")
    try:
        keys = load_keys(state / "region-1" / "keys")
        publish_lm(RegistryKit(registry, keys, state / "region-1" / "keys", state / "files"), version="2", seed=1)
    finally:
        registry.close()


def test_fleet_lists_every_node_as_json_and_as_a_table(
    capsys: pytest.CaptureFixture[str], state: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("COLUMNS", "200")
    code, out = run(capsys, "fleet", "token", "--state-dir", str(state))
    enroll_and_check_in(state, out.splitlines()[0])
    code, out = run(capsys, "deploy", "lm", "1", "--state-dir", str(state))
    assert code == 0 and "1 enrolled node(s) get it" in out
    code, out = run(capsys, "fleet", "--json", "--state-dir", str(state))
    assert code == 0
    (node,) = json.loads(out)["nodes"]
    assert node["node_id"] == "device-1" and node["tier"] == "device"
    assert node["hardware_class"] == "cpu-x86_64" and node["memory_budget_bytes"] == 256 * MB
    assert node["installed"] == [
        {
            "name": "lm",
            "version": "1",
            "variant": "int8",
            "state": "refused",
            "last_error": "golden vectors differ",
            "shadow": False,
        }
    ]
    assert node["desired"] == [{"name": "lm", "version": "1"}]
    assert node["update_state"] == "refused" and node["last_error"] == "golden vectors differ"
    assert node["last_seen"] and node["revoked"] is False
    assert node["traffic"] is None  # the region has no telemetry store
    code, out = run(capsys, "fleet", "--state-dir", str(state))
    assert code == 0
    for text in ("device-1", "256.0 MB", "refused", "golden vectors"):
        assert text in out


def test_revoke_marks_the_node_and_an_unknown_id_is_refused(capsys: pytest.CaptureFixture[str], state: Path) -> None:
    _, out = run(capsys, "fleet", "token", "--state-dir", str(state))
    enroll_and_check_in(state, out.splitlines()[0])
    code, out = run(capsys, "fleet", "revoke", "device-1", "--state-dir", str(state))
    assert code == 0 and "revoked device-1" in out
    _, out = run(capsys, "fleet", "--json", "--state-dir", str(state))
    assert json.loads(out)["nodes"][0]["revoked"] is True
    code, out = run(capsys, "fleet", "revoke", "ghost", "--state-dir", str(state))
    assert code == 2 and "no node 'ghost' is enrolled" in out


def test_fleet_shows_each_node_s_and_each_version_s_traffic_from_the_telemetry_store(
    capsys: pytest.CaptureFixture[str], state: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("COLUMNS", "250")
    _, out = run(capsys, "fleet", "token", "--state-dir", str(state))
    enroll_and_check_in(state, out.splitlines()[0])
    store = TelemetryStore(state / "region-1" / "telemetry.sqlite", TelemetrySection(path="x"))
    try:
        model = {MODEL_NAME: "lm", MODEL_VERSION: "2", MODEL_VARIANT: "int8"}
        start, now = int((time.time() - 30) * 1e9), int(time.time() * 1e9)
        points: list[MetricPoint] = [
            SumPoint(REQUESTS, tuple(sorted({**model, OUTCOME: o}.items())), start, now, n, Temporality.DELTA, True)
            for o, n in (("ok", 90.0), ("error", 6.0), ("forwarded", 4.0))
        ]
        samples, rejected, _ = admit_points("device-1", ResourceMetrics(((NODE_ID, "device-1"),), tuple(points)))
        assert not rejected
        store.write([MetricsBatch(time.time(), tuple(samples))])
    finally:
        store.close()

    code, out = run(capsys, "fleet", "--json", "--state-dir", str(state), "--window-s", "120")
    assert code == 0, out
    shown = json.loads(out)
    assert shown["window_s"] == 120
    assert shown["nodes"][0]["traffic"] == {
        "requests": 100,
        "error_rate": 0.06,
        "fallback_rate": 0.04,
        "p50_ms": None,
        "p99_ms": None,
        "p999_ms": None,
        "last_anomaly": None,
    }
    [version] = shown["versions"]
    assert (version["name"], version["version"], version["nodes"], version["requests"]) == ("lm", "2", 1, 100)
    code, out = run(capsys, "fleet", "--state-dir", str(state))
    assert code == 0 and "traffic by version" in out and "6.0 %" in out
    code, out = run(capsys, "fleet", "--state-dir", str(state), "--window-s", "0")
    assert code == 2 and "--window-s must be a positive number" in out
