"""Which variant a node gets: the most accurate that fits its memory, hardware class and runtime (issue 9 #2)."""

from __future__ import annotations

import pytest

from tier2_region.fleet.assignment import (
    VariantOffer,
    choose_variant,
    parse_version,
    unreadable_offer,
    version_at_least,
)
from tier2_region.fleet.domain import NodeFacts

MB = 1024 * 1024


def node(budget_mb: float = 256, hardware_class: str = "cpu-x86_64", runtime: str = "1.20.1") -> NodeFacts:
    return NodeFacts("device-1", "device", hardware_class, int(budget_mb * MB), runtime)


def offer(
    variant: str,
    memory_mb: float,
    accuracy: float | None = 0.5,
    classes: tuple[str, ...] = (),
    minimum: str = "",
) -> VariantOffer:
    peak = int(memory_mb * MB)
    return VariantOffer(variant, f"models/lm/1/{variant}", f"key-{variant}", peak, classes, minimum, accuracy)


def test_the_most_accurate_variant_that_fits_wins() -> None:
    fp32, int8 = offer("fp32", 100, 0.52), offer("int8", 40, 0.50)
    assert choose_variant(node(256), [int8, fp32]) == fp32
    # fp32 no longer fits: the next most accurate does.
    assert choose_variant(node(64), [int8, fp32]) == int8


def test_ties_in_accuracy_go_to_the_smaller_variant_and_an_unsigned_accuracy_ranks_last() -> None:
    small, large = offer("small", 10, 0.5), offer("large", 20, 0.5)
    assert choose_variant(node(), [large, small]) == small
    unknown = offer("unknown", 1, None)
    assert choose_variant(node(), [unknown, large]) == large
    assert choose_variant(node(), [unknown]) == unknown  # it still fits, and is all there is


def test_a_model_none_of_whose_variants_fit_gets_the_reason_of_each() -> None:
    reason = choose_variant(node(128), [offer("fp32", 420), offer("int8", 210)])
    assert reason == "no variant fits: fp32 needs 420.0 MB, budget 128.0 MB; int8 needs 210.0 MB, budget 128.0 MB"


def test_memory_at_the_budget_fits_one_byte_over_does_not() -> None:
    exact = VariantOffer("v", "models/m/1/v", "k", 1000, (), "", 0.5)
    assert choose_variant(NodeFacts("d", "device", "", 1000, "1.20"), [exact]) == exact
    assert isinstance(choose_variant(NodeFacts("d", "device", "", 999, "1.20"), [exact]), str)


def test_hardware_class_must_be_listed_unless_the_variant_is_for_any() -> None:
    arm = offer("arm", 10, 0.9, classes=("cpu-aarch64",))
    anywhere = offer("any", 10, 0.5)
    assert choose_variant(node(hardware_class="cpu-aarch64"), [arm, anywhere]) == arm
    assert choose_variant(node(hardware_class="cpu-x86_64"), [arm, anywhere]) == anywhere
    # A node that states no class takes any (the contract: "empty = any").
    assert choose_variant(node(hardware_class=""), [arm, anywhere]) == arm
    reason = choose_variant(node(hardware_class="cpu-x86_64"), [arm])
    assert reason == "no variant fits: arm is for cpu-aarch64, the node is cpu-x86_64"


def test_onnxruntime_versions_compare_numerically() -> None:
    assert parse_version("1.20.1rc1") == (1, 20, 1)
    assert parse_version("v1") is None
    assert version_at_least("1.20", "1.9")  # as strings "1.20" < "1.9"
    assert not version_at_least("1.9.9", "1.20")
    assert version_at_least("1.20", "1.20.0")
    assert version_at_least("anything", "")
    assert not version_at_least("", "1.0")
    needs_new = offer("new", 10, 0.9, minimum="1.21")
    old_ok = offer("old", 10, 0.5, minimum="1.9")
    assert choose_variant(node(runtime="1.20.1"), [needs_new, old_ok]) == old_ok
    assert choose_variant(node(runtime="1.21.0"), [needs_new, old_ok]) == needs_new
    reason = choose_variant(node(runtime="1.20.1"), [needs_new])
    assert reason == "no variant fits: new needs onnxruntime 1.21 or newer, the node has 1.20.1"


@pytest.mark.parametrize("runtime", ["", "unknown"])
def test_a_node_without_a_readable_runtime_fits_no_variant_with_a_minimum(runtime: str) -> None:
    assert isinstance(choose_variant(node(runtime=runtime), [offer("v", 1, minimum="1.0")]), str)


def test_a_variant_without_a_memory_profile_or_readable_facts_fits_nowhere() -> None:
    unprofiled = VariantOffer("v", "models/m/1/v", "k", None, (), "", 0.9)
    broken = unreadable_offer("w", "models/m/1/w", "its signed facts cannot be read")
    reason = choose_variant(node(), [unprofiled, broken])
    assert reason == ("no variant fits: v has no signed memory profile; w: its signed facts cannot be read")


def test_no_variants_at_all_is_a_reason_too() -> None:
    assert choose_variant(node(), []) == "no variant fits: the model has no variants"
