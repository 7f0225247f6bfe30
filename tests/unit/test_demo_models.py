"""Contract and quality checks for the committed demo char-LM ONNX files.

The held-out sample is rebuilt from the installed standard library with
``examples.charlm.corpus``; the split is keyed on module-name hashes, so on a
different 3.11 patch release the sample can shift slightly but stays held out.
That is why the accuracy checks compare models on the same sample (paired)
and only check the stored metadata value with a tolerance.
"""

from __future__ import annotations

import json
import sys
from functools import cache
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from examples.charlm.corpus import heldout_sample  # noqa: E402

MODELS_DIR = ROOT / "examples" / "models"
DEVICE_FP32 = "charlm-device.onnx"
DEVICE_INT8 = "charlm-device.int8.onnx"
EDGE_FP32 = "charlm-edge.onnx"
EDGE_INT8 = "charlm-edge.int8.onnx"
FILES = (DEVICE_FP32, DEVICE_INT8, EDGE_FP32, EDGE_INT8)
MODEL_NAMES = {
    DEVICE_FP32: "charlm-device",
    DEVICE_INT8: "charlm-device",
    EDGE_FP32: "charlm-edge",
    EDGE_INT8: "charlm-edge",
}
REQUIRED_META = (
    "edgecascade.task",
    "edgecascade.vocab",
    "edgecascade.context_length",
    "edgecascade.heldout_accuracy",
    "edgecascade.corpus",
    "edgecascade.model_name",
)
# Paired sample: the same positions for every model. Large enough that a
# 5-point gap is many standard errors away, small enough to stay fast.
SAMPLE_SIZE = 8000
MAX_TOTAL_BYTES = 5 * 1024 * 1024


@cache
def _session(name: str) -> ort.InferenceSession:
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    return ort.InferenceSession(str(MODELS_DIR / name), opts, providers=["CPUExecutionProvider"])


@cache
def _meta(name: str) -> dict[str, str]:
    return dict(_session(name).get_modelmeta().custom_metadata_map)


def _context(name: str) -> int:
    return int(_meta(name)["edgecascade.context_length"])


def _vocab(name: str) -> list[str]:
    vocab = json.loads(_meta(name)["edgecascade.vocab"])
    assert isinstance(vocab, list)
    return vocab


@cache
def _sample(name: str) -> tuple[np.ndarray, np.ndarray]:
    return heldout_sample(_vocab(name), _context(name), n=SAMPLE_SIZE)


@cache
def _sample_accuracy(name: str) -> float:
    x, y = _sample(name)
    assert len(y) == SAMPLE_SIZE
    sess = _session(name)
    hits = 0
    for i in range(0, len(x), 1000):
        probs = sess.run(["probs"], {"input_ids": x[i : i + 1000]})[0]
        hits += int((probs.argmax(axis=1) == y[i : i + 1000]).sum())
    return hits / len(y)


def test_files_exist_and_fit_size_budget() -> None:
    sizes = {name: (MODELS_DIR / name).stat().st_size for name in FILES}
    assert sum(sizes.values()) <= MAX_TOTAL_BYTES, sizes
    # int8 weights must actually shrink the file.
    assert sizes[DEVICE_INT8] < 0.5 * sizes[DEVICE_FP32]
    assert sizes[EDGE_INT8] < 0.5 * sizes[EDGE_FP32]
    assert sizes[EDGE_FP32] > sizes[DEVICE_FP32]


@pytest.mark.parametrize("name", FILES)
def test_onnx_file_header(name: str) -> None:
    proto = onnx.load(str(MODELS_DIR / name), load_external_data=False)
    assert proto.ir_version in (9, 10)
    default_opsets = [o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")]
    assert default_opsets == [17]


@pytest.mark.parametrize("name", FILES)
def test_io_contract(name: str) -> None:
    sess = _session(name)
    (inp,) = sess.get_inputs()
    (out,) = sess.get_outputs()
    c = _context(name)
    v = len(_vocab(name))
    assert inp.name == "input_ids"
    assert inp.type == "tensor(int64)"
    assert inp.shape == ["batch", c]
    assert out.name == "probs"
    assert out.type == "tensor(float)"
    assert out.shape == ["batch", v]


@pytest.mark.parametrize("name", FILES)
def test_metadata(name: str) -> None:
    meta = _meta(name)
    for key in REQUIRED_META:
        assert key in meta, key
    assert meta["edgecascade.task"] == "char-lm"
    assert meta["edgecascade.model_name"] == MODEL_NAMES[name]
    assert "Python" in meta["edgecascade.corpus"]
    vocab = _vocab(name)
    assert vocab[0] == "" and vocab[1] == ""
    chars = vocab[2:]
    assert all(isinstance(ch, str) and len(ch) == 1 for ch in chars)
    assert len(set(chars)) == len(chars)
    assert {" ", "e", "t"} <= set(chars)
    assert 8 <= _context(name) <= 256
    acc = float(meta["edgecascade.heldout_accuracy"])
    assert 0.3 < acc < 0.95


def test_int8_metadata_matches_fp32() -> None:
    for fp32, int8 in ((DEVICE_FP32, DEVICE_INT8), (EDGE_FP32, EDGE_INT8)):
        a, b = _meta(fp32), _meta(int8)
        for key in REQUIRED_META:
            if key != "edgecascade.heldout_accuracy":
                assert a[key] == b[key], key


@pytest.mark.parametrize("name", FILES)
@pytest.mark.parametrize("batch", [1, 64])
def test_probs_are_distributions(name: str, batch: int) -> None:
    x, _ = _sample(name)
    # Include a fully padded row and a row with one character: the left-padding
    # path must give proper distributions too.
    rows = x[:batch].copy()
    rows[0] = 0
    if batch > 1:
        rows[1, :-1] = 0
    probs = _session(name).run(["probs"], {"input_ids": rows})[0]
    assert probs.shape == (batch, len(_vocab(name)))
    assert probs.dtype == np.float32
    assert np.all(np.isfinite(probs))
    assert np.all(probs >= 0.0)
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, atol=1e-4)
    assert float(probs[:, 0].max()) < 1e-3  # PAD is never predicted


@pytest.mark.parametrize("name", FILES)
def test_heldout_sample_matches_metadata(name: str) -> None:
    stored = float(_meta(name)["edgecascade.heldout_accuracy"])
    # 8000 positions give a standard error of ~0.55 points; 3 points of slack
    # also absorbs small corpus changes between Python patch releases.
    assert abs(_sample_accuracy(name) - stored) < 0.03


def test_edge_beats_device_by_five_points() -> None:
    device = _sample_accuracy(DEVICE_INT8)
    edge = _sample_accuracy(EDGE_FP32)
    assert edge >= device + 0.05, (edge, device)
    assert _sample_accuracy(EDGE_INT8) >= _sample_accuracy(DEVICE_FP32) + 0.05


@pytest.mark.parametrize(("fp32", "int8"), [(DEVICE_FP32, DEVICE_INT8), (EDGE_FP32, EDGE_INT8)])
def test_int8_close_to_fp32(fp32: str, int8: str) -> None:
    assert abs(_sample_accuracy(fp32) - _sample_accuracy(int8)) <= 0.01
