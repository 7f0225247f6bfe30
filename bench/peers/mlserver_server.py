"""Seldon MLServer (1.7) as a peer: a custom runtime running onnxruntime, served the way ``mlserver start`` does.

Server settings: ``parallel_workers: 0`` (the model runs in the server process,
no worker pool), gRPC and REST on free ports, ``debug`` off (so no per-request
access log), Prometheus metrics off (one interceptor and one port fewer), uvloop
as the ``mlserver`` command installs it. Model settings: adaptive batching off
(``--max-batch-size 0``) or on (``--max-batch-size 64 --max-batch-time 0.002``).
``predict`` hands ``session.run`` to a pool of ``--concurrency`` threads (2, as
Tier 0 runs two at once) so the event loop keeps reading requests.

Before the port file is written, a fixed input goes through MLServer's own gRPC
endpoint and the answer is compared with onnxruntime's (``common.check_over_grpc``);
a peer that answers other numbers stops itself instead.

Run inside ``.venv-mlserver``:
    python -m bench.peers.mlserver_server --model-path M.onnx --name charlm --port-file F.json [--max-batch-size 64]
"""

from __future__ import annotations

import asyncio
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
from mlserver import MLModel, MLServer  # type: ignore[import-not-found]  # only in its own venv
from mlserver.codecs import NumpyCodec  # type: ignore[import-not-found]  # only in its own venv
from mlserver.grpc import dataplane_pb2 as pb  # type: ignore[import-not-found]  # only in its own venv
from mlserver.grpc import dataplane_pb2_grpc as pb_grpc
from mlserver.logging import configure_logger  # type: ignore[import-not-found]  # only in its own venv
from mlserver.settings import ModelParameters, ModelSettings, Settings  # type: ignore[import-not-found]  # only in its own venv
from mlserver.types import InferenceRequest, InferenceResponse  # type: ignore[import-not-found]  # only in its own venv
from mlserver.utils import install_uvloop_event_loop  # type: ignore[import-not-found]  # only in its own venv

from bench.peers.common import announce_when_checked, arguments, free_port, say, session, signature, version


class OnnxRuntime(MLModel):  # type: ignore[misc]
    """A custom MLServer runtime: one ONNX file, run by onnxruntime.

    ``parameters.uri`` is the ONNX file; ``parameters.extra`` carries
    ``intra_op_threads`` and ``concurrency``.
    """

    async def load(self) -> bool:
        params = self.settings.parameters
        extra = dict(params.extra or {})
        self._session = session(Path(params.uri), int(extra.get("intra_op_threads", 1)))
        self._input, _, _, self._output, _ = signature(self._session)
        self._pool = ThreadPoolExecutor(max_workers=int(extra.get("concurrency", 2)), thread_name_prefix="ort")
        self.ready = True
        return True

    async def predict(self, payload: InferenceRequest) -> InferenceResponse:
        data = NumpyCodec.decode_input(payload.inputs[0])
        loop = asyncio.get_running_loop()
        out = await loop.run_in_executor(self._pool, lambda: self._session.run([self._output], {self._input: data})[0])
        return InferenceResponse(
            model_name=self.name,
            id=payload.id,
            outputs=[NumpyCodec.encode_output(name=self._output, payload=np.asarray(out, dtype=np.float32))],
        )


async def serve(settings: Settings, model: ModelSettings) -> None:
    """What ``mlserver start`` does with a settings.json and one model-settings.json."""
    server = MLServer(settings)
    await server.start([model])


def main() -> None:
    """Command-line entry point."""
    parser = arguments(__doc__.splitlines()[0])
    parser.add_argument("--concurrency", type=int, default=2, help="onnxruntime runs at once")
    parser.add_argument("--max-batch-size", type=int, default=0, help="adaptive batching: most requests in a batch")
    parser.add_argument("--max-batch-time", type=float, default=0.002, help="adaptive batching: most seconds to wait")
    args = parser.parse_args()
    grpc_port = free_port()
    settings = Settings(
        debug=False,
        parallel_workers=0,
        host="127.0.0.1",
        grpc_port=grpc_port,
        http_port=free_port(),
        metrics_endpoint=None,
        load_models_at_startup=True,
    )
    batching = args.max_batch_size > 1
    model = ModelSettings(
        name=args.name,
        implementation="bench.peers.mlserver_server.OnnxRuntime",
        max_batch_size=args.max_batch_size if batching else 0,
        max_batch_time=args.max_batch_time if batching else 0.0,
        parameters=ModelParameters(
            uri=str(args.model_path.resolve()),
            extra={"intra_op_threads": args.intra_op_threads, "concurrency": args.concurrency},
        ),
    )
    configure_logger(settings)
    install_uvloop_event_loop()
    say(
        f"mlserver {version('mlserver')} (uvloop {version('uvloop')}): {args.name} from {args.model_path}, "
        f"batching {'on, ' + str(args.max_batch_size) + ' / ' + str(args.max_batch_time) + ' s' if batching else 'off'}, "
        f"gRPC on {grpc_port}"
    )
    sess = session(args.model_path, args.intra_op_threads)
    announce_when_checked(grpc_port, args.port_file, args.name, sess, pb, pb_grpc.GRPCInferenceServiceStub)
    asyncio.run(serve(settings, model))


if __name__ == "__main__":
    main()
