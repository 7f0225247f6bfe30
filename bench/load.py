"""Load generator: the stock ``tritonclient.grpc.aio`` against one OIP endpoint.

Runs in its own process and virtualenv (tritonclient pins protobuf below 7), so
it imports nothing from edgecascade. Prints one JSON object.

Modes:
  closed   N requests always in flight (each client sends the next as soon as
           the previous answers).
  poisson  open loop: requests start at exponentially distributed gaps with the
           given mean rate, however long earlier ones take.
  constant open loop at evenly spaced starts with the same mean rate.
  stream   N concurrent generation streams of T tokens each; reports tokens/s
           and time to first token.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
from collections import Counter
from typing import Any

import numpy as np
import tritonclient.grpc.aio as aioclient
from tritonclient.grpc import InferInput


def make_input(spec: str, rng: np.random.Generator) -> InferInput:
    name, datatype, shape_text, high = [*spec.split(":"), "0"][:4]
    shape = [int(d) for d in shape_text.split("x")]
    if datatype == "INT64":
        data = rng.integers(2, int(high) or 2, size=shape, dtype=np.int64)
    elif datatype == "BYTES":
        data = np.array([b"Return the value of"] * int(np.prod(shape)), dtype=object).reshape(shape)
    else:
        data = rng.standard_normal(shape).astype(np.float32)
    tensor = InferInput(name, shape, datatype)
    tensor.set_data_from_numpy(data)
    return tensor


def summary(latencies: list[float], errors: int, seconds: float) -> dict[str, Any]:
    ms = np.asarray(latencies) * 1000
    return {
        "requests": len(latencies),
        "errors": errors,
        "seconds": seconds,
        "throughput": len(latencies) / seconds,
        "p50_ms": float(np.percentile(ms, 50)) if len(ms) else None,
        "p99_ms": float(np.percentile(ms, 99)) if len(ms) else None,
    }


async def closed(
    client: aioclient.InferenceServerClient,
    model: str,
    inputs: list[InferInput],
    clients: int,
    seconds: float,
    warmup: float,
    deadline: float | None = None,
) -> dict[str, Any]:
    latencies: list[float] = []
    errors = 0
    kinds: Counter[str] = Counter()
    start = time.perf_counter()
    measure_from = start + warmup
    stop_at = measure_from + seconds

    async def worker() -> None:
        nonlocal errors
        while True:
            t0 = time.perf_counter()
            if t0 >= stop_at:
                return
            try:
                await client.infer(model, inputs, client_timeout=deadline)
            except Exception as exc:
                errors += 1
                status = getattr(exc, "status", None)
                kinds[str(status()) if callable(status) else type(exc).__name__] += 1
                continue
            t1 = time.perf_counter()
            if t0 >= measure_from:
                latencies.append(t1 - t0)

    await asyncio.gather(*(worker() for _ in range(clients)))
    return {**summary(latencies, errors, seconds), "error_kinds": dict(kinds)}


async def open_loop(
    client: aioclient.InferenceServerClient,
    model: str,
    inputs: list[InferInput],
    rate: float,
    seconds: float,
    poisson: bool,
    seed: int,
) -> dict[str, Any]:
    rng = np.random.default_rng(seed)
    count = int(rate * seconds)
    gaps = rng.exponential(1 / rate, count) if poisson else np.full(count, 1 / rate)
    starts = np.cumsum(gaps)
    latencies: list[float] = []
    errors = 0
    begin = time.perf_counter()

    async def one(at: float) -> None:
        nonlocal errors
        delay = begin + at - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        t0 = time.perf_counter()
        try:
            await client.infer(model, inputs)
        except Exception:
            errors += 1
            return
        latencies.append(time.perf_counter() - t0)

    await asyncio.gather(*(one(float(s)) for s in starts))
    return summary(latencies, errors, float(starts[-1]) if count else seconds)


async def streams(client: aioclient.InferenceServerClient, model: str, count: int, tokens: int) -> dict[str, Any]:
    first_token: list[float] = []
    produced = 0
    errors = 0

    async def one(index: int) -> None:
        nonlocal produced, errors
        prompt = InferInput("text_input", [1], "BYTES")
        prompt.set_data_from_numpy(np.array([b"Return the value of"], dtype=object))

        async def requests() -> Any:
            yield {
                "model_name": model,
                "inputs": [prompt],
                "parameters": {"max_tokens": tokens, "temperature": 0.8, "seed": index},
            }

        t0 = time.perf_counter()
        seen = 0
        async for result, error in client.stream_infer(requests()):
            if error is not None:
                errors += 1
                return
            params = result.get_response().parameters
            if "triton_final_response" in params and params["triton_final_response"].bool_param:
                return
            if seen == 0:
                first_token.append(time.perf_counter() - t0)
            seen += 1
            produced += 1

    t0 = time.perf_counter()
    await asyncio.gather(*(one(i) for i in range(count)))
    seconds = time.perf_counter() - t0
    return {
        "streams": count,
        "tokens": produced,
        "errors": errors,
        "seconds": seconds,
        "tokens_per_s": produced / seconds,
        "ttft_p50_ms": float(np.percentile(np.asarray(first_token) * 1000, 50)) if first_token else None,
    }


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--address", required=True)
    parser.add_argument("--model", required=True)
    parser.add_argument(
        "--input", action="append", default=[], help="name:DATATYPE:AxB[:high] (INT64 ids drawn below high)"
    )
    parser.add_argument("--mode", choices=["closed", "poisson", "constant", "stream"], default="closed")
    parser.add_argument("--clients", type=int, default=1)
    parser.add_argument("--rate", type=float, default=100.0)
    parser.add_argument("--seconds", type=float, default=4.0)
    parser.add_argument("--warmup", type=float, default=0.5)
    parser.add_argument("--tokens", type=int, default=32)
    parser.add_argument("--deadline", type=float, default=None, help="gRPC deadline of each request, seconds")
    parser.add_argument("--repeat", type=int, default=10, help="stream mode: runs, one after another")
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    client = aioclient.InferenceServerClient(url=args.address)
    try:
        inputs = [make_input(spec, rng) for spec in args.input]
        if args.mode == "closed":
            result = await closed(client, args.model, inputs, args.clients, args.seconds, args.warmup, args.deadline)
        elif args.mode == "stream":
            await streams(client, args.model, 1, 4)  # warm-up
            # Time to first token is one sample per stream; repeat so its median means something.
            runs = [await streams(client, args.model, args.clients, args.tokens) for _ in range(args.repeat)]
            ttfts = [r["ttft_p50_ms"] for r in runs if r["ttft_p50_ms"] is not None]
            tokens = sum(r["tokens"] for r in runs)
            seconds = sum(r["seconds"] for r in runs)
            result = {
                "streams": args.clients,
                "runs": len(runs),
                "tokens": tokens,
                "errors": sum(r["errors"] for r in runs),
                "seconds": seconds,
                "tokens_per_s": tokens / seconds,
                "ttft_p50_ms": float(np.median(ttfts)) if ttfts else None,
            }
        else:
            deadline = time.perf_counter() + args.warmup
            while time.perf_counter() < deadline:  # warm the connection and the model up
                await client.infer(args.model, inputs)
            result = await open_loop(client, args.model, inputs, args.rate, args.seconds, args.mode == "poisson", 1)
    finally:
        await client.close()
    print(json.dumps(result))


if __name__ == "__main__":
    asyncio.run(main())
