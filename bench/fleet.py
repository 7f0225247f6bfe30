"""``python -m bench.fleet``: a region process under a simulated fleet, and how fast it rolls a bad version back (issue 10).

Both measurements run a real region (``python -m tier2_region``, :mod:`bench.fleet_region`: registry
with versions 1 and 2 of a model, fleet inventory, OTLP receiver and telemetry store) against
simulated nodes on the real protocol (:mod:`bench.fleet_sim`: one-time
tokens, enrollment, signed check-ins, installs, OTLP metrics sent by the stock exporter), all on
127.0.0.1 and in a temp dir.

1. **Ingest** — for each fleet size N, every node checks in and exports its metrics once per
   ``--report-interval`` (10 s, ± 20 % jitter; ``[fleet] check_interval_s`` is set to it; the
   telemetry store keeps its default 60 s windows). After
   enrollment and a warm-up of one interval and more (every node installs version 1 and starts
   serving), a measured window: check-ins and exports done per second against N / interval, p50
   and p99 of a check-in call and of an OTLP export call (the stock exporter's ``export()``, which
   returns once the region has written the points), how late calls started against their schedule,
   failures, and the region process's CPU (cores) and RSS (psutil). *Sustained without backlog*
   means: ≥ 97 % of the scheduled calls done, none failed, none skipped because the node's
   previous export was still running, call starts no more than 1 s late at p99, and the second
   half's p99 within 2× the first half's. The simulator (one process, ``direct`` metrics) shares
   the machine's CPUs with the region: its own CPU and event-loop lag are reported beside, so a
   simulator that cannot keep up is told apart from a region that cannot.
2. **Rollback** — a fleet of ``--rollback-nodes`` nodes (check-ins and exports every
   ``--rollback-check`` s, installs take 1 s, 10 requests/s per node on one MeterProvider each)
   serving version 1; ``rollout start`` of a bad version 2 with ``--interval-s 5`` and the default
   steps (1, 10, 50, 100 %), ``--min-devices 3 --min-requests 100``, judged on 1 s telemetry windows
   (``--rollback-window``; the store's figures have the resolution of one window, which a 5 s stage
   needs finer than the default minute). Measured per run (a fresh region
   and fleet each): from the first canary's first request on version 2 (for a version that fails
   to install: its first refusal) to the rollback (the rollout's ``ended_at``), and to the last
   canary serving version 1 again. Three kinds of bad: p99 5× the old one, 30 % errors, every
   install refused.

Raw results go to ``bench/results/fleet-latest.json`` (not committed). Nothing is asserted.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import platform
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import psutil
from rich.console import Console
from rich.table import Table

from bench.fleet_region import MODEL, ROOT, RegionProcess, RegionSettings, publish_registry
from bench.fleet_sim import CallSummary, FleetSim, SimSettings, VersionProfile, wait_for
from tier2_region.fleet.rollout import RolloutPlan

console = Console()

STEADY = VersionProfile(requests_per_s=2.0, p50_ms=10.0, p99_ms=14.0, install_delay_s=1.0)
GOOD = VersionProfile(requests_per_s=10.0, p50_ms=10.0, p99_ms=14.0, install_delay_s=1.0)
BAD = {
    "p99_latency": VersionProfile(requests_per_s=10.0, p50_ms=40.0, p99_ms=70.0, install_delay_s=1.0),
    "error_rate": VersionProfile(requests_per_s=10.0, p50_ms=10.0, p99_ms=14.0, error_share=0.3, install_delay_s=1.0),
    "failed_installs": VersionProfile(requests_per_s=10.0, refuse_share=1.0, install_delay_s=1.0),
}
# Sustained without backlog: what a measured window must show (see the module docs).
MIN_DONE_SHARE = 0.97
MAX_LATE_P99_S = 1.0
MAX_P99_GROWTH = 2.0
# The store's default window (``[telemetry] window_s``): the ingest measurement runs the region as deployed.
INGEST_WINDOW_S = 60


@dataclass(frozen=True)
class Settings:
    """What one run measures."""

    sizes: tuple[int, ...]
    report_interval_s: int
    warmup_s: float
    measure_s: float
    exporters: int
    channels: int
    export_threads: int
    rollback_nodes: int
    rollback_runs: int
    rollback_kinds: tuple[str, ...]
    rollback_interval_s: float
    rollback_check_s: int
    rollback_window_s: int
    timeout_s: float
    measures: tuple[str, ...]


# -- sampling a process -----------------------------------------------------------------------------------------


class ProcessSampler:
    """CPU seconds and RSS of a process, sampled every second while it runs (a task on the loop)."""

    def __init__(self, pid: int) -> None:
        self._process = psutil.Process(pid)
        self.samples: list[tuple[float, float, int]] = []  # (monotonic, cpu seconds, rss)
        self._task: asyncio.Task[None] | None = None

    def _sample(self) -> None:
        times = self._process.cpu_times()
        self.samples.append((time.monotonic(), times.user + times.system, self._process.memory_info().rss))

    async def _run(self) -> None:
        while True:
            self._sample()
            await asyncio.sleep(1.0)

    def start(self) -> None:
        """Starts sampling."""
        self._task = asyncio.create_task(self._run())

    async def stop(self) -> None:
        """Takes a last sample and stops."""
        self._sample()
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)

    def cores(self, since: float, until: float) -> float:
        """Mean CPU use between two monotonic times, in cores."""
        inside = [s for s in self.samples if since <= s[0] <= until]
        if len(inside) < 2:
            return float("nan")
        return (inside[-1][1] - inside[0][1]) / (inside[-1][0] - inside[0][0])

    def rss_max(self) -> int:
        """The largest RSS seen."""
        return max(s[2] for s in self.samples)


def busy_cpu_seconds() -> float:
    """CPU seconds the whole machine spent busy so far (every process, not idle or waiting for I/O)."""
    t = psutil.cpu_times()
    return float(sum(t) - t.idle - getattr(t, "iowait", 0.0))


# -- 1. ingest --------------------------------------------------------------------------------------------------


def _summary(c: CallSummary) -> dict[str, Any]:
    return asdict(c)


def _sustained(n: int, s: Settings, window: float, calls: dict[str, Any], skipped: int) -> tuple[bool, list[str]]:
    """Whether a window shows the fleet's load sustained without backlog, and what fell short if not."""
    expected = n * window / s.report_interval_s
    short = []
    for kind in ("checkins", "exports"):
        whole, first, second = calls[kind]["whole"], calls[kind]["first_half"], calls[kind]["second_half"]
        if whole["calls"] < MIN_DONE_SHARE * expected:
            short.append(f"{kind}: {whole['calls']} done of {expected:.0f} scheduled")
        if whole["failed"]:
            short.append(f"{kind}: {whole['failed']} failed ({whole['failures']})")
        if whole["late_p99_ms"] is not None and whole["late_p99_ms"] > MAX_LATE_P99_S * 1000:
            short.append(f"{kind}: started {whole['late_p99_ms']:.0f} ms late at p99")
        if first["p99_ms"] and second["p99_ms"] and second["p99_ms"] > MAX_P99_GROWTH * first["p99_ms"]:
            short.append(f"{kind}: p99 grew from {first['p99_ms']:.0f} to {second['p99_ms']:.0f} ms")
    if skipped:
        short.append(f"{skipped} exports skipped: the node's previous export was still running")
    return not short, short


