"""Hard examples on the node: bodies within their size bound, sampling, and emission on the log path (issue 11.5)."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import pytest
from opentelemetry.sdk._logs.export import InMemoryLogRecordExporter, SimpleLogRecordProcessor
from opentelemetry.sdk.resources import Resource

from protos.inference import grpc_service_pb2 as pb
from services import telemetry_names as names
from services.cascade import Cascade
from services.cascade_generation import CascadePlan, CascadeTally, TokenCascade, TokenCascadeSettings
from services.dataplane import Relayed
from services.engine.generation import CharTokenizer, GenerationParams
from services.errors import ConfigError
from services.hard_examples import (
    Escalation,
    cannot_fit,
    generation_body,
    request_body,
    tensor_json,
    top_k_json,
)
from services.inference import FallbackReason
from services.rpc import anomaly_log
from services.rpc.anomaly_log import AnomalyLog
from services.rpc.hard_example_log import HardExampleLog
from services.tensors import encode_raw
from services.tier_config import TelemetrySection
from tests.unit.test_cascade_generation import DEVICE, EDGE, VOCAB, FakeUpstream, device_step
from tier2_region.telemetry import hard_examples as region

MODEL = ("cls", "1")
X = {"x": np.array([[0.5, -1.0, 2.0, 0.25]], np.float32)}
LOCAL = {"probs": np.array([[0.4, 0.35, 0.25]], np.float32)}
UPSTREAM = {"probs": np.array([[0.1, 0.8, 0.1]], np.float32)}


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def _answer(outputs: dict[str, np.ndarray[Any, Any]], name: str = "cls", version: str = "3") -> Relayed:
    response = pb.ModelInferResponse(model_name=name, model_version=version)
    for key, array in outputs.items():
        response.outputs.add(name=key, datatype="FP32", shape=list(array.shape))
        response.raw_output_contents.append(encode_raw(array))
    return Relayed(response, FallbackReason.LOW_CONFIDENCE)


# -- bodies ----------------------------------------------------------------------------------------------------


def test_a_request_body_holds_the_inputs_and_both_answers_in_full_when_they_fit() -> None:
    body = request_body(MODEL, ("cls", "3"), 0.4, 0.8, X, LOCAL, UPSTREAM, 64 * 1024)
    assert body is not None
    example = json.loads(body)
    assert example["format"] == 1 and example["kind"] == "request" and example["outputs"] == "full"
    assert example["model"] == {"name": "cls", "version": "1"}
    assert example["upstream"] == {"name": "cls", "version": "3"}
    assert example["confidence"] == pytest.approx(0.4) and example["threshold"] == pytest.approx(0.8)
    assert example["inputs"]["x"] == {"datatype": "FP32", "shape": [1, 4], "data": [0.5, -1.0, 2.0, 0.25]}
    assert example["device_answer"]["probs"]["data"] == pytest.approx([0.4, 0.35, 0.25])
    assert example["upstream_answer"]["probs"]["data"] == pytest.approx([0.1, 0.8, 0.1])


def test_answers_too_large_in_full_go_as_their_top_k_and_what_still_does_not_fit_is_refused() -> None:
    rng = np.random.default_rng(0)
    wide = {"probs": rng.random((2, 1000)).astype(np.float32)}
    body = request_body(MODEL, ("cls", "3"), 0.1, 0.5, X, wide, wide, 4096)
    assert body is not None and len(body.encode()) <= 4096
    example = json.loads(body)
    assert example["outputs"] == "top_k"
    top = example["device_answer"]["probs"]
    assert top["top_k"] == 5 and top["shape"] == [2, 1000] and len(top["indices"]) == 2
    assert top["indices"][0][0] == int(np.argmax(wide["probs"][0]))
    big_input = {"x": np.zeros((1, 5000), np.float32)}
    assert cannot_fit(big_input, 4096)
    assert request_body(MODEL, ("cls", "3"), 0.1, 0.5, big_input, LOCAL, UPSTREAM, 4096) is None


def test_bytes_tensors_are_text_and_small_outputs_keep_their_top_k_whole() -> None:
    prompt = np.array([b"The mod\xff"], dtype=object)
    assert tensor_json(prompt) == {"datatype": "BYTES", "shape": [1], "data": ["The mod\\xff"]}
    assert top_k_json(LOCAL["probs"]) == tensor_json(LOCAL["probs"])


def test_a_generation_body_lists_the_escalated_positions() -> None:
    escalations = [Escalation(2, "x", 0.1, "d", 0.7), Escalation(5, None, None, "e", 0.9)]
    body = generation_body(MODEL, "lm-edge", "confidence", 0.4, 0.6, "The mo", "dule", escalations, 4096)
    assert body is not None
    example = json.loads(body)
    assert example["kind"] == "generation" and example["upstream"] == {"name": "lm-edge", "version": ""}
    assert (example["prompt"], example["output"], example["mode"]) == ("The mo", "dule", "confidence")
    assert example["escalations"][0] == {
        "index": 2,
        "device_token": "x",
        "device_confidence": 0.1,
        "upstream_token": "d",
        "upstream_probability": 0.7,
    }
    assert generation_body(MODEL, "lm-edge", "confidence", 0.4, 0.6, "p" * 5000, "", escalations, 4096) is None


# -- sampling and emission ---------------------------------------------------------------------------------------


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def sink_of(clock: Clock) -> Iterator[Callable[..., tuple[HardExampleLog, InMemoryLogRecordExporter]]]:
    """Builds hard-example sinks over AnomalyLogs whose exports go nowhere, each record also kept in memory."""
    built: list[AnomalyLog] = []

    def build(
        draws: list[float] | None = None, max_queue: int = anomaly_log.MAX_QUEUE, **settings: Any
    ) -> tuple[HardExampleLog, InMemoryLogRecordExporter]:
        section = TelemetrySection(export=True, timeout_s=0.2, **settings)
        log = AnomalyLog(section, "127.0.0.1:9", Resource.create({}), clock=clock, max_queue=max_queue)
        memory = InMemoryLogRecordExporter()  # type: ignore[no-untyped-call]
        log.provider.add_log_record_processor(SimpleLogRecordProcessor(memory))
        built.append(log)
        sequence = iter(draws or [])
        return HardExampleLog(section, log, lambda: next(sequence, 0.0)), memory

    yield build
    for log in built:
        log.provider.shutdown()


def test_the_rate_is_off_by_default_and_a_documented_switch() -> None:
    section = TelemetrySection()
    assert section.hard_examples_rate == 0 and not section.sends_hard_examples
    assert section.hard_examples_max_bytes == 64 * 1024
    assert TelemetrySection(export=True, hard_examples_rate=0.5).sends_hard_examples
    assert not TelemetrySection(export=True, logs=False, hard_examples_rate=0.5).sends_hard_examples
    for bad in ({"hard_examples_rate": 1.5}, {"hard_examples_rate": -0.1}, {"hard_examples_max_bytes": 10}):
        with pytest.raises(ConfigError, match="hard_examples"):
            TelemetrySection(**bad)


def test_escalations_are_sampled_at_the_rate(sink_of: Callable[..., Any]) -> None:
    sink, memory = sink_of(draws=[0.1, 0.6, 0.29, 0.3], hard_examples_rate=0.3)
    for _ in range(4):
        sink.request(MODEL, X, LOCAL, 0.4, 0.8, _answer(UPSTREAM))
    assert (sink.offered, sink.sampled) == (4, 2)
    assert sink.log.stats.emitted == {"hard_example": 2} and len(memory.get_finished_logs()) == 2


def test_a_sampled_request_is_emitted_as_a_marked_record_with_both_answers(sink_of: Callable[..., Any]) -> None:
    sink, memory = sink_of(hard_examples_rate=1.0)
    sink.request(MODEL, X, LOCAL, 0.4, 0.8, _answer(UPSTREAM, "cls", "3"))
    (record,) = [r.log_record for r in memory.get_finished_logs()]
    attributes = dict(record.attributes or {})
    assert attributes[names.HARD_EXAMPLE] is True and attributes[names.HARD_EXAMPLE_KIND] == "request"
    assert (attributes[names.MODEL_NAME], attributes[names.MODEL_VERSION]) == MODEL
    assert (attributes[names.UPSTREAM_MODEL], attributes[names.UPSTREAM_VERSION]) == ("cls", "3")
    assert attributes[names.HARD_EXAMPLE_CONFIDENCE] == pytest.approx(0.4)
    assert attributes[names.HARD_EXAMPLE_THRESHOLD] == pytest.approx(0.8)
    assert record.severity_text == "INFO" and names.ANOMALY not in attributes
    example = json.loads(str(record.body))
    assert example["upstream_answer"]["probs"]["data"] == pytest.approx([0.1, 0.8, 0.1])
    assert example["inputs"]["x"]["shape"] == [1, 4]


def test_a_generation_without_escalations_sends_nothing(sink_of: Callable[..., Any]) -> None:
    sink, memory = sink_of(hard_examples_rate=1.0)
    sink.generation(MODEL, "lm-edge", "confidence", 0.4, 0.9, "p", "q", [])
    assert sink.offered == 0 and not memory.get_finished_logs()
    sink.generation(MODEL, "lm-edge", "confidence", 0.4, 0.2, "p", "q", [Escalation(0, "a", 0.1, "q", 0.9)])
    (record,) = [r.log_record for r in memory.get_finished_logs()]
    assert dict(record.attributes or {})[names.HARD_EXAMPLE_KIND] == "generation"


def test_examples_over_the_size_bound_are_dropped_and_counted(sink_of: Callable[..., Any]) -> None:
    sink, memory = sink_of(hard_examples_rate=1.0, hard_examples_max_bytes=1024)
    sink.request(MODEL, {"x": np.zeros((1, 2000), np.float32)}, LOCAL, 0.4, 0.8, _answer(UPSTREAM))
    assert sink.log.stats.hard_examples_too_large == 1 and sink.log.stats.dropped == 1
    assert not memory.get_finished_logs() and sink.log.stats.emitted == {}


def test_hard_examples_have_their_own_rate_limit_and_leave_anomalies_theirs(
    sink_of: Callable[..., Any], clock: Clock
) -> None:
    sink, _ = sink_of(hard_examples_rate=1.0, hard_examples_per_s=0.01, hard_examples_burst=2)
    for _ in range(5):
        sink.request(MODEL, X, LOCAL, 0.4, 0.8, _answer(UPSTREAM))
    stats = sink.log.stats
    assert stats.emitted == {"hard_example": 2} and stats.hard_examples_rate_limited == 3
    assert sink.log.bucket.take(clock()), "the anomalies' bucket is untouched"


def test_hard_examples_may_fill_only_their_share_of_the_queue(sink_of: Callable[..., Any]) -> None:
    sink, _ = sink_of(max_queue=8, hard_examples_rate=1.0, hard_examples_burst=100, hard_examples_per_s=100)
    for _ in range(5):
        sink.request(MODEL, X, LOCAL, 0.4, 0.8, _answer(UPSTREAM))
    # A quarter of 8: two wait for their export (the processor's thread takes them only after 200 ms).
    assert sink.log.exporter.handed == 0
    assert sink.log.stats.emitted == {"hard_example": 2} and sink.log.stats.hard_examples_queue_full == 3
    assert sink.log.stats.hard_examples_dropped == 3


def test_the_node_and_the_region_name_hard_examples_alike() -> None:
    for key in (
        "HARD_EXAMPLE",
        "HARD_EXAMPLE_KIND",
        "HARD_EXAMPLE_REQUEST",
        "HARD_EXAMPLE_GENERATION",
        "HARD_EXAMPLE_KINDS",
        "UPSTREAM_MODEL",
        "UPSTREAM_VERSION",
        "HARD_EXAMPLE_CONFIDENCE",
        "HARD_EXAMPLE_THRESHOLD",
        "MODEL_NAME",
        "MODEL_VERSION",
    ):
        assert getattr(region, key) == getattr(names, key), key


# -- token-level escalations -------------------------------------------------------------------------------------


async def test_a_generation_keeps_the_tokens_the_upstream_decided_only_when_asked() -> None:
    async def generate(plan: CascadePlan, keep: bool) -> tuple[list[Any], CascadeTally]:
        tally = CascadeTally(keep_escalations=keep)
        cascade = TokenCascade(TokenCascadeSettings(), FakeUpstream(EDGE), Cascade())
        deadline = asyncio.get_running_loop().time() + 10
        params = GenerationParams(seed=0, max_tokens=30)
        stream = cascade.generate(
            plan, CharTokenizer(VOCAB, 4), device_step(DEVICE), "ab", params, ("tier0:d",), deadline, tally
        )
        return [t async for t in stream], tally

    confidence = CascadePlan("confidence", "big", 0.5, "chosen_prob")
    tokens, tally = await generate(confidence, keep=True)
    upstream = [t for t in tokens if t.origin == "upstream"]
    assert upstream and [e.index for e in tally.escalations] == [t.index for t in upstream]
    for escalation, token in zip(tally.escalations, upstream, strict=True):
        assert escalation.upstream_token == token.text and escalation.upstream_probability == token.probability
        assert escalation.device_token != "a" and escalation.device_confidence == token.confidence
    assert (await generate(confidence, keep=False))[1].escalations == []

    tokens, tally = await generate(CascadePlan("speculative", "big", 0.5, "chosen_prob"), keep=True)
    by_index = {t.index: t for t in tokens}
    assert tally.escalations and len(tally.escalations) <= tally.drafted - tally.accepted
    for escalation in tally.escalations:  # corrected drafts: the device drafted one token, the edge emitted another
        assert by_index[escalation.index].origin == "upstream"
        assert escalation.upstream_token == by_index[escalation.index].text
