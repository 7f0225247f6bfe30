"""The registry core: a real TUF repository, real encryption, real SQLite; profiles made by hand."""

from __future__ import annotations

import hashlib
import json
import os
import stat
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from tuf.api.metadata import Metadata

from services.engine import onnx_session
from services.errors import (
    ConfigError,
    DuplicateVariantError,
    InvalidArgumentError,
    InvalidModelError,
    PreconditionError,
    QuantizationGateError,
    SignatureMismatchError,
)
from services.updates.content_encryption import decrypt_artifact
from services.updates.golden_vectors import GoldenVectors
from tests.support.onnx_models import linear_model
from tests.support.registry import (
    FakeClock,
    RegistryKit,
    lm_variants,
    new_registry,
    publish_lm,
    submissions,
    tree,
)
from tier2_region.registry import model_inspection, quantization_gate
from tier2_region.registry import registry as registry_module
from tier2_region.registry.model_inspection import inspect_model, signature_from_json
from tier2_region.registry.pipeline import PipelineOptions, prepare, publish_model
from tier2_region.registry.quantization_gate import GateOverride
from tier2_region.registry.registry import ModelRegistry, check_variant_name
from tier2_region.registry.signing_keys import generate_keys, load_keys, load_signer
from tier2_region.registry.tuf_repository import ExpiryPolicy, TufRepository

REQUIRED_CUSTOM = {
    "name", "version", "variant", "plaintext_sha256", "signature", "peak_memory_bytes", "latency_us", "accuracy",
    "confidence_threshold", "hardware_classes", "min_onnxruntime_version", "opset", "golden_vectors", "encryption",
    "gate", "max_batch_size", "load_time_us",
}  # fmt: skip


@pytest.fixture
def kit(tmp_path: Path) -> RegistryKit:
    return new_registry(tmp_path)


def _versions(repo: TufRepository) -> tuple[int, int, int]:
    state = repo.state()
    return state.timestamp.signed.version, state.snapshot.signed.version, state.targets.signed.version


def test_publish_signs_the_encrypted_blob_and_the_profile(kit: RegistryKit) -> None:
    files = lm_variants(kit.files)
    published = publish_lm(kit)
    repo = kit.registry.repository
    targets = repo.targets()
    assert set(targets) == {
        "models/lm/1/fp32", "models/lm/1/fp32.golden.json", "models/lm/1/int8", "models/lm/1/int8.golden.json",
    }  # fmt: skip
    for item in published:
        info = targets[item.target_path]
        blob = (repo.targets_dir / f"models/lm/1/{info.hashes['sha256']}.{item.variant}").read_bytes()
        # Length and hashes cover the encrypted bytes, not the model.
        info.verify_length_and_hashes(blob)
        plaintext = files[item.variant].read_bytes()
        assert plaintext not in blob
        record = next(r for r in kit.registry.variants() if r.variant == item.variant)
        key = kit.registry.database.content_key(record.key_id)
        assert decrypt_artifact(blob, key, item.target_path) == plaintext
        custom = info.custom
        assert custom.keys() >= REQUIRED_CUSTOM
        assert custom["plaintext_sha256"] == inspect_model(files[item.variant]).sha256
        assert custom["encryption"]["key_id"] == record.key_id
        assert custom["peak_memory_bytes"] == {"1": 10_000_000, "8": 12_000_000}
        assert custom["signature"]["inputs"] == [{"name": "input_ids", "datatype": "INT64", "shape": [-1, 4]}]
        assert custom["opset"] == 17 and custom["golden_vectors"] == f"{item.target_path}.golden.json"
        assert custom["properties"]["edgecascade.task"] == "char-lm"
        golden = repo.targets_dir / f"models/lm/1/{targets[custom['golden_vectors']].hashes['sha256']}"
        golden_json = json.loads(Path(f"{golden}.{item.variant}.golden.json").read_bytes())
        assert GoldenVectors.from_json(golden_json).outputs["probs"].shape == (1, 31)
    # Two fresh content keys, never the same.
    keys = {kit.registry.database.content_key(r.key_id) for r in kit.registry.variants()}
    assert len(keys) == 2 and all(len(k) == 32 for k in keys)