async def ingest(n: int, s: Settings, registry: Path, work: Path) -> dict[str, Any]:
    """One fleet size: enroll N nodes, let them settle, measure a window."""
    region = RegionProcess(
        work / f"region-{n}",
        registry,
        RegionSettings(check_interval_s=s.report_interval_s, window_s=INGEST_WINDOW_S),
    )
    await region.start_and_wait()
    sim: FleetSim | None = None
    try:
        began = time.monotonic()
        tokens = await asyncio.to_thread(region.issue_tokens, n)
        tokens_s = time.monotonic() - began
        with region.fleet() as fleet:
            fleet.deploy(MODEL, "1")
        settings = SimSettings(
            region.address,
            export_interval_s=float(s.report_interval_s),
            metrics="direct",
            exporters=s.exporters,
            channels=s.channels,
            export_threads=s.export_threads,
            timeout_s=s.timeout_s,
            id_prefix=f"n{n}",
        )
        sim = FleetSim(settings, default=STEADY)
        nodes = await asyncio.to_thread(sim.add_nodes, n)
        began = time.monotonic()
        await sim.enroll(nodes, tokens, concurrency=64)
        enroll_s = time.monotonic() - began
        console.print(f"  {n} nodes: {n} tokens in {tokens_s:.1f} s, enrolled in {enroll_s:.1f} s; warming up")
        region_cpu = ProcessSampler(region.pid)
        sim_cpu = ProcessSampler(os.getpid())
        region_cpu.start()
        sim_cpu.start()
        sim.start()
        await asyncio.sleep(s.warmup_s)
        serving = sum(1 for v in sim.serving(MODEL).values() if v == "1")
        loop = asyncio.get_running_loop()
        skipped_before = sim.export_results["skipped_busy"]
        start = loop.time()
        busy_before = busy_cpu_seconds()
        console.print(f"  {serving} of {n} serving version 1 after the warm-up; measuring {s.measure_s:.0f} s")
        await asyncio.sleep(s.measure_s)
        end = loop.time()
        machine_cores = (busy_cpu_seconds() - busy_before) / (end - start)
        middle = (start + end) / 2
        skipped = sim.export_results["skipped_busy"] - skipped_before
        await region_cpu.stop()
        await sim_cpu.stop()
        calls = {
            kind: {
                "whole": _summary(log.summary(start, end)),
                "first_half": _summary(log.summary(start, middle)),
                "second_half": _summary(log.summary(middle, end)),
            }
            for kind, log in (("checkins", sim.checkins), ("exports", sim.exports))
        }
        ok, short = _sustained(n, s, end - start, calls, skipped)
        window = end - start
        answered = sum(calls[k]["whole"]["calls"] - calls[k]["whole"]["failed"] for k in ("checkins", "exports"))
        return {
            "nodes": n,
            "report_interval_s": s.report_interval_s,
            "window_s": window,
            "tokens_s": tokens_s,
            "enroll_s": enroll_s,
            "enroll": _summary(sim.enrollments.summary()),
            "serving_after_warmup": serving,
            "scheduled_per_s": n / s.report_interval_s,
            "checkins_per_s": calls["checkins"]["whole"]["calls"] / window,
            "exports_per_s": calls["exports"]["whole"]["calls"] / window,
            "calls": calls,
            "skipped_exports": skipped,
            "sustained": ok,
            "short_of": short,
            "region_cores": region_cpu.cores(start, end),
            # What one answered call (a check-in or an export) costs the region, to size a larger fleet by.
            "region_cpu_ms_per_call": 1000 * region_cpu.cores(start, end) / max(answered / window, 1e-9),
            "region_rss_mb": region_cpu.rss_max() / 2**20,
            "sim_cores": sim_cpu.cores(start, end),
            "sim_rss_mb": sim_cpu.rss_max() / 2**20,
            "sim_loop_lag": _summary(sim.loop_lag.summary(start, end)),
            # The machine is shared: what everything else used of its CPUs during the window.
            "other_cores": machine_cores - region_cpu.cores(start, end) - sim_cpu.cores(start, end),
            "sim_errors": sim.errors,
        }
    finally:
        if sim is not None:
            await sim.stop()
        region.stop()


