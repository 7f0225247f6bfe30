"""Hard examples at the region: admission, the bounded table and its counts, and the export (issue 11.5)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from opentelemetry.proto.logs.v1 import logs_pb2

from edgecascade.__main__ import main
from services import telemetry_names as names
from tier2_region.config import TelemetrySection
from tier2_region.telemetry.admission import Limits, admit_logs
from tier2_region.telemetry.otlp_servicer import resource_logs
from tier2_region.telemetry.points import Anomaly, HardExample, LogEntry, LogsBatch, ResourceLogs
from tier2_region.telemetry.store import TelemetryStore

TRACE = bytes(range(16))
SPAN = bytes(range(8))


def _body(kind: str = "request", **more: Any) -> str:
    tensor = {"datatype": "FP32", "shape": [1], "data": [1]}
    return json.dumps({"format": 1, "kind": kind, "inputs": {"x": tensor}, **more})


def _attributes(kind: str = "request", model: str = "cls", **more: Any) -> tuple[tuple[str, Any], ...]:
    pairs = {
        names.HARD_EXAMPLE: True,
        names.HARD_EXAMPLE_KIND: kind,
        names.MODEL_NAME: model,
        names.MODEL_VERSION: "1",
        names.UPSTREAM_MODEL: model,
        names.UPSTREAM_VERSION: "3",
        names.HARD_EXAMPLE_CONFIDENCE: 0.4,
        names.HARD_EXAMPLE_THRESHOLD: 0.8,
        **more,
    }
    return tuple(sorted(pairs.items()))


def _entry(body: str | None = None, **attributes: Any) -> LogEntry:
    text = _body() if body is None else body
    return LogEntry(_attributes(**attributes), 123_000_000_000, 9, "INFO", text, TRACE, SPAN)


def _example(n: int, model: str = "cls", received_at: float = 1000.0) -> HardExample:
    return HardExample(
        "d1", received_at + n, n, TRACE.hex(), SPAN.hex(), "request", model, "1", model, "3", 0.4, 0.8, _body(n=n)
    )


# -- admission ---------------------------------------------------------------------------------------------------


def test_hard_examples_are_admitted_apart_from_anomalies_and_malformed_ones_are_refused() -> None:
    resource = ResourceLogs(
        (),
        (
            _entry(),
            _entry(kind="generation", body=_body("generation", prompt="p")),
            _entry(body="not json"),
            _entry(body=_body("generation")),  # its body says another kind
            _entry(kind="other"),
            _entry(model=""),
            LogEntry(((names.ANOMALY, True),), 1, 13, "WARN", "fallback", b"", b""),
        ),
    )
    kept, rejected, ignored = admit_logs("d1", resource, 2000.0)
    examples = [k for k in kept if isinstance(k, HardExample)]
    assert len(examples) == 2 and len([k for k in kept if isinstance(k, Anomaly)]) == 1
    assert dict(rejected) == {"bad_hard_example": 4} and ignored == 0
    first = examples[0]
    assert (first.kind, first.model, first.version, first.upstream_model, first.upstream_version) == (
        "request",
        "cls",
        "1",
        "cls",
        "3",
    )
    assert (first.confidence, first.threshold, first.trace_id, first.received_at) == (0.4, 0.8, TRACE.hex(), 2000.0)


def _otlp(body: str, hard: bool = True) -> logs_pb2.ResourceLogs:
    resource = logs_pb2.ResourceLogs()
    record = resource.scope_logs.add().log_records.add(severity_number=9, trace_id=TRACE, span_id=SPAN)
    record.body.string_value = body
    if hard:
        for key, value in _attributes():
            attribute = record.attributes.add(key=key)
            if isinstance(value, bool):
                attribute.value.bool_value = value
            elif isinstance(value, float):
                attribute.value.double_value = value
            else:
                attribute.value.string_value = value
    return resource


def test_a_hard_example_body_is_taken_whole_up_to_its_bound_and_refused_beyond_it() -> None:
    limits = Limits(max_body_chars=64, max_hard_example_bytes=4096)
    whole = _body(pad="x" * 2000)
    converted = resource_logs(_otlp(whole), limits)
    assert converted.records[0].body == whole and not converted.rejected  # not cut at max_body_chars
    too_large = resource_logs(_otlp(_body(pad="x" * 5000)), limits)
    assert not too_large.records and dict(too_large.rejected) == {"hard_example_too_large": 1}
    assert len(resource_logs(_otlp("y" * 500, hard=False), limits).records[0].body) == 64  # others are still cut


# -- the bounded table -------------------------------------------------------------------------------------------


@pytest.fixture
def store(tmp_path: Path) -> Iterator[TelemetryStore]:
    made = TelemetryStore(tmp_path / "telemetry.sqlite", TelemetrySection(hard_examples_max_rows=3))
    yield made
    made.close()


def test_the_store_stays_within_its_bound_and_counts_what_it_prunes(store: TelemetryStore, tmp_path: Path) -> None:
    store.write([LogsBatch(1000.0, (), tuple(_example(n) for n in range(2)))])
    store.write([LogsBatch(1010.0, (), tuple(_example(n) for n in range(2, 7)))])
    held = store.hard_examples()
    assert [e.time_ns for _, e in held] == [4, 5, 6]  # the newest three, oldest first
    stats = store.hard_example_stats()
    assert (stats.held, stats.received, stats.pruned) == (3, 7, 4)
    assert stats.by_model == {"cls": 3} and stats.bytes == sum(len(e.body) for _, e in held)
    assert store.stats["hard_examples"] == 7 and store.stats["hard_examples_pruned"] == 4
    # The counts live in the file: another process reading it sees them.
    other = TelemetryStore(store.path, TelemetrySection(hard_examples_max_rows=3))
    try:
        assert (other.hard_example_stats().received, other.hard_example_stats().pruned) == (7, 4)
    finally:
        other.close()


def test_hard_examples_are_not_pruned_by_age_and_anomalies_keep_their_own_bound(store: TelemetryStore) -> None:
    anomaly = Anomaly("d1", 1.0, 1, 13, "WARN", "slow", "", "")
    store.write([LogsBatch(1.0, (anomaly,), (_example(0, received_at=1.0),))])
    store.prune(1e9)
    assert len(store.hard_examples()) == 1 and store.anomalies("d1") == []


# -- the export --------------------------------------------------------------------------------------------------


def test_export_writes_one_json_object_per_line_with_the_documented_fields(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "telemetry.sqlite"
    store = TelemetryStore(path, TelemetrySection())
    store.write([LogsBatch(0.0, (), (_example(0, "cls", 1_700_000_000.0), _example(1, "lm", 1_700_000_000.0)))])
    store.write([LogsBatch(0.0, (), (_example(0, "cls", 1_800_000_000.0),))])
    store.close()
    out = tmp_path / "out" / "examples.jsonl"
    assert main(["hard-examples", "export", "--format", "jsonl", "--telemetry", str(path), "--out", str(out)]) == 0
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(lines) == 3
    first = lines[0]
    assert set(first) == {
        "id",
        "node_id",
        "received_at",
        "time",
        "trace_id",
        "span_id",
        "kind",
        "model",
        "upstream",
        "confidence",
        "threshold",
        "example",
    }
    assert first["model"] == {"name": "cls", "version": "1"} and first["upstream"] == {"name": "cls", "version": "3"}
    assert first["received_at"] == "2023-11-14T22:13:20.000+00:00" and first["trace_id"] == TRACE.hex()
    assert first["example"]["kind"] == "request" and first["example"]["inputs"]["x"]["data"] == [1]

    capsys.readouterr()
    assert main(["hard-examples", "export", "--telemetry", str(path), "--model", "cls", "--since", "2025-01-01"]) == 0
    captured = capsys.readouterr()
    (only,) = [json.loads(line) for line in captured.out.splitlines()]
    assert only["received_at"].startswith("2027-01-15") and "exported 1 hard example" in captured.err
    assert main(["hard-examples", "export", "--telemetry", str(path), "--limit", "1"]) == 0
    assert len(capsys.readouterr().out.splitlines()) == 1

    assert main(["hard-examples", "stats", "--json", "--telemetry", str(path)]) == 0
    stats = json.loads(capsys.readouterr().out)
    assert (stats["held"], stats["received"], stats["pruned"], stats["by_model"]) == (3, 3, 0, {"cls": 2, "lm": 1})
    assert main(["hard-examples", "export", "--telemetry", str(path), "--since", "yesterday"]) == 2
    assert main(["hard-examples", "stats", "--telemetry", str(tmp_path / "none.sqlite")]) == 2


def test_the_region_bounds_are_settings_with_defaults() -> None:
    section = TelemetrySection()
    assert (section.hard_examples_max_rows, section.hard_examples_max_bytes) == (10_000, 64 * 1024)
    with pytest.raises(Exception, match="hard_examples_max_rows"):
        TelemetrySection(hard_examples_max_rows=0)
