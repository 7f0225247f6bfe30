"""``python -m bench.updates``: secure model updates measured on a real mesh on this machine (issue 9).

One run measures, over real gRPC on 127.0.0.1, with a region (TUF registry and
fleet) and an edge (verifying artifact cache) in this process and devices in
their own processes (``python -m tier0_device --config FILE``):

1. **Update under load** — a device serves 64 closed-loop clients
   (``bench.update_load``, its own process) while the region's fleet deploys a
   new version; the device checks in, downloads through the edge, verifies,
   trials and hot-swaps it. Failed requests, p99 in the swap window ÷ steady
   p99, requests/s.
2. **Deploy → every device serving the new version** at a 2 s check interval,
   for 2 devices (one process each) and for 20 (the lightweight fleet: device
   nodes sharing a few ``bench.device_host`` processes). A device serves the
   new version when its own ``ModelInfer`` answer carries it.
3. **Resume** — a device downloading a ~20 MB blob through the edge is killed
   (SIGKILL) once its staging file holds half of it, and restarted; the edge
   counts the bytes of that blob it streams before and after.
4. **Cold start** — a device whose state directory holds a committed
   ``charlm-device``: process start → first inference the device answers
   itself, a few times.

Models are published through the production pipeline into a registry in a temp
dir (the ~20 MB model is built here); nothing is written in the repository but
``bench/results/updates-latest.json`` (not committed). Nothing is asserted:
numbers are reported.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import platform
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
from grpc import aio
from rich.console import Console
from rich.table import Table

from bench.update_load import charlm_request
from bench.update_mesh import (
    BIG_MODEL,
    DEVICE_MODEL,
    ROOT,
    DeviceFiles,
    Mesh,
    NodeProcess,
    Published,
    child_env,
    device_files,
    device_process,
    float_request,
    host_process,
    journal_state,
    journal_variant,
    log_tail,
    mesh,
    probe,
    publish,
    wait_journal,
    wait_serving,
)
from protos.inference import grpc_service_pb2_grpc as pb_grpc
from tier1_edge.config import EdgeConfig

CONTEXT, VOCAB = 16, 72  # charlm-device: input_ids [batch, 16], probs [batch, 72]
console = Console(highlight=False)
# Loggers of this process (the region and the edge) whose errors a device killed mid-download provokes:
# they are counted and reported with the resume measurement instead of printed as tracebacks.
BROKEN_STREAM_LOGGERS = ("opentelemetry.context", "grpc._cython.cygrpc")


class BrokenStreamLogs(logging.Filter):
    """Counts (and holds back) the error records of :data:`BROKEN_STREAM_LOGGERS`."""

    def __init__(self) -> None:
        super().__init__()
        self.counts: dict[str, int] = {}

    def filter(self, record: logging.LogRecord) -> bool:
        if record.name in BROKEN_STREAM_LOGGERS and record.levelno >= logging.ERROR:
            first_line = record.getMessage().splitlines()[0] if record.getMessage() else ""
            key = f"{record.name}: {first_line}"
            self.counts[key] = self.counts.get(key, 0) + 1
            return False
        return True


broken_streams = BrokenStreamLogs()


@dataclass(frozen=True)
class Settings:
    """What one run measures and how long it waits."""

    clients: int
    check_interval_s: int
    warmup_s: float
    steady_s: float
    after_commit_s: float
    fleet_sizes: tuple[int, ...]
    max_real_processes: int
    fleet_processes: int
    blob_mb: float
    kill_at: float
    cold_starts: int
    timeout_s: float
    measures: tuple[str, ...]


# -- 1. update under load ---------------------------------------------------------------------------------------


async def follow_journal(files: DeviceFiles, model: str, version: str, timeout_s: float) -> dict[str, float]:
    """The monotonic time each state of an update was first seen in the device's journal, until it ends."""
    seen: dict[str, float] = {}
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        got, state, error = journal_state(files.state, model)
        if got == version and state and state not in seen:
            seen[state] = time.monotonic()
            if state == "refused":
                raise RuntimeError(f"{files.node_id} refused {model} v{version}: {error}")
        if "committed" in seen:
            return seen
        await asyncio.sleep(0.01)
    raise TimeoutError(f"{files.node_id}: {model} v{version} was not committed: {journal_state(files.state, model)}")


