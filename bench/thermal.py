"""``python -m bench.thermal``: what the model variant, batching and heat cost a device, measured in one run.

A Tier 0 process serves the demo device char-LM in both variants side by side —
``charlm-fp32`` (``examples/models/charlm-device.onnx``) and ``charlm-int8``
(``charlm-device.int8.onnx``; ``python -m examples.charlm.train --size all --out
examples/models`` rebuilds both) — loaded with the stock ``tritonclient.grpc.aio``
load generator (``bench/load.py``) in its own process and virtualenv. Its sensors
are a temporary sysfs tree holding one thermal zone the script sets, and no RAPL
counter:

1. **Energy.** Inferences per joule of each variant at 1 and 64 requests in
   flight, batching on (``max_batch_size`` 64) and off (1): the version's
   inferences and joules from the node's ``GetTierInfo``, before and after each
   run (after its last period closed). With no RAPL counter the joules are the
   device class's power profile applied to the node process's CPU use (defaults
   2 W idle, 6 W busy): reported with the source the node gives, ``estimated``
   here, so the figures compare variants and settings on one machine, not
   devices.
2. **Heat.** Tier 0 throughput and p99 of each variant at 64 in flight, batching
   on, with the zone at 50 °C (normal) and at 85 °C (above the 80 °C soft limit:
   hot, measured once batch caps and run slots have shrunk to their floors).

Prints the tables and writes ``bench/results/thermal.json``. Nothing is asserted.

    TRITONCLIENT_PYTHON=.venv-triton/bin/python .venv/bin/python -m bench.thermal [--seconds 4]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import grpc
import onnxruntime as ort
from rich.console import Console
from rich.table import Table

from bench import run
from bench.run import ROOT, load, process, session
from protos.edgecascade.v1 import mesh_pb2, mesh_pb2_grpc
from services.engine.model_repository import ModelRepository
from services.engine.throttle import VARIANT_PROPERTY

MODELS_DIR = ROOT / "examples" / "models"
VARIANTS = {"fp32": MODELS_DIR / "charlm-device.onnx", "int8": MODELS_DIR / "charlm-device.int8.onnx"}
IN_FLIGHT = (1, 64)
NORMAL_C = 50.0
HOT_C = 85.0  # above the default soft limit (80 °C), below the hard one (95 °C): served here, throttled
PERIOD_S = 0.25  # the monitor's period: energy is apportioned per period, so short runs need short ones
console = Console(highlight=False)


def set_temperature(sysfs: Path, celsius: float) -> None:
    """Writes the zone's temperature at once (a reader never sees half a value)."""
    zone = sysfs / "class" / "thermal" / "thermal_zone0"
    zone.mkdir(parents=True, exist_ok=True)
    (zone / "type").write_text("x86_pkg_temp\n")
    staging = zone / ".temp.new"
    staging.write_text(f"{round(celsius * 1000)}\n")
    os.replace(staging, zone / "temp")


def thermal(address: str) -> mesh_pb2.ThermalStatus:
    """The node's thermal status, from ``GetTierInfo``."""
    with grpc.insecure_channel(address) as channel:
        info = mesh_pb2_grpc.MeshServiceStub(channel).GetTierInfo(mesh_pb2.GetTierInfoRequest(), timeout=60)
    status: mesh_pb2.ThermalStatus = info.thermal
    return status


def wait_for(address: str, done: Callable[[mesh_pb2.ThermalStatus], bool], what: str) -> mesh_pb2.ThermalStatus:
    """Polls the node's thermal status until ``done`` (at most a minute)."""
    deadline = time.monotonic() + 60
    while True:
        status = thermal(address)
        if done(status):
            return status
        if time.monotonic() > deadline:
            raise RuntimeError(f"the node did not reach: {what}")
        time.sleep(PERIOD_S / 2)


def closed_periods(address: str) -> mesh_pb2.ThermalStatus:
    """The status once two more periods have closed: every run so far is in the energy figures."""
    polls = thermal(address).polls
    return wait_for(address, lambda s: s.polls >= polls + 2, "two more thermal periods")