def test_every_publish_bumps_targets_snapshot_and_timestamp(kit: RegistryKit) -> None:
    repo = kit.registry.repository
    assert _versions(repo) == (1, 1, 1)
    publish_lm(kit)
    assert _versions(repo) == (2, 2, 2)
    publish_lm(kit, version="2", seed=1)
    assert _versions(repo) == (3, 3, 3)
    state = repo.state()
    # Each role is signed by the key root names for it.
    root = state.root.signed
    root.verify_delegate("targets", state.targets.signed_bytes, state.targets.signatures)
    root.verify_delegate("snapshot", state.snapshot.signed_bytes, state.snapshot.signatures)
    root.verify_delegate("timestamp", state.timestamp.signed_bytes, state.timestamp.signatures)
    assert [(r.name, r.version, r.variant) for r in kit.registry.variants()] == [
        ("lm", "1", "fp32"), ("lm", "1", "int8"), ("lm", "2", "fp32"), ("lm", "2", "int8"),
    ]  # fmt: skip


def test_not_onnx_is_refused_before_anything_is_written(kit: RegistryKit, tmp_path: Path) -> None:
    before = tree(kit.registry.directory)
    junk = tmp_path / "junk.onnx"
    junk.write_bytes(b"\x08\x07this is not a model at all")
    good = lm_variants(kit.files)["fp32"]
    with pytest.raises(InvalidModelError, match=r"junk\.onnx is not an ONNX model"):
        prepare({"fp32": good, "int8": junk}, "fp32", PipelineOptions())
    empty = tmp_path / "empty.onnx"
    empty.write_bytes(b"")
    with pytest.raises(InvalidModelError, match="not an ONNX model"):
        inspect_model(empty)
    assert tree(kit.registry.directory) == before


def test_a_declared_signature_that_does_not_match_is_refused(kit: RegistryKit) -> None:
    before = tree(kit.registry.directory)
    declared = signature_from_json(
        {
            "inputs": [{"name": "input_ids", "datatype": "INT64", "shape": [-1, 8]}],
            "outputs": [{"name": "probs", "datatype": "FP32", "shape": [-1, 31]}],
        },
        "test",
    )
    options = PipelineOptions(declared_signature=declared)
    with pytest.raises(SignatureMismatchError, match=r"input 'input_ids' is INT64 \[-1, 4\], declared INT64 \[-1, 8\]"):
        prepare(lm_variants(kit.files), "fp32", options)
    with pytest.raises(SignatureMismatchError, match=r"input 'input_ids' is INT64 \[-1, 4\], declared INT64 \[-1, 8\]"):
        publish_model(kit.registry, kit.keys, "lm", "1", submissions(lm_variants(kit.files)), options)
    assert tree(kit.registry.directory) == before


def test_variants_of_one_version_must_share_a_signature(kit: RegistryKit) -> None:
    other = linear_model(kit.files / "lin.onnx")
    with pytest.raises(SignatureMismatchError, match="variant 'int8'"):
        prepare({"fp32": lm_variants(kit.files)["fp32"], "int8": other}, "fp32", PipelineOptions())
    publish_lm(kit)
    before = tree(kit.registry.directory)
    subs = submissions({"fp16": other})
    with pytest.raises(SignatureMismatchError, match="as published earlier"):
        publish_model(kit.registry, kit.keys, "lm", "1", subs, PipelineOptions())
    assert tree(kit.registry.directory) == before


def test_a_duplicate_variant_is_refused_and_nothing_changes(kit: RegistryKit) -> None:
    publish_lm(kit)
    before = tree(kit.registry.directory)
    with pytest.raises(DuplicateVariantError, match="'lm' version 1 variant 'fp32' is already published"):
        publish_lm(kit)
    assert tree(kit.registry.directory) == before
    assert _versions(kit.registry.repository) == (2, 2, 2)