def period(records: dict[str, np.ndarray[Any, Any]], start: float, end: float) -> dict[str, float]:
    """Requests that ended in [start, end): count, requests/s, p50/p99 of those answered, failures, fallbacks."""
    mask = (records["end"] >= start) & (records["end"] < end)
    ok = mask & records["ok"]
    latency = (records["end"] - records["start"])[ok] * 1000
    return {
        "seconds": end - start,
        "requests": int(mask.sum()),
        "rps": float(mask.sum() / (end - start)) if end > start else 0.0,
        "p50_ms": float(np.percentile(latency, 50)) if latency.size else float("nan"),
        "p99_ms": float(np.percentile(latency, 99)) if latency.size else float("nan"),
        "failed": int((mask & ~records["ok"]).sum()),
        "not_by_device": int((ok & ~records["local"]).sum()),
    }


def start_load(address: str, files: DeviceFiles, s: Settings, out: Path) -> subprocess.Popen[bytes]:
    """Starts the load generator (its records go to ``out``)."""
    log = out.with_suffix(".log").open("ab")
    load = subprocess.Popen(
        [
            sys.executable, "-m", "bench.update_load", "--address", address, "--node-id", files.node_id,
            "--model", DEVICE_MODEL, "--clients", str(s.clients), "--context", str(CONTEXT), "--vocab", str(VOCAB),
            "--out", str(out),
        ],
        stdout=subprocess.PIPE, stderr=log, env=child_env(), cwd=ROOT,
    )  # fmt: skip
    log.close()
    return load


async def run_load(address: str, files: DeviceFiles, s: Settings, out: Path) -> subprocess.Popen[bytes]:
    """Starts the load generator and waits until its clients run."""
    load = start_load(address, files, s, out)
    assert load.stdout is not None
    line = await asyncio.to_thread(load.stdout.readline)
    if b"started" not in line:
        raise RuntimeError(f"the load generator did not start:\n{log_tail(out.with_suffix('.log'))}")
    return load


async def swap_under_load(m: Mesh, files: DeviceFiles, address: str, s: Settings) -> dict[str, Any]:
    """Deploys version 2 while the device serves ``s.clients`` in flight; returns what the clients saw."""
    out = m.work / "load.json"
    load = await run_load(address, files, s, out)
    try:
        await asyncio.sleep(s.warmup_s)
        steady_from = time.monotonic()
        await asyncio.sleep(s.steady_s)
        deployed = time.monotonic()
        m.fleet.deploy(DEVICE_MODEL, "2", tier="device")
        timeline = await follow_journal(files, DEVICE_MODEL, "2", s.timeout_s)
        await asyncio.sleep(s.after_commit_s + 0.5)
    finally:
        load.send_signal(signal.SIGTERM)
        try:
            await asyncio.to_thread(load.wait, 60)
        except subprocess.TimeoutExpired:
            load.kill()
        if load.stdout is not None:
            load.stdout.close()
    raw = json.loads(out.read_text())
    records = {
        "start": np.asarray(raw["start"]),
        "end": np.asarray(raw["end"]),
        "ok": np.asarray(raw["code"]) == "OK",
        "local": np.asarray(raw["local"], dtype=bool),
    }
    version = np.asarray(raw["version"])
    window_from = timeline.get("assigned", deployed)
    window_to = timeline["committed"] + s.after_commit_s
    new = records["end"][version == "2"]
    old = records["end"][version == "1"]
    codes: dict[str, int] = {}
    for code in raw["code"]:
        if code != "OK":
            codes[code] = codes.get(code, 0) + 1
    return {
        "clients": s.clients,
        "steady": period(records, steady_from, deployed),
        "window": period(records, window_from, window_to),
        "update": period(records, window_from, timeline["committed"]),
        "run": period(records, float(records["start"].min()), float(records["end"].max()) + 1e-6),
        "failure_codes": codes,
        "timeline_s": {state: t - deployed for state, t in sorted(timeline.items(), key=lambda kv: kv[1])},
        "first_v2_answer_s": float(new.min() - deployed) if new.size else None,
        "last_v1_answer_s": float(old.max() - deployed) if old.size else None,
        "window_s": [window_from - deployed, window_to - deployed],
    }


