"""Hard examples for retraining (issue 11, item 5): what a node keeps of an escalation, as JSON.

An escalation is an input the node's model was unsure about: a request answered
upstream because its confidence was under the threshold, or a generation some of
whose tokens were decided upstream. With ``[telemetry] hard_examples_rate`` above
0 (a privacy switch: off by default, since the inputs leave the node) that share of
them is sent on the telemetry path as one OTLP log record each
(:mod:`services.rpc.hard_example_log`), whose body is built here:

request (``kind`` = ``request``)::

    {"format": 1, "kind": "request",
     "model": {"name": …, "version": …}, "upstream": {"name": …, "version": …},
     "confidence": 0.41, "threshold": 0.8,
     "inputs": {NAME: TENSOR, …},
     "outputs": "full" | "top_k",
     "device_answer": {NAME: TENSOR | TOP_K, …}, "upstream_answer": {NAME: TENSOR | TOP_K, …}}

    TENSOR = {"datatype": "FP32", "shape": [1, 4], "data": [… flat, row-major …]}
             (BYTES elements as UTF-8 text, undecodable bytes backslash-escaped)
    TOP_K  = {"datatype": …, "shape": …, "top_k": K, "indices": [[…] per row], "values": [[…] per row]}

generation (``kind`` = ``generation``)::

    {"format": 1, "kind": "generation", "model": …, "upstream": {"name": …, "version": ""},
     "mode": "confidence" | "speculative", "confidence": mean device confidence, "threshold": 0.4,
     "prompt": "…", "output": "… the text streamed …",
     "escalations": [{"index": 3, "device_token": "e" | null, "device_confidence": 0.2 | null,
                      "upstream_token": "a", "upstream_probability": 0.7}, …]}

An example is at most ``max_bytes`` of UTF-8 JSON: a request's answers are sent in
full when they fit, else as their top-:data:`TOP_K` per row (``"outputs": "top_k"``);
what still does not fit is not built at all when its inputs alone cannot fit
(:func:`cannot_fit`), and is dropped and counted otherwise. This module decides
nothing about sampling or sending: it only builds bodies (numpy in, text out).
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any, Protocol

import numpy as np

from services.tensors import datatype_of

Array = np.ndarray[Any, Any]

FORMAT = 1  # the body's "format": raised when a field changes meaning
KIND_REQUEST = "request"
KIND_GENERATION = "generation"
TOP_K = 5  # classes kept per row of an answer too large to send in full
FULL = "full"
TOPK = "top_k"
# Every JSON number or string costs at least this many bytes (one character and a separator).
_MIN_ELEMENT_BYTES = 2


@dataclass(frozen=True)
class Escalation:
    """One token of a generation that the upstream decided.

    Attributes:
        index: Its position in the generation (0 = the first generated token).
        device_token: What the device had (the token it sampled, or its draft), None if it had none.
        device_confidence: The device's confidence at that step, None if not measured.
        upstream_token: The token emitted (from the upstream's distribution).
        upstream_probability: The upstream's probability of it.
    """

    index: int
    device_token: str | None
    device_confidence: float | None
    upstream_token: str
    upstream_probability: float


class HardExampleSink(Protocol):
    """Where the data plane offers its escalations (a port: it samples, builds and sends, never blocking)."""

    def request(
        self,
        model: tuple[str, str],
        inputs: Mapping[str, Array],
        local: Mapping[str, Array],
        confidence: float,
        threshold: float,
        answer: Any,
    ) -> None:
        """Offers a request answered upstream for low confidence.

        Args:
            model: The local model's name and version.
            inputs: The request's input tensors, as decoded.
            local: The local answer's outputs.
            confidence: The local answer's confidence.
            threshold: The threshold it was under.
            answer: The upstream's answer, in the transport's own form (the adapter reads it).
        """
        ...

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
        """Offers a finished generation that escalated tokens (``escalations`` is not empty)."""
        ...


def cannot_fit(arrays: Mapping[str, Array], max_bytes: int) -> bool:
    """Whether tensors are sure to exceed ``max_bytes`` as JSON (a cheap check before building anything)."""
    return sum(int(a.size) for a in arrays.values()) * _MIN_ELEMENT_BYTES > max_bytes


def _element(value: Any) -> Any:
    if isinstance(value, bytes):
        return value.decode("utf-8", errors="backslashreplace")
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)  # JSON has no NaN or infinity; "nan", "inf", "-inf" keep what it was
    return value


def tensor_json(array: Array) -> dict[str, Any]:
    """A tensor as JSON: its OIP datatype, shape and flat row-major data."""
    flat = np.asarray(array).reshape(-1)
    data = [_element(v) for v in flat.tolist()]
    return {"datatype": datatype_of(array), "shape": list(array.shape), "data": data}


def top_k_json(array: Array, k: int = TOP_K) -> dict[str, Any]:
    """A numeric answer as its ``k`` largest values per row (the last axis), with their indices.

    Non-numeric or scalar outputs are kept whole.
    """
    if array.dtype == object or array.ndim == 0 or array.shape[-1] <= k:
        return tensor_json(array)
    rows = np.asarray(array, dtype=np.float64).reshape(-1, array.shape[-1])
    order = np.argsort(-rows, axis=1, kind="stable")[:, :k]
    values = np.take_along_axis(rows, order, axis=1)
    return {
        "datatype": datatype_of(array),
        "shape": list(array.shape),
        "top_k": k,
        "indices": order.tolist(),
        "values": [[_element(v) for v in row] for row in values.tolist()],
    }


def _fits(body: dict[str, Any], max_bytes: int) -> str | None:
    try:
        text = json.dumps(body, separators=(",", ":"), ensure_ascii=False, allow_nan=False)
    except ValueError:  # a NaN in a decoded answer: no training job could read it
        return None
    return text if len(text.encode("utf-8")) <= max_bytes else None


def request_body(
    model: tuple[str, str],
    upstream: tuple[str, str],
    confidence: float,
    threshold: float,
    inputs: Mapping[str, Array],
    local: Mapping[str, Array],
    answer: Mapping[str, Array],
    max_bytes: int,
) -> str | None:
    """The body of a request-level example, or None when it does not fit ``max_bytes`` even with top-k answers."""
    if cannot_fit(inputs, max_bytes):
        return None
    head: dict[str, Any] = {
        "format": FORMAT,
        "kind": KIND_REQUEST,
        "model": {"name": model[0], "version": model[1]},
        "upstream": {"name": upstream[0], "version": upstream[1]},
        "confidence": _element(float(confidence)),
        "threshold": _element(float(threshold)),
        "inputs": {name: tensor_json(a) for name, a in inputs.items()},
    }
    if not cannot_fit({**inputs, **{f"l.{k}": v for k, v in local.items()}, **answer}, max_bytes):
        full = _fits(
            {
                **head,
                "outputs": FULL,
                "device_answer": {n: tensor_json(a) for n, a in local.items()},
                "upstream_answer": {n: tensor_json(a) for n, a in answer.items()},
            },
            max_bytes,
        )
        if full is not None:
            return full
    return _fits(
        {
            **head,
            "outputs": TOPK,
            "device_answer": {n: top_k_json(a) for n, a in local.items()},
            "upstream_answer": {n: top_k_json(a) for n, a in answer.items()},
        },
        max_bytes,
    )


def generation_body(
    model: tuple[str, str],
    upstream_model: str,
    mode: str,
    threshold: float,
    confidence: float,
    prompt: str,
    output: str,
    escalations: Sequence[Escalation],
    max_bytes: int,
) -> str | None:
    """The body of a generation's example, or None when it does not fit ``max_bytes``."""
    if (len(prompt) + len(output) + len(escalations) * 16) > max_bytes:
        return None  # each escalation takes well over 16 bytes: sure not to fit
    return _fits(
        {
            "format": FORMAT,
            "kind": KIND_GENERATION,
            "model": {"name": model[0], "version": model[1]},
            "upstream": {"name": upstream_model, "version": ""},
            "mode": mode,
            "confidence": _element(float(confidence)),
            "threshold": _element(float(threshold)),
            "prompt": prompt,
            "output": output,
            "escalations": [asdict(e) for e in escalations],
        },
        max_bytes,
    )
