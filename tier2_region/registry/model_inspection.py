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
from dataclasses import dataclass, field
from pathlib import Path

import onnx

from services.engine.onnx_session import OnnxSession
from services.errors import EdgecascadeError, InvalidModelError
from services.inference import ModelSignature
from services.updates.variant_facts import check_signature, signature_from_json, signature_to_json

# The signature checks are shared with the nodes (they live with the signed variant facts); named here too.
__all__ = [
    "PROPERTY_PREFIX",
    "ModelFacts",
    "check_signature",
    "inspect_model",
    "signature_from_json",
    "signature_to_json",
]

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
