"""Int8 variants of an fp32 ONNX model, made by onnxruntime's own quantizer.

Dynamic quantization: weights of ``MatMul``/``Gemm`` (and friends) are stored
as int8 with per-tensor (or per-channel) scales, activations are quantized on
the fly. It needs no calibration data and suits the MatMul-heavy char-LMs; the
``edgecascade.*`` metadata properties of the source are carried over so the
variant keeps its tokenizer and task.
"""

from __future__ import annotations

import logging
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import onnx
from onnxruntime.quantization import QuantType, quantize_dynamic

from services.atomic_files import write_atomically
from services.errors import InvalidArgumentError
from tier2_region.registry.model_inspection import PROPERTY_PREFIX, inspect_model

WEIGHT_TYPES = {"qint8": QuantType.QInt8, "quint8": QuantType.QUInt8}


def default_output(source: Path) -> Path:
    """``model.onnx`` → ``model.int8.onnx`` next to it."""
    return source.with_name(f"{source.stem}.int8{source.suffix}")


def quantize(source: Path, output: Path, *, per_channel: bool = False, weight_type: str = "qint8") -> Path:
    """Writes a dynamically quantized int8 variant of ``source`` to ``output`` (atomically).

    Args:
        source: The fp32 model.
        output: Where the variant goes (replaced if it exists).
        per_channel: One scale per output channel instead of per tensor.
        weight_type: ``qint8`` (signed, the default) or ``quint8``.

    Returns:
        ``output``.

    Raises:
        InvalidModelError: ``source`` is not a valid ONNX model.
        InvalidArgumentError: Unknown weight type, or ``output`` is ``source``.
    """
    if weight_type not in WEIGHT_TYPES:
        raise InvalidArgumentError(f"weight type {weight_type!r} is not one of {', '.join(WEIGHT_TYPES)}")
    if output.resolve() == source.resolve():
        raise InvalidArgumentError(f"the int8 variant would overwrite its source {source}; choose another --out")
    facts = inspect_model(source)
    with tempfile.TemporaryDirectory(prefix="edgecascade-quantize-") as tmp:
        staged = Path(tmp) / "model.int8.onnx"
        with _quiet_root_logger():
            quantize_dynamic(source, staged, per_channel=per_channel, weight_type=WEIGHT_TYPES[weight_type])
        model = onnx.load(str(staged))
        present = {p.key for p in model.metadata_props}
        for key, value in facts.properties.items():
            if key.startswith(PROPERTY_PREFIX) and key not in present:
                entry = model.metadata_props.add()
                entry.key, entry.value = key, value
        output.parent.mkdir(parents=True, exist_ok=True)
        write_atomically(output, model.SerializeToString())
    return output


@contextmanager
def _quiet_root_logger() -> Iterator[None]:
    """Keeps the quantizer's advice off the root logger (and stops it installing a stderr handler there)."""
    root = logging.getLogger()
    guard = logging.NullHandler() if not root.handlers else None
    if guard is not None:
        root.addHandler(guard)
    previous = root.manager.disable
    logging.disable(logging.WARNING)
    try:
        yield
    finally:
        logging.disable(previous)
        if guard is not None:
            root.removeHandler(guard)