async def under_load(published: Published, work: Path, s: Settings) -> dict[str, Any]:
    """Measurement 1 (and 4, on the same device's state afterwards)."""
    async with mesh(work / "load", published, s.check_interval_s) as m:
        m.fleet.deploy(DEVICE_MODEL, "1", tier="device")
        files = device_files(m, "device-load", m.fleet.create_token().token)
        device = device_process(files)
        device.start()
        request = charlm_request(DEVICE_MODEL, CONTEXT, VOCAB, 0)
        try:
            [address] = await device.ready(s.timeout_s)
            await wait_serving([address], [files], request, "1", s.timeout_s)
            await wait_journal(files, DEVICE_MODEL, "1", {"committed"}, s.timeout_s)
            console.print(f"update under load: {s.clients} clients, steady {s.steady_s:g} s, then deploy v2")
            result = await swap_under_load(m, files, address, s)
        finally:
            await device.stop()
        if "cold" in s.measures:
            console.print(f"cold start: {s.cold_starts} starts of a device with a committed {DEVICE_MODEL}")
            result["cold_start"] = await cold_start(files, s)
    return result


# -- 4. cold start ----------------------------------------------------------------------------------------------


async def first_answer(address: str, files: DeviceFiles, timeout_s: float) -> float:
    """Asks until the device answers ``charlm-device`` itself; returns the monotonic time of that answer."""
    request = charlm_request(DEVICE_MODEL, CONTEXT, VOCAB, 1)
    deadline = time.monotonic() + timeout_s
    async with aio.insecure_channel(address) as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        while not await probe(stub, request, files):
            if time.monotonic() > deadline:
                raise TimeoutError(f"{files.node_id} never answered {DEVICE_MODEL} itself")
            await asyncio.sleep(0.002)
    return time.monotonic()


async def cold_start(files: DeviceFiles, s: Settings) -> dict[str, Any]:
    """Process start → port file (serving) → first inference the device answers, ``s.cold_starts`` times."""
    ready, first = [], []
    for _ in range(s.cold_starts):
        device = device_process(files)
        device.start()
        try:
            [address] = await device.ready(s.timeout_s, poll_s=0.002)
            ready.append(time.monotonic() - device.started_at)
            first.append(await first_answer(address, files, s.timeout_s) - device.started_at)
        finally:
            await device.stop()
    version, state, _ = journal_state(files.state, DEVICE_MODEL)
    return {
        "ready_s": ready,
        "first_inference_s": first,
        "median_s": statistics.median(first),
        "installed": f"v{version} {journal_variant(files.state, DEVICE_MODEL)} ({state})",
    }


# -- 2. deploy → every device serving ---------------------------------------------------------------------------


def fleet_processes(files: list[DeviceFiles], work: Path, s: Settings) -> tuple[list[NodeProcess], str]:
    """One ``python -m tier0_device`` per device for small fleets, else devices shared by a few host processes."""
    if len(files) <= s.max_real_processes:
        return [device_process(f) for f in files], f"{len(files)} processes (tier0_device)"
    count = min(s.fleet_processes, len(files))
    groups = [files[i::count] for i in range(count)]
    processes = [host_process(group, work / f"host-{i}.log") for i, group in enumerate(groups)]
    return processes, f"{len(files)} nodes in {count} processes (bench.device_host)"


