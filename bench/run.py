"""``python -m bench.run``: the device engine against its physical limits, measured side by side.

One run measures, on this machine, with the stock ``tritonclient.grpc.aio`` as
the load generator in its own process:

* the ceilings: a no-op gRPC echo server (per-request overhead) and raw
  onnxruntime in-process throughput at batch 1 … 64 (compute), for the demo
  device model (tiny, overhead-bound) and a ~40 MB MLP built here
  (compute-bound);
* Tier 0 with batching off (``EDGECASCADE_BATCHING__MAX_BATCH_SIZE=1``) and
  on, at 1, 16 and 64 requests in flight; constant and Poisson arrivals at the
  same mean rate; streaming tokens/s with 1 and 16 concurrent streams;
* its peers (``bench/peers``: KServe, Seldon MLServer, NVIDIA PyTriton, each in
  its own virtualenv, serving the same ONNX files with onnxruntime), checked for
  onnxruntime's numbers through the load generator's client, then loaded the
  same way at 1, 16 and 64 in flight; "Tier 0 ÷ best peer" at each.
  ``--peers none|all|kserve,mlserver,pytriton`` selects them, a peer whose
  virtualenv is missing is skipped with the reason, and ``--only-peers`` runs
  just this comparison (Tier 0's closed-loop runs and the peers', to
  ``bench/results/peers-latest.json``).

It prints the ratios the targets are stated in and writes
``bench/results/latest.json``. Nothing here is asserted: numbers are reported.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import platform
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
from rich.console import Console
from rich.table import Table

from bench.peers import DISTRIBUTIONS, IN_FLIGHT, PeerConfig, best, missing_venv, ranked, ratio, select
from services.engine.model_repository import ModelRepository

ROOT = Path(__file__).resolve().parent.parent
DEVICE_MODEL = ROOT / "examples" / "models" / "charlm-device.int8.onnx"
BATCHES = (1, 2, 4, 8, 16, 32, 64)
console = Console(highlight=False)


@dataclass(frozen=True)
class Workload:
    """A model and what the load generator sends it."""

    path: Path
    inputs: list[str]
    out: str


def build_mlp(path: Path) -> Path:
    """A compute-bound MLP of about 40 MB: 512 → 2048 → 2048 → 2048 → 512, tanh."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    dims = [512, 2048, 2048, 2048, 512]
    nodes, weights = [], []
    previous = "x"
    for i, (a, b) in enumerate(itertools.pairwise(dims)):
        weights.append(numpy_helper.from_array((rng.standard_normal((a, b)) / np.sqrt(a)).astype(np.float32), f"W{i}"))
        nodes.append(helper.make_node("MatMul", [previous, f"W{i}"], [f"m{i}"]))
        out = "y" if i == len(dims) - 2 else f"t{i}"
        nodes.append(helper.make_node("Tanh", [f"m{i}"], [out]))
        previous = out
    graph = helper.make_graph(
        nodes,
        "mlp40",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 512])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 512])],
        initializer=weights,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 9
    onnx.save(model, str(path))
    return path


def session(path: Path) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    options.inter_op_num_threads = 1
    return ort.InferenceSession(str(path), sess_options=options, providers=["CPUExecutionProvider"])


def feed(sess: ort.InferenceSession, batch: int, rng: np.random.Generator) -> dict[str, np.ndarray[Any, Any]]:
    arg = sess.get_inputs()[0]
    width = arg.shape[1]
    if arg.type == "tensor(int64)":
        vocab = sess.get_outputs()[0].shape[1]
        return {arg.name: rng.integers(2, vocab, size=(batch, width), dtype=np.int64)}
    return {arg.name: rng.standard_normal((batch, width)).astype(np.float32)}


