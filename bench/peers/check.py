"""Are a server's answers onnxruntime's numbers? Asked through the bench's own client, ``tritonclient.grpc.aio``.

Runs in the load generator's virtualenv (``.venv-triton``), like
``bench/load.py``. Reads an ``.npz`` of ``inputs`` ``[K, 1, width]`` and the
``expected`` outputs ``[K, 1, out]`` that onnxruntime computed for each row
alone, sends the K requests one at a time and then all at once, compares each
answer (``bench.peers.compare``) and prints one JSON object:
``{"ok": bool, "problem": str | null, "sequential_max_abs": float, "concurrent_max_abs": float}``.

Usage: python -m bench.peers.check --address HOST:PORT --model NAME --cases FILE.npz --input NAME:DATATYPE --output NAME
"""

from __future__ import annotations

import argparse
import asyncio
import json
from pathlib import Path
from typing import Any

import numpy as np
import tritonclient.grpc.aio as aioclient
from tritonclient.grpc import InferInput, InferRequestedOutput

from bench.peers.compare import compare, compare_batched


async def ask(
    client: aioclient.InferenceServerClient,
    model: str,
    name: str,
    datatype: str,
    output: str,
    row: np.ndarray[Any, Any],
) -> np.ndarray[Any, Any]:
    tensor = InferInput(name, list(row.shape), datatype)
    tensor.set_data_from_numpy(row)
    result = await client.infer(model, [tensor], outputs=[InferRequestedOutput(output)], client_timeout=60)
    answer = result.as_numpy(output)
    if answer is None:
        raise ValueError(f"the answer has no output {output!r}")
    return np.asarray(answer)


async def check(address: str, model: str, cases: Path, input_spec: str, output: str) -> dict[str, Any]:
    name, datatype = input_spec.split(":")
    with np.load(cases) as data:
        inputs, expected = data["inputs"], data["expected"]
    report: dict[str, Any] = {"ok": False, "problem": None, "sequential_max_abs": None, "concurrent_max_abs": None}
    client = aioclient.InferenceServerClient(url=address)
    try:
        sequential = np.stack([await ask(client, model, name, datatype, output, row) for row in inputs])
        report["sequential_max_abs"] = compare(expected, sequential)
        concurrent = np.stack(
            await asyncio.gather(*(ask(client, model, name, datatype, output, row) for row in inputs))
        )
        report["concurrent_max_abs"] = compare_batched(expected, concurrent)
        report["ok"] = True
    except Exception as error:  # any failure is the verdict, reported rather than raised
        report["problem"] = f"{type(error).__name__}: {error}"
    finally:
        await client.close()
    return report


def main() -> None:
    """Command-line entry point."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--address", required=True)
    parser.add_argument("--model", required=True)
    parser.add_argument("--cases", type=Path, required=True, help=".npz with inputs [K, 1, w] and expected [K, 1, o]")
    parser.add_argument("--input", required=True, help="NAME:DATATYPE of the model's input")
    parser.add_argument("--output", required=True, help="name of the model's output")
    args = parser.parse_args()
    print(json.dumps(asyncio.run(check(args.address, args.model, args.cases, args.input, args.output))))


if __name__ == "__main__":
    main()
