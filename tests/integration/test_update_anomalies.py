"""A failed update is an anomaly: the updater reports a refusal, and the node's log sends it as an ERROR record."""

from __future__ import annotations

from pathlib import Path

import pytest
from opentelemetry.sdk._logs.export import InMemoryLogRecordExporter, SimpleLogRecordProcessor
from opentelemetry.sdk.resources import Resource

from services.rpc.anomaly_log import AnomalyLog
from services.telemetry_names import ANOMALY, ANOMALY_KIND, ANOMALY_UPDATE, ERROR_TYPE, MODEL_NAME, MODEL_VERSION
from services.tier_config import TelemetrySection
from services.updates.update_journal import Assignment
from tests.support.registry import DirectorySource, new_registry
from tests.support.updater_node import apply, assignment, build_node, publish_real


async def test_a_refused_update_is_sent_as_an_anomaly_with_its_reason(tmp_path: Path) -> None:
    kit = new_registry(tmp_path)
    published = publish_real(kit, version="1", seed=1, hardware_classes=("gpu-h100",))
    log = AnomalyLog(TelemetrySection(export=True, timeout_s=0.2), "127.0.0.1:9", Resource.create({}))
    records = InMemoryLogRecordExporter()  # type: ignore[no-untyped-call]
    log.provider.add_log_record_processor(SimpleLogRecordProcessor(records))
    failures: list[tuple[str, str, str]] = []

    def on_failure(a: Assignment, kind: str, reason: str) -> None:
        failures.append((a.version, kind, reason))
        log.update_failed(a.name, a.version, a.variant, kind, reason)

    node = build_node(
        tmp_path / "node", DirectorySource(kit.registry.repository_dir), kit.registry.repository.trusted_root(),
        on_failure=on_failure,
    )  # fmt: skip
    try:
        [row] = await apply(node, assignment(kit, published, node.node_id, node.keys.agreement_public))
        assert row.state == "refused"
        [(version, kind, reason)] = failures
        assert (version, kind) == ("1", "refused") and "signed for hardware classes gpu-h100" in reason

        [record] = [r.log_record for r in records.get_finished_logs()]
        assert record.severity_text == "ERROR" and "gpu-h100" in str(record.body)
        attributes = dict(record.attributes or {})
        assert attributes[ANOMALY] is True and attributes[ANOMALY_KIND] == ANOMALY_UPDATE
        assert (attributes[MODEL_NAME], attributes[MODEL_VERSION], attributes[ERROR_TYPE]) == ("lm", "1", "refused")
        assert log.detail.elevated  # a failed update raises the detail like any anomaly
    finally:
        await node.close()
        await log.shutdown()
        kit.registry.close()


@pytest.mark.parametrize("kind", ["refused", "internal_error"])
def test_both_kinds_of_failure_read_as_sentences(kind: str) -> None:
    log = AnomalyLog(TelemetrySection(export=True, timeout_s=0.2), "127.0.0.1:9", Resource.create({}))
    records = InMemoryLogRecordExporter()  # type: ignore[no-untyped-call]
    log.provider.add_log_record_processor(SimpleLogRecordProcessor(records))
    try:
        log.update_failed("lm", "2", "int8", kind, "why")
        [record] = [r.log_record for r in records.get_finished_logs()]
        assert record.body == f"update of lm to version 2 (int8) {kind.replace('_', ' ')}: why"
    finally:
        log.provider.shutdown()