def raw_throughput(path: Path, threads: int, seconds: float) -> dict[int, float]:
    """Rows per second of raw onnxruntime at each batch size, ``threads`` runs at once (as the service runs)."""
    sess = session(path)
    rng = np.random.default_rng(0)
    result: dict[int, float] = {}

    def loop(data: dict[str, np.ndarray[Any, Any]], stop_at: float, counts: list[int], i: int) -> None:
        while time.perf_counter() < stop_at:
            sess.run(None, data)
            counts[i] += 1

    for batch in BATCHES:
        data = feed(sess, batch, rng)
        sess.run(None, data)
        counts = [0] * threads
        stop_at = time.perf_counter() + seconds
        workers = [threading.Thread(target=loop, args=(data, stop_at, counts, i)) for i in range(threads)]
        started = time.perf_counter()
        for w in workers:
            w.start()
        for w in workers:
            w.join()
        result[batch] = sum(counts) * batch / (time.perf_counter() - started)
    return result


@contextmanager
def process(args: list[str], env: dict[str, str], port_file: Path) -> Iterator[str]:
    """Runs a server process until the block ends; yields its address."""
    port_file.unlink(missing_ok=True)
    # The server's log goes to a file beside its port file: a pipe nobody reads fills up, and a server
    # blocked writing its log stops answering (the "statistics after overload" hang of earlier runs).
    log_path = port_file.with_suffix(".log")
    with log_path.open("wb") as log_file:
        child = subprocess.Popen(args, env=env, stdout=subprocess.DEVNULL, stderr=log_file, cwd=ROOT)
    try:
        deadline = time.monotonic() + 60
        while not port_file.is_file():
            if child.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"{args} did not start: {log_path.read_text(errors='replace')[-4000:]}")
            time.sleep(0.05)
        yield str(json.loads(port_file.read_text())["address"])
    finally:
        child.send_signal(signal.SIGTERM)
        try:
            child.wait(30)
        except subprocess.TimeoutExpired:
            child.kill()
        errors = [line for line in log_path.read_text(errors="replace").splitlines() if "Traceback" in line]
        if errors:
            console.print(f"[yellow]{args[-1]}: {len(errors)} traceback(s) in its log {log_path}[/yellow]")


def load(python: str, address: str, model: str, inputs: list[str], **options: Any) -> dict[str, Any]:
    """Runs the load generator in its own process and returns its JSON report."""
    args = [python, str(ROOT / "bench" / "load.py"), "--address", address, "--model", model]
    for spec in inputs:
        args += ["--input", spec]
    for key, value in options.items():
        args += [f"--{key}", str(value)]
    out = subprocess.run(args, capture_output=True, text=True, timeout=600, check=True).stdout
    report: dict[str, Any] = json.loads(out)
    return report


def engine_counts(address: str, model: str) -> dict[str, int]:
    """What the node counted for a model: requests computed, executions, and requests shed by reason."""
    import grpc

    from protos.edgecascade.v1 import mesh_pb2, mesh_pb2_grpc
    from protos.inference import grpc_service_pb2 as pb
    from protos.inference import grpc_service_pb2_grpc as pb_grpc

    # Right after an overload the node may still be answering the calls its
    # clients abandoned; wait for it rather than measure that backlog.
    with grpc.insecure_channel(address) as channel:
        stats = pb_grpc.GRPCInferenceServiceStub(channel).ModelStatistics(
            pb.ModelStatisticsRequest(name=model), timeout=120, wait_for_ready=True
        )
        info = mesh_pb2_grpc.MeshServiceStub(channel).GetTierInfo(mesh_pb2.GetTierInfoRequest(), timeout=120)
    counts = {"computed": stats.model_stats[0].inference_count, "executions": stats.model_stats[0].execution_count}
    for held in info.models:
        if held.name == model and held.state == "READY":
            counts.update({f"shed_{k}": v for k, v in held.shed.items()})
    return counts


def tier0(
    repo: Path, work: Path, batching: bool, settings: Mapping[str, str] | None = None
) -> tuple[list[str], dict[str, str], Path]:
    """The command, environment and port file of a Tier 0 process (``settings``: more ``EDGECASCADE_*``)."""
    port_file = work / ("on.json" if batching else "off.json")
    env = {
        **os.environ,
        "EDGECASCADE_SERVER__PORT_FILE": str(port_file),
        "EDGECASCADE_SERVER__PORT": "0",
        "EDGECASCADE_REPOSITORY__PATH": str(repo),
        "EDGECASCADE_LOG__LEVEL": "WARNING",
        "EDGECASCADE_BATCHING__MAX_BATCH_SIZE": "64" if batching else "1",
        "EDGECASCADE_BATCHING__MAX_QUEUE_SIZE": "4096",
        **(settings or {}),
    }
    env.pop("OTEL_EXPORTER_OTLP_ENDPOINT", None)
    return [sys.executable, "-m", "tier0_device"], env, port_file


