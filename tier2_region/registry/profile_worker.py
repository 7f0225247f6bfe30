"""Measures one variant in a fresh process: ``python -m tier2_region.registry.profile_worker REQUEST.json``.

Order matters, because the kernel's high-water mark (VmHWM) only grows:

1. import numpy and onnxruntime, read the validation inputs, build the
   latency batches — then take the baseline VmHWM;
2. load the session (load time);
3. for each batch size, ascending: warm-up run, timed runs (p50/p99), then
   read VmHWM − baseline as that batch size's peak. Loading peaks once and
   onnxruntime's arena only grows with the batch, so the reading after batch
   ``b`` is what a fresh process that loads the model and runs batch ``b``
   reaches;
4. only then run the whole validation set (its big batches must not count).

Writes ``result.json`` (load time, per-batch memory and latency, versions)
and ``outputs.npz`` (top-1 class and confidence per validation row, and every
output of the first golden rows) into the request's ``out_dir``.
"""

from __future__ import annotations

import json
import platform
import resource
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort


def vm_hwm_bytes() -> int:
    """This process's peak resident memory so far, in bytes."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024  # kB on Linux


def _rows(inputs: dict[str, np.ndarray[Any, Any]], count: int) -> dict[str, np.ndarray[Any, Any]]:
    # Tile when the validation set has fewer rows than the batch.
    total = next(iter(inputs.values())).shape[0]
    index = np.arange(count) % total
    return {k: np.ascontiguousarray(v[index]) for k, v in inputs.items()}


def measure(request: dict[str, Any]) -> None:
    """Runs the measurement described by ``request`` and writes its files."""
    out_dir = Path(request["out_dir"])
    with np.load(request["validation"], allow_pickle=False) as npz:
        inputs = {k: npz[k] for k in npz.files if k != "labels"}
    batch_sizes = sorted(int(b) for b in request["batch_sizes"])
    batches = {b: _rows(inputs, b) for b in batch_sizes}
    options = ort.SessionOptions()
    options.intra_op_num_threads = int(request["intra_op_threads"])
    options.inter_op_num_threads = 1
    options.log_severity_level = 3

    baseline = vm_hwm_bytes()
    started = time.perf_counter()
    session = ort.InferenceSession(request["model"], sess_options=options, providers=["CPUExecutionProvider"])
    load_time_ms = (time.perf_counter() - started) * 1000.0
    output_name = session.get_outputs()[0].name

    per_batch = []
    for b in batch_sizes:
        feed = batches[b]
        session.run([output_name], feed)  # warm-up: first-run allocations belong to the peak, not the latency
        times: list[float] = []
        budget_end = time.perf_counter() + float(request["latency_budget_s"])
        while len(times) < int(request["latency_runs"]) and (len(times) < 5 or time.perf_counter() < budget_end):
            t0 = time.perf_counter_ns()
            session.run([output_name], feed)
            times.append((time.perf_counter_ns() - t0) / 1000.0)
        per_batch.append(
            {
                "batch_size": b,
                "peak_memory_bytes": max(0, vm_hwm_bytes() - baseline),
                "latency_p50_us": float(np.percentile(times, 50)),
                "latency_p99_us": float(np.percentile(times, 99)),
            }
        )

    from tier2_region.registry.profiles import top1  # after the measurements: its imports must not count

    chunk = max(batch_sizes)
    total = next(iter(inputs.values())).shape[0]
    predictions = np.zeros(total, dtype=np.int64)
    confidences = np.zeros(total, dtype=np.float64)
    for start in range(0, total, chunk):
        feed = {k: np.ascontiguousarray(v[start : start + chunk]) for k, v in inputs.items()}
        (out,) = session.run([output_name], feed)
        predictions[start : start + chunk], confidences[start : start + chunk] = top1(np.asarray(out))
    golden_rows = min(int(request["golden_rows"]), total)
    golden_feed = {k: np.ascontiguousarray(v[:golden_rows]) for k, v in inputs.items()}
    golden_out = session.run(None, golden_feed)
    names = [o.name for o in session.get_outputs()]
    arrays: dict[str, np.ndarray[Any, Any]] = {"predictions": predictions, "confidences": confidences}
    arrays.update({f"golden_in:{k}": v for k, v in golden_feed.items()})
    arrays.update({f"golden_out:{n}": np.asarray(v) for n, v in zip(names, golden_out, strict=True)})
    with (out_dir / "outputs.npz").open("wb") as fh:
        np.savez(fh, allow_pickle=False, **arrays)
    result = {
        "load_time_ms": load_time_ms,
        "batches": per_batch,
        "onnxruntime_version": ort.__version__,
        "machine": f"{platform.system().lower()}-{platform.machine()}",
        "baseline_bytes": baseline,
    }
    (out_dir / "result.json").write_text(json.dumps(result))


def main(argv: list[str]) -> int:
    """Entry point; returns the exit code (1 with a message on stderr when the model cannot be measured)."""
    if len(argv) != 1:
        print("usage: python -m tier2_region.registry.profile_worker REQUEST.json", file=sys.stderr)
        return 2
    request = json.loads(Path(argv[0]).read_text())
    try:
        measure(request)
    except Exception as exc:  # onnxruntime raises many unrelated types; the parent reports the message
        print(f"{type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