def test_the_quantization_gate_refuses_a_large_drop_unless_overridden(kit: RegistryKit) -> None:
    before = tree(kit.registry.directory)
    failing = submissions(lm_variants(kit.files), int8_accuracy=0.48)  # 2 points below the reference
    with pytest.raises(QuantizationGateError) as refused:
        publish_model(kit.registry, kit.keys, "lm", "1", failing, PipelineOptions())
    message = refused.value.message
    assert "variant 'int8' fails the quantization gate" in message
    assert "50.00% (reference) → 48.00%, a drop of 2.00 points where at most 1.00 is allowed" in message
    assert "--override-gate" in message
    assert tree(kit.registry.directory) == before
    # A looser limit passes; an override publishes and is signed into the metadata.
    publish_model(kit.registry, kit.keys, "lm", "1", failing, PipelineOptions(max_drop_points=2.5))
    override = GateOverride("accepted for the demo", "tester", "2030-01-01T00:00:00+00:00")
    publish_model(kit.registry, kit.keys, "lm", "2", failing, PipelineOptions(override=override))
    gate = kit.registry.target("lm", "2", "int8").custom["gate"]
    assert gate == {
        "drop_points": "2.0000",
        "max_drop_points": "1.0000",
        "passed": False,
        "override": {"reason": "accepted for the demo", "by": "tester", "at": "2030-01-01T00:00:00+00:00"},
    }
    assert kit.registry.target("lm", "2", "fp32").custom["gate"]["override"] is None


def test_a_profile_of_another_file_is_refused(kit: RegistryKit) -> None:
    subs = list(submissions(lm_variants(kit.files)))
    subs[1] = type(subs[1])(subs[1].variant, subs[1].facts, subs[0].profile)
    with pytest.raises(InvalidArgumentError, match="measured on another file"):
        publish_model(kit.registry, kit.keys, "lm", "1", subs, PipelineOptions())


@pytest.mark.parametrize(
    ("name", "version", "variant"), [("../x", "1", "fp32"), ("lm", "01", "fp32"), ("lm", "1", "A/B")]
)
def test_unsafe_names_are_refused(kit: RegistryKit, name: str, version: str, variant: str) -> None:
    subs = submissions({variant if "/" not in variant else "fp32": lm_variants(kit.files)["fp32"]})
    if "/" in variant:
        subs = (type(subs[0])(variant, subs[0].facts, subs[0].profile),)
    with pytest.raises(InvalidArgumentError):
        publish_model(kit.registry, kit.keys, name, version, subs, PipelineOptions())


def test_keys_are_private_files_and_loose_ones_are_refused(tmp_path: Path) -> None:
    key_dir = tmp_path / "keys"
    written = generate_keys(key_dir, root_keys=3)
    assert [p.name for p in written] == ["root-1.pem", "root-2.pem", "root-3.pem", "targets.pem", "online.pem"]
    assert stat.S_IMODE(key_dir.stat().st_mode) == 0o700
    assert all(stat.S_IMODE(p.stat().st_mode) == 0o600 for p in written)
    with pytest.raises(ConfigError, match="refusing to overwrite"):
        generate_keys(key_dir)
    assert len(load_keys(key_dir, key_dir).root) == 3
    os.chmod(key_dir / "online.pem", 0o644)
    with pytest.raises(ConfigError, match="accessible by group or others"):
        load_signer(key_dir / "online.pem")
    # The serving process loads the online key only.
    os.chmod(key_dir / "online.pem", 0o600)
    serving = load_keys(key_dir, publisher=False)
    assert serving.root == () and serving.targets is None and serving.online is not None