async def rollout(published: Published, work: Path, devices: int, s: Settings) -> dict[str, Any]:
    """Measurement 2 for one fleet size: every device serves v1, then deploy v2 and time until all serve it.

    ``work`` is this fleet's own directory: a region, edge and devices that start from nothing.
    """
    async with mesh(work, published, s.check_interval_s) as m:
        m.fleet.deploy(DEVICE_MODEL, "1", tier="device")
        files = [device_files(m, f"fleet{devices}-{i:02d}", m.fleet.create_token().token) for i in range(devices)]
        processes, how = fleet_processes(files, m.work, s)
        order = [f for p in processes for f in p.files]
        request = charlm_request(DEVICE_MODEL, CONTEXT, VOCAB, 2)
        # Each device is asked every poll_s (the resolution of the times below); a big fleet less often.
        poll_s = 0.05 if devices <= s.max_real_processes else 0.1
        started = time.monotonic()
        for p in processes:
            p.start()
        try:
            addresses = [a for p in processes for a in await p.ready(s.timeout_s)]
            await wait_serving(addresses, order, request, "1", s.timeout_s, poll_s=0.1)
            first_install = time.monotonic() - started
            await asyncio.gather(*(wait_journal(f, DEVICE_MODEL, "1", {"committed"}, s.timeout_s) for f in order))
            await asyncio.sleep(0.5)
            console.print(f"deploy → serving: {how}; deploying v2")
            deployed = time.monotonic()
            m.fleet.deploy(DEVICE_MODEL, "2", tier="device")
            watch = asyncio.gather(*(first_seen(f, DEVICE_MODEL, "2", s.timeout_s) for f in order))
            times = await wait_serving(addresses, order, request, "2", s.timeout_s, poll_s=poll_s)
            assigned = await watch
        finally:
            await asyncio.gather(*(p.stop() for p in processes))
    seconds = sorted(t - deployed for t in times)
    # Deploy → the device's check-in brought the assignment (its journal says so), then → it serves v2.
    waits = sorted(a - deployed for a in assigned)
    installs = sorted(t - a for t, a in zip(times, assigned, strict=True))
    return {
        "devices": devices,
        "how": how,
        "all_s": seconds[-1],
        "median_s": statistics.median(seconds),
        "first_s": seconds[0],
        "start_to_v1_s": first_install,
        "poll_s": poll_s,
        "per_device_s": seconds,
        "check_in_wait_s": waits,
        "install_s": installs,
    }


async def first_seen(files: DeviceFiles, model: str, version: str, timeout_s: float) -> float:
    """The monotonic time an update to ``version`` first shows in the device's journal."""
    deadline = time.monotonic() + timeout_s
    while journal_state(files.state, model)[0] != version:
        if time.monotonic() > deadline:
            raise TimeoutError(f"{files.node_id} was never assigned {model} v{version}")
        await asyncio.sleep(0.02)
    return time.monotonic()


# -- 3. resume --------------------------------------------------------------------------------------------------


def kill_when(device: NodeProcess, part: Path, threshold: int, timeout_s: float) -> int:
    """SIGKILLs the device once ``part`` holds ``threshold`` bytes; returns the size seen then (runs in a thread)."""
    deadline = time.monotonic() + timeout_s
    assert device.proc is not None
    while time.monotonic() < deadline:
        try:
            size = part.stat().st_size
        except FileNotFoundError:
            size = 0
        if size >= threshold:
            os.kill(device.pid, signal.SIGKILL)
            return size
        if device.proc.poll() is not None:
            raise RuntimeError(f"the device exited before its download reached {threshold} bytes")
        time.sleep(0.0005)
    raise TimeoutError(f"{part.name} never reached {threshold} bytes")


async def resume(published: Published, work: Path, s: Settings) -> dict[str, Any]:
    """Measurement 3: kill at ``s.kill_at`` of the blob, restart, count what the edge streams again."""
    big = published.big
    async with mesh(work / "resume", published, s.check_interval_s) as m:
        assert isinstance(m.edge.config, EdgeConfig)
        chunk = m.edge.config.artifacts.chunk_bytes
        m.fleet.deploy(BIG_MODEL, "1", tier="device")
        files = device_files(m, "device-resume", m.fleet.create_token().token)
        part = files.state / "tuf" / "staging" / f"{big.sha256}.part"
        device = device_process(files)
        device.start()
        try:
            await device.ready(s.timeout_s)
            seen = await asyncio.to_thread(kill_when, device, part, int(big.length * s.kill_at), s.timeout_s)
            await device.wait(10.0)
            killed_in = journal_state(files.state, BIG_MODEL)
        finally:
            await device.stop()
        staged = part.stat().st_size if part.is_file() else 0
        await asyncio.sleep(0.5)  # the edge notices the broken stream
        before = m.artifacts.served_bytes(big.sha256)
        console.print(
            f"resume: killed at {staged / big.length:.0%} of {big.length / 1e6:.1f} MB (journal: {killed_in[1]}); restarting"
        )
        again = device_process(files)
        again.start()
        restarted = time.monotonic()
        try:
            [address] = await again.ready(s.timeout_s)
            state = await wait_journal(files, BIG_MODEL, "1", {"committed", "refused"}, s.timeout_s)
            installed_s = time.monotonic() - restarted
            request = float_request(BIG_MODEL, "x", published.big_rows)
            serving = (await wait_serving([address], [files], request, "1", s.timeout_s))[0] - restarted
        finally:
            await again.stop()
        after = m.artifacts.served_bytes(big.sha256) - before
    missing = big.length - staged
    logged = dict(broken_streams.counts)
    return {
        "blob_bytes": big.length,
        "plaintext_bytes": published.big_plaintext_bytes,
        "chunk_bytes": chunk,
        "seen_at_kill": seen,
        "staged_at_kill": staged,
        "served_before_kill": before,
        "served_after_restart": after,
        "missing_at_restart": missing,
        "re_downloaded": after - missing,
        "lost_in_flight": before - staged,
        "journal_at_kill": killed_in[1],
        "final_state": state,
        "restart_to_committed_s": installed_s,
        "restart_to_serving_s": serving,
        "region_edge_error_logs": logged,
    }


