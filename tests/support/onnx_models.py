"""Small ONNX models the tests build on the fly (nothing is downloaded)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

OPSET = 17
IR_VERSION = 9


def _save(graph: onnx.GraphProto, path: Path, properties: dict[str, str] | None = None) -> Path:
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)], producer_name="edgecascade-tests")
    model.ir_version = IR_VERSION
    for key, value in (properties or {}).items():
        entry = model.metadata_props.add()
        entry.key, entry.value = key, value
    onnx.checker.check_model(model)
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(path))
    return path


def linear_model(path: Path, in_dim: int = 4, out_dim: int = 3, seed: int = 0) -> Path:
    """``y = softmax(x @ W + b)`` with x FP32 ``[batch, in_dim]`` and y FP32 ``[batch, out_dim]``."""
    rng = np.random.default_rng(seed)
    weight = numpy_helper.from_array(rng.standard_normal((in_dim, out_dim)).astype(np.float32), "W")
    bias = numpy_helper.from_array(rng.standard_normal(out_dim).astype(np.float32), "b")
    graph = helper.make_graph(
        [
            helper.make_node("MatMul", ["x", "W"], ["xw"]),
            helper.make_node("Add", ["xw", "b"], ["logits"]),
            helper.make_node("Softmax", ["logits"], ["y"], axis=-1),
        ],
        "linear",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", in_dim])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", out_dim])],
        initializer=[weight, bias],
    )
    return _save(graph, path)


_ONNX_TYPES = {
    "BOOL": TensorProto.BOOL,
    "UINT8": TensorProto.UINT8,
    "UINT16": TensorProto.UINT16,
    "UINT32": TensorProto.UINT32,
    "UINT64": TensorProto.UINT64,
    "INT8": TensorProto.INT8,
    "INT16": TensorProto.INT16,
    "INT32": TensorProto.INT32,
    "INT64": TensorProto.INT64,
    "FP16": TensorProto.FLOAT16,
    "FP32": TensorProto.FLOAT,
    "FP64": TensorProto.DOUBLE,
    "BYTES": TensorProto.STRING,
}


def identity_model(path: Path, datatype: str) -> Path:
    """``out = Identity(inp)`` for one protocol datatype, shape ``[batch, -1]``."""
    onnx_type = _ONNX_TYPES[datatype]
    graph = helper.make_graph(
        [helper.make_node("Identity", ["inp"], ["out"])],
        f"identity_{datatype.lower()}",
        [helper.make_tensor_value_info("inp", onnx_type, ["batch", "n"])],
        [helper.make_tensor_value_info("out", onnx_type, ["batch", "n"])],
    )
    return _save(graph, path)


def tiny_char_lm(path: Path, vocab: list[str] | None = None, context: int = 4, seed: int = 0) -> Path:
    """A randomly initialised char-LM with the demo models' contract.

    ``input_ids`` INT64 ``[batch, context]`` → ``probs`` FP32 ``[batch, V]``, with
    the tokenizer in the ``edgecascade.*`` metadata properties.
    """
    import json

    vocab = vocab or ["", "", *"abcdefgh ."]
    size = len(vocab)
    rng = np.random.default_rng(seed)
    embed = numpy_helper.from_array(rng.standard_normal((size, 3)).astype(np.float32), "E")
    weight = numpy_helper.from_array(rng.standard_normal((context * 3, size)).astype(np.float32), "W")
    shape = numpy_helper.from_array(np.array([-1, context * 3], dtype=np.int64), "flat_shape")
    graph = helper.make_graph(
        [
            helper.make_node("Gather", ["E", "input_ids"], ["emb"]),
            helper.make_node("Reshape", ["emb", "flat_shape"], ["flat"]),
            helper.make_node("MatMul", ["flat", "W"], ["logits"]),
            helper.make_node("Softmax", ["logits"], ["probs"], axis=-1),
        ],
        "tiny_char_lm",
        [helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch", context])],
        [helper.make_tensor_value_info("probs", TensorProto.FLOAT, ["batch", size])],
        initializer=[embed, weight, shape],
    )
    return _save(
        graph,
        path,
        {
            "edgecascade.task": "char-lm",
            "edgecascade.vocab": json.dumps(vocab),
            "edgecascade.context_length": str(context),
        },
    )


def mlp_model(path: Path, width: int = 512, layers: int = 4, in_dim: int = 64, seed: int = 0) -> Path:
    """A compute-heavy MLP: ``x`` FP32 ``[batch, in_dim]`` → ``y`` FP32 ``[batch, width]``.

    File size is about ``4 × width × (in_dim + (layers - 1) × width)`` bytes.
    """
    rng = np.random.default_rng(seed)
    nodes = []
    initializers = []
    previous, dim = "x", in_dim
    for i in range(layers):
        weight = (rng.standard_normal((dim, width)) / np.sqrt(dim)).astype(np.float32)
        initializers.append(numpy_helper.from_array(weight, f"W{i}"))
        nodes.append(helper.make_node("MatMul", [previous, f"W{i}"], [f"h{i}"]))
        activation = "y" if i == layers - 1 else f"a{i}"
        nodes.append(helper.make_node("Tanh", [f"h{i}"], [activation]))
        previous, dim = activation, width
    graph = helper.make_graph(
        nodes,
        "mlp",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", in_dim])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", width])],
        initializer=initializers,
    )
    return _save(graph, path)