def test_root_threshold_and_keys_are_configurable(tmp_path: Path) -> None:
    key_dir, root_dir = tmp_path / "keys", tmp_path / "offline-root"
    generate_keys(key_dir, root_dir, root_keys=3)
    registry = ModelRegistry(tmp_path / "registry")
    with pytest.raises(ConfigError, match="root threshold must be between 1 and the number of root keys"):
        registry.create(load_keys(key_dir, root_dir), 4, key_dir, root_dir)
    registry.create(load_keys(key_dir, root_dir), 2, key_dir, root_dir)
    root = Metadata.from_bytes(registry.repository.trusted_root())
    assert root.signed.roles["root"].threshold == 2
    assert len(root.signed.roles["root"].keyids) == 3 and len(root.signatures) == 3
    assert {row[0] for row in registry.database.signing_keys()} == {"root", "targets", "snapshot+timestamp"}
    assert all(str(root_dir) in loc for role, _, loc in registry.database.signing_keys() if role == "root")


def test_online_roles_are_re_signed_before_they_expire(tmp_path: Path) -> None:
    clock = FakeClock()
    expiry = ExpiryPolicy(timestamp=timedelta(hours=24), snapshot=timedelta(days=7), resign_margin=timedelta(hours=6))
    kit = new_registry(tmp_path, clock, expiry)
    repo = kit.registry.repository
    assert kit.registry.refresh_online(kit.keys) == []
    clock.advance(timedelta(hours=17))
    assert kit.registry.refresh_online(kit.keys) == []
    clock.advance(timedelta(hours=2))  # 5 h left on the timestamp
    assert kit.registry.refresh_online(kit.keys) == ["timestamp"]
    assert _versions(repo) == (2, 1, 1)
    assert repo.state().timestamp.signed.expires == clock.now.replace(microsecond=0) + timedelta(hours=24)
    clock.advance(timedelta(days=6, hours=1))  # snapshot within its margin too
    assert kit.registry.refresh_online(kit.keys) == ["snapshot", "timestamp"]
    assert _versions(repo) == (3, 2, 1)


def test_an_interrupted_publish_leaves_the_previous_version_and_is_settled(kit: RegistryKit) -> None:
    publish_lm(kit)
    before = _versions(kit.registry.repository)

    def crash(step: str) -> None:
        if step == "snapshot":
            raise RuntimeError("power cut")

    subs = submissions(lm_variants(kit.files, seed=1))
    with pytest.raises(RuntimeError, match="power cut"):
        publish_model(kit.registry, kit.keys, "lm", "2", subs, PipelineOptions(), on_step=crash)
    assert _versions(kit.registry.repository) == before
    assert {r.version for r in kit.registry.database.variants(include_pending=True)} == {"1"}
    # Files of the uncommitted change are unreferenced; the next publish goes ahead.
    assert kit.registry.repository.unreferenced_files()
    publish_model(kit.registry, kit.keys, "lm", "2", subs, PipelineOptions())
    assert _versions(kit.registry.repository) == (3, 3, 3)


def test_reconcile_keeps_committed_pending_rows_and_drops_the_rest(kit: RegistryKit) -> None:
    def stop_before_marking(step: str) -> None:
        if step == "timestamp":
            raise KeyboardInterrupt  # after the commit point, before the rows are marked

    with pytest.raises(KeyboardInterrupt):
        publish_model(
            kit.registry,
            kit.keys,
            "lm",
            "1",
            submissions(lm_variants(kit.files)),
            PipelineOptions(),
            stop_before_marking,
        )
    # The failure handler settled the rows against the committed state: they were committed.
    assert [r.state for r in kit.registry.database.variants(include_pending=True)] == ["published", "published"]
    assert kit.registry.reconcile() == ([], [])


