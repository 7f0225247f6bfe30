"""The request-level cascade's policy: confidence of an answer, threshold resolution, request checks (issue 11)."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
from rich.console import Console

from edgecascade.client_commands import _upstream
from protos.edgecascade.v1 import mesh_pb2
from services.cascade import (
    DEGRADED_CIRCUIT_OPEN,
    DEGRADED_ERROR,
    DEGRADED_OVERLOADED,
    DEGRADED_TIMEOUT,
    DEGRADED_UNAVAILABLE,
    OUTPUT_PROPERTY,
    THRESHOLD_PROPERTY,
    Cascade,
    CascadeAsk,
    CascadeSettings,
    degraded_reason,
    parse_request,
    reserve,
    row_confidence,
)
from services.config import load_config
from services.errors import (
    CircuitOpenError,
    ConfigError,
    DeadlineExceededError,
    InternalError,
    InvalidArgumentError,
    ModelNotFoundError,
    QueueFullError,
    UpstreamUnavailableError,
)
from services.inference import CASCADE, THRESHOLD, TensorSpec
from tier0_device.config import DeviceConfig
from tier1_edge.config import EdgeConfig

SPECS = (TensorSpec("ids", "INT64", (-1, 4)), TensorSpec("y", "FP32", (-1, 3)), TensorSpec("z", "FP32", (-1, 5)))


def test_rows_of_probabilities_are_used_as_they_are_and_logits_go_through_a_softmax() -> None:
    assert row_confidence(np.array([[0.2, 0.7, 0.1]], np.float32)) == pytest.approx(0.7)
    logits = np.array([[1.0, 2.0, 0.0]])
    expected = np.exp(2.0) / np.exp(logits).sum()
    assert row_confidence(logits) == pytest.approx(expected)
    # Several rows: the least confident one; higher ranks: every axis but the last counts rows.
    assert row_confidence(np.array([[0.9, 0.1], [0.6, 0.4]])) == pytest.approx(0.6)
    assert row_confidence(np.array([[[0.9, 0.1]], [[0.55, 0.45]]])) == pytest.approx(0.55)
    # No classes, no rows: no confidence; a broken answer: none to speak of.
    assert row_confidence(np.array([[0.3]])) is None and row_confidence(np.zeros((0, 3))) is None
    assert row_confidence(np.array([[np.nan, 0.5, 0.5]])) == 0.0
    # Rounded probabilities summing to 1 within 1e-3 (+ 1e-5 relative) are probabilities, not logits.
    assert row_confidence(np.array([[0.9901, 0.01]])) == pytest.approx(0.9901)
    assert row_confidence(np.array([[0.99, 0.011005]])) == pytest.approx(0.99)  # off by 1.005e-3


def test_the_confidence_comes_from_the_named_output_else_the_first_classifier_style_one() -> None:
    outputs: dict[str, np.ndarray[Any, Any]] = {
        "ids": np.zeros((1, 4), np.int64),
        "y": np.array([[0.1, 0.8, 0.1]], np.float32),
        "z": np.array([[0.5, 0.5, 0, 0, 0]], np.float32),
    }
    cascade = Cascade()
    assert cascade.confidence("m", {}, SPECS, outputs) == pytest.approx(0.8)
    assert cascade.confidence("m", {OUTPUT_PROPERTY: "z"}, SPECS, outputs) == pytest.approx(0.5)
    configured = Cascade(CascadeSettings(outputs={"m": "z"}))
    assert configured.confidence("m", {OUTPUT_PROPERTY: "y"}, SPECS, outputs) == pytest.approx(0.5)
    # Not requested, or no float output with classes: no confidence.
    assert cascade.confidence("m", {OUTPUT_PROPERTY: "y"}, SPECS, {"z": outputs["z"]}) is None
    assert cascade.confidence("m", {}, SPECS[:1], {"ids": outputs["ids"]}) is None


def test_the_threshold_is_the_requests_else_the_configured_else_the_signed_one() -> None:
    signed = {THRESHOLD_PROPERTY: "0.25"}
    cascade = Cascade(CascadeSettings(thresholds={"m": 0.6}))
    assert cascade.threshold("m", signed, CascadeAsk("confidence", 0.9)) == 0.9
    assert cascade.threshold("m", signed, CascadeAsk("confidence")) == 0.6
    assert cascade.threshold("other", signed, CascadeAsk("confidence")) == 0.25
    assert cascade.threshold("other", {}, CascadeAsk("confidence")) is None
    assert cascade.threshold("other", {THRESHOLD_PROPERTY: "high"}, CascadeAsk("confidence")) is None


@pytest.mark.parametrize(
    ("parameters", "expected"),
    [
        ({}, CascadeAsk("confidence")),
        ({CASCADE: "off"}, CascadeAsk("off")),
        ({CASCADE: "speculative", THRESHOLD: 0.5}, CascadeAsk("speculative", 0.5)),
        ({THRESHOLD: 1}, CascadeAsk("confidence", 1.0)),
        ({THRESHOLD: 0}, CascadeAsk("confidence", 0.0)),
    ],
)
def test_good_cascade_parameters(parameters: dict[str, Any], expected: CascadeAsk) -> None:
    assert parse_request(parameters) == expected


@pytest.mark.parametrize(
    ("parameters", "named"),
    [
        ({CASCADE: "always"}, CASCADE),
        ({CASCADE: True}, CASCADE),
        ({THRESHOLD: 1.01}, THRESHOLD),
        ({THRESHOLD: float("nan")}, THRESHOLD),
        ({THRESHOLD: False}, THRESHOLD),
        ({THRESHOLD: "0.3"}, THRESHOLD),
    ],
)
def test_bad_cascade_parameters_name_the_parameter(parameters: dict[str, Any], named: str) -> None:
    with pytest.raises(InvalidArgumentError, match=named.replace(".", r"\.")):
        parse_request(parameters)


def test_the_default_mode_is_the_nodes_and_an_off_request_does_not_cascade() -> None:
    assert Cascade(CascadeSettings(mode="off")).ask({}) == CascadeAsk("off")
    assert not CascadeAsk("off").on and CascadeAsk("speculative").on


def test_degraded_reasons_and_the_reserve() -> None:
    assert degraded_reason(CircuitOpenError("x")) == DEGRADED_CIRCUIT_OPEN
    assert degraded_reason(UpstreamUnavailableError("x")) == DEGRADED_UNAVAILABLE
    assert degraded_reason(DeadlineExceededError("x")) == DEGRADED_TIMEOUT
    assert degraded_reason(QueueFullError("x")) == DEGRADED_OVERLOADED
    assert degraded_reason(InternalError("x")) == DEGRADED_ERROR
    assert reserve(5.0) == 0.5 and reserve(0.2) == pytest.approx(0.04) and reserve(0.01) == 0.005


def test_an_upstream_without_the_model_is_not_asked_again_for_a_while() -> None:
    now = [0.0]
    cascade = Cascade(clock=lambda: now[0])
    assert not cascade.not_held("m", "", UpstreamUnavailableError("down"))
    assert not cascade.upstream_lacks("m", "")
    assert cascade.not_held("m", "", ModelNotFoundError("no"))
    assert cascade.upstream_lacks("m", "") and not cascade.upstream_lacks("m", "2")
    now[0] = 31.0
    assert not cascade.upstream_lacks("m", "")


def test_the_cascade_section_of_device_and_edge_configs() -> None:
    for config_type in (DeviceConfig, EdgeConfig):
        config = load_config(
            config_type,
            env={"EDGECASCADE_CASCADE__THRESHOLDS": "lin=0.8, lm=0.5", "EDGECASCADE_CASCADE__MODE": "off"},
            overrides={"cascade": {"outputs": ["lin=y"]}},
        )
        assert isinstance(config, DeviceConfig | EdgeConfig)
        settings = config.cascade.settings()
        assert settings == CascadeSettings("off", {"lin": 0.8, "lm": 0.5}, {"lin": "y"})
    for bad in ({"mode": "sometimes"}, {"thresholds": ["lin=2"]}, {"thresholds": ["lin"]}, {"outputs": ["=y"]}):
        with pytest.raises(ConfigError, match=r"\[cascade\]"):
            load_config(DeviceConfig, env={}, overrides={"cascade": bad})


def test_status_shows_the_breaker_of_each_nodes_upstream() -> None:
    info = mesh_pb2.GetTierInfoResponse(upstream="127.0.0.1:9")
    assert _upstream(mesh_pb2.GetTierInfoResponse()) == "-"
    assert _upstream(info) == "127.0.0.1:9"
    info.upstream_status.CopyFrom(
        mesh_pb2.UpstreamStatus(
            address="127.0.0.1:9",
            breaker_state="open",
            breaker_opened=2,
            breaker_rejected=40,
            breaker_retry_in_s=1.5,
            last_failure="upstream 127.0.0.1:9 is unavailable",
            cache_hits=1,
            cache_misses=3,
        )
    )
    console = Console(record=True, width=300)
    console.print(_upstream(info))
    text = console.export_text()
    assert "breaker open (probe in 1.5 s)" in text and "opened 2× · refused 40" in text
    assert "is unavailable" in text and "cache hits 25 % of 4" in text
