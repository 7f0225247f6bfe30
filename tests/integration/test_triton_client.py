"""The stock tritonclient works against Tier 0 and Tier 1 unchanged (run in its own virtualenv)."""

from __future__ import annotations

import asyncio
import json
import os
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest

from tests.integration.conftest import Chain

PROBE = Path(__file__).with_name("triton_probe.py")
X = (np.arange(12, dtype=np.float32).reshape(3, 4) - 6) / 7


def triton_python() -> str:
    python = os.environ.get("TRITONCLIENT_PYTHON", "")
    if not python:
        if os.environ.get("CI"):
            pytest.fail("TRITONCLIENT_PYTHON is not set; run the suite with `make test`")
        pytest.skip("set TRITONCLIENT_PYTHON to a python with tritonclient[grpc] (`make test` does)")
    return python


@pytest.mark.slow
@pytest.mark.parametrize(("tier", "infer_model", "lm_model", "file"), [
    ("device", "lin", "lm", "lin.onnx"),
    ("edge", "edge-only", "edge-lm", "edge.onnx"),
])  # fmt: skip
async def test_stock_tritonclient(chain: Chain, tier: str, infer_model: str, lm_model: str, file: str) -> None:
    python = triton_python()
    address = chain.device.address if tier == "device" else chain.edge.address
    process = await asyncio.create_subprocess_exec(
        python, str(PROBE), address, infer_model, lm_model, json.dumps(X.tolist()),
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    stdout, stderr = await asyncio.wait_for(process.communicate(), 120)
    assert process.returncode == 0, stderr.decode()
    seen = json.loads(stdout)

    assert seen["live"] and seen["ready"] and seen["model_ready"]
    assert seen["server"] == "edgecascade"
    assert seen["metadata"]["name"] == infer_model
    assert seen["metadata"]["inputs"] == [{"name": "x", "datatype": "FP32", "shape": ["-1", "4"]}]
    assert seen["config"]["max_batch_size"] == 64
    assert seen["config"]["input"][0]["name"] == "x"
    assert infer_model in seen["index"] and lm_model in seen["index"]

    session = ort.InferenceSession(str(chain.models / file), providers=["CPUExecutionProvider"])
    np.testing.assert_allclose(np.asarray(seen["y"]), session.run(["y"], {"x": X})[0], rtol=1e-6)
    served_by = "tier0:device-1" if tier == "device" else "tier1:edge-1"
    assert served_by in seen["infer_parameters"]["edgecascade.served_by"]

    assert "stream_error" not in seen
    assert seen["final"] and seen["final_tokens"] == 8
    assert len(seen["tokens"]) == 8 and all(len(t) == 1 for t in seen["tokens"])
    assert all(0 < p <= 1 for p in seen["probabilities"])
