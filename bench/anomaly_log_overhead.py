"""What adaptive logging adds to a request on the serving path (issue 10, item 1).

Microseconds per request spent in ``CallRoute`` + ``FleetMetrics.record``, side by
side without and with the node's :class:`~services.rpc.anomaly_log.AnomalyLog`
attached, for an ordinary local answer (routine sampling at 0, slow-outlier
detection on), and for the anomaly paths — a forwarded call and an error — both
when the token bucket sends them (a record built and queued) and when it drops
them (the steady state of a flood). Exports go to a closed port, in the
processor's own thread. Prints one JSON object.

    .venv/bin/python -m bench.anomaly_log_overhead
"""

from __future__ import annotations

import json
import timeit
from collections.abc import Callable

N = 50_000
SENT = 60  # records per timed run of a path that sends: 5 runs x 4 paths stay within the export queue


def _best(fn: Callable[[], None], number: int = N) -> float:
    """Microseconds per call, the best of five runs."""
    return round(min(timeit.repeat(fn, number=number, repeat=5)) / number * 1e6, 2)


def micro() -> dict[str, float]:
    """Microseconds per request, by path, without and with the log."""
    from opentelemetry.sdk.metrics import MeterProvider
    from opentelemetry.sdk.metrics.export import InMemoryMetricReader
    from opentelemetry.sdk.resources import Resource

    from services.inference import NodeIdentity
    from services.rpc.anomaly_log import AnomalyLog
    from services.rpc.fleet_metrics import CallRoute, FleetMetrics
    from services.tier_config import TelemetrySection

    node = NodeIdentity("tier0", "d")
    result: dict[str, float] = {}
    for mode in ("off", "on"):
        metrics = FleetMetrics(MeterProvider(metric_readers=[InMemoryMetricReader()]))
        log = None
        if mode == "on":
            # A huge bucket: every anomaly is built and queued (the cost of one that is sent).
            settings = TelemetrySection(export=True, timeout_s=0.1, anomalies_per_s=10_000, anomaly_burst=100_000)
            log = AnomalyLog(settings, "127.0.0.1:9", Resource.create({}))
            metrics.use_log(log)

        def local(metrics: FleetMetrics = metrics) -> None:
            route = CallRoute(node, "lin", "")
            route.routed("lin", "1", "")
            metrics.record(route, "ok", 0.0012)

        def forwarded(metrics: FleetMetrics = metrics) -> None:
            route = CallRoute(node, "big", "")
            route.routed("big", "", "model_not_held")
            metrics.record(route, "forwarded", 0.0042)

        def error(metrics: FleetMetrics = metrics) -> None:
            route = CallRoute(node, "lin", "")
            route.routed("lin", "1", "")
            metrics.record(route, "error", 0.0001, error=ValueError())

        result[f"local_ok_{mode}"] = _best(local)
        if log is None:
            result["forwarded_off"] = _best(forwarded)
            result["error_off"] = _best(error)
            continue
        # Sent: few enough that the queue never fills.
        result["forwarded_sent"] = _best(forwarded, number=SENT)
        result["error_sent"] = _best(error, number=SENT)
        log.bucket = type(log.bucket)(1e-9, 1, 0.0)
        log.bucket.take(0.0)  # empty from now on: every anomaly is rate-limited
        result["forwarded_rate_limited"] = _best(forwarded)
        result["error_rate_limited"] = _best(error)
        log.provider.shutdown()
    result.update(isolated())
    return result


def isolated() -> dict[str, float]:
    """Microseconds of ``AnomalyLog.request`` alone, by path (what the log adds, free of the histogram's noise)."""
    from opentelemetry.sdk.resources import Resource

    from services.rpc.anomaly_log import AnomalyLog
    from services.tier_config import TelemetrySection

    model = {"edgecascade.model.name": "lin", "edgecascade.model.version": "1", "edgecascade.model.variant": ""}
    settings = TelemetrySection(export=True, timeout_s=0.1, anomalies_per_s=10_000, anomaly_burst=100_000)
    log = AnomalyLog(settings, "127.0.0.1:9", Resource.create({}))
    try:
        out = {
            "log_ok_slow_check_routine_0": _best(lambda: log.request("lin", "1", model, "ok", "", 0.0012, ""), 200_000),
            "log_error_sent": _best(lambda: log.request("lin", "1", model, "error", "", 0.001, "ValueError"), SENT),
            "log_fallback_sent": _best(
                lambda: log.request("big", "(unresolved)", model, "forwarded", "queue_full", 0.004, ""), SENT
            ),
        }
        log.bucket = type(log.bucket)(1e-9, 1, 0.0)
        log.bucket.take(0.0)
        out["log_error_rate_limited"] = _best(lambda: log.request("lin", "1", model, "error", "", 0.001, "E"), 50_000)
        log.detail.rate = 1.0  # every ordinary answer sampled (the elevated detail's default)
        out["log_ok_routine_1_sent"] = _best(lambda: log.request("lin", "1", model, "ok", "", 0.0012, ""), SENT)
        out["records_dropped_as_queue_full"] = log.stats.queue_full  # 0: every "sent" figure built and queued one
    finally:
        log.provider.shutdown()
    return out


def main() -> None:
    """Runs the measurement and prints it as JSON."""
    print(json.dumps({"micro_us_per_request": micro()}, indent=2))


if __name__ == "__main__":
    main()
