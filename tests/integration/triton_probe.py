"""Runs the stock tritonclient against an edgecascade tier and prints what it saw as JSON.

Executed by the tests in a separate virtualenv (tritonclient pins protobuf < 7
and registers the same ``inference.*`` message names as our contracts), so this
file imports nothing from edgecascade.

Usage: python triton_probe.py ADDRESS INFER_MODEL LM_MODEL INPUT_JSON
"""

from __future__ import annotations

import json
import queue
import sys
from typing import Any

import numpy as np
import tritonclient.grpc as grpcclient


def main() -> int:
    address, infer_model, lm_model, input_json = sys.argv[1:5]
    client = grpcclient.InferenceServerClient(url=address)
    out: dict[str, Any] = {
        "live": client.is_server_live(),
        "ready": client.is_server_ready(),
        "model_ready": client.is_model_ready(infer_model),
    }
    metadata = client.get_model_metadata(infer_model, as_json=True)
    out["metadata"] = {"name": metadata["name"], "inputs": metadata["inputs"], "outputs": metadata["outputs"]}
    config = client.get_model_config(infer_model, as_json=True)["config"]
    out["config"] = {
        "name": config["name"],
        "max_batch_size": config.get("max_batch_size", 0),
        "input": config["input"],
    }
    out["index"] = sorted(m["name"] for m in client.get_model_repository_index(as_json=True).get("models", []))
    out["server"] = client.get_server_metadata(as_json=True)["name"]

    x = np.asarray(json.loads(input_json), dtype=np.float32)
    tensor = grpcclient.InferInput("x", list(x.shape), "FP32")
    tensor.set_data_from_numpy(x)
    result = client.infer(infer_model, [tensor], outputs=[grpcclient.InferRequestedOutput("y")])
    out["y"] = result.as_numpy("y").tolist()
    out["infer_parameters"] = {k: str(v).strip() for k, v in result.get_response().parameters.items()}

    responses: queue.Queue[tuple[Any, Any]] = queue.Queue()
    client.start_stream(callback=lambda result, error: responses.put((result, error)))
    prompt = grpcclient.InferInput("text_input", [1], "BYTES")
    prompt.set_data_from_numpy(np.array([b"abc"], dtype=object))
    client.async_stream_infer(lm_model, [prompt], parameters={"max_tokens": 8, "temperature": 0.0})
    tokens: list[str] = []
    probabilities: list[float] = []
    final = False
    while not final:
        result, error = responses.get(timeout=30)
        if error is not None:
            out["stream_error"] = str(error)
            break
        response = result.get_response()
        params = response.parameters
        if "triton_final_response" in params and params["triton_final_response"].bool_param:
            final = True
            out["final_tokens"] = params["edgecascade.tokens"].int64_param
            continue
        tokens.append(result.as_numpy("text_output")[0].decode())
        probabilities.append(params["edgecascade.token_probability"].double_param)
    client.stop_stream()
    out["tokens"] = tokens
    out["probabilities"] = probabilities
    out["final"] = final
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