# -- 2. rollback ------------------------------------------------------------------------------------------------


async def rollback(kind: str, run: int, s: Settings, registry: Path, work: Path) -> dict[str, Any]:
    """One rollout of a bad version over a fresh region and fleet, timed from its first canary to its rollback."""
    region = RegionProcess(
        work / f"rollback-{kind}-{run}",
        registry,
        RegionSettings(check_interval_s=s.rollback_check_s, window_s=s.rollback_window_s),
    )
    await region.start_and_wait()
    settings = SimSettings(region.address, export_interval_s=float(s.rollback_check_s), timeout_s=s.timeout_s, seed=run)
    sim = FleetSim(settings, {"1": GOOD, "2": BAD[kind]}, default=GOOD)
    try:
        with region.fleet() as fleet:
            fleet.deploy(MODEL, "1")
        await sim.enroll(sim.add_nodes(s.rollback_nodes), region.issue_tokens(s.rollback_nodes))
        sim.start()
        await wait_for(lambda: set(sim.serving(MODEL).values()) == {"1"}, s.timeout_s * 10, "every node on v1")
        # One more export round, so the baseline has figures when the first stage is judged.
        await asyncio.sleep(s.rollback_check_s)
        plan = RolloutPlan(interval_s=s.rollback_interval_s, min_devices=3, min_requests=100)
        with region.controller() as controller:
            started = controller.start(MODEL, "2", plan)

        def ended() -> bool:
            with region.controller() as controller:
                return not controller.status(MODEL)[0].rollout.active

        await wait_for(ended, 120.0, "the rollout to end", poll_s=0.2)
        with region.controller() as controller:
            final = controller.status(MODEL)[0].rollout
        await wait_for(
            lambda: (
                set(sim.serving(MODEL).values()) == {"1"}
                and all(m.target is None for n in sim.nodes for m in n.models.values())
            ),
            60.0,
            "every canary back on v1",
        )
        first = (
            sim.first_refused(MODEL, "2", started.started_at)
            if kind == "failed_installs"
            else sim.first_served(MODEL, "2", started.started_at)
        )
        canaries = {n.node_id for n in sim.nodes for _, _, v in n.history if v == "2"}
        back = [
            max(t for t, _, v in sim.node(node_id).history if v == "1") for node_id in canaries
        ]  # each canary's return to v1
        assert final.ended_at is not None
        return {
            "kind": kind,
            "run": run,
            "state": final.state,
            "reason": final.reason,
            "stage": final.stage + 1,
            "canaries": len(canaries),
            "start_to_first_s": None if first is None else first - started.started_at,
            "first_to_rollback_s": None if first is None else final.ended_at - first,
            "first_to_restored_s": None if first is None or not back else max(back) - first,
            "start_to_rollback_s": final.ended_at - started.started_at,
        }
    finally:
        await sim.stop()
        region.stop()