# -- the run ----------------------------------------------------------------------------------------------------


def parse_args(argv: Sequence[str] | None) -> Settings:
    """The command line."""
    parser = argparse.ArgumentParser(
        prog="python -m bench.updates",
        description="Secure model updates on a real mesh on this machine (issue 9): update under load, "
        "deploy → every device serving, resume after a kill, cold start. Prints the tables and writes "
        "bench/results/updates-latest.json.",
    )
    parser.add_argument(
        "--quick", action="store_true", help="shorter windows, a fleet of 8 instead of 20, 2 cold starts"
    )
    parser.add_argument("--clients", type=int, default=64, help="requests in flight during the update under load")
    parser.add_argument("--check-interval", type=int, default=2, help="check-in interval of the fleet (s)")
    parser.add_argument(
        "--steady", type=float, default=None, help="steady window before the deploy (s; default 4, quick 2)"
    )
    parser.add_argument("--fleet-sizes", default=None, help="comma-separated device counts (default 2,20; quick 2,8)")
    parser.add_argument(
        "--max-real-processes",
        type=int,
        default=4,
        help="fleets up to this size run one tier0_device process per device",
    )
    parser.add_argument("--fleet-processes", type=int, default=2, help="host processes of a larger (lightweight) fleet")
    parser.add_argument("--blob-mb", type=float, default=20.0, help="size of the model the resume test downloads (MiB)")
    parser.add_argument(
        "--kill-at", type=float, default=0.5, help="fraction of the blob staged when the device is killed"
    )
    parser.add_argument("--cold-starts", type=int, default=None, help="cold starts to time (default 3, quick 2)")
    parser.add_argument("--timeout", type=float, default=180.0, help="longest wait for any one step (s)")
    parser.add_argument(
        "--measure",
        action="append",
        choices=["load", "cold", "rollout", "resume"],
        help="run only these (repeatable; cold runs on the device of load); default all",
    )
    args = parser.parse_args(argv)
    sizes = args.fleet_sizes or ("2,8" if args.quick else "2,20")
    measures = tuple(args.measure or ("load", "cold", "rollout", "resume"))
    if "cold" in measures and "load" not in measures:
        measures = (*measures, "load")
    return Settings(
        clients=args.clients,
        check_interval_s=args.check_interval,
        warmup_s=1.0,
        steady_s=args.steady if args.steady is not None else (2.0 if args.quick else 4.0),
        after_commit_s=1.0,
        fleet_sizes=tuple(int(n) for n in sizes.split(",") if n.strip()),
        max_real_processes=args.max_real_processes,
        fleet_processes=args.fleet_processes,
        blob_mb=args.blob_mb,
        kill_at=args.kill_at,
        cold_starts=args.cold_starts if args.cold_starts is not None else (2 if args.quick else 3),
        timeout_s=args.timeout,
        measures=measures,
    )


