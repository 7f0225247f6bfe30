"""What the registry checks about an ONNX file before anything is written.

A file is publishable when ``onnx`` parses and checks it, it carries all its
weights inline (one file is one artifact), and onnxruntime can load it on the
CPU with tensor types the Open Inference Protocol can carry. Its signature is
read from the loaded session, the way every tier will see it.

The file is read once: every fact (digest, signature, properties) is about
those bytes, and :attr:`ModelFacts.data` carries them on to profiling and
publishing, so a file replaced on disk afterwards changes nothing.
"""

from __future__ import annotations

import hashlib
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import onnx

from services.engine.onnx_session import OnnxSession
from services.errors import EdgecascadeError, InvalidModelError, SignatureMismatchError
from services.inference import ModelSignature, TensorSpec
from services.tensors import DATATYPES

PROPERTY_PREFIX = "edgecascade."


@dataclass(frozen=True)
class ModelFacts:
    """What a publishable ONNX file is.

    Attributes:
        path: The file.
        sha256: Hex digest of its bytes.
        size: Its length in bytes.
        signature: Inputs and outputs as onnxruntime reports them.
        opset: The default-domain (``ai.onnx``) opset it imports.
        properties: Its ``edgecascade.*`` metadata properties.
        data: The bytes inspected (what ``sha256`` covers); profiled and published as they are.
    """

    path: Path
    sha256: str
    size: int
    signature: ModelSignature
    opset: int
    properties: dict[str, str]
    data: bytes = field(repr=False, compare=False)


def inspect_model(path: Path) -> ModelFacts:
    """Checks that ``path`` is a publishable ONNX model and reads its facts.

    Raises:
        InvalidModelError: The file is missing, not ONNX, fails the ONNX
            checker, keeps weights in external files, or cannot be loaded by
            onnxruntime.
    """
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise InvalidModelError(f"{path} cannot be read: {exc.strerror}") from None
    try:
        model = onnx.load_model_from_string(data)
    except Exception:  # protobuf's DecodeError and onnx's own errors share no base class
        raise InvalidModelError(f"{path.name} is not an ONNX model (it does not parse as a ModelProto)") from None
    if not model.graph.node and not model.graph.output:
        # Protobuf happily parses many byte strings into an empty message.
        raise InvalidModelError(f"{path.name} is not an ONNX model (it has no graph)")
    if any(t.data_location == onnx.TensorProto.EXTERNAL for t in model.graph.initializer):
        raise InvalidModelError(f"{path.name} keeps weights in external files; save it as a single file")
    try:
        onnx.checker.check_model(model)
    except onnx.checker.ValidationError as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else "invalid model"
        raise InvalidModelError(f"{path.name} fails the ONNX checker: {first[:200]}") from None
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)
    # Load the bytes already read (a private copy), not the path again: the file may change meanwhile.
    with tempfile.TemporaryDirectory(prefix="edgecascade-inspect-") as tmp:
        copy = Path(tmp) / path.name
        copy.write_bytes(data)
        try:
            session = OnnxSession(copy)
        except EdgecascadeError as exc:
            raise InvalidModelError(f"{path.name} is not servable: {exc.message}") from None
    properties = {p.key: p.value for p in model.metadata_props if p.key.startswith(PROPERTY_PREFIX)}
    return ModelFacts(
        path=path,
        sha256=hashlib.sha256(data).hexdigest(),
        size=len(data),
        signature=session.signature,
        opset=int(opset),
        properties=properties,
        data=data,
    )


def signature_to_json(signature: ModelSignature) -> dict[str, list[dict[str, Any]]]:
    """The signature as JSON-ready data (what is signed into a target's ``custom``)."""

    def side(specs: Sequence[TensorSpec]) -> list[dict[str, Any]]:
        return [{"name": s.name, "datatype": s.datatype, "shape": list(s.shape)} for s in specs]

    return {"inputs": side(signature.inputs), "outputs": side(signature.outputs)}


def signature_from_json(data: Mapping[str, Any], where: str) -> ModelSignature:
    """Parses a declared signature: ``{"inputs": [{name, datatype, shape}], "outputs": [...]}``.

    Args:
        data: The parsed JSON.
        where: Names the source in error messages.

    Raises:
        InvalidArgumentError: The data does not have that shape (as :class:`SignatureMismatchError`).
    """

    def side(key: str) -> tuple[TensorSpec, ...]:
        items = data.get(key)
        if not isinstance(items, list):
            raise SignatureMismatchError(f"{where}: '{key}' must be a list of {{name, datatype, shape}}")
        specs = []
        for item in items:
            if not isinstance(item, dict) or not isinstance(item.get("name"), str):
                raise SignatureMismatchError(f"{where}: every entry of '{key}' needs a string 'name'")
            datatype = item.get("datatype")
            if datatype not in DATATYPES:
                raise SignatureMismatchError(
                    f"{where}: {key} '{item['name']}' has datatype {datatype!r}; expected one of "
                    f"{', '.join(sorted(DATATYPES))}"
                )
            shape = item.get("shape")
            if not isinstance(shape, list) or not all(isinstance(d, int) and d >= -1 for d in shape):
                raise SignatureMismatchError(
                    f"{where}: {key} '{item['name']}' needs 'shape' as a list of integers (-1 for any size)"
                )
            specs.append(TensorSpec(item["name"], datatype, tuple(shape)))
        return tuple(specs)

    return ModelSignature(inputs=side("inputs"), outputs=side("outputs"))


def check_signature(actual: ModelSignature, declared: ModelSignature, what: str) -> None:
    """Refuses a model whose inputs or outputs differ from the declared ones.

    Raises:
        SignatureMismatchError: A tensor is missing, extra, or differs in datatype or shape.
    """
    for side, have, want in (("input", actual.inputs, declared.inputs), ("output", actual.outputs, declared.outputs)):
        have_by_name = {s.name: s for s in have}
        want_by_name = {s.name: s for s in want}
        for name in want_by_name.keys() - have_by_name.keys():
            raise SignatureMismatchError(
                f"{what} has no {side} '{name}' although it was declared; it has {', '.join(sorted(have_by_name))}"
            )
        for name in have_by_name.keys() - want_by_name.keys():
            raise SignatureMismatchError(f"{what} has an undeclared {side} '{name}'")
        for name, spec in want_by_name.items():
            got = have_by_name[name]
            if got.datatype != spec.datatype or got.shape != spec.shape:
                raise SignatureMismatchError(
                    f"{what} {side} '{name}' is {got.datatype} {list(got.shape)}, "
                    f"declared {spec.datatype} {list(spec.shape)}"
                )