def peer_selection(spec: str) -> list[PeerConfig]:
    """``--peers``: the configurations it names."""
    try:
        return select(spec)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from error


CHECK_ROWS = 16  # requests the correctness check sends, one at a time and then all at once


def check_cases(spec: Workload, path: Path) -> tuple[Path, str, str]:
    """Writes the check's inputs and onnxruntime's answers, each row computed alone; returns (file, input spec, output)."""
    sess = session(spec.path)
    arg, out = sess.get_inputs()[0], sess.get_outputs()[0]
    rows = feed(sess, CHECK_ROWS, np.random.default_rng(7))[arg.name]
    expected = np.stack([sess.run([out.name], {arg.name: rows[i : i + 1]})[0] for i in range(CHECK_ROWS)])
    np.savez(path, inputs=rows[:, None, :], expected=expected)
    datatype = "INT64" if arg.type == "tensor(int64)" else "FP32"
    return path, f"{arg.name}:{datatype}", out.name


def check_peer(python: str, address: str, model: str, cases: Path, input_spec: str, output: str) -> dict[str, Any]:
    """Asks a running server for onnxruntime's numbers through tritonclient (``bench/peers/check.py``)."""
    args = [python, "-m", "bench.peers.check", "--address", address, "--model", model, "--cases", str(cases)]
    args += ["--input", input_spec, "--output", output]
    done = subprocess.run(args, capture_output=True, text=True, timeout=300, check=False, cwd=ROOT)
    if done.returncode != 0:
        return {"ok": False, "problem": f"the check failed to run: {done.stderr.strip()[-2000:]}"}
    verdict: dict[str, Any] = json.loads(done.stdout)
    return verdict


def peer_versions(config: PeerConfig) -> dict[str, str]:
    """What the peer's virtualenv has installed, as pip reports it."""
    names = DISTRIBUTIONS.get(config.family, ())
    code = f"import json, importlib.metadata as m\nprint(json.dumps({{d: m.version(d) for d in {list(names)!r}}}))"
    python = config.venv(ROOT) / "bin" / "python"
    done = subprocess.run([str(python), "-c", code], capture_output=True, text=True, timeout=60, check=False)
    if done.returncode != 0:
        return {"error": done.stderr.strip()[-500:]}
    versions: dict[str, str] = json.loads(done.stdout)
    return versions


def run_peers(
    peers: list[PeerConfig], models: dict[str, Workload], work: Path, triton_python: str, seconds: float,
    results: dict[str, Any],
) -> None:  # fmt: skip
    """Each peer configuration on each model: started, checked for onnxruntime's numbers, then loaded like Tier 0.

    Results go to ``results[model]["peers"][config.key]``: ``checked`` (the
    verdict), ``closed_<N>`` (load reports), or ``skipped`` / ``failed`` with the
    reason. A peer whose answers are wrong is not loaded, and is reported so.
    """
    record: dict[str, Any] = results.setdefault("peers", {"configs": {}, "versions": {}})
    cases = {name: check_cases(spec, work / f"check-{name}.npz") for name, spec in models.items()}
    for config in peers:
        record["configs"][config.key] = {"label": config.label, "family": config.family, "args": list(config.args)}
        reason = missing_venv(config, ROOT)
        if reason is not None:
            console.print(f"[yellow]peer {config.label}: skipped, {reason}[/yellow]")
            for name in models:
                results[name].setdefault("peers", {})[config.key] = {"skipped": reason}
            continue
        if config.family not in record["versions"]:
            record["versions"][config.family] = peer_versions(config)
        for name, spec in models.items():
            entry: dict[str, Any] = results[name].setdefault("peers", {}).setdefault(config.key, {})
            for attempt in (1, 2):
                try:
                    measure_peer(config, name, spec, work, cases[name], triton_python, seconds, entry)
                    break
                except RuntimeError as error:  # it did not start: PyTriton's instances can race at start-up
                    entry.setdefault("start_failures", []).append(str(error)[-2000:])
                    console.print(
                        f"[yellow]peer {config.label}: {name} did not start (attempt {attempt}): {str(error)[-400:]}[/yellow]"
                    )
                    if attempt == 2:
                        entry["failed"] = str(error)[-2000:]
                except (subprocess.SubprocessError, json.JSONDecodeError) as error:
                    entry["failed"] = str(error)[-2000:]
                    console.print(f"[red]peer {config.label}: {name} failed: {str(error)[-600:]}[/red]")
                    break


