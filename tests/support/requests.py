"""Builders of Open Inference Protocol requests for tests."""

from __future__ import annotations

from typing import Any

import numpy as np

from protos.inference import grpc_service_pb2 as pb
from services.rpc.converters import set_param
from services.tensors import datatype_of, encode_raw


def infer_request(model: str, inputs: dict[str, np.ndarray[Any, Any]], **params: Any) -> pb.ModelInferRequest:
    """A ModelInferRequest with raw contents for each input."""
    request = pb.ModelInferRequest(model_name=model)
    for name, array in inputs.items():
        request.inputs.add(name=name, datatype=datatype_of(array), shape=list(array.shape))
        request.raw_input_contents.append(encode_raw(array))
    for key, value in params.items():
        set_param(request.parameters[key], value)
    return request


def text_request(model: str, prompt: bytes | str, **params: Any) -> pb.ModelInferRequest:
    """A request with one ``text_input`` BYTES element."""
    data = prompt.encode() if isinstance(prompt, str) else prompt
    return infer_request(model, {"text_input": np.array([data], dtype=object)}, **params)


def output(response: pb.ModelInferResponse, name: str) -> np.ndarray[Any, Any]:
    """Decodes one raw output of a response."""
    from services.tensors import decode_raw

    names = [o.name for o in response.outputs]
    tensor = response.outputs[names.index(name)]
    return decode_raw(name, tensor.datatype, list(tensor.shape), response.raw_output_contents[names.index(name)])


def params(response: pb.ModelInferResponse) -> dict[str, Any]:
    """Response parameters as plain values."""
    from services.rpc.converters import params_from_proto

    return params_from_proto(response.parameters)
