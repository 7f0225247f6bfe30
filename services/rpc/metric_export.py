"""The node's OTLP metric export to its upstream: the stock exporter, counted.

:class:`PeriodicExportingMetricReader` collects and exports in its own thread, so
exporting never runs on the event loop that serves requests. Each export has a
deadline (``[telemetry] timeout_s``, the exporter's own retries of UNAVAILABLE
included); one that fails is counted and dropped, never raised: with the default
cumulative temporality the next export carries what a lost one held.
"""

from __future__ import annotations

import logging
from typing import Any

from opentelemetry.exporter.otlp.proto.grpc.metric_exporter import OTLPMetricExporter
from opentelemetry.metrics import CallbackOptions, Observation
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import MetricExportResult, MetricsData, PeriodicExportingMetricReader

from services.tier_config import TelemetrySection

log = logging.getLogger("edgecascade.telemetry")

# Data points per export request: well under what a receiver takes at once (the region's default is 10,000).
MAX_POINTS_PER_EXPORT = 2_000
EXPORT_RESULT = "edgecascade.export.result"  # attribute of edgecascade.telemetry.exports: ok or failed


class CountedMetricExporter(OTLPMetricExporter):
    """The stock OTLP/gRPC metric exporter, counting its results and never raising.

    Args:
        endpoint: ``host:port`` of the receiver (plaintext on the mesh's own channels, like the node's other calls).
        timeout_s: Deadline of one export, its retries included.
    """

    def __init__(self, endpoint: str, timeout_s: float) -> None:
        super().__init__(
            endpoint=f"http://{endpoint}",
            insecure=True,
            timeout=timeout_s,
            max_export_batch_size=MAX_POINTS_PER_EXPORT,
        )
        self.target = endpoint
        self.succeeded = 0
        self.failed = 0
        self._failing = False

    def export(self, metrics_data: MetricsData, timeout_millis: float = 10_000, **kwargs: Any) -> MetricExportResult:
        """Exports one collection; a failure is counted and logged once per streak."""
        try:
            result = super().export(metrics_data, timeout_millis=timeout_millis, **kwargs)
        except Exception:
            # The reader's thread would only log it; a bug here must not stop later exports either.
            log.exception("metric export to %s raised", self.target)
            result = MetricExportResult.FAILURE
        if result is MetricExportResult.SUCCESS:
            self.succeeded += 1
            if self._failing:
                log.info("metric export to %s works again", self.target)
            self._failing = False
        else:
            self.failed += 1
            if not self._failing:
                log.warning("metric export to %s failed; counting failures until it works again", self.target)
            self._failing = True
        return result


def upstream_reader(
    settings: TelemetrySection, target: str
) -> tuple[PeriodicExportingMetricReader, CountedMetricExporter]:
    """The reader that exports the node's metrics to ``target`` every ``interval_s``, and its exporter."""
    exporter = CountedMetricExporter(target, settings.timeout_s)
    reader = PeriodicExportingMetricReader(
        exporter,
        export_interval_millis=settings.interval_s * 1000,
        # The reader's own bound on collect + export, a little above the exporter's deadline.
        export_timeout_millis=settings.timeout_s * 1000 + 1000,
    )
    return reader, exporter


def observe_exports(provider: MeterProvider, exporter: CountedMetricExporter) -> None:
    """Reports the exporter's results as ``edgecascade.telemetry.exports`` (by ``edgecascade.export.result``)."""

    def observe(options: CallbackOptions) -> list[Observation]:
        return [
            Observation(exporter.succeeded, {EXPORT_RESULT: "ok"}),
            Observation(exporter.failed, {EXPORT_RESULT: "failed"}),
        ]

    provider.get_meter("edgecascade.telemetry").create_observable_counter(
        "edgecascade.telemetry.exports", [observe], unit="{export}", description="Metric exports by result"
    )
