"""An onnxruntime session that knows and enforces its model's signature.

The wrapper reads the input and output names, element types and shapes from the
session and rejects a request that does not fit before onnxruntime sees it, so
a client gets an INVALID_ARGUMENT naming the input instead of an opaque
runtime error. ``run`` is blocking; callers run it off the event loop.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort

from services.errors import InvalidArgumentError, ModelNotReadyError
from services.inference import ModelSignature, TensorSpec
from services.tensors import datatype_of

# onnxruntime's type strings → protocol datatypes.
_ORT_TYPES = {
    "tensor(bool)": "BOOL",
    "tensor(uint8)": "UINT8",
    "tensor(uint16)": "UINT16",
    "tensor(uint32)": "UINT32",
    "tensor(uint64)": "UINT64",
    "tensor(int8)": "INT8",
    "tensor(int16)": "INT16",
    "tensor(int32)": "INT32",
    "tensor(int64)": "INT64",
    "tensor(float16)": "FP16",
    "tensor(float)": "FP32",
    "tensor(double)": "FP64",
    "tensor(string)": "BYTES",
}


def _spec(arg: Any) -> TensorSpec:
    datatype = _ORT_TYPES.get(arg.type)
    if datatype is None:
        raise ModelNotReadyError(f"tensor '{arg.name}' has type {arg.type}, which edgecascade cannot serve")
    shape = tuple(d if isinstance(d, int) and d >= 0 else -1 for d in arg.shape)
    return TensorSpec(arg.name, datatype, shape)


class OnnxSession:
    """One loaded ONNX model.

    Args:
        path: The ``.onnx`` file, or the model's bytes (decrypted in memory: nothing is written to disk).
        intra_op_threads: Threads onnxruntime may use inside one run.

    Raises:
        ModelNotReadyError: onnxruntime cannot load the file, or the model uses
            tensor types the protocol cannot carry.
    """

    def __init__(self, path: Path | bytes, intra_op_threads: int = 1) -> None:
        options = ort.SessionOptions()
        options.intra_op_num_threads = intra_op_threads
        options.inter_op_num_threads = 1
        options.log_severity_level = 3
        model = path if isinstance(path, bytes) else str(path)
        what = "model bytes" if isinstance(path, bytes) else f"model file {path.name}"
        try:
            self._session = ort.InferenceSession(model, sess_options=options, providers=["CPUExecutionProvider"])
        except Exception as exc:  # onnxruntime raises several unrelated types for a bad file
            raise ModelNotReadyError(f"{what} cannot be loaded by onnxruntime") from exc
        self.signature = ModelSignature(
            inputs=tuple(_spec(a) for a in self._session.get_inputs()),
            outputs=tuple(_spec(a) for a in self._session.get_outputs()),
        )
        self.metadata: dict[str, str] = dict(self._session.get_modelmeta().custom_metadata_map)

    def validate(self, inputs: Mapping[str, np.ndarray[Any, Any]], requested_outputs: Sequence[str] = ()) -> None:
        """Checks that inputs and requested outputs fit the model's signature.

        Raises:
            InvalidArgumentError: An input is missing, unknown, of the wrong
                datatype or of a shape the model cannot take; or a requested
                output does not exist.
        """
        expected = {s.name: s for s in self.signature.inputs}
        for name in inputs:
            if name not in expected:
                raise InvalidArgumentError(
                    f"input '{name}' is not an input of this model; its inputs are: {', '.join(expected)}"
                )
        for spec in self.signature.inputs:
            if spec.name not in inputs:
                raise InvalidArgumentError(f"required input '{spec.name}' is missing")
            array = inputs[spec.name]
            got = datatype_of(array)
            if got != spec.datatype:
                raise InvalidArgumentError(f"input '{spec.name}' must be {spec.datatype}, got {got}")
            if len(array.shape) != len(spec.shape) or any(
                want not in (-1, have) for want, have in zip(spec.shape, array.shape, strict=True)
            ):
                raise InvalidArgumentError(
                    f"input '{spec.name}': shape {list(array.shape)} does not fit the model's {list(spec.shape)}"
                )
        outputs = {s.name for s in self.signature.outputs}
        for name in requested_outputs:
            if name not in outputs:
                raise InvalidArgumentError(
                    f"requested output '{name}' is not an output of this model; its outputs are: {', '.join(outputs)}"
                )

    def prepare(
        self, inputs: Mapping[str, np.ndarray[Any, Any]], requested_outputs: Sequence[str] = ()
    ) -> dict[str, np.ndarray[Any, Any]]:
        """Checks one request against the signature and returns its inputs ready to run.

        BYTES inputs become ``object`` arrays of ``str``, each element decoded
        as UTF-8 on its own: memory stays linear in the request size (numpy's
        fixed-width unicode would pad every element to the longest), and a
        request that is not UTF-8 is refused alone, before it joins a batch.

        Raises:
            InvalidArgumentError: As :meth:`validate`, or a BYTES element is not valid UTF-8.
        """
        self.validate(inputs, requested_outputs)
        return {name: (_as_text(name, array) if array.dtype == object else array) for name, array in inputs.items()}

    def run(
        self, inputs: Mapping[str, np.ndarray[Any, Any]], requested_outputs: Sequence[str] = ()
    ) -> dict[str, np.ndarray[Any, Any]]:
        """Runs the model (blocking). Inputs must come from :meth:`prepare`.

        Returns:
            The requested outputs (all outputs when none are requested) by name.

        Raises:
            InvalidArgumentError: onnxruntime rejected the input values.
        """
        names = list(requested_outputs) or [s.name for s in self.signature.outputs]
        try:
            results = self._session.run(names, dict(inputs))
        except (ort.capi.onnxruntime_pybind11_state.InvalidArgument, ort.capi.onnxruntime_pybind11_state.Fail) as exc:
            # Values the signature cannot express (e.g. an index out of range).
            raise InvalidArgumentError(f"the model rejected the input values: {_first_line(exc)}") from exc
        return dict(zip(names, (np.asarray(r) for r in results), strict=True))


def _as_text(name: str, array: np.ndarray[Any, Any]) -> np.ndarray[Any, Any]:
    """Decodes a BYTES tensor element by element into an ``object`` array of ``str``."""
    text = np.empty(array.size, dtype=object)
    for index, item in enumerate(array.reshape(-1)):
        if isinstance(item, str):
            text[index] = item
            continue
        try:
            text[index] = bytes(item).decode("utf-8")
        except UnicodeDecodeError as exc:
            raise InvalidArgumentError(
                f"input '{name}' element {index} is not valid UTF-8 (byte {exc.start}); send text encoded as UTF-8"
            ) from None
    return text.reshape(array.shape)


def _first_line(exc: Exception) -> str:
    return str(exc).strip().splitlines()[0][:300] if str(exc).strip() else type(exc).__name__
