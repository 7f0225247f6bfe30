"""Run in a fresh process: load one model, run one batch, print the peak resident memory it added.

Usage: python -m tests.support.fresh_peak MODEL.onnx BATCH INPUT_DIM
The baseline is the kernel's high-water mark (VmHWM) right after numpy and
onnxruntime are imported and the input is built; the answer is VmHWM after
the run minus that baseline. Written independently of the profiler on purpose.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import onnxruntime as ort


def hwm() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


def main(model: str, batch: int, input_dim: int) -> None:
    x = np.random.default_rng(0).standard_normal((batch, input_dim)).astype(np.float32)
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    options.inter_op_num_threads = 1
    baseline = hwm()
    session = ort.InferenceSession(model, sess_options=options, providers=["CPUExecutionProvider"])
    session.run(None, {session.get_inputs()[0].name: x})
    print(hwm() - baseline)


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]))
