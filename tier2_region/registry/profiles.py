"""A variant's measured profile: what is signed into its TUF target, and how it is computed.

The numbers come from a fresh process per variant (``profile_worker``); this
module turns that process's raw outputs into the figures a device relies on:

* **accuracy** — top-1 on the validation set (next-character accuracy for the
  char-LMs), against its labels, or against the reference variant's top-1 when
  the set has none;
* **agreement** — share of rows whose top-1 equals the reference's;
* **confidence threshold** — the smallest threshold whose kept predictions
  (confidence ≥ threshold) reach the target accuracy, so a device falls back
  upward exactly where the variant is likely wrong;
* **golden vectors** — a few inputs with their exact outputs, for on-device self-tests.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from services.errors import InvalidArgumentError
from services.inference import ModelSignature
from services.updates.golden_vectors import GoldenVectors
from tier2_region.registry.model_inspection import signature_from_json, signature_to_json

# A threshold must rest on enough kept rows to mean anything.
MIN_KEPT_ROWS = 20


@dataclass(frozen=True)
class BatchProfile:
    """Memory and latency at one batch size."""

    batch_size: int
    peak_memory_bytes: int
    latency_p50_us: float
    latency_p99_us: float


@dataclass(frozen=True)
class VariantProfile:
    """Everything measured about one variant file."""

    file_sha256: str
    file_bytes: int
    signature: ModelSignature
    opset: int
    load_time_ms: float
    batches: tuple[BatchProfile, ...]
    metric: str
    accuracy: float
    reference_accuracy: float
    agreement: float
    validation_size: int
    validation_source: str
    confidence_threshold: float
    target_accuracy: float
    onnxruntime_version: str
    machine: str
    intra_op_threads: int
    golden: GoldenVectors

    @property
    def accuracy_drop_points(self) -> float:
        """Accuracy lost against the reference, in percentage points (negative = gained)."""
        return (self.reference_accuracy - self.accuracy) * 100.0

    @property
    def max_batch_size(self) -> int:
        """The largest batch size profiled."""
        return max(b.batch_size for b in self.batches)

    def batch(self, size: int) -> BatchProfile:
        """The profile at one batch size.

        Raises:
            InvalidArgumentError: That size was not profiled.
        """
        for b in self.batches:
            if b.batch_size == size:
                return b
        raise InvalidArgumentError(f"batch size {size} was not profiled (have {[b.batch_size for b in self.batches]})")

    def to_json(self) -> dict[str, Any]:
        """JSON-ready form (``edgecascade model profile --out``)."""
        return {
            "file_sha256": self.file_sha256,
            "file_bytes": self.file_bytes,
            "signature": signature_to_json(self.signature),
            "opset": self.opset,
            "load_time_ms": self.load_time_ms,
            "batches": [b.__dict__ for b in self.batches],
            "metric": self.metric,
            "accuracy": self.accuracy,
            "reference_accuracy": self.reference_accuracy,
            "agreement": self.agreement,
            "validation_size": self.validation_size,
            "validation_source": self.validation_source,
            "confidence_threshold": self.confidence_threshold,
            "target_accuracy": self.target_accuracy,
            "onnxruntime_version": self.onnxruntime_version,
            "machine": self.machine,
            "intra_op_threads": self.intra_op_threads,
            "golden": self.golden.to_json(),
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any], where: str) -> VariantProfile:
        """Parses :meth:`to_json` output.

        Raises:
            InvalidArgumentError: A field is missing or has the wrong type.
        """
        try:
            return cls(
                file_sha256=str(data["file_sha256"]),
                file_bytes=int(data["file_bytes"]),
                signature=signature_from_json(data["signature"], where),
                opset=int(data["opset"]),
                load_time_ms=float(data["load_time_ms"]),
                batches=tuple(BatchProfile(**b) for b in data["batches"]),
                metric=str(data["metric"]),
                accuracy=float(data["accuracy"]),
                reference_accuracy=float(data["reference_accuracy"]),
                agreement=float(data["agreement"]),
                validation_size=int(data["validation_size"]),
                validation_source=str(data["validation_source"]),
                confidence_threshold=float(data["confidence_threshold"]),
                target_accuracy=float(data["target_accuracy"]),
                onnxruntime_version=str(data["onnxruntime_version"]),
                machine=str(data["machine"]),
                intra_op_threads=int(data["intra_op_threads"]),
                golden=GoldenVectors.from_json(data["golden"]),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise InvalidArgumentError(
                f"{where} is not a profile written by `edgecascade model profile`: {exc}"
            ) from None


def load_profiles(text: str, where: str) -> dict[str, VariantProfile]:
    """Parses a profiles file: ``{"profiles": {sha256: profile}}``, keyed by the profiled file's digest.

    Raises:
        InvalidArgumentError: The file is not JSON of that shape.
    """
    try:
        data = json.loads(text)
        items = data["profiles"]
    except (ValueError, KeyError, TypeError):
        raise InvalidArgumentError(f"{where} is not a profiles file written by `edgecascade model profile`") from None
    return {sha: VariantProfile.from_json(p, where) for sha, p in items.items()}


def dump_profiles(profiles: Mapping[str, VariantProfile]) -> str:
    """The profiles file for :func:`load_profiles`."""
    return json.dumps({"profiles": {sha: p.to_json() for sha, p in profiles.items()}}, indent=2) + "\n"


def top1(outputs: np.ndarray[Any, Any]) -> tuple[np.ndarray[Any, Any], np.ndarray[Any, Any]]:
    """Top-1 class and its confidence per row, from probabilities or logits on the last axis.

    Rows that do not look like probabilities (outside [0, 1] or not summing to
    about 1) are put through a softmax first, so a confidence is always a probability.
    """
    scores = outputs.reshape(outputs.shape[0], -1).astype(np.float64)
    sums = scores.sum(axis=1)
    if scores.min() < 0 or scores.max() > 1 or not np.allclose(sums, 1.0, atol=1e-3):
        shifted = np.exp(scores - scores.max(axis=1, keepdims=True))
        scores = shifted / shifted.sum(axis=1, keepdims=True)
    return scores.argmax(axis=1), scores.max(axis=1)


def calibrate_threshold(confidences: np.ndarray[Any, Any], correct: np.ndarray[Any, Any], target: float) -> float:
    """The smallest confidence threshold whose kept predictions reach ``target`` accuracy.

    Predictions with confidence ≥ threshold are kept. Candidates are the
    observed confidences; a candidate must keep at least :data:`MIN_KEPT_ROWS`
    rows (or all rows when there are fewer). Returns 0.0 when every prediction
    may be kept, and 1.0 (keep nothing: always fall back) when no threshold
    reaches the target.
    """
    if not 0.0 < target <= 1.0:
        raise InvalidArgumentError(f"target accuracy must be in (0, 1], got {target}")
    n = len(confidences)
    if n == 0:
        return 1.0
    order = np.argsort(-confidences, kind="stable")
    conf = confidences[order]
    hits = np.cumsum(correct[order].astype(np.float64))
    kept = np.arange(1, n + 1)
    acc = hits / kept
    # A threshold keeps every row tied with it, so only the last row of each tie run is a candidate.
    boundary = np.append(conf[1:] != conf[:-1], True)
    ok = boundary & (acc >= target - 1e-12) & (kept >= min(MIN_KEPT_ROWS, n))
    if not ok.any():
        return 1.0
    k = int(np.flatnonzero(ok)[-1])
    return 0.0 if k == n - 1 else float(conf[k])
