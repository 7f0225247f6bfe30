"""The node's hard-example sink: samples escalations and sends them on the telemetry path (issue 11, item 5).

The data plane offers every escalation (:class:`~services.hard_examples.HardExampleSink`);
this adapter keeps ``[telemetry] hard_examples_rate`` of them (one random draw: an
example not sampled costs nothing more), reads the upstream's answer from its
``ModelInferResponse``, and hands the rest to the node's
:class:`~services.rpc.anomaly_log.AnomalyLog`, which rate-limits, bounds and
counts it and builds the body (:mod:`services.hard_examples`) only once it is
sure to be queued. The record carries the request's trace and span (the current
context), the model's and the upstream's names and versions, the confidence and
the threshold as attributes (:mod:`services.telemetry_names`).

Built only when hard examples are on (rate above 0, logs sent): with the default
rate of 0 nothing is sampled, built or sent.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np

from protos.inference import grpc_service_pb2 as pb
from services.hard_examples import Array, Escalation, generation_body, request_body
from services.rpc.anomaly_log import AnomalyLog
from services.telemetry_names import (
    HARD_EXAMPLE_CONFIDENCE,
    HARD_EXAMPLE_GENERATION,
    HARD_EXAMPLE_KIND,
    HARD_EXAMPLE_REQUEST,
    HARD_EXAMPLE_THRESHOLD,
    MODEL_NAME,
    MODEL_VERSION,
    UPSTREAM_MODEL,
    UPSTREAM_VERSION,
)
from services.tensors import decode_raw
from services.tier_config import TelemetrySection


class HardExampleLog:
    """Samples the data plane's escalations and sends them as hard-example log records.

    Args:
        settings: The node's ``[telemetry]`` section (rate and size bound).
        log: The node's adaptive logging (its export path, bounds and counts).
        draw: Uniform random numbers in [0, 1) (tests pass a fixed sequence).
    """

    def __init__(self, settings: TelemetrySection, log: AnomalyLog, draw: Callable[[], float] = random.random) -> None:
        self.rate = settings.hard_examples_rate
        self.max_bytes = settings.hard_examples_max_bytes
        self.log = log
        self._draw = draw
        self.offered = 0  # escalations offered
        self.sampled = 0  # of which sampled (sent, or dropped and counted in the log's stats)

    def _sample(self) -> bool:
        self.offered += 1
        if not self.rate or self._draw() >= self.rate:
            return False
        self.sampled += 1
        return True

    def request(
        self,
        model: tuple[str, str],
        inputs: Mapping[str, Array],
        local: Mapping[str, Array],
        confidence: float,
        threshold: float,
        answer: Any,
    ) -> None:
        """Sends a sampled request-level escalation (``answer``: a ``Relayed`` holding a ``ModelInferResponse``)."""
        if not self._sample():
            return
        response = getattr(answer, "message", None)
        upstream = (
            (response.model_name, response.model_version) if isinstance(response, pb.ModelInferResponse) else ("", "")
        )
        attributes = _attributes(HARD_EXAMPLE_REQUEST, model, upstream, confidence, threshold)

        def build() -> str | None:
            outputs = _outputs(response) if isinstance(response, pb.ModelInferResponse) else {}
            return request_body(model, upstream, confidence, threshold, inputs, local, outputs, self.max_bytes)

        self.log.hard_example(attributes, build)

    def generation(
        self,
        model: tuple[str, str],
        upstream_model: str,
        mode: str,
        threshold: float,
        confidence: float,
        prompt: str,
        output: str,
        escalations: Sequence[Escalation],
    ) -> None:
        """Sends a sampled generation that escalated tokens."""
        if not escalations or not self._sample():
            return
        attributes = _attributes(HARD_EXAMPLE_GENERATION, model, (upstream_model, ""), confidence, threshold)
        self.log.hard_example(
            attributes,
            lambda: generation_body(
                model, upstream_model, mode, threshold, confidence, prompt, output, escalations, self.max_bytes
            ),
        )


def _attributes(
    kind: str, model: tuple[str, str], upstream: tuple[str, str], confidence: float, threshold: float
) -> dict[str, Any]:
    return {
        HARD_EXAMPLE_KIND: kind,
        MODEL_NAME: model[0],
        MODEL_VERSION: model[1],
        UPSTREAM_MODEL: upstream[0],
        UPSTREAM_VERSION: upstream[1],
        HARD_EXAMPLE_CONFIDENCE: float(confidence),
        HARD_EXAMPLE_THRESHOLD: float(threshold),
    }


def _outputs(response: pb.ModelInferResponse) -> dict[str, np.ndarray[Any, Any]]:
    """The upstream's outputs (raw contents, as every tier answers); an output that does not decode is left out."""
    outputs: dict[str, np.ndarray[Any, Any]] = {}
    for tensor, raw in zip(response.outputs, response.raw_output_contents, strict=False):
        try:
            outputs[tensor.name] = decode_raw(tensor.name, tensor.datatype, tensor.shape, raw)
        except Exception:  # another tier's answer; a hard example is never worth an error
            continue
    return outputs
