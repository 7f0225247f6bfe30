"""NVIDIA PyTriton (0.7) as a peer: the real Triton server front end calling a Python function that runs onnxruntime.

Triton's dynamic batcher is on (``max_batch_size`` 64, ``--max-queue-delay-us``,
0 by default: batch what is queued when an instance frees up) with
``--instances`` 1 or 2 copies of the callable, each with its own onnxruntime
session. Triton's gRPC, HTTP and metrics endpoints listen on free ports; Triton
logs without verbosity (nothing per request) and PyTriton's loggers are at
WARNING.

Triton runs the callable through its Python backend, whose stub process links
``libpython``: the running interpreter's ``LIBDIR`` is put first on
``LD_LIBRARY_PATH`` (the children inherit it), or the stub may load another
Python's library (on this machine, Debian's 3.11 instead of pyenv's).

Before the port file is written, a fixed input goes through Triton's own gRPC
endpoint and the answer is compared with onnxruntime's (``common.check_over_grpc``);
a peer that answers other numbers stops itself instead.

Run inside ``.venv-pytriton``:
    python -m bench.peers.pytriton_server --model-path M.onnx --name charlm --port-file F.json --instances 2
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import sysconfig
from collections.abc import Callable
from typing import Any, NoReturn

import numpy as np

from bench.peers.common import announce_when_checked, arguments, free_port, say, session, signature, version


def libpython_first(environ: dict[str, str] | os._Environ[str], libdir: str | None) -> str | None:
    """The ``LD_LIBRARY_PATH`` that puts ``libdir`` first (once), or ``None`` if it is already first or unknown."""
    current = environ.get("LD_LIBRARY_PATH", "")
    parts = [p for p in current.split(":") if p]
    if not libdir or (parts and parts[0] == libdir):
        return None
    return ":".join([libdir, *(p for p in parts if p != libdir)])


def stop(signum: int, frame: Any) -> NoReturn:
    """SIGTERM ends ``Triton.serve`` through SystemExit, so the ``with`` block stops Triton and its stubs."""
    raise SystemExit(0)


def main() -> None:
    """Command-line entry point."""
    parser = arguments(__doc__.splitlines()[0])
    parser.add_argument("--instances", type=int, default=1, help="copies of the callable (Triton instances)")
    parser.add_argument("--max-batch-size", type=int, default=64, help="dynamic batching: most rows in a batch")
    parser.add_argument("--max-queue-delay-us", type=int, default=0, help="dynamic batching: most µs to wait")
    args = parser.parse_args()
    path = libpython_first(os.environ, sysconfig.get_config_var("LIBDIR"))
    if path is not None:
        os.environ["LD_LIBRARY_PATH"] = path
    signal.signal(signal.SIGTERM, stop)

    from pytriton.decorators import batch  # type: ignore[import-not-found]  # only in its own venv
    from pytriton.model_config import DynamicBatcher, ModelConfig, Tensor  # type: ignore[import-not-found]  # only in its own venv
    from pytriton.triton import Triton, TritonConfig  # type: ignore[import-not-found]  # only in its own venv
    from tritonclient.grpc import service_pb2 as pb
    from tritonclient.grpc import service_pb2_grpc as pb_grpc

    for name in ("pytriton", "tritonclient"):
        logging.getLogger(name).setLevel(logging.WARNING)

    sess = session(args.model_path, args.intra_op_threads)
    input_name, datatype, width, output_name, out_width = signature(sess)
    in_dtype = np.int64 if datatype == "INT64" else np.float32

    def instance() -> Callable[..., dict[str, np.ndarray[Any, Any]]]:
        own = session(args.model_path, args.intra_op_threads)

        @batch  # type: ignore[untyped-decorator]
        def infer(**inputs: np.ndarray[Any, Any]) -> dict[str, np.ndarray[Any, Any]]:
            out = own.run([output_name], {input_name: inputs[input_name]})[0]
            return {output_name: np.asarray(out, dtype=np.float32)}

        typed: Callable[..., dict[str, np.ndarray[Any, Any]]] = infer
        return typed

    grpc_port = free_port()
    config = TritonConfig(
        grpc_address="127.0.0.1",
        grpc_port=grpc_port,
        http_address="127.0.0.1",
        http_port=free_port(),
        metrics_port=free_port(),
        log_verbose=0,
    )
    say(
        f"nvidia-pytriton {version('nvidia-pytriton')} (numpy {np.__version__}): {args.name} from {args.model_path}, "
        f"{args.instances} instance(s), dynamic batching up to {args.max_batch_size}, "
        f"delay {args.max_queue_delay_us} µs, gRPC on {grpc_port}, LD_LIBRARY_PATH={os.environ.get('LD_LIBRARY_PATH')}"
    )
    announce_when_checked(grpc_port, args.port_file, args.name, sess, pb, pb_grpc.GRPCInferenceServiceStub)
    # Triton's copy of itself and the model store go beside the port file (the bench's temporary folder).
    workspace = args.port_file.parent / f"pytriton-{args.name}-{os.getpid()}"
    with Triton(config=config, workspace=workspace) as triton:
        triton.bind(
            model_name=args.name,
            infer_func=[instance() for _ in range(args.instances)],
            inputs=[Tensor(name=input_name, dtype=in_dtype, shape=(width,))],
            outputs=[Tensor(name=output_name, dtype=np.float32, shape=(out_width,))],
            config=ModelConfig(
                max_batch_size=args.max_batch_size,
                batcher=DynamicBatcher(max_queue_delay_microseconds=args.max_queue_delay_us),
            ),
            strict=True,
        )
        triton.serve()
    sys.exit(0)


if __name__ == "__main__":
    main()