def measure_peer(
    config: PeerConfig, name: str, spec: Workload, work: Path, case: tuple[Path, str, str], triton_python: str,
    seconds: float, entry: dict[str, Any],
) -> None:  # fmt: skip
    """One peer configuration serving one model: checked, then loaded at each count in flight, into ``entry``."""
    port_file = work / f"peer-{config.key}-{name}.json"
    python = str(config.venv(ROOT) / "bin" / "python")
    cmd = [python, "-m", config.module, *config.args, "--model-path", str(spec.path), "--port-file", str(port_file)]
    cmd += ["--name", name]
    cases, input_spec, output = case
    with process(cmd, dict(os.environ), port_file) as address:
        console.print(f"peer {config.label}: {name}, checking its numbers")
        entry["checked"] = check_peer(triton_python, address, name, cases, input_spec, output)
        if not entry["checked"]["ok"]:
            console.print(f"[red]peer {config.label}: {name} answered wrong: {entry['checked']['problem']}[/red]")
            return
        for clients in IN_FLIGHT:
            console.print(f"peer {config.label}: {name}, {clients} in flight")
            run = load(triton_python, address, name, spec.inputs, mode="closed", clients=clients, seconds=seconds)
            entry[f"closed_{clients}"] = run
            if run.get("errors"):
                console.print(
                    f"[yellow]peer {config.label}: {name} at {clients}: {run['errors']} errors {run.get('error_kinds')}[/yellow]"
                )


def peers_only(triton_python: str, device_model: Path, peers: list[PeerConfig], seconds: float) -> int:
    """``--only-peers``: the comparison alone, Tier 0 (batching off and on) and the peers, closed loop at 1, 16, 64.

    Tier 0 is measured here too, minutes before its peers, rather than taken from
    an older run: on a shared machine the load around both changes by the hour.
    """
    results: dict[str, Any] = {
        "machine": {
            "cpus": os.cpu_count(),
            "platform": platform.platform(),
            "python": platform.python_version(),
            "onnxruntime": ort.__version__,
        },
    }
    with tempfile.TemporaryDirectory(prefix="edgecascade-bench-peers-") as tmp:
        work = Path(tmp)
        repo = ModelRepository(work / "repo")
        repo.add("charlm", device_model)
        repo.add("mlp", build_mlp(work / "mlp.onnx"))
        lm = session(device_model)
        context, vocab = lm.get_inputs()[0].shape[1], lm.get_outputs()[0].shape[1]
        models = {
            "charlm": Workload(device_model, [f"input_ids:INT64:1x{context}:{vocab}"], f"1x{vocab}"),
            "mlp": Workload(work / "mlp.onnx", ["x:FP32:1x512"], "1x512"),
        }
        for batching in (False, True):
            label = "on" if batching else "off"
            cmd, env, port_file = tier0(work / "repo", work, batching)
            with process(cmd, env, port_file) as address:
                for name, spec in models.items():
                    for clients in IN_FLIGHT:
                        console.print(f"tier0 batching {label}: {name}, {clients} in flight")
                        results.setdefault(name, {})[f"tier0_{label}_{clients}"] = load(
                            triton_python, address, name, spec.inputs, mode="closed", clients=clients, seconds=seconds
                        )
        run_peers(peers, models, work, triton_python, seconds, results)
    report_peers(results)
    out = ROOT / "bench" / "results"
    out.mkdir(exist_ok=True)
    (out / "peers-latest.json").write_text(json.dumps(results, indent=2, default=str) + "\n")
    console.print(f"raw results: {out / 'peers-latest.json'}")
    return 0


