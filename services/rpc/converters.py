"""Protobuf ⇄ domain conversion for the Open Inference Protocol.

The only place that knows both the generated ``inference`` messages and the
domain types of ``services.inference``. Decoding validates the protocol rules a
client can break (raw and typed contents mixed, counts that do not match,
duplicate names, empty parameters) and raises
:class:`~services.errors.InvalidArgumentError` naming the tensor or parameter.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

import numpy as np

from protos.inference import grpc_service_pb2 as pb
from protos.inference import model_config_pb2 as config_pb
from services.engine.model_cache import IndexEntry, LoadedModel
from services.engine.model_stats import ModelStats
from services.errors import InvalidArgumentError
from services.inference import (
    FALLBACK_REASON,
    ROUTE,
    SERVED_BY,
    InferRequest,
    InferResult,
    ModelSignature,
    NodeIdentity,
    ParamValue,
    TensorSpec,
)
from services.tensors import datatype, datatype_of, decode_raw, decode_typed, encode_raw

UINT63 = (1 << 63) - 1


def params_from_proto(params: Mapping[str, pb.InferParameter], where: str = "request") -> dict[str, ParamValue]:
    """Reads a parameter map.

    Raises:
        InvalidArgumentError: A parameter has no value set.
    """
    out: dict[str, ParamValue] = {}
    for key, value in params.items():
        choice = value.WhichOneof("parameter_choice")
        if choice is None:
            raise InvalidArgumentError(f"{where} parameter '{key}' has no value")
        out[key] = getattr(value, choice)
    return out


def set_param(target: pb.InferParameter, value: ParamValue) -> None:
    """Stores a Python value in an InferParameter, choosing the matching field."""
    if isinstance(value, bool):
        target.bool_param = value
    elif isinstance(value, int):
        if value > UINT63:
            target.uint64_param = value
        else:
            target.int64_param = value
    elif isinstance(value, float):
        target.double_param = value
    else:
        target.string_param = str(value)


def _has_typed_contents(contents: pb.InferTensorContents) -> bool:
    return bool(contents.ListFields())


def request_from_proto(
    request: pb.ModelInferRequest, parameters: Mapping[str, ParamValue] | None = None
) -> InferRequest:
    """Decodes a ModelInferRequest (``parameters``: already parsed by :func:`params_from_proto`, else parsed here).

    Raises:
        InvalidArgumentError: A protocol rule is broken or a tensor does not decode.
    """
    raw = request.raw_input_contents
    if raw and len(raw) != len(request.inputs):
        raise InvalidArgumentError(
            f"raw_input_contents has {len(raw)} entries for {len(request.inputs)} inputs; send one per input, in order"
        )
    inputs: dict[str, np.ndarray[Any, Any]] = {}
    for index, tensor in enumerate(request.inputs):
        name = tensor.name
        if not name:
            raise InvalidArgumentError(f"input {index} has no name")
        if name in inputs:
            raise InvalidArgumentError(f"input '{name}' appears more than once")
        typed = _has_typed_contents(tensor.contents)
        if raw:
            if typed:
                raise InvalidArgumentError(
                    f"input '{name}' has both raw and typed contents; use one or the other for all inputs"
                )
            inputs[name] = decode_raw(name, tensor.datatype, tensor.shape, raw[index])
        else:
            field = datatype(tensor.datatype, name).contents_field
            values = getattr(tensor.contents, field) if field else []
            inputs[name] = decode_typed(name, tensor.datatype, tensor.shape, values)
    return InferRequest(
        model_name=request.model_name,
        model_version=request.model_version,
        request_id=request.id,
        inputs=inputs,
        requested_outputs=tuple(o.name for o in request.outputs),
        parameters=params_from_proto(request.parameters) if parameters is None else parameters,
    )


def response_to_proto(result: InferResult) -> pb.ModelInferResponse:
    """Encodes a result with raw output contents (what Triton clients read)."""
    response = pb.ModelInferResponse(
        model_name=result.model_name, model_version=result.model_version, id=result.request_id
    )
    for key, value in result.parameters.items():
        set_param(response.parameters[key], value)
    for name, array in result.outputs.items():
        response.outputs.add(name=name, datatype=datatype_of(array), shape=list(array.shape))
        response.raw_output_contents.append(encode_raw(array))
    return response


def mark_forwarded(response: pb.ModelInferResponse, reason: str, identity: NodeIdentity) -> None:
    """Records on a forwarded response why and through which node it was forwarded.

    ``edgecascade.fallback_reason`` ends up holding the reason of the node
    nearest the client; ``edgecascade.route`` lists the nodes the request
    passed through, nearest first, ending with the one that served it.
    """
    served_by = response.parameters[SERVED_BY].string_param if SERVED_BY in response.parameters else "?"
    route = response.parameters[ROUTE].string_param if ROUTE in response.parameters else served_by
    response.parameters[ROUTE].string_param = f"{identity.served_by} > {route}"
    response.parameters[FALLBACK_REASON].string_param = reason


def tensor_metadata(specs: tuple[TensorSpec, ...]) -> list[pb.ModelMetadataResponse.TensorMetadata]:
    """Tensor specs as ModelMetadata entries."""
    return [
        pb.ModelMetadataResponse.TensorMetadata(name=s.name, datatype=s.datatype, shape=list(s.shape)) for s in specs
    ]


def metadata_to_proto(model: LoadedModel, versions: list[str]) -> pb.ModelMetadataResponse:
    """ModelMetadata of a loaded model."""
    signature: ModelSignature = model.signature
    return pb.ModelMetadataResponse(
        name=model.name,
        versions=versions,
        platform=model.entry.platform,
        inputs=tensor_metadata(signature.inputs),
        outputs=tensor_metadata(signature.outputs),
    )


_CONFIG_TYPES = {
    name: getattr(config_pb, f"TYPE_{'STRING' if name == 'BYTES' else name}")
    for name in (
        "BOOL",
        "UINT8",
        "UINT16",
        "UINT32",
        "UINT64",
        "INT8",
        "INT16",
        "INT32",
        "INT64",
        "FP16",
        "FP32",
        "FP64",
        "BYTES",
    )
}


def config_to_proto(model: LoadedModel) -> config_pb.ModelConfig:
    """A minimal Triton-shaped ModelConfig; dims exclude the batch axis when the model batches."""
    max_batch = model.entry.max_batch_size if model.signature.batchable else 0

    def dims(spec: TensorSpec) -> list[int]:
        return list(spec.shape[1:] if max_batch else spec.shape)

    config = config_pb.ModelConfig(
        name=model.name,
        platform=model.entry.platform,
        max_batch_size=max_batch,
        input=[
            config_pb.ModelInput(name=s.name, data_type=_CONFIG_TYPES[s.datatype], dims=dims(s))
            for s in model.signature.inputs
        ],
        output=[
            config_pb.ModelOutput(name=s.name, data_type=_CONFIG_TYPES[s.datatype], dims=dims(s))
            for s in model.signature.outputs
        ],
    )
    if model.entry.task:
        config.parameters["edgecascade.task"].string_value = model.entry.task
    if model.tokenizer is not None:
        # Clients need the vocabulary to read a next-character distribution.
        config.parameters["edgecascade.vocab"].string_value = json.dumps(model.tokenizer.vocab)
        config.parameters["edgecascade.context_length"].string_value = str(model.tokenizer.context_length)
    return config


def _duration(target: pb.StatisticDuration, count: int, ns: int) -> None:
    target.count = count
    target.ns = ns


def statistics_to_proto(model: LoadedModel) -> pb.ModelStatistics:
    """ModelStatistics of one loaded model version."""
    stats: ModelStats = model.stats
    out = pb.ModelStatistics(
        name=model.name,
        version=model.version,
        last_inference=stats.last_inference_ms,
        inference_count=stats.inference_count,
        execution_count=stats.execution_count,
    )
    s = out.inference_stats
    _duration(s.success, stats.success.count, stats.success.ns)
    _duration(s.fail, stats.fail.count, stats.fail.ns)
    _duration(s.queue, stats.queue.count, stats.queue.ns)
    _duration(s.compute_infer, stats.compute_infer.count, stats.compute_infer.ns)
    for size, duration in sorted(stats.batches.items()):
        batch = out.batch_stats.add(batch_size=size)
        _duration(batch.compute_infer, duration.count, duration.ns)
    out.memory_usage.add(type="CPU", id=0, byte_size=model.footprint_bytes)
    return out


def index_to_proto(rows: list[IndexEntry], ready_only: bool) -> pb.RepositoryIndexResponse:
    """RepositoryIndex rows."""
    return pb.RepositoryIndexResponse(
        models=[
            pb.RepositoryIndexResponse.ModelIndex(name=r.name, version=r.version, state=r.state.value, reason=r.reason)
            for r in rows
            if not ready_only or r.state.value == "READY"
        ]
    )
