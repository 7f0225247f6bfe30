"""The signed variant facts: one type that the registry writes and every reader parses."""

from __future__ import annotations

import copy
import math
import re
from collections.abc import Callable
from dataclasses import replace
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
from securesystemslib.formats import encode_canonical
from tuf.api.metadata import TargetFile

from services.errors import IntegrityError, InvalidArgumentError
from services.updates import tuf_client, variant_facts
from services.updates.tuf_client import model_target
from services.updates.variant_facts import GateOverride, GoldenFacts, Latency, VariantFacts, ratio
from tests.support.registry import RegistryKit, lm_variants, new_registry, publish_lm, submissions, tree
from tier2_region.registry import model_inspection, quantization_gate, registry
from tier2_region.registry.pipeline import PipelineOptions, publish_model


@pytest.fixture(scope="module")
def kit(tmp_path_factory: pytest.TempPathFactory) -> RegistryKit:
    kit = new_registry(tmp_path_factory.mktemp("registry"))
    publish_lm(kit)
    return kit


@pytest.fixture
def custom(kit: RegistryKit) -> dict[str, Any]:
    """The signed custom field of a real published variant, as a node reads it."""
    return copy.deepcopy(kit.registry.target("lm", "1", "int8").custom)


@pytest.mark.parametrize("variant", ["fp32", "int8"])
def test_a_published_variant_round_trips_to_the_same_signed_bytes(kit: RegistryKit, variant: str) -> None:
    signed = kit.registry.target("lm", "1", variant).custom
    facts = VariantFacts.from_dict(signed, f"models/lm/1/{variant}")
    assert facts.to_dict() == signed
    assert encode_canonical(facts.to_dict()) == encode_canonical(signed)
    assert facts.unrecognized == {}
    published = next(r for r in kit.registry.variants("lm", "1") if r.variant == variant)
    assert VariantFacts.from_dict(published.custom) == facts  # the database row holds the same facts


def test_the_golden_vectors_facts_round_trip(kit: RegistryKit) -> None:
    signed = kit.registry.repository.targets()["models/lm/1/int8.golden.json"].custom
    golden = GoldenFacts.from_dict(signed)
    assert golden == GoldenFacts("lm", "1", "int8")
    assert golden.to_dict() == signed and golden.target_path == "models/lm/1/int8.golden.json"
    with pytest.raises(IntegrityError, match="signed field 'kind' is 'model'"):
        GoldenFacts.from_dict(kit.registry.target("lm", "1", "int8").custom)


def test_unknown_keys_of_a_newer_registry_survive_a_round_trip(custom: dict[str, Any]) -> None:
    custom["energy_uj"] = {"1": 350, "8": 900}
    custom["rollout"] = None
    facts = VariantFacts.from_dict(custom)
    assert facts.unrecognized == {"energy_uj": {"1": 350, "8": 900}, "rollout": None}
    assert encode_canonical(facts.to_dict()) == encode_canonical(custom)
    with pytest.raises(ValueError, match="may not repeat known ones"):
        GoldenFacts("lm", "1", "int8", unrecognized={"name": "other"})


def test_accessors(custom: dict[str, Any]) -> None:
    facts = VariantFacts.from_dict(custom)
    assert facts.peak_memory_bytes(1) == 10_000_000 and facts.peak_memory_bytes(8) == 12_000_000
    assert facts.peak_memory_bytes(64) is None
    assert facts.latency_us(8) == Latency(15, 30) and facts.latency_us(2) is None
    assert facts.threshold == 0.25 and facts.confidence_threshold == Decimal("0.250000")
    assert facts.golden_vectors == "models/lm/1/int8.golden.json"
    assert facts.target_path == "models/lm/1/int8" and facts.max_batch_size == 8
    assert facts.accuracy.metric == "next_char_top1" and facts.accuracy.validation_size == 100
    assert facts.gate.passed is True and facts.gate.override is None
    assert facts.encryption.aad == "target_path" and facts.profiled_with.intra_op_threads == 1
    assert [s.name for s in facts.signature.inputs] == ["input_ids"]


def test_a_model_target_carries_the_parsed_facts(kit: RegistryKit) -> None:
    info = kit.registry.target("lm", "1", "int8")
    target = model_target(info)
    assert target.facts == VariantFacts.from_dict(info.custom)
    assert target.custom == info.custom
    assert target.golden_vectors_path == "models/lm/1/int8.golden.json"
    assert target.peak_memory_bytes(8) == 12_000_000 and target.peak_memory_bytes(3) is None


def _set(path: str, value: Any) -> Callable[[dict[str, Any]], None]:
    def change(custom: dict[str, Any]) -> None:
        *parents, last = path.split(".")
        node = custom
        for key in parents:
            node = node[key]
        node[last] = value

    return change