def main() -> int:  # noqa: PLR0915 - one linear script is the clearest record of what is measured
    """Runs every measurement and prints the tables."""
    parser = argparse.ArgumentParser(description="Tier 0 against its physical limits, measured side by side.")
    parser.add_argument(
        "--triton-python", default=os.environ.get("TRITONCLIENT_PYTHON", str(ROOT / ".venv-triton/bin/python"))
    )
    parser.add_argument("--seconds", type=float, default=4.0, help="measurement window per load run")
    parser.add_argument("--device-model", type=Path, default=DEVICE_MODEL, help="the overhead-bound char-LM")
    parser.add_argument(
        "--peers",
        type=peer_selection,
        default="all",
        help="peers to measure: none, all, or e.g. kserve,mlserver,pytriton",
    )
    parser.add_argument(
        "--only-peers", action="store_true", help="only the comparison: Tier 0 and the peers, closed loop at 1, 16, 64"
    )
    args = parser.parse_args()
    peers: list[PeerConfig] = args.peers
    seconds = args.seconds
    device_model: Path = args.device_model
    if not device_model.is_file():
        console.print(f"[red]{device_model} is missing[/red]")
        return 1
    if args.only_peers:
        return peers_only(args.triton_python, device_model, peers, seconds)
    results: dict[str, Any] = {
        "machine": {
            "cpus": os.cpu_count(),
            "platform": platform.platform(),
            "python": platform.python_version(),
            "onnxruntime": ort.__version__,
        },
    }
    with tempfile.TemporaryDirectory(prefix="edgecascade-bench-") as tmp:
        work = Path(tmp)
        repo = ModelRepository(work / "repo")
        repo.add("charlm", device_model)
        repo.add("mlp", build_mlp(work / "mlp.onnx"))
        lm = session(device_model)
        context, vocab = lm.get_inputs()[0].shape[1], lm.get_outputs()[0].shape[1]
        models = {
            "charlm": Workload(device_model, [f"input_ids:INT64:1x{context}:{vocab}"], f"1x{vocab}"),
            "mlp": Workload(work / "mlp.onnx", ["x:FP32:1x512"], "1x512"),
        }
        threads = os.cpu_count() or 1
        for name, spec in models.items():
            console.print(f"raw onnxruntime: {name} ({spec.path.stat().st_size / 1e6:.1f} MB), {threads} runs at once")
            results.setdefault(name, {})["raw"] = raw_throughput(spec.path, threads, min(seconds / 2, 2.0))

        for name, spec in models.items():
            port_file = work / f"echo-{name}.json"
            echo = [
                sys.executable,
                "-m",
                "bench.echo_server",
                "--port-file",
                str(port_file),
                "--output-shape",
                spec.out,
            ]
            with process(echo, dict(os.environ), port_file) as address:
                console.print(f"echo ceiling for {name}")
                results[name]["echo_64"] = load(
                    args.triton_python, address, "echo", spec.inputs, mode="closed", clients=64, seconds=seconds
                )
                results[name]["echo_1"] = load(
                    args.triton_python, address, "echo", spec.inputs, mode="closed", clients=1, seconds=seconds
                )
                if name == "charlm":
                    results[name]["echo_stream_16"] = load(
                        args.triton_python, address, "echo", [], mode="stream", clients=16, tokens=64
                    )
                    results[name]["echo_stream_1"] = load(
                        args.triton_python, address, "echo", [], mode="stream", clients=1, tokens=64
                    )

        for batching in (False, True):
            label = "on" if batching else "off"
            cmd, env, port_file = tier0(work / "repo", work, batching)
            with process(cmd, env, port_file) as address:
                for name, spec in models.items():
                    for clients in (1, 16, 64):
                        console.print(f"tier0 batching {label}: {name}, {clients} in flight")
                        before = engine_counts(address, name)
                        run = load(
                            args.triton_python,
                            address,
                            name,
                            spec.inputs,
                            mode="closed",
                            clients=clients,
                            seconds=seconds,
                        )
                        after = engine_counts(address, name)
                        run["server"] = {k: after[k] - before.get(k, 0) for k in after}
                        results[name][f"tier0_{label}_{clients}"] = run
                    if batching:
                        rate = round(0.7 * results[name]["tier0_on_64"]["throughput"])
                        for mode in ("constant", "poisson"):
                            console.print(f"tier0 batching on: {name}, {mode} arrivals at {rate}/s")
                            results[name][f"tier0_on_{mode}"] = load(
                                args.triton_python, address, name, spec.inputs, mode=mode, rate=rate, seconds=seconds
                            )
                if not batching:
                    console.print("tier0 batching off: mlp overloaded, 64 in flight with a 50 ms deadline each")
                    before = engine_counts(address, "mlp")
                    overload = load(
                        args.triton_python,
                        address,
                        "mlp",
                        models["mlp"].inputs,
                        mode="closed",
                        clients=64,
                        seconds=seconds,
                        deadline=0.05,
                    )
                    after = engine_counts(address, "mlp")
                    overload["server"] = {k: after[k] - before.get(k, 0) for k in after}
                    results["mlp"]["tier0_off_overload"] = overload
                for streams in (1, 16):
                    console.print(f"tier0 batching {label}: {streams} generation streams")
                    results["charlm"][f"tier0_{label}_stream_{streams}"] = load(
                        args.triton_python, address, "charlm", [], mode="stream", clients=streams, tokens=64
                    )
        run_peers(peers, models, work, args.triton_python, seconds, results)
    report(results)
    report_peers(results)
    out = ROOT / "bench" / "results"
    out.mkdir(exist_ok=True)
    (out / "latest.json").write_text(json.dumps(results, indent=2, default=str) + "\n")
    console.print(f"raw results: {out / 'latest.json'}")
    return 0


