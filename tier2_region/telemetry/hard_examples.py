"""Hard examples at the region: what a node's hard-example record must be, and the line it is exported as.

A node marks a hard example (issue 11, item 5) with :data:`HARD_EXAMPLE` = true on an
OTLP log record whose body is the example as a JSON object (its format is
:mod:`services.hard_examples`'; these names are the node's
:mod:`services.telemetry_names`, with the same values: a unit test holds them
equal). The receiver takes its body whole up to ``[telemetry]
hard_examples_max_bytes`` (a larger one is refused, never cut);
:func:`admit` accepts it or names why not; the store keeps the newest
``hard_examples_max_rows`` (:mod:`.hard_example_table`); :func:`export_line`
is what ``edgecascade hard-examples export`` writes for each, one JSON object
per line:

    id, node_id, received_at (ISO 8601, UTC, the region's clock), time (the
    node's), trace_id, span_id, kind (request | generation), model {name,
    version}, upstream {name, version}, confidence, threshold, example (the
    body as the node built it: inputs, the device's answer and the upstream's,
    or a generation's prompt, output and escalated positions)
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any

from tier2_region.telemetry.points import AttributeValue, HardExample, LogEntry

# The node's names (services.telemetry_names), as the region reads them.
HARD_EXAMPLE = "edgecascade.hard_example"
HARD_EXAMPLE_KIND = "edgecascade.hard_example.kind"
HARD_EXAMPLE_REQUEST = "request"
HARD_EXAMPLE_GENERATION = "generation"
HARD_EXAMPLE_KINDS = (HARD_EXAMPLE_REQUEST, HARD_EXAMPLE_GENERATION)
UPSTREAM_MODEL = "edgecascade.upstream.model.name"
UPSTREAM_VERSION = "edgecascade.upstream.model.version"
HARD_EXAMPLE_CONFIDENCE = "edgecascade.hard_example.confidence"
HARD_EXAMPLE_THRESHOLD = "edgecascade.hard_example.threshold"
MODEL_NAME = "edgecascade.model.name"
MODEL_VERSION = "edgecascade.model.version"

MAX_TEXT = 256  # model names and versions
BAD = "bad_hard_example"  # the admission reason of a malformed one
TOO_LARGE = "hard_example_too_large"  # the conversion's reason for a body over the bound


def is_hard_example(attributes: Mapping[str, AttributeValue]) -> bool:
    """Whether a record's own attributes mark it as a hard example (a bool true, or the string "true")."""
    flag = attributes.get(HARD_EXAMPLE)
    return flag is True or flag == "true"


def _text(value: AttributeValue) -> str | None:
    return value if isinstance(value, str) and len(value) <= MAX_TEXT else None


def _share(value: AttributeValue) -> float | None:
    """A confidence or threshold: a number in [0, 1], else None (not sent, or not one)."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    number = float(value)
    return number if math.isfinite(number) and 0.0 <= number <= 1.0 else None


def admit(
    node_id: str,
    record: LogEntry,
    attributes: Mapping[str, AttributeValue],
    resource: Mapping[str, AttributeValue],
    received_at: float,
) -> HardExample | None:
    """The hard example a record holds, or None when it is malformed (counted as :data:`BAD`).

    It must name its kind (one of :data:`HARD_EXAMPLE_KINDS`) and its model (on the record or its
    resource), and its body must be a JSON object of that kind.
    """
    kind = attributes.get(HARD_EXAMPLE_KIND)
    model = _text(attributes.get(MODEL_NAME, resource.get(MODEL_NAME)))
    version = _text(attributes.get(MODEL_VERSION, resource.get(MODEL_VERSION, "")))
    upstream = _text(attributes.get(UPSTREAM_MODEL, ""))
    upstream_version = _text(attributes.get(UPSTREAM_VERSION, ""))
    if kind not in HARD_EXAMPLE_KINDS or not model or version is None or upstream is None or upstream_version is None:
        return None
    try:
        body = json.loads(record.body)
    except ValueError:
        return None
    if not isinstance(body, dict) or body.get("kind") != kind:
        return None
    return HardExample(
        node_id=node_id,
        received_at=received_at,
        time_ns=record.time_ns,
        trace_id=record.trace_id.hex(),
        span_id=record.span_id.hex(),
        kind=str(kind),
        model=model,
        version=version,
        upstream_model=upstream,
        upstream_version=upstream_version,
        confidence=_share(attributes.get(HARD_EXAMPLE_CONFIDENCE)),
        threshold=_share(attributes.get(HARD_EXAMPLE_THRESHOLD)),
        body=record.body,
    )


def _iso(seconds: float) -> str:
    return datetime.fromtimestamp(seconds, UTC).isoformat(timespec="milliseconds")


def export_line(row_id: int, example: HardExample) -> dict[str, Any]:
    """The JSON object ``hard-examples export`` writes for one stored example (the fields of the module docstring)."""
    return {
        "id": row_id,
        "node_id": example.node_id,
        "received_at": _iso(example.received_at),
        "time": _iso(example.time_ns / 1e9) if example.time_ns else None,
        "trace_id": example.trace_id,
        "span_id": example.span_id,
        "kind": example.kind,
        "model": {"name": example.model, "version": example.version},
        "upstream": {"name": example.upstream_model, "version": example.upstream_version},
        "confidence": example.confidence,
        "threshold": example.threshold,
        "example": json.loads(example.body),
    }