def version_energy(status: mesh_pb2.ThermalStatus, model: str) -> tuple[float, int, str]:
    """Joules, inferences and source of a model's version 1 (zeros before it ran)."""
    for row in status.energy:
        if row.name == model and row.version == "1":
            return row.joules, row.inferences, row.source
    return 0.0, 0, ""


def measured_run(
    triton_python: str, address: str, model: str, inputs: list[str], clients: int, seconds: float, warmup: float
) -> dict[str, Any]:
    """One closed-loop load run, with the inferences per joule the node accounted to the model over it."""
    joules_before, inferences_before, _ = version_energy(closed_periods(address), model)
    report = load(triton_python, address, model, inputs, mode="closed", clients=clients, seconds=seconds, warmup=warmup)
    after = closed_periods(address)
    joules_after, inferences_after, source = version_energy(after, model)
    joules, inferences = joules_after - joules_before, inferences_after - inferences_before
    report["energy"] = {
        "joules": joules,
        "inferences": inferences,
        "inferences_per_joule": inferences / joules if joules > 0 else None,
        "source": source,
        "power_watts": after.power_watts if after.HasField("power_watts") else None,
        "power_source": after.power_source,
    }
    return report


def tier0(repo: Path, sysfs: Path, work: Path, batching: bool) -> tuple[list[str], dict[str, str], Path]:
    """The command, environment and port file of a Tier 0 process reading its sensors under ``sysfs``."""
    return run.tier0(
        repo,
        work,
        batching,
        {"EDGECASCADE_THERMAL__SYSFS_ROOT": str(sysfs), "EDGECASCADE_THERMAL__PERIOD_S": str(PERIOD_S)},
    )


def at_floors(status: mesh_pb2.ThermalStatus) -> bool:
    """Hot, with every batch cap and the run slots shrunk as far as they go (floors 1)."""
    return status.state == "hot" and status.run_slots == 1 and all(c.rows == 1 for c in status.batch_caps)