def test_publish_encrypts_and_signs_the_bytes_that_were_inspected(
    kit: RegistryKit, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Issue 7 #2: a file replaced after inspection (here: while the gate runs) must not be published."""
    files = lm_variants(kit.files)
    subs = submissions(files)
    inspected = {variant: path.read_bytes() for variant, path in files.items()}
    others = lm_variants(kit.files / "other", seed=7)
    real_gate = quantization_gate.check_gate

    def replace_files_then_gate(*args: Any, **kwargs: Any) -> Any:
        for variant, path in files.items():
            path.write_bytes(others[variant].read_bytes())
        return real_gate(*args, **kwargs)

    monkeypatch.setattr(registry_module, "check_gate", replace_files_then_gate)
    published = publish_model(kit.registry, kit.keys, "lm", "1", subs, PipelineOptions())
    assert {v: p.read_bytes() for v, p in files.items()} != inspected  # the files on disk did change
    repo = kit.registry.repository
    for item in published:
        blob = (repo.targets_dir / f"models/lm/1/{item.sha256}.{item.variant}").read_bytes()
        record = next(r for r in kit.registry.variants() if r.variant == item.variant)
        plaintext = decrypt_artifact(blob, kit.registry.database.content_key(record.key_id), item.target_path)
        assert plaintext == inspected[item.variant]
        assert hashlib.sha256(plaintext).hexdigest() == item.custom["plaintext_sha256"]
        assert len(plaintext) == item.custom["plaintext_length"]


def test_inspection_reads_the_file_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The signature is read from the same bytes that were hashed, even if the file is replaced meanwhile."""
    lm = lm_variants(tmp_path)["fp32"]
    original = lm.read_bytes()
    other = linear_model(tmp_path / "lin.onnx").read_bytes()
    real_session = onnx_session.OnnxSession

    def replace_then_load(path: Path, *args: Any, **kwargs: Any) -> Any:
        lm.write_bytes(other)
        return real_session(path, *args, **kwargs)

    monkeypatch.setattr(model_inspection, "OnnxSession", replace_then_load)
    facts = inspect_model(lm)
    assert facts.sha256 == hashlib.sha256(original).hexdigest()
    assert [s.name for s in facts.signature.inputs] == ["input_ids"]


@pytest.mark.parametrize("variant", ["fp32\n", "int8\n"])
def test_a_variant_name_with_a_trailing_newline_is_refused(variant: str) -> None:
    """Issue 7 #11b: ``$`` matches before a final newline; names must match in full."""
    with pytest.raises(InvalidArgumentError, match="variant name"):
        check_variant_name(variant)


@pytest.mark.parametrize(("name", "version"), [("lm\n", "1"), ("lm", "1\n"), ("lm", "\u00b9")])
def test_a_model_name_or_version_with_a_trailing_newline_is_refused(kit: RegistryKit, name: str, version: str) -> None:
    before = tree(kit.registry.directory)
    with pytest.raises(InvalidArgumentError):
        publish_model(kit.registry, kit.keys, name, version, submissions(lm_variants(kit.files)), PipelineOptions())
    assert tree(kit.registry.directory) == before


def test_a_publish_that_would_outgrow_the_targets_size_cap_is_refused(kit: RegistryKit) -> None:
    """Issue 7 #11c: targets.json may not grow past the registry's cap (a small cap injected)."""
    publish_lm(kit)
    state = kit.registry.repository.state()
    current = len((kit.registry.repository.metadata_dir / f"{state.targets.signed.version}.targets.json").read_bytes())
    kit.registry.close()
    small = ModelRegistry(kit.registry.directory, targets_max_length=current + 1000)
    try:
        before = tree(kit.registry.directory)
        with pytest.raises(PreconditionError, match=r"targets metadata would grow to \d+ bytes") as refused:
            publish_model(small, kit.keys, "lm", "2", submissions(lm_variants(kit.files, seed=1)), PipelineOptions())
        assert f"{current + 1000}" in refused.value.message
        # A policy, not a client limit: every device downloads the whole targets.json on each change.
        assert "every device downloads the whole targets metadata" in refused.value.message
        assert "TUF delegations" in refused.value.message
        assert tree(kit.registry.directory) == before
        assert [r.version for r in small.variants()] == ["1", "1"]
    finally:
        small.close()