async def run(s: Settings, work: Path) -> dict[str, Any]:
    """Publishes the models and runs the measurements asked for."""
    results: dict[str, Any] = {"settings": asdict(s)}
    published = await asyncio.to_thread(publish, work / "registry-home", s.blob_mb, console.print)
    results["published_s"] = published.seconds
    if "load" in s.measures:
        results["load"] = await under_load(published, work, s)
    if "rollout" in s.measures:
        results["rollout"] = []
        for i, devices in enumerate(s.fleet_sizes):
            console.print(f"deploy → serving: starting {devices} devices")
            results["rollout"].append(await rollout(published, work / f"fleet-{i}-{devices}", devices, s))
    if "resume" in s.measures:
        console.print(f"resume: {BIG_MODEL} ({published.big.length / 1e6:.1f} MB blob) through the edge")
        results["resume"] = await resume(published, work, s)
    return results


def main(argv: Sequence[str] | None = None) -> int:
    """Runs the measurements and prints the tables."""
    settings = parse_args(argv)
    if not console.is_terminal:
        console.width = max(console.width, 160)  # a log or a pipe: keep the tables' rows on one line
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s bench %(levelname)s %(name)s: %(message)s")
    for handler in logging.getLogger().handlers:
        handler.addFilter(broken_streams)
    logging.getLogger("opentelemetry.instrumentation.grpc._server").setLevel(logging.ERROR)
    started = time.perf_counter()
    load_before = os.getloadavg()[0]
    with tempfile.TemporaryDirectory(prefix="edgecascade-bench-updates-") as tmp:
        results = asyncio.run(run(settings, Path(tmp)))
    results["seconds"] = time.perf_counter() - started
    results["machine"] = {
        "cpus": os.cpu_count(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "onnxruntime": ort.__version__,
        # Other work on the machine shows here: this run itself keeps about 1-2 cores busy.
        "loadavg_1min_before_after": [load_before, os.getloadavg()[0]],
    }
    report(results)
    out = ROOT / "bench" / "results"
    out.mkdir(exist_ok=True)
    (out / "updates-latest.json").write_text(json.dumps(results, indent=2, default=str) + "\n")
    before, after = results["machine"]["loadavg_1min_before_after"]
    console.print(
        f"total {results['seconds']:.0f} s on {os.cpu_count()} CPUs (1-min load average {before:.1f} before, "
        f"{after:.1f} after); raw results: {out / 'updates-latest.json'}"
    )
    return 0


# -- tables -----------------------------------------------------------------------------------------------------


def report(r: dict[str, Any]) -> None:
    """Prints the four measurements against their goals."""
    goals = Table(title="Secure updates (issue 9): measured against the goals")
    for column in ("measurement", "measured", "goal", ""):
        goals.add_column(column, justify="right" if column == "measured" else "left")
    if "load" in r:
        report_load(r["load"], goals)
    if "rollout" in r:
        report_rollout(r["rollout"], goals)
    if "resume" in r:
        report_resume(r["resume"], goals)
    console.print(goals)


def verdict(ok: bool) -> str:
    return "[green]met[/green]" if ok else "[red]missed[/red]"


def report_load(load: dict[str, Any], goals: Table) -> None:
    """Tables of the update under load and the cold start."""
    table = Table(title=f"1. Update under load: {load['clients']} requests in flight on one device, deploy of v2")
    for column in ("period", "s", "requests", "req/s", "p50 ms", "p99 ms", "failed", "not by device"):
        table.add_column(column, justify="right")
    names = {
        "steady": "steady (before the deploy)",
        "window": "swap window (update + 1 s)",
        "update": "  of which the update itself",
        "run": "whole run",
    }
    for name, label in names.items():
        p = load[name]
        table.add_row(
            label,
            f"{p['seconds']:.1f}", str(p["requests"]), f"{p['rps']:.0f}", f"{p['p50_ms']:.1f}", f"{p['p99_ms']:.1f}",
            str(p["failed"]), str(p["not_by_device"]),
        )  # fmt: skip
    console.print(table)
    timeline = ", ".join(f"{state} +{t:.2f}" for state, t in load["timeline_s"].items())
    console.print(
        f"  after the deploy (s): {timeline}; first v2 answer +{load['first_v2_answer_s']:.2f}, last v1 answer "
        f"+{load['last_v1_answer_s']:.2f}; swap window = journal 'assigned' → commit + 1 s "
        f"(+{load['window_s'][0]:.2f} … +{load['window_s'][1]:.2f}); failures by code: {load['failure_codes'] or 'none'}"
    )
    ratio = load["window"]["p99_ms"] / load["steady"]["p99_ms"]
    failed = load["run"]["failed"]
    goals.add_row("1. failed requests during the update (whole run)", str(failed), "0", verdict(failed == 0))
    goals.add_row("1. p99 swap window ÷ steady p99", f"{ratio:.2f}", "≤ 2", verdict(ratio <= 2))
    goals.add_row(
        "1. requests/s steady / in the swap window",
        f"{load['steady']['rps']:.0f} / {load['window']['rps']:.0f}",
        "",
        "",
    )
    cold = load.get("cold_start")
    if cold:
        console.print(
            f"4. Cold start ({DEVICE_MODEL} {cold['installed']} in the state dir), per start (s): first inference "
            f"{', '.join(f'{t:.2f}' for t in cold['first_inference_s'])}; port file (serving) "
            f"{', '.join(f'{t:.2f}' for t in cold['ready_s'])}"
        )
        goals.add_row(
            "4. cold start → first inference, median (s)",
            f"{cold['median_s']:.2f}",
            "≤ 1.5",
            verdict(cold["median_s"] <= 1.5),
        )


def report_rollout(rows: list[dict[str, Any]], goals: Table) -> None:
    """The deploy → serving table."""
    table = Table(title="2. Deploy of v2 → every device serving it (its own ModelInfer answer carries v2)")
    for column in (
        "devices",
        "how they run",
        "first (s)",
        "median (s)",
        "all (s)",
        "asked every (s)",
        "check-in wait max (s)",
        "install med / max (s)",
        "start → all on v1 (s)",
    ):
        table.add_column(column, justify="right")
    for row in rows:
        table.add_row(
            str(row["devices"]), row["how"], f"{row['first_s']:.2f}", f"{row['median_s']:.2f}", f"{row['all_s']:.2f}",
            f"{row['poll_s']:g}", f"{row['check_in_wait_s'][-1]:.2f}",
            f"{statistics.median(row['install_s']):.2f} / {row['install_s'][-1]:.2f}", f"{row['start_to_v1_s']:.1f}",
        )  # fmt: skip
        goals.add_row(f"2. deploy → all {row['devices']} devices serving (s)", f"{row['all_s']:.2f}", "reported", "")
    console.print(table)


def report_resume(res: dict[str, Any], goals: Table) -> None:
    """The resume table."""
    table = Table(title="3. Resume: SIGKILL during the download through the edge, then restart (bytes)")
    for column in (
        "blob",
        "chunk",
        "staged at kill",
        "edge served before kill",
        "served after restart",
        "missing at restart",
        "re-downloaded",
    ):
        table.add_column(column, justify="right")
    table.add_row(
        f"{res['blob_bytes']:,}", f"{res['chunk_bytes']:,}",
        f"{res['staged_at_kill']:,} ({res['staged_at_kill'] / res['blob_bytes']:.0%})", f"{res['served_before_kill']:,}",
        f"{res['served_after_restart']:,}", f"{res['missing_at_restart']:,}", f"{res['re_downloaded']:,}",
    )  # fmt: skip
    console.print(table)
    console.print(
        f"  journal at the kill: {res['journal_at_kill']}; after the restart: {res['final_state']} in "
        f"{res['restart_to_committed_s']:.2f} s, serving in {res['restart_to_serving_s']:.2f} s; streamed before the "
        f"kill but not on disk: {res['lost_in_flight']:,} bytes"
    )
    for line, count in res["region_edge_error_logs"].items():
        console.print(f"  logged as ERROR in the region/edge process ({count}×, held back): {line}", markup=False)
    again = res["re_downloaded"]
    goals.add_row(
        "3. bytes re-downloaded after the kill",
        f"{again:,}",
        f"≤ 1 chunk ({res['chunk_bytes']:,})",
        verdict(again <= res["chunk_bytes"]),
    )
    goals.add_row(
        "3. edge served after restart / blob", f"{res['served_after_restart']:,} / {res['blob_bytes']:,}", "", ""
    )


if __name__ == "__main__":
    sys.exit(main())
