"""The tensor codec: every protocol datatype, raw and typed in, raw out."""

from __future__ import annotations

import struct
from typing import Any

import numpy as np
import pytest

from services.errors import InvalidArgumentError
from services.tensors import DATATYPES, datatype_of, decode_raw, decode_typed, encode_raw

SAMPLES: dict[str, np.ndarray[Any, Any]] = {
    "BOOL": np.array([[True, False, True]]),
    "UINT8": np.array([[0, 7, 255]], dtype=np.uint8),
    "UINT16": np.array([[0, 7, 65535]], dtype=np.uint16),
    "UINT32": np.array([[0, 7, 2**32 - 1]], dtype=np.uint32),
    "UINT64": np.array([[0, 7, 2**64 - 1]], dtype=np.uint64),
    "INT8": np.array([[-128, 0, 127]], dtype=np.int8),
    "INT16": np.array([[-32768, 0, 32767]], dtype=np.int16),
    "INT32": np.array([[-(2**31), 0, 2**31 - 1]], dtype=np.int32),
    "INT64": np.array([[-(2**63), 0, 2**63 - 1]], dtype=np.int64),
    "FP16": np.array([[-1.5, 0.0, 65504.0]], dtype=np.float16),
    "FP32": np.array([[-1.5, 0.0, 3.25]], dtype=np.float32),
    "FP64": np.array([[-1.5, 0.0, 1e300]], dtype=np.float64),
    "BYTES": np.array([[b"", b"abc", "héllo".encode()]], dtype=object),
}


def test_samples_cover_every_datatype() -> None:
    assert set(SAMPLES) == set(DATATYPES)


@pytest.mark.parametrize("name", sorted(SAMPLES))
def test_raw_round_trip(name: str) -> None:
    array = SAMPLES[name]
    assert datatype_of(array) == name
    decoded = decode_raw("t", name, array.shape, encode_raw(array))
    assert decoded.shape == array.shape
    assert decoded.tolist() == array.tolist()


@pytest.mark.parametrize("name", sorted(n for n in SAMPLES if DATATYPES[n].contents_field))
def test_typed_contents_decode(name: str) -> None:
    array = SAMPLES[name]
    decoded = decode_typed("t", name, array.shape, array.reshape(-1).tolist())
    assert decoded.dtype == DATATYPES[name].dtype
    assert decoded.tolist() == array.tolist()


def test_raw_is_little_endian_and_bytes_are_length_prefixed() -> None:
    assert encode_raw(np.array([1], dtype=np.int32)) == b"\x01\x00\x00\x00"
    assert encode_raw(np.array([b"ab", b""], dtype=object)) == struct.pack("<I", 2) + b"ab" + struct.pack("<I", 0)


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda: decode_raw("x", "FLOAT32", [1], b"\0" * 4), "unknown datatype 'FLOAT32'"),
        (lambda: decode_raw("x", "FP32", [2, 2], b"\0" * 12), "needs 16 bytes of raw contents, got 12"),
        (lambda: decode_raw("x", "FP32", [-1, 2], b""), "negative dimension"),
        (lambda: decode_raw("x", "FP32", [1 << 20, 1 << 20], b""), "more than"),
        (lambda: decode_raw("x", "BYTES", [2], struct.pack("<I", 1) + b"a"), "needs 2 BYTES elements"),
        (lambda: decode_raw("x", "BYTES", [1], struct.pack("<I", 9) + b"a"), "declares 9 bytes"),
        (lambda: decode_raw("x", "BYTES", [1], b"\x01\x00"), "inside a length prefix"),
        (lambda: decode_raw("x", "BOOL", [1], b"\x02"), "BOOL raw contents"),
        (lambda: decode_typed("x", "FP16", [1], [1.0]), "only be sent as raw"),
        (lambda: decode_typed("x", "INT32", [3], [1, 2]), "needs 3 elements"),
        (lambda: decode_typed("x", "INT8", [1], [300]), "does not fit INT8"),
    ],
)
def test_bad_tensors_are_rejected_naming_the_input(call: Any, message: str) -> None:
    with pytest.raises(InvalidArgumentError) as caught:
        call()
    assert message in caught.value.message
    assert "'x'" in caught.value.message or "x" in caught.value.message
