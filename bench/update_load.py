"""``python -m bench.update_load``: closed-loop OIP clients that record every request, for ``bench.updates``.

``--clients`` tasks each send a char-LM ``ModelInfer`` (grpc.aio, stubs from
``protos.inference``), wait for its answer and send the next, until SIGTERM.
Each request is recorded with its monotonic start and end (``time.monotonic``
is the system-wide clock on Linux, so the parent can line them up with its own
events), its status, the version that answered and whether the device itself
answered. At SIGTERM the clients finish the request they are on, and the
records go to ``--out`` as JSON columns.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import signal
import sys
import time
from pathlib import Path

import grpc
import numpy as np
from grpc import aio

from protos.inference import grpc_service_pb2 as pb
from protos.inference import grpc_service_pb2_grpc as pb_grpc
from services.inference import SERVED_BY


def charlm_request(model: str, context: int, vocab: int, seed: int) -> pb.ModelInferRequest:
    """A next-character request for a char-LM: ``input_ids`` INT64 [1, context]."""
    ids = np.random.default_rng(seed).integers(2, vocab, size=(1, context), dtype=np.int64)
    request = pb.ModelInferRequest(model_name=model)
    request.inputs.add(name="input_ids", datatype="INT64", shape=[1, context])
    request.raw_input_contents.append(ids.astype("<i8").tobytes())
    return request


def served_by(response: pb.ModelInferResponse) -> str:
    """Who answered (``edgecascade.served_by``)."""
    return response.parameters[SERVED_BY].string_param if SERVED_BY in response.parameters else ""


async def run(args: argparse.Namespace) -> dict[str, list[float] | list[str] | list[bool]]:
    """Runs the clients until SIGTERM and returns the records as columns."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    requests = [charlm_request(args.model, args.context, args.vocab, seed) for seed in range(256)]
    start: list[float] = []
    end: list[float] = []
    code: list[str] = []
    version: list[str] = []
    local: list[bool] = []
    expected = f"tier0:{args.node_id}"
    async with aio.insecure_channel(args.address) as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)

        async def client(i: int) -> None:
            n = i
            while not stop.is_set():
                request = requests[n % len(requests)]
                n += args.clients
                t0 = time.monotonic()
                try:
                    response = await stub.ModelInfer(request, timeout=args.timeout)
                    result, answered, here = "OK", response.model_version, served_by(response) == expected
                except grpc.aio.AioRpcError as exc:
                    result, answered, here = exc.code().name, "", False
                start.append(t0)
                end.append(time.monotonic())
                code.append(result)
                version.append(answered)
                local.append(here)

        tasks = [asyncio.create_task(client(i)) for i in range(args.clients)]
        print("started", flush=True)
        await stop.wait()
        await asyncio.gather(*tasks)
    return {"start": start, "end": end, "code": code, "version": version, "local": local}


def main() -> int:
    """Command-line entry point."""
    parser = argparse.ArgumentParser(prog="python -m bench.update_load", description=__doc__)
    parser.add_argument("--address", required=True, help="host:port of the device")
    parser.add_argument("--node-id", required=True, help="the device's node id (to tell its own answers)")
    parser.add_argument("--model", required=True)
    parser.add_argument("--clients", type=int, default=64, help="requests in flight")
    parser.add_argument("--context", type=int, default=16, help="input_ids length")
    parser.add_argument("--vocab", type=int, default=72, help="token ids are drawn below this")
    parser.add_argument("--timeout", type=float, default=10.0, help="gRPC deadline of each request (s)")
    parser.add_argument("--out", type=Path, required=True, help="where the records go (JSON)")
    args = parser.parse_args()
    records = asyncio.run(run(args))
    args.out.write_text(json.dumps(records))
    return 0


if __name__ == "__main__":
    sys.exit(main())
