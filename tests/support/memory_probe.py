"""Run in a fresh process: ask a model cache for models totalling twice its budget, report peak memory.

Usage: python -m tests.support.memory_probe WORKDIR MODELS WIDTH
Prints one JSON object: budget, peak RSS gain over the post-import baseline
(VmHWM, the kernel's own high-water mark), evictions, refusals and answers.
"""

from __future__ import annotations

import asyncio
import json
import sys
from pathlib import Path

import numpy as np

from services.engine.batcher import BatchingConfig
from services.engine.memory import estimate_footprint
from services.engine.model_cache import ModelCache
from services.engine.model_repository import ModelRepository
from services.engine.run_pool import RunPool
from services.errors import MemoryBudgetError
from tests.support.onnx_models import linear_model, mlp_model


def vm_hwm() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmHWM")


async def main(workdir: Path, count: int, width: int) -> dict[str, object]:
    repo = ModelRepository(workdir / "repo")
    for i in range(count):
        repo.add(f"m{i}", mlp_model(workdir / f"m{i}.onnx", width=width, layers=3, seed=i))
    repo.add("tiny", linear_model(workdir / "tiny.onnx"))
    file_bytes = (workdir / "m0.onnx").stat().st_size
    budget = count * estimate_footprint(file_bytes, {}) // 2
    pool = RunPool(1)
    # Warm onnxruntime's own globals up before the baseline is taken.
    warm = ModelCache(repo, pool, BatchingConfig(), 1 << 40)
    await warm.run(await warm.get("tiny"), {"x": np.ones((1, 4), np.float32)})
    await warm.close()
    baseline = vm_hwm()
    cache = ModelCache(repo, pool, BatchingConfig(max_batch_size=8), budget)
    answered = refused = 0
    max_used = 0
    for _ in range(2):
        for i in range(count):
            try:
                model = await cache.get(f"m{i}")
            except MemoryBudgetError:
                refused += 1
                continue
            out = await cache.run(model, {"x": np.ones((8, 64), np.float32)})
            answered += int(out["y"].shape == (8, width))
            max_used = max(max_used, cache.used_bytes)
    await cache.close()
    pool.close()
    return {
        "budget": budget,
        "file_bytes": file_bytes,
        "peak_gain": vm_hwm() - baseline,
        "max_used": max_used,
        "evictions": cache.stats.evictions,
        "refusals": cache.stats.refusals,
        "answered": answered,
        "footprints": [m.footprint_bytes for m in cache.loaded()],
    }


if __name__ == "__main__":
    print(json.dumps(asyncio.run(main(Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])))))
