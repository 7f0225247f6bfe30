"""Hard examples end to end: device → edge (relay) → a real region, and out as JSON Lines (issue 11, item 5).

The device escalates a request for low confidence (the request's own threshold of 1.0); the
edge answers it; with ``hard_examples_rate`` 1.0 the device sends the inputs with both answers
as a hard-example log record, the edge relays it, the region stores it and
``edgecascade hard-examples export`` writes it as one JSON line. With the default rate of 0
the same escalation sends no example.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from edgecascade.__main__ import main
from services.engine.model_repository import ModelRepository
from services.inference import FALLBACK_REASON, SERVED_BY, THRESHOLD
from tests.integration import test_anomaly_logs as anomaly_chain
from tests.integration.test_anomaly_logs import Chain, eventually
from tests.support.onnx_models import linear_model
from tests.support.requests import infer_request, params

chain_factory = anomaly_chain.chain_factory  # region ← edge ← enrolled device, the device's [telemetry] as given

X = np.array([[0.5, -1.0, 2.0, 0.25]], np.float32)


def _edge_holds_lin(tmp_path: Path) -> None:
    """The edge gets its own copy of the device's ``lin`` (another seed), so an escalation is answered there."""
    ModelRepository(tmp_path / "edge").add("lin", linear_model(tmp_path / "files" / "lin-edge.onnx", seed=5))


async def test_an_escalated_request_reaches_the_region_store_and_exports_as_jsonl(
    chain_factory: Callable[..., Any], tmp_path: Path, capsys: Any
) -> None:
    _edge_holds_lin(tmp_path)
    chain: Chain = await chain_factory(hard_examples_rate=1.0)
    assert chain.device.hard_examples is not None
    answer = params(await chain.stub.ModelInfer(infer_request("lin", {"x": X}, **{THRESHOLD: 1.0}), timeout=10))
    assert answer[FALLBACK_REASON] == "low_confidence" and answer[SERVED_BY] == "tier1:edge-1"

    assert chain.log.stats.emitted.get("hard_example") == 1 and chain.log.stats.hard_examples_dropped == 0
    await chain.log.flush()
    store = chain.receiver.store
    assert store is not None
    await eventually(lambda: len(store.hard_examples()) == 1)
    ((_, example),) = store.hard_examples()
    assert (example.node_id, example.kind, example.model, example.version) == ("device-1", "request", "lin", "1")
    assert (example.upstream_model, example.upstream_version) == ("lin", "1")
    assert example.threshold == 1.0 and example.confidence is not None and example.confidence < 1.0
    assert len(example.trace_id) == 32 and example.trace_id != "0" * 32

    capsys.readouterr()
    assert main(["hard-examples", "export", "--format", "jsonl", "--telemetry", str(store.path)]) == 0
    (line,) = capsys.readouterr().out.splitlines()
    exported = json.loads(line)
    assert exported["node_id"] == "device-1" and exported["trace_id"] == example.trace_id
    body = exported["example"]
    assert body["inputs"]["x"] == {"datatype": "FP32", "shape": [1, 4], "data": [0.5, -1.0, 2.0, 0.25]}
    device_probs = body["device_answer"]
    upstream_probs = body["upstream_answer"]
    assert set(device_probs) == set(upstream_probs) and body["outputs"] == "full"
    (name,) = device_probs
    assert device_probs[name]["data"] != upstream_probs[name]["data"]  # two models, two answers


async def test_with_the_default_rate_an_escalation_sends_no_example(
    chain_factory: Callable[..., Any], tmp_path: Path
) -> None:
    _edge_holds_lin(tmp_path)
    chain: Chain = await chain_factory()
    assert chain.device.hard_examples is None
    answer = params(await chain.stub.ModelInfer(infer_request("lin", {"x": X}, **{THRESHOLD: 1.0}), timeout=10))
    assert answer[FALLBACK_REASON] == "low_confidence"

    await chain.log.flush()
    await eventually(lambda: len(chain.anomalies()) == 1)  # the fallback anomaly went the same way
    store = chain.receiver.store
    assert store is not None
    assert store.hard_examples() == [] and "hard_example" not in chain.log.stats.emitted
    assert chain.receiver.counts.get("logs.hard_examples.stored", 0) == 0
