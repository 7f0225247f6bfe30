"""Tensors of the Open Inference Protocol as numpy arrays.

The protocol names element types with strings (``BOOL``, ``UINT8`` … ``FP64``,
``BYTES``). This module owns that table and the byte layout: raw contents are
little-endian and densely packed in row-major order; each BYTES element is a
4-byte little-endian length followed by its bytes. BYTES tensors are numpy
``object`` arrays of ``bytes``.

Decoding validates everything a client can get wrong (unknown datatype,
negative dimensions, a byte length or element count that does not match the
shape) and raises :class:`~services.errors.InvalidArgumentError` naming the
tensor. Encoding always produces raw contents, which is what Triton clients read.
"""

from __future__ import annotations

import math
import struct
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from services.errors import InvalidArgumentError


@dataclass(frozen=True)
class Datatype:
    """One protocol datatype: its name, numpy dtype and typed-contents field."""

    name: str
    dtype: np.dtype[Any]
    # Field of InferTensorContents that carries it, or "" where the protocol
    # only allows raw contents (FP16).
    contents_field: str


_LE = "<"
DATATYPES: dict[str, Datatype] = {
    d.name: d
    for d in (
        Datatype("BOOL", np.dtype(np.bool_), "bool_contents"),
        Datatype("UINT8", np.dtype(_LE + "u1"), "uint_contents"),
        Datatype("UINT16", np.dtype(_LE + "u2"), "uint_contents"),
        Datatype("UINT32", np.dtype(_LE + "u4"), "uint_contents"),
        Datatype("UINT64", np.dtype(_LE + "u8"), "uint64_contents"),
        Datatype("INT8", np.dtype(_LE + "i1"), "int_contents"),
        Datatype("INT16", np.dtype(_LE + "i2"), "int_contents"),
        Datatype("INT32", np.dtype(_LE + "i4"), "int_contents"),
        Datatype("INT64", np.dtype(_LE + "i8"), "int64_contents"),
        Datatype("FP16", np.dtype(_LE + "f2"), ""),
        Datatype("FP32", np.dtype(_LE + "f4"), "fp32_contents"),
        Datatype("FP64", np.dtype(_LE + "f8"), "fp64_contents"),
        Datatype("BYTES", np.dtype(object), "bytes_contents"),
    )
}

# Guards against shapes whose element count overflows before any byte is read.
MAX_ELEMENTS = 1 << 31
# numpy refuses more than 64 dimensions; no model we serve needs half of that.
MAX_RANK = 32


def datatype(name: str, tensor: str) -> Datatype:
    """Looks up a datatype by its protocol name.

    Raises:
        InvalidArgumentError: The name is not a protocol datatype.
    """
    try:
        return DATATYPES[name]
    except KeyError:
        raise InvalidArgumentError(
            f"input '{tensor}': unknown datatype {name!r}; expected one of {', '.join(DATATYPES)}"
        ) from None


def datatype_of(array: np.ndarray[Any, Any]) -> str:
    """Returns the protocol datatype name of a numpy array.

    Raises:
        InvalidArgumentError: The array's dtype has no protocol datatype.
    """
    if array.dtype == object or array.dtype.kind in "SU":
        return "BYTES"
    for d in DATATYPES.values():
        if d.dtype != np.dtype(object) and d.dtype == array.dtype.newbyteorder("<"):
            return d.name
    raise InvalidArgumentError(f"numpy dtype {array.dtype} has no Open Inference Protocol datatype")


def element_count(shape: Sequence[int], tensor: str) -> int:
    """Returns the number of elements of a shape after validating it.

    A zero dimension makes the count 0 but does not make the other dimensions
    harmless (numpy refuses ``[0, 2**62]``), so each dimension is bounded as if
    the zeros were ones.

    Raises:
        InvalidArgumentError: A dimension is negative, there are more than
            :data:`MAX_RANK` dimensions, or the shape is absurdly large.
    """
    if len(shape) > MAX_RANK:
        raise InvalidArgumentError(
            f"input '{tensor}': shape has {len(shape)} dimensions, more than the limit of {MAX_RANK}"
        )
    for dim in shape:
        if dim < 0:
            raise InvalidArgumentError(f"input '{tensor}': shape {list(shape)} has a negative dimension")
    if math.prod(max(dim, 1) for dim in shape) > MAX_ELEMENTS:
        raise InvalidArgumentError(f"input '{tensor}': shape {list(shape)} has more than {MAX_ELEMENTS} elements")
    return math.prod(shape)