def _drop(path: str) -> Callable[[dict[str, Any]], None]:
    def change(custom: dict[str, Any]) -> None:
        *parents, last = path.split(".")
        node = custom
        for key in parents:
            node = node[key]
        del node[last]

    return change


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (_set("schema", "edgecascade.model/2"), "'schema' is 'edgecascade.model/2', not 'edgecascade.model/1'"),
        (_set("kind", "golden_vectors"), "'kind' is 'golden_vectors', not 'model': not a model variant"),
        (_set("plaintext_sha256", "A" * 64), "'plaintext_sha256' must be 64 lowercase hex"),
        (_set("plaintext_sha256", "a" * 63), "'plaintext_sha256' must be 64 lowercase hex"),
        (_set("peak_memory_bytes.8", -1), "'peak_memory_bytes.8' must be a non-negative integer, got -1"),
        (_set("peak_memory_bytes", {"08": 1}), "'peak_memory_bytes.08' is not a batch size"),
        (_set("latency_us.1.p99", 1.5), "'latency_us.1.p99' must be a non-negative integer"),
        (_set("plaintext_length", True), "'plaintext_length' must be a non-negative integer, got True"),
        (_set("max_batch_size", 0), "'max_batch_size' must be an integer of at least 1"),
        (_drop("accuracy"), "'accuracy' is missing"),
        (_drop("accuracy.metric"), "'accuracy.metric' is missing"),
        (_drop("published_at"), "'published_at' is missing"),
        (_set("accuracy.value", 0.5), "'accuracy.value' must be a decimal string"),
        (_set("accuracy.value", "5e-1"), "'accuracy.value' must be a decimal string"),
        (_set("confidence_threshold", "nan"), "'confidence_threshold' must be a decimal string"),
        (_set("gate.passed", "yes"), "'gate.passed' must be true or false"),
        (_set("gate.override", {"reason": "why"}), "'gate.override.by' is missing"),
        (_set("encryption", "aes"), "'encryption' must be a JSON object"),
        (_set("name", "../x"), "'name' is not valid: model name '../x'"),
        (_set("version", "01"), "'version' is not valid"),
        (_set("variant", "A/B"), "'variant' is not valid"),
        (_set("signature", {"inputs": "x", "outputs": []}), "'signature': 'inputs' must be a list"),
        (_set("hardware_classes", "x86_64"), "'hardware_classes' must be a list of strings"),
        (_set("properties", {"edgecascade.task": 1}), "'properties' must be an object of strings"),
        (_set("golden_vectors", None), "'golden_vectors' must be a string"),
    ],
)
def test_a_bad_field_is_refused_as_an_integrity_error_naming_it(
    custom: dict[str, Any], change: Callable[[dict[str, Any]], None], message: str
) -> None:
    change(custom)
    with pytest.raises(IntegrityError, match=f"^models/lm/1/int8: signed field {re.escape(message)}"):
        VariantFacts.from_dict(custom, "models/lm/1/int8")


def test_a_custom_field_that_is_not_an_object_is_refused() -> None:
    with pytest.raises(IntegrityError, match="signed field 'custom' must be a JSON object"):
        VariantFacts.from_dict(None)


def test_model_target_refuses_facts_that_do_not_parse(kit: RegistryKit, custom: dict[str, Any]) -> None:
    genuine = kit.registry.target("lm", "1", "int8")
    custom["peak_memory_bytes"]["1"] = "lots"
    info = TargetFile(genuine.length, genuine.hashes, genuine.path, {"custom": custom})
    with pytest.raises(IntegrityError, match=r"models/lm/1/int8: signed field 'peak_memory_bytes\.1'"):
        model_target(info)
    golden = kit.registry.repository.targets()["models/lm/1/int8.golden.json"]
    with pytest.raises(IntegrityError, match="not a model variant published by edgecascade"):
        model_target(golden)


def test_decimals_are_written_back_exactly() -> None:
    assert ratio(0.5) == Decimal("0.500000") and format(ratio(-0.01234, 4), "f") == "-0.0123"
    assert format(ratio(1.0, 4), "f") == "1.0000"
    with pytest.raises(InvalidArgumentError, match="finite number"):
        ratio(math.nan)


def test_the_gate_decision_is_signed_as_gate_facts() -> None:
    override = GateOverride("accepted", "tester", "2030-01-01T00:00:00+00:00")
    decision = quantization_gate.GateDecision("int8", 2.0, 1.0, False, override)
    assert (
        decision.to_json()
        == decision.facts().to_dict()
        == {
            "drop_points": "2.0000",
            "max_drop_points": "1.0000",
            "passed": False,
            "override": {"reason": "accepted", "by": "tester", "at": "2030-01-01T00:00:00+00:00"},
        }
    )


def test_each_check_is_one_function() -> None:
    assert registry.check_variant_name is variant_facts.check_variant_name
    assert registry.check_model_ref is variant_facts.check_model_ref
    assert model_inspection.check_signature is variant_facts.check_signature
    assert model_inspection.signature_from_json is variant_facts.signature_from_json
    assert model_inspection.signature_to_json is variant_facts.signature_to_json
    assert quantization_gate.GateOverride is variant_facts.GateOverride
    assert tuf_client.is_sha256 is variant_facts.is_sha256


def test_the_registry_refuses_to_sign_facts_no_reader_accepts(tmp_path: Path) -> None:
    fresh = new_registry(tmp_path)
    subs = submissions(lm_variants(fresh.files))
    broken = replace(subs[1], profile=replace(subs[1].profile, load_time_ms=-1.0))
    before = tree(fresh.registry.directory)
    with pytest.raises(IntegrityError, match=r"models/lm/1/int8: signed field 'load_time_us' must be a non-negative"):
        publish_model(fresh.registry, fresh.keys, "lm", "1", (subs[0], broken), PipelineOptions())
    assert tree(fresh.registry.directory) == before