def mean_batch(run: dict[str, Any]) -> str:
    """Requests per model run the node counted during a load run (its ModelStatistics), or "-"."""
    server = run.get("server") or {}
    executions = server.get("executions", 0)
    return f"{server.get('computed', 0) / executions:.1f}" if executions else "-"


def report(r: dict[str, Any]) -> None:
    """Prints the ratios the targets are stated in."""
    table = Table(title="Tier 0 vs its physical limit (requests/s, 64 in flight)")
    for column in (
        "model",
        "echo ceiling",
        "raw ORT @64",
        "limit",
        "tier0 on",
        "on ÷ limit",
        "tier0 off",
        "on ÷ off",
        "p99 on/off ms",
        "mean batch on/off",
    ):
        table.add_column(column, justify="right")
    for name in ("charlm", "mlp"):
        m = r[name]
        echo = m["echo_64"]["throughput"]
        raw64 = m["raw"][64]
        limit = min(echo, raw64)
        on, off = m["tier0_on_64"], m["tier0_off_64"]
        table.add_row(
            name, f"{echo:.0f}", f"{raw64:.0f}", f"{limit:.0f}", f"{on['throughput']:.0f}", f"{on['throughput'] / limit:.2f}",
            f"{off['throughput']:.0f}", f"{on['throughput'] / off['throughput']:.2f}", f"{on['p99_ms']:.1f} / {off['p99_ms']:.1f}",
            f"{mean_batch(on)} / {mean_batch(off)}",
        )  # fmt: skip
    console.print(table)
    latency = Table(title="Latency (ms) by requests in flight")
    for column in ("model", "in flight", "off p50", "on p50", "on − off p50", "off p99", "on p99", "echo p50 (1)"):
        latency.add_column(column, justify="right")
    for name in ("charlm", "mlp"):
        m = r[name]
        for clients in (1, 16, 64):
            on, off = m[f"tier0_on_{clients}"], m[f"tier0_off_{clients}"]
            latency.add_row(
                name, str(clients), f"{off['p50_ms']:.2f}", f"{on['p50_ms']:.2f}", f"{on['p50_ms'] - off['p50_ms']:+.2f}",
                f"{off['p99_ms']:.2f}", f"{on['p99_ms']:.2f}", f"{m['echo_1']['p50_ms']:.2f}" if clients == 1 else "",
            )  # fmt: skip
    console.print(latency)
    arrivals = Table(title="Constant vs Poisson arrivals at the same mean rate (batching on)")
    for column in ("model", "rate/s", "constant p99 ms", "poisson p99 ms", "poisson ÷ constant"):
        arrivals.add_column(column, justify="right")
    for name in ("charlm", "mlp"):
        c, p = r[name]["tier0_on_constant"], r[name]["tier0_on_poisson"]
        arrivals.add_row(
            name,
            f"{c['throughput']:.0f}",
            f"{c['p99_ms']:.2f}",
            f"{p['p99_ms']:.2f}",
            f"{p['p99_ms'] / c['p99_ms']:.2f}",
        )
    console.print(arrivals)
    m = r["charlm"]
    decode_limit = min(m["raw"][16], m["echo_stream_16"]["tokens_per_s"])
    step_ms = 1000 / m["raw"][1]
    streams = Table(title="Streaming generation (charlm, 64 tokens per stream)")
    for column in ("", "tokens/s 1 stream", "tokens/s 16 streams", "16 ÷ limit", "TTFT p50 ms (1 stream)"):
        streams.add_column(column, justify="right")
    streams.add_row(
        "limit", f"{1000 / step_ms:.0f} (raw step)", f"{decode_limit:.0f}", "1.00", f"{2 * step_ms + 1:.2f} (target)"
    )
    echo_one, echo_sixteen = m["echo_stream_1"], m["echo_stream_16"]
    streams.add_row(
        "echo (no compute)",
        f"{echo_one['tokens_per_s']:.0f}",
        f"{echo_sixteen['tokens_per_s']:.0f}",
        "",
        f"{echo_one['ttft_p50_ms']:.2f}",
    )
    for label in ("off", "on"):
        one, sixteen = m[f"tier0_{label}_stream_1"], m[f"tier0_{label}_stream_16"]
        streams.add_row(
            f"tier0 batching {label}", f"{one['tokens_per_s']:.0f}", f"{sixteen['tokens_per_s']:.0f}",
            f"{sixteen['tokens_per_s'] / decode_limit:.2f}", f"{one['ttft_p50_ms']:.2f}",
        )  # fmt: skip
    console.print(streams)
    overload = r["mlp"]["tier0_off_overload"]
    server = overload["server"]
    console.print(
        f"Overload (mlp, batching off, 64 in flight, 50 ms deadline): {overload['requests']} answered in time, "
        f"{overload['errors']} missed their deadline; the node computed {server.get('computed', 0)} and answered "
        f"{server.get('shed_expired', 0)} as expired without computing them "
        f"(cancelled before running: {server.get('shed_cancelled', 0)})."
    )
    raw = Table(title="Raw onnxruntime rows/s by batch size (same thread budget as the service)")
    raw.add_column("model")
    for b in BATCHES:
        raw.add_column(str(b), justify="right")
    for name in ("charlm", "mlp"):
        raw.add_row(name, *(f"{r[name]['raw'][b]:.0f}" for b in BATCHES))
    console.print(raw)


