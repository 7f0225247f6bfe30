"""What recording and exporting the fleet's metrics costs a device (issue 10, item 1).

1. Micro: microseconds per request spent in ``CallRoute`` + ``FleetMetrics.record``
   (the servicer's share), for a local answer, a forwarded call, and an error.
2. End to end: a device process serving a linear model (batching off) to 64
   requests in flight from this process, in three modes run side by side and
   repeated: recording off (``FleetMetrics.record`` replaced by a no-op), recording
   on with export off (the default), and recording on with export every second
   to a stand-in OTLP receiver. Prints one JSON object.

    .venv/bin/python -m bench.fleet_metrics_overhead [--seconds 5] [--rounds 3]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import tempfile
import time
import timeit
from pathlib import Path
from typing import Any

import grpc
import numpy as np

RECEIVER = """
import asyncio, sys
from tests.support.otlp_metrics_receiver import OtlpMetricsReceiver

async def main():
    receiver = OtlpMetricsReceiver()
    print(await receiver.start(), flush=True)
    await asyncio.get_running_loop().run_in_executor(None, sys.stdin.read)  # until the parent closes stdin
    print(len(receiver.raw), flush=True)
    await receiver.stop()

asyncio.run(main())
"""

CHILD = """
import sys
from services.rpc import fleet_metrics
if sys.argv[1] == "off":
    fleet_metrics.FleetMetrics.record = lambda self, *args, **kwargs: None
from services.rpc.node import main
from tier0_device.app import DEFAULTS, SPEC
sys.exit(main(SPEC, DEFAULTS, ["--config", sys.argv[2]]))
"""


def micro() -> dict[str, float]:
    """Microseconds per request of the servicer's recording, by path."""
    from opentelemetry.sdk.metrics import MeterProvider
    from opentelemetry.sdk.metrics.export import InMemoryMetricReader

    from services.inference import NodeIdentity
    from services.rpc.fleet_metrics import CallRoute, FleetMetrics

    metrics = FleetMetrics(MeterProvider(metric_readers=[InMemoryMetricReader()]))
    node = NodeIdentity("tier0", "d")

    def local() -> None:
        route = CallRoute(node, "lin", "")
        route.routed("lin", "1", "")
        metrics.record(route, "ok", 0.0012)

    def forwarded() -> None:
        route = CallRoute(node, "big", "")
        route.routed("big", "", "model_not_held")
        metrics.record(route, "forwarded", 0.0042)

    def error() -> None:
        route = CallRoute(node, "lin", "")
        route.routed("lin", "1", "")
        metrics.record(route, "error", 0.0001)

    def route_only() -> None:  # what the servicer did before: one span annotation per routing
        CallRoute(node, "lin", "").routed("lin", "1", "")

    n = 50_000
    return {
        name: round(min(timeit.repeat(fn, number=n, repeat=5)) / n * 1e6, 2)
        for name, fn in (("local_ok", local), ("forwarded", forwarded), ("error", error), ("route_only", route_only))
    }


def export_cost(address: str, exports: int = 50) -> dict[str, float]:
    """CPU milliseconds of one collect-and-export of a node's fleet metrics (10 models × ok/forwarded/error)."""
    from opentelemetry.sdk.metrics import MeterProvider

    from services.inference import NodeIdentity
    from services.rpc.fleet_metrics import CallRoute, FleetMetrics
    from services.rpc.metric_export import upstream_reader
    from services.tier_config import TelemetrySection

    reader, exporter = upstream_reader(TelemetrySection(export=True, interval_s=86_400), address)
    provider = MeterProvider(metric_readers=[reader])
    metrics = FleetMetrics(provider)
    node = NodeIdentity("tier0", "d")
    for model in range(10):
        for outcome, reason in (("ok", ""), ("forwarded", "queue_full"), ("error", "")):
            route = CallRoute(node, f"m{model}", "")
            route.routed(f"m{model}", "1", "")
            if reason:
                route.routed(f"m{model}", "", reason)
            metrics.record(route, outcome, 0.002)
    provider.force_flush()  # connects
    cpu, wall = time.process_time(), time.perf_counter()
    for _ in range(exports):
        provider.force_flush()
    result = {
        "cpu_ms_per_export": round((time.process_time() - cpu) / exports * 1000, 2),
        "wall_ms_per_export": round((time.perf_counter() - wall) / exports * 1000, 2),
        "failed_exports": exporter.failed,
    }
    provider.shutdown()
    return result