# -- the run ----------------------------------------------------------------------------------------------------


async def run(s: Settings, work: Path) -> dict[str, Any]:
    """Publishes the registry and runs the measurements asked for."""
    registry = await asyncio.to_thread(publish_registry, work / "registry-home")
    results: dict[str, Any] = {"settings": asdict(s)}
    if "ingest" in s.measures:
        results["ingest"] = []
        for n in s.sizes:
            console.print(f"ingest: {n} nodes, one check-in and one export each every {s.report_interval_s} s")
            results["ingest"].append(await ingest(n, s, registry, work))
    if "rollback" in s.measures:
        results["rollback"] = []
        for kind in s.rollback_kinds:
            for i in range(s.rollback_runs):
                console.print(f"rollback: {kind}, run {i + 1} of {s.rollback_runs}")
                results["rollback"].append(await rollback(kind, i, s, registry, work))
    return results


def report(r: dict[str, Any]) -> None:
    """Prints the tables."""
    if "ingest" in r:
        table = Table(title="1. Region ingest: every node checks in and exports OTLP once per interval")
        columns = (
            "nodes", "interval s", "scheduled/s", "check-ins/s", "exports/s", "check-in p50 / p99 ms",
            "export p50 / p99 ms", "late p99 ms (c / e)", "failed", "region cores", "region RSS MB",
            "sim cores", "sim loop lag p99 ms", "sustained",
        )  # fmt: skip
        for column in columns:
            table.add_column(column, justify="right")
        for row in r["ingest"]:
            c, e = row["calls"]["checkins"]["whole"], row["calls"]["exports"]["whole"]
            table.add_row(
                str(row["nodes"]), str(row["report_interval_s"]), f"{row['scheduled_per_s']:.0f}",
                f"{row['checkins_per_s']:.0f}", f"{row['exports_per_s']:.0f}",
                f"{_ms(c['p50_ms'])} / {_ms(c['p99_ms'])}", f"{_ms(e['p50_ms'])} / {_ms(e['p99_ms'])}",
                f"{_ms(c['late_p99_ms'])} / {_ms(e['late_p99_ms'])}", str(c["failed"] + e["failed"]),
                f"{row['region_cores']:.2f}", f"{row['region_rss_mb']:.0f}", f"{row['sim_cores']:.2f}",
                _ms(row["sim_loop_lag"]["late_p99_ms"]),
                "[green]yes[/green]" if row["sustained"] else "[red]no[/red]",
            )  # fmt: skip
        console.print(table)
        for row in r["ingest"]:
            if row["short_of"]:
                console.print(f"  {row['nodes']} nodes fell short: {'; '.join(row['short_of'])}")
            console.print(
                f"  {row['nodes']} nodes: tokens {row['tokens_s']:.1f} s, enrollment {row['enroll_s']:.1f} s "
                f"(p99 {_ms(row['enroll']['p99_ms'])} ms), {row['serving_after_warmup']} serving v1 after the warm-up; "
                f"region CPU per answered call (check-in or export) {row['region_cpu_ms_per_call']:.1f} ms; "
                f"region RSS {row['region_rss_mb']:.0f} MB, simulator RSS {row['sim_rss_mb']:.0f} MB; "
                f"other processes used {row['other_cores']:.2f} cores meanwhile"
            )
    if "rollback" in r:
        table = Table(title="2. A bad version's first canary traffic → its rollback (interval 5 s)")
        for column in ("bad version", "run", "state", "stage", "canaries", "start → first s", "first → rollback s",
                       "first → canaries back on v1 s", "gate"):  # fmt: skip
            table.add_column(column, justify="right")
        for row in r["rollback"]:
            gate = row["reason"].split(" ", 2)[1] if row["reason"].startswith("gate ") else row["reason"][:40]
            table.add_row(
                row["kind"], str(row["run"] + 1), row["state"], str(row["stage"]), str(row["canaries"]),
                _s(row["start_to_first_s"]), _s(row["first_to_rollback_s"]), _s(row["first_to_restored_s"]), gate,
            )  # fmt: skip
        console.print(table)


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}"