def report_peers(r: dict[str, Any]) -> None:
    """The peers side by side with Tier 0, and Tier 0 ÷ the best peer at each load."""
    configs: dict[str, Any] = r.get("peers", {}).get("configs", {})
    if not configs:
        return
    peer_table(r, configs)
    peer_notes(r, configs)
    ratio_table(r, configs)
    for family, versions in r.get("peers", {}).get("versions", {}).items():
        console.print(f"{family}: " + ", ".join(f"{k} {v}" for k, v in versions.items()))


def load_cell(run: dict[str, Any] | None) -> str:
    """Requests/s of one load run, with its errors if it had any."""
    if not run:
        return "–"
    if run.get("errors"):
        return f"{run['throughput']:.0f} ({run['errors']} err)"
    return f"{run['throughput']:.0f}"


def p99_cell(run: dict[str, Any] | None) -> str:
    """p99 of one load run in ms."""
    return f"{run['p99_ms']:.1f}" if run and run.get("p99_ms") is not None else "–"


def peer_table(r: dict[str, Any], configs: dict[str, Any]) -> None:
    """Requests/s at each load and p99 at the highest, Tier 0's configurations first."""
    table = Table(title="Peers: same model, same load generator (requests/s by requests in flight)")
    for column in ("model", "server", "numbers", *(f"@{n}" for n in IN_FLIGHT), f"p99 @{IN_FLIGHT[-1]} ms"):
        table.add_column(column, justify="right")
    for name in ("charlm", "mlp"):
        m = r.get(name, {})
        for label in ("off", "on"):
            runs = [m.get(f"tier0_{label}_{n}") for n in IN_FLIGHT]
            if any(runs):
                table.add_row(name, f"Tier 0 batching {label}", "", *map(load_cell, runs), p99_cell(runs[-1]))
        for key, config in configs.items():
            entry = m.get("peers", {}).get(key, {})
            if "skipped" in entry or "failed" in entry:
                why = "skipped" if "skipped" in entry else "failed to start"
                table.add_row(name, config["label"], why, *("–" for _ in IN_FLIGHT), "–")
                continue
            verdict = "ok" if entry.get("checked", {}).get("ok") else "WRONG"
            runs = [entry.get(f"closed_{n}") for n in IN_FLIGHT]
            table.add_row(name, config["label"], verdict, *map(load_cell, runs), p99_cell(runs[-1]))
    console.print(table)