def decode_raw(name: str, datatype_name: str, shape: Sequence[int], raw: bytes) -> np.ndarray[Any, Any]:
    """Decodes raw contents into an array of the given shape.

    Args:
        name: Tensor name, for error messages.
        datatype_name: Protocol datatype.
        shape: Tensor shape.
        raw: The raw bytes.

    Returns:
        A numpy array (``object`` array of ``bytes`` for BYTES).

    Raises:
        InvalidArgumentError: Unknown datatype, bad shape, or a byte length that
            does not match ``shape`` × datatype.
    """
    dt = datatype(datatype_name, name)
    count = element_count(shape, name)
    if dt.name == "BYTES":
        return _decode_bytes(name, shape, count, raw)
    expected = count * dt.dtype.itemsize
    if len(raw) != expected:
        raise InvalidArgumentError(
            f"input '{name}': shape {list(shape)} of {dt.name} needs {expected} bytes of raw contents, got {len(raw)}"
        )
    array = np.frombuffer(raw, dtype=dt.dtype).reshape(tuple(shape))
    if dt.name == "BOOL" and array.size and np.any(np.frombuffer(raw, dtype=np.uint8) > 1):
        raise InvalidArgumentError(f"input '{name}': BOOL raw contents must be bytes 0 or 1")
    return array


def _decode_bytes(name: str, shape: Sequence[int], count: int, raw: bytes) -> np.ndarray[Any, Any]:
    items: list[bytes] = []
    offset = 0
    view = memoryview(raw)
    while offset < len(raw):
        if offset + 4 > len(raw):
            raise InvalidArgumentError(f"input '{name}': BYTES raw contents end inside a length prefix")
        (length,) = struct.unpack_from("<I", raw, offset)
        offset += 4
        if offset + length > len(raw):
            raise InvalidArgumentError(
                f"input '{name}': BYTES element {len(items)} declares {length} bytes "
                f"but only {len(raw) - offset} remain"
            )
        items.append(bytes(view[offset : offset + length]))
        offset += length
    if len(items) != count:
        raise InvalidArgumentError(
            f"input '{name}': shape {list(shape)} needs {count} BYTES elements, raw contents hold {len(items)}"
        )
    array = np.empty(count, dtype=object)
    array[:] = items
    return array.reshape(tuple(shape))


def decode_typed(name: str, datatype_name: str, shape: Sequence[int], values: Sequence[Any]) -> np.ndarray[Any, Any]:
    """Decodes typed contents (already taken from the right contents field).

    Raises:
        InvalidArgumentError: Unknown datatype, a datatype without typed
            contents (FP16), bad shape, a wrong element count, or values out of
            range for the datatype.
    """
    dt = datatype(datatype_name, name)
    count = element_count(shape, name)
    if not dt.contents_field:
        raise InvalidArgumentError(f"input '{name}': {dt.name} can only be sent as raw contents")
    if len(values) != count:
        raise InvalidArgumentError(
            f"input '{name}': shape {list(shape)} needs {count} elements, typed contents hold {len(values)}"
        )
    if dt.name == "BYTES":
        array = np.empty(count, dtype=object)
        array[:] = list(values)
        return array.reshape(tuple(shape))
    if dt.dtype.kind in "iu" and count:
        # Checked on Python ints: a numpy round trip would pass through float64 for UINT64.
        info = np.iinfo(dt.dtype)
        if min(values) < info.min or max(values) > info.max:
            raise InvalidArgumentError(f"input '{name}': a value does not fit {dt.name}")
    return np.array(values, dtype=dt.dtype).reshape(tuple(shape))


def encode_raw(array: np.ndarray[Any, Any]) -> bytes:
    """Encodes an array as raw contents (little-endian; length-prefixed BYTES).

    Raises:
        InvalidArgumentError: The array's dtype has no protocol datatype.
    """
    name = datatype_of(array)
    if name == "BYTES":
        parts: list[bytes] = []
        for item in array.reshape(-1):
            data = item.encode("utf-8") if isinstance(item, str) else bytes(item)
            parts.append(struct.pack("<I", len(data)))
            parts.append(data)
        return b"".join(parts)
    return np.ascontiguousarray(array, dtype=DATATYPES[name].dtype).tobytes()