def _s(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}"


def parse_args(argv: Sequence[str] | None) -> Settings:
    """The command line."""
    parser = argparse.ArgumentParser(
        prog="python -m bench.fleet",
        description="The region under a simulated fleet (issue 10): ingest of check-ins and OTLP metrics from 1,000 "
        "and 10,000 nodes, and the time from a bad version's first canary traffic to its rollback. Prints the tables "
        "and writes bench/results/fleet-latest.json.",
    )
    parser.add_argument("--sizes", default="1000,10000", help="comma-separated fleet sizes for the ingest measurement")
    parser.add_argument("--report-interval", type=int, default=10, help="each node checks in and exports every N s")
    parser.add_argument("--warmup", type=float, default=25.0, help="seconds between the fleet's start and the window")
    parser.add_argument("--measure", type=float, default=60.0, help="seconds of the measured window")
    parser.add_argument("--exporters", type=int, default=4, help="stock OTLP exporters (gRPC channels) the nodes share")
    parser.add_argument("--channels", type=int, default=4, help="fleet-service channels the nodes share")
    parser.add_argument("--export-threads", type=int, default=16, help="threads running the blocking exports")
    parser.add_argument("--rollback-nodes", type=int, default=100, help="nodes of the rollback measurement")
    parser.add_argument("--rollback-runs", type=int, default=2, help="runs per kind of bad version")
    parser.add_argument(
        "--rollback-kinds", default=",".join(BAD), help=f"comma-separated kinds of bad version ({', '.join(BAD)})"
    )
    parser.add_argument("--interval-s", type=float, default=5.0, help="the rollout's stage interval (s)")
    parser.add_argument("--rollback-check", type=int, default=5, help="check-in and export interval of that fleet (s)")
    parser.add_argument(
        "--rollback-window",
        type=int,
        default=1,
        help="[telemetry] window_s of that region (s): the resolution of the figures a stage is judged on",
    )
    parser.add_argument("--timeout", type=float, default=10.0, help="deadline of one check-in or export (s)")
    parser.add_argument(
        "--only", action="append", choices=["ingest", "rollback"], help="run only these (repeatable); default both"
    )
    args = parser.parse_args(argv)
    kinds = tuple(k for k in args.rollback_kinds.split(",") if k)
    unknown = set(kinds) - set(BAD)
    if unknown:
        parser.error(f"unknown --rollback-kinds {', '.join(sorted(unknown))}")
    return Settings(
        sizes=tuple(int(n) for n in args.sizes.split(",") if n.strip()),
        report_interval_s=args.report_interval,
        warmup_s=args.warmup,
        measure_s=args.measure,
        exporters=args.exporters,
        channels=args.channels,
        export_threads=args.export_threads,
        rollback_nodes=args.rollback_nodes,
        rollback_runs=args.rollback_runs,
        rollback_kinds=kinds,
        rollback_interval_s=args.interval_s,
        rollback_check_s=args.rollback_check,
        rollback_window_s=args.rollback_window,
        timeout_s=args.timeout,
        measures=tuple(args.only or ("ingest", "rollback")),
    )


def main(argv: Sequence[str] | None = None) -> int:
    """Runs the measurements and prints the tables."""
    settings = parse_args(argv)
    if not console.is_terminal:
        console.width = max(console.width, 200)  # a log or a pipe: keep the tables' rows on one line
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s bench %(levelname)s %(name)s: %(message)s")
    # A failed export is counted by the simulator; the exporter's own log line for each would drown the tables.
    logging.getLogger("opentelemetry.exporter.otlp.proto.grpc.exporter").setLevel(logging.CRITICAL)
    started = time.perf_counter()
    load_before = os.getloadavg()[0]
    with tempfile.TemporaryDirectory(prefix="edgecascade-bench-fleet-") as tmp:
        results = asyncio.run(run(settings, Path(tmp)))
    results["seconds"] = time.perf_counter() - started
    results["machine"] = {
        "cpus": os.cpu_count(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "loadavg_1min_before_after": [load_before, os.getloadavg()[0]],
    }
    report(results)
    out = ROOT / "bench" / "results"
    out.mkdir(exist_ok=True)
    (out / "fleet-latest.json").write_text(json.dumps(results, indent=2, default=str) + "\n")
    console.print(
        f"total {results['seconds']:.0f} s on {os.cpu_count()} CPUs; raw results: {out / 'fleet-latest.json'}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
