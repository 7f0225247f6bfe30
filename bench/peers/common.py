"""What every peer launcher shares: the onnxruntime session, the self-check, the port file.

Runs inside a peer's own virtualenv, so it imports only the standard library,
numpy, onnxruntime and grpcio (every peer venv has those), nothing of edgecascade.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import sys
import threading
import time
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import onnxruntime as ort

from bench.peers.compare import compare


def session(path: Path, intra_op_threads: int = 1) -> ort.InferenceSession:
    """The model as Tier 0 runs it: CPU, ``intra_op_threads`` threads inside one run, no inter-op pool."""
    options = ort.SessionOptions()
    options.intra_op_num_threads = intra_op_threads
    options.inter_op_num_threads = 1
    return ort.InferenceSession(str(path), sess_options=options, providers=["CPUExecutionProvider"])


def signature(sess: ort.InferenceSession) -> tuple[str, str, int, str, int]:
    """``(input name, input datatype, input width, output name, output width)`` of a ``[batch, width]`` model."""
    arg, out = sess.get_inputs()[0], sess.get_outputs()[0]
    datatype = {"tensor(int64)": "INT64", "tensor(float)": "FP32"}[arg.type]
    return arg.name, datatype, int(arg.shape[1]), out.name, int(out.shape[1])


def fixed_input(sess: ort.InferenceSession, rows: int = 1, seed: int = 1234) -> np.ndarray[Any, Any]:
    """A deterministic input of ``rows`` rows: token ids in ``[2, vocab)`` or standard-normal floats."""
    _, datatype, width, _, vocab = signature(sess)
    rng = np.random.default_rng(seed)
    if datatype == "INT64":
        return rng.integers(2, vocab, size=(rows, width), dtype=np.int64)
    return rng.standard_normal((rows, width)).astype(np.float32)


def check_over_grpc(
    port: int, model: str, sess: ort.InferenceSession, pb: Any, stub: Any, timeout: float = 120
) -> float:
    """Sends a fixed input to the peer's own gRPC endpoint and compares the answer with onnxruntime's.

    ``pb`` and ``stub`` are the peer's own generated Open Inference Protocol
    modules (each peer ships a copy), so the check needs no client of ours.
    Retries while the model is still loading; raises ``ValueError`` if the
    numbers differ, ``TimeoutError`` if the model never answered.
    """
    input_name, datatype, _, _, _ = signature(sess)
    data = fixed_input(sess)
    expected = np.asarray(sess.run(None, {input_name: data})[0])
    request = pb.ModelInferRequest(model_name=model, id="self-check")
    request.inputs.add(name=input_name, datatype=datatype, shape=list(data.shape))
    request.raw_input_contents.append(data.tobytes())
    deadline = time.monotonic() + timeout
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        infer = stub(channel).ModelInfer
        while True:
            try:
                response = infer(request, timeout=10)
                break
            except grpc.RpcError as error:
                if time.monotonic() > deadline:
                    raise TimeoutError(f"{model} never answered: {error}") from error
                time.sleep(0.2)
    out = response.outputs[0]
    if response.raw_output_contents:
        got = np.frombuffer(response.raw_output_contents[0], dtype=np.float32)
    else:
        got = np.asarray(out.contents.fp32_contents, dtype=np.float32)
    return compare(expected, got.reshape([int(d) for d in out.shape]))


def announce_when_checked(
    port: int, port_file: Path, model: str, sess: ort.InferenceSession, pb: Any, stub: Any
) -> None:
    """In a thread: once the peer serves, checks its numbers over gRPC, then writes the port file.

    A peer that answers wrong numbers (or never answers) stops itself with
    SIGTERM and never writes the port file, so the bench does not measure it.
    """

    def run() -> None:
        try:
            wait_for_port(port)
            worst = check_over_grpc(port, model, sess, pb, stub)
        except Exception as error:  # whatever went wrong, the peer must not be measured
            say(f"self-check failed, refusing to serve: {type(error).__name__}: {error}")
            os.kill(os.getpid(), signal.SIGTERM)
            return
        say(f"self-check passed: {model} answers onnxruntime's numbers over gRPC (max |Δ| {worst:g})")
        write_port_file(port_file, port)

    threading.Thread(target=run, name="self-check", daemon=True).start()


def free_port() -> int:
    """A port free on 127.0.0.1 now, for servers that cannot listen on port 0 and tell which port they got."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def wait_for_port(port: int, timeout: float = 120.0) -> None:
    """Blocks until something accepts connections on ``127.0.0.1:port``."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                return
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.1)


def write_port_file(path: Path, port: int) -> None:
    """Tells the bench where the peer serves gRPC, as ``bench/echo_server.py`` and Tier 0 do."""
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps({"address": f"127.0.0.1:{port}"}))
    tmp.replace(path)


def arguments(description: str) -> argparse.ArgumentParser:
    """The options every launcher takes."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--model-path", type=Path, required=True, help="the ONNX file to serve")
    parser.add_argument("--name", required=True, help="the model name clients ask for")
    parser.add_argument("--port-file", type=Path, required=True, help='written as {"address": ...} once serving')
    parser.add_argument("--intra-op-threads", type=int, default=1, help="onnxruntime threads inside one run")
    return parser


def version(distribution: str) -> str:
    """The installed version of a package, as pip reports it."""
    from importlib.metadata import version as installed

    return installed(distribution)


def say(message: str) -> None:
    """One line to the launcher's log (stderr, which the bench sends to a file)."""
    print(message, file=sys.stderr, flush=True)