async def _load(address: str, seconds: float, in_flight: int) -> float:
    from protos.inference import grpc_service_pb2_grpc as pb_grpc
    from tests.support.requests import infer_request

    request = infer_request("lin", {"x": np.ones((1, 4), np.float32)})
    async with grpc.aio.insecure_channel(address) as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        for _ in range(200):  # warm up
            await stub.ModelInfer(request)
        done = 0
        end = time.perf_counter() + seconds

        async def client() -> None:
            nonlocal done
            while time.perf_counter() < end:
                await stub.ModelInfer(request)
                done += 1

        started = time.perf_counter()
        await asyncio.gather(*(client() for _ in range(in_flight)))
        return done / (time.perf_counter() - started)


def _run(mode: str, root: Path, receiver: str, seconds: float) -> float:
    port_file = root / f"{mode}.port"
    port_file.unlink(missing_ok=True)
    config = root / f"{mode}.toml"
    export = mode == "export"
    config.write_text(
        f'[server]\nport = 0\nnode_id = "bench-{mode}"\nport_file = "{port_file}"\n'
        f'[repository]\npath = "{root / "models"}"\n'
        f"[batching]\nmax_batch_size = 1\n[runtime]\nmax_concurrent_runs = 1\n"
        f'[telemetry]\nexport = {"true" if export else "false"}\ninterval_s = 1.0\nendpoint = "{receiver}"\n'
        '[log]\nlevel = "WARNING"\n'
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith(("EDGECASCADE_", "OTEL_"))}
    child = subprocess.Popen([sys.executable, "-c", CHILD, "off" if mode == "off" else "on", str(config)], env=env)
    try:
        for _ in range(600):
            if port_file.exists():
                break
            time.sleep(0.05)
        address = json.loads(port_file.read_text())["address"]
        return asyncio.run(_load(address, seconds, 64))
    finally:
        child.terminate()
        child.wait(30)


def end_to_end(seconds: float, rounds: int) -> dict[str, Any]:
    """Throughput (requests/s) of each mode, per round, and the ratios of the medians."""
    from services.engine.model_repository import ModelRepository
    from tests.support.onnx_models import linear_model

    # The stand-in receiver runs in its own process: in this one it would compete with the load.
    receiver = subprocess.Popen(
        [sys.executable, "-c", RECEIVER], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    assert receiver.stdout is not None
    address = receiver.stdout.readline().strip()
    cost = export_cost(address)
    runs: dict[str, list[float]] = {"off": [], "on": [], "export": []}
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        ModelRepository(root / "models").add("lin", linear_model(root / "lin.onnx"))
        for _ in range(rounds):
            for mode, values in runs.items():
                values.append(round(_run(mode, root, address, seconds), 1))
    received, _ = receiver.communicate("", timeout=30)
    median = {mode: float(np.median(values)) for mode, values in runs.items()}
    return {
        "requests_per_s": runs,
        "recording_on_over_off": round(median["on"] / median["off"], 3),
        "export_on_over_recording_on": round(median["export"] / median["on"], 3),
        "export_on_over_off": round(median["export"] / median["off"], 3),
        "exports_received": int(received.strip() or 0),
        "export": cost,
    }


def main() -> None:
    """Runs both measurements and prints them as JSON."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    result = {"micro_us_per_request": micro(), **end_to_end(args.seconds, args.rounds)}
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
