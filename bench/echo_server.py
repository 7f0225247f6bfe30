"""The ceiling: a no-op Open Inference Protocol server in the same style as the tiers.

``grpc.aio`` with the same generated servicer; ModelInfer answers at once with
a canned output of the size the real model would send, and ModelStreamInfer
answers ``max_tokens`` token messages and a final one without computing
anything. What it reaches with the benchmark's load generator is the per-request
overhead limit of a Python gRPC service on this machine.

Usage: python -m bench.echo_server --port-file FILE --output-shape 1x64
"""

from __future__ import annotations

import argparse
import asyncio
import json
import signal
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import numpy as np
from grpc import aio

from protos.inference import grpc_service_pb2 as pb
from protos.inference import grpc_service_pb2_grpc as pb_grpc


class Echo(pb_grpc.GRPCInferenceServiceServicer):
    """Answers without computing."""

    def __init__(self, shape: list[int]) -> None:
        self._response = pb.ModelInferResponse(model_name="echo", model_version="1")
        self._response.outputs.add(name="y", datatype="FP32", shape=shape)
        self._response.raw_output_contents.append(np.zeros(shape, np.float32).tobytes())
        self._response.parameters["edgecascade.served_by"].string_param = "echo"
        token = pb.ModelInferResponse(model_name="echo", model_version="1")
        token.outputs.add(name="text_output", datatype="BYTES", shape=[1])
        token.raw_output_contents.append(b"\x01\x00\x00\x00a")
        token.parameters["edgecascade.token_probability"].double_param = 0.5
        self._token = pb.ModelStreamInferResponse(infer_response=token)
        final = pb.ModelInferResponse(model_name="echo", model_version="1")
        final.parameters["triton_final_response"].bool_param = True
        self._final = pb.ModelStreamInferResponse(infer_response=final)

    async def ServerLive(self, request: pb.ServerLiveRequest, context: Any) -> pb.ServerLiveResponse:
        return pb.ServerLiveResponse(live=True)

    async def ModelInfer(self, request: pb.ModelInferRequest, context: Any) -> pb.ModelInferResponse:
        return self._response

    async def ModelStreamInfer(
        self, request_iterator: AsyncIterator[pb.ModelInferRequest], context: Any
    ) -> AsyncIterator[pb.ModelStreamInferResponse]:
        async for request in request_iterator:
            tokens = request.parameters["max_tokens"].int64_param if "max_tokens" in request.parameters else 1
            for _ in range(tokens):
                yield self._token
            yield self._final


async def serve(port_file: Path, shape: list[int]) -> None:
    server = aio.server(options=[("grpc.so_reuseport", 0)])
    pb_grpc.add_GRPCInferenceServiceServicer_to_server(Echo(shape), server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    port_file.write_text(json.dumps({"address": f"127.0.0.1:{port}"}))  # noqa: ASYNC240 - once, at start-up
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    await server.stop(1)


def main() -> None:
    """Command-line entry point."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port-file", type=Path, required=True)
    parser.add_argument("--output-shape", default="1x64", help="shape of the canned FP32 output, e.g. 1x64")
    args = parser.parse_args()
    asyncio.run(serve(args.port_file, [int(d) for d in args.output_shape.split("x")]))


if __name__ == "__main__":
    main()