def main(argv: list[str] | None = None) -> int:
    """Runs both measurements, prints them and writes ``bench/results/thermal.json``."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument(
        "--triton-python", default=os.environ.get("TRITONCLIENT_PYTHON", str(ROOT / ".venv-triton/bin/python"))
    )
    parser.add_argument("--seconds", type=float, default=4.0, help="measurement window per load run")
    parser.add_argument("--warmup", type=float, default=0.5, help="load before each window, not measured")
    args = parser.parse_args(argv)
    missing = [str(path) for path in VARIANTS.values() if not path.is_file()]
    if missing:
        console.print(f"[red]missing {', '.join(missing)}: python -m examples.charlm.train --size all[/red]")
        return 1
    lm = session(VARIANTS["fp32"])
    context, vocab = lm.get_inputs()[0].shape[1], lm.get_outputs()[0].shape[1]
    inputs = [f"input_ids:INT64:1x{context}:{vocab}"]
    models = {f"charlm-{variant}": variant for variant in VARIANTS}
    results: dict[str, Any] = {
        "machine": {
            "cpus": os.cpu_count(),
            "platform": platform.platform(),
            "python": platform.python_version(),
            "onnxruntime": ort.__version__,
        },
        "settings": {"seconds": args.seconds, "warmup": args.warmup, "period_s": PERIOD_S},
        "energy": {},
        "heat": {},
    }
    with tempfile.TemporaryDirectory(prefix="edgecascade-bench-") as tmp:
        work = Path(tmp)
        repo = ModelRepository(work / "repo")
        for model, variant in models.items():
            repo.add(model, VARIANTS[variant], properties={VARIANT_PROPERTY: variant})
        sysfs = work / "sys"
        set_temperature(sysfs, NORMAL_C)
        for batching in (False, True):
            label = "on" if batching else "off"
            cmd, env, port_file = tier0(work / "repo", sysfs, work, batching)
            set_temperature(sysfs, NORMAL_C)
            with process(cmd, env, port_file) as address:
                for model in models:
                    for clients in IN_FLIGHT:
                        console.print(f"energy: {model}, batching {label}, {clients} in flight")
                        results["energy"][f"{model}_{label}_{clients}"] = measured_run(
                            args.triton_python, address, model, inputs, clients, args.seconds, args.warmup
                        )
                if not batching:
                    continue
                for temperature, state in ((NORMAL_C, "normal"), (HOT_C, "hot")):
                    set_temperature(sysfs, temperature)
                    if state == "hot":
                        wait_for(address, at_floors, "hot with every cap at its floor")
                    else:
                        wait_for(address, lambda s: s.state == "normal", "normal")
                    for model in models:
                        console.print(f"heat: {model} at {temperature:.0f} °C ({state}), 64 in flight")
                        run = measured_run(args.triton_python, address, model, inputs, 64, args.seconds, args.warmup)
                        run["thermal"] = {"temperature_c": temperature, "state": thermal(address).state}
                        results["heat"][f"{model}_{state}"] = run
    report(results, models)
    out = ROOT / "bench" / "results"
    out.mkdir(exist_ok=True)
    (out / "thermal.json").write_text(json.dumps(results, indent=2, default=str) + "\n")
    console.print(f"raw results: {out / 'thermal.json'}")
    return 0


def _per_joule(run: dict[str, Any]) -> str:
    value = run["energy"]["inferences_per_joule"]
    return "-" if value is None else f"{value:.1f}"


def _sources(*runs: dict[str, Any]) -> str:
    """Where the joules of some runs came from, as the node labels them (measured, estimated)."""
    return "/".join(sorted({run["energy"]["source"] or "?" for run in runs}))


def report(r: dict[str, Any], models: dict[str, str]) -> None:
    """Prints inferences per joule by variant, batching and load, then throughput and p99 normal vs hot."""
    # One source for the whole run as a rule (the same sensors throughout); named in the titles.
    source = _sources(*r["energy"].values(), *r["heat"].values())
    energy = Table(title=f"Inferences per joule, demo device char-LM (joules {source})")
    for column in ("variant", "in flight", "inf/J off", "inf/J on", "on ÷ off", "req/s off", "req/s on"):
        energy.add_column(column, justify="right")
    for model, variant in models.items():
        for clients in IN_FLIGHT:
            off, on = r["energy"][f"{model}_off_{clients}"], r["energy"][f"{model}_on_{clients}"]
            a, b = off["energy"]["inferences_per_joule"], on["energy"]["inferences_per_joule"]
            energy.add_row(
                variant, str(clients), _per_joule(off), _per_joule(on), f"{b / a:.2f}" if a and b else "-",
                f"{off['throughput']:.0f}", f"{on['throughput']:.0f}",
            )  # fmt: skip
    console.print(energy)
    fp32, int8 = (r["energy"].get(f"charlm-{v}_on_64", {}).get("energy", {}) for v in ("fp32", "int8"))
    if fp32.get("inferences_per_joule") and int8.get("inferences_per_joule"):
        ratio = int8["inferences_per_joule"] / fp32["inferences_per_joule"]
        console.print(f"int8 ÷ fp32 inferences per joule, batching on, 64 in flight: {ratio:.2f} ({source})")
    heat = Table(title=f"64 in flight, batching on: {NORMAL_C:.0f} °C (normal) vs {HOT_C:.0f} °C (hot, at the floors)")
    for column in ("variant", "req/s normal", "req/s hot", "hot ÷ normal", "p99 ms normal", "p99 ms hot", "inf/J hot"):
        heat.add_column(column, justify="right")
    for model, variant in models.items():
        normal, hot = r["heat"][f"{model}_normal"], r["heat"][f"{model}_hot"]
        heat.add_row(
            variant, f"{normal['throughput']:.0f}", f"{hot['throughput']:.0f}",
            f"{hot['throughput'] / normal['throughput']:.2f}" if normal["throughput"] else "-",
            _ms(normal["p99_ms"]), _ms(hot["p99_ms"]), _per_joule(hot),
        )  # fmt: skip
    console.print(heat)


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}"


if __name__ == "__main__":
    sys.exit(main())
