"""KServe (0.21) as a peer: a small ``kserve.Model`` running onnxruntime behind KServe's own ModelServer.

gRPC on (the Open Inference Protocol the bench's load generator speaks), REST on
a second free port because ModelServer always starts it, per-request logging off
(latency logging off, KServe's loggers at WARNING so its gRPC interceptor's
per-call INFO line is not written). ``predict`` hands ``session.run`` to a pool
of ``--concurrency`` threads (2, as Tier 0 runs two at once) so the event loop
keeps reading requests; onnxruntime releases the GIL while it computes.

Before the port file is written, a fixed input goes through KServe's own gRPC
endpoint and the answer is compared with onnxruntime's (``common.check_over_grpc``);
a peer that answers other numbers stops itself instead.

Run inside ``.venv-kserve``:
    python -m bench.peers.kserve_server --model-path M.onnx --name charlm --port-file F.json
"""

from __future__ import annotations

import asyncio
import logging
import sys
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from bench.peers.common import announce_when_checked, arguments, free_port, say, session, signature, version


def quiet() -> None:
    """Per-request logging off: KServe's and uvicorn's loggers at WARNING."""
    for name in ("kserve", "kserve.trace", "uvicorn", "uvicorn.access", "uvicorn.error"):
        logging.getLogger(name).setLevel(logging.WARNING)


def main() -> None:
    """Command-line entry point."""
    parser = arguments(__doc__.splitlines()[0])
    parser.add_argument("--concurrency", type=int, default=2, help="onnxruntime runs at once")
    args = parser.parse_args()
    grpc_port, http_port = free_port(), free_port()
    # kserve.model_server parses sys.argv for its own flags when imported; give it only ours.
    sys.argv = [sys.argv[0], f"--grpc_port={grpc_port}", f"--http_port={http_port}"]
    import kserve  # type: ignore[import-not-found]  # only in its own venv
    from kserve.protocol.grpc import grpc_predict_v2_pb2 as pb  # type: ignore[import-not-found]  # only in its own venv
    from kserve.protocol.grpc import grpc_predict_v2_pb2_grpc as pb_grpc

    quiet()
    sess = session(args.model_path, args.intra_op_threads)
    input_name, _, _, output_name, _ = signature(sess)
    pool = ThreadPoolExecutor(max_workers=args.concurrency, thread_name_prefix="ort")

    class OnnxModel(kserve.Model):  # type: ignore[misc]
        """One ONNX file, run by onnxruntime."""

        def load(self) -> bool:
            self.ready = True
            return True

        async def predict(
            self, payload: kserve.InferRequest, headers: dict[str, str] | None = None
        ) -> kserve.InferResponse:
            data = payload.inputs[0].as_numpy()
            loop = asyncio.get_running_loop()
            out = await loop.run_in_executor(pool, lambda: sess.run([output_name], {input_name: data})[0])
            tensor = kserve.InferOutput(name=output_name, shape=list(out.shape), datatype="FP32")
            tensor.set_data_from_numpy(np.ascontiguousarray(out, dtype=np.float32), binary_data=True)
            return kserve.InferResponse(
                response_id=payload.id or "",
                model_name=self.name,
                infer_outputs=[tensor],
                use_binary_outputs=payload.use_binary_outputs,
            )

    model = OnnxModel(args.name)
    model.load()
    say(f"kserve {version('kserve')}: {args.name} from {args.model_path}, gRPC on {grpc_port}")
    announce_when_checked(grpc_port, args.port_file, args.name, sess, pb, pb_grpc.GRPCInferenceServiceStub)
    server = kserve.ModelServer(
        grpc_port=grpc_port,
        http_port=http_port,
        enable_grpc=True,
        enable_docs_url=False,
        enable_latency_logging=False,
        workers=1,
    )
    quiet()  # again: ModelServer configures KServe's logging
    server.start([model])


if __name__ == "__main__":
    main()