def peer_notes(r: dict[str, Any], configs: dict[str, Any]) -> None:
    """Why a peer is not ranked: skipped, failed to start, wrong numbers, or errors under load."""
    for name in ("charlm", "mlp"):
        for key, entry in r.get(name, {}).get("peers", {}).items():
            label = f"{name}, {configs.get(key, {}).get('label', key)}"
            checked = entry.get("checked")
            if checked and not checked.get("ok"):
                console.print(f"[red]{label}: not ranked, not onnxruntime's numbers: {checked.get('problem')}[/red]")
            for n in IN_FLIGHT:
                run = entry.get(f"closed_{n}")
                if run and run.get("errors"):
                    console.print(
                        f"[yellow]{label} @{n}: not ranked, {run['errors']} errors {run.get('error_kinds')}[/yellow]"
                    )
            if "skipped" in entry:
                console.print(f"{label}: skipped, {entry['skipped']}")
            if "failed" in entry:
                console.print(f"[red]{label}: failed, {entry['failed'][-300:]}[/red]")


def ratio_table(r: dict[str, Any], configs: dict[str, Any]) -> None:
    """Tier 0 (its better configuration at each load) ÷ the best ranked peer configuration."""
    last = IN_FLIGHT[-1]
    ratios = Table(title="Tier 0 ÷ best peer (requests/s: > 1 is Tier 0 ahead; p99: < 1 is Tier 0 ahead)")
    for column in ("model", *(f"÷ best @{n}" for n in IN_FLIGHT), f"p99 @{last} ÷ best"):
        ratios.add_column(column, justify="right")
    bests = []
    for name in ("charlm", "mlp"):
        m = r.get(name, {})
        peers = m.get("peers", {})
        cells, names = [], []
        for n in IN_FLIGHT:
            ours = best({label: m.get(f"tier0_{label}_{n}") for label in ("off", "on")})
            theirs = best(ranked(peers, n))
            value = ratio(ours[1]["throughput"] if ours else None, theirs[1]["throughput"] if theirs else None)
            cells.append(f"{value:.2f}" if value is not None else "–")
            names.append(configs[theirs[0]]["label"] if theirs else "–")
        ours = best({label: m.get(f"tier0_{label}_{last}") for label in ("off", "on")}, lowest_p99=True)
        theirs = best(ranked(peers, last), lowest_p99=True)
        value = ratio(ours[1]["p99_ms"] if ours else None, theirs[1]["p99_ms"] if theirs else None)
        ratios.add_row(name, *cells, f"{value:.2f}" if value is not None else "–")
        bests.append(f"{name}: " + ", ".join(f"@{n} {label}" for n, label in zip(IN_FLIGHT, names, strict=True)))
    console.print(ratios)
    console.print("best peer: " + "; ".join(bests))
    console.print(
        "Tier 0 is its better configuration (batching off or on) at each load; the best peer is the fastest "
        "configuration whose answers were checked and had no errors (for p99, the lowest p99 on each side)."
    )


if __name__ == "__main__":
    sys.exit(main())
