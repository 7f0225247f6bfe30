"""Profiles model variants, each in a fresh process, against the reference (fp32) variant.

The reference runs first: its top-1 answers are the labels when the validation
set has none, and every variant's agreement is measured against them. Each
variant's process only measures (``profile_worker``); accuracy, agreement,
threshold calibration and golden vectors are computed here from what it
returns, so the numbers do not depend on the measuring process's own imports.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from services.errors import ConfigError, InvalidModelError
from services.updates.golden_vectors import GoldenVectors
from tier2_region.registry.model_inspection import ModelFacts
from tier2_region.registry.profiles import BatchProfile, VariantProfile, calibrate_threshold
from tier2_region.registry.validation_sets import ValidationSet, check_fits


@dataclass(frozen=True)
class ProfileSettings:
    """How variants are profiled.

    Attributes:
        batch_sizes: Batch sizes whose peak memory and latency are measured;
            the largest is the variant's max batch size.
        latency_runs: Timed runs per batch size (at most).
        latency_budget_s: Time spent on timed runs per batch size (at most, after 5 runs).
        golden_rows: Rows of the validation set kept as golden vectors.
        intra_op_threads: onnxruntime threads per run, as on a device.
        target_accuracy: Accuracy the kept predictions must reach when the
            confidence threshold is calibrated.
        timeout_s: Time one variant's process may take.
    """

    batch_sizes: tuple[int, ...] = (1, 8, 64)
    latency_runs: int = 50
    latency_budget_s: float = 1.0
    golden_rows: int = 4
    intra_op_threads: int = 1
    target_accuracy: float = 0.8
    timeout_s: float = 600.0

    def __post_init__(self) -> None:
        if not self.batch_sizes or min(self.batch_sizes) < 1:
            raise ConfigError(f"batch sizes must be positive integers, got {list(self.batch_sizes)}")
        if self.latency_runs < 5:
            raise ConfigError(f"latency runs must be at least 5, got {self.latency_runs}")
        if not 0.0 < self.target_accuracy <= 1.0:
            raise ConfigError(f"target accuracy must be in (0, 1], got {self.target_accuracy}")
        if not 1 <= self.golden_rows <= 64:
            raise ConfigError(f"golden rows must be between 1 and 64, got {self.golden_rows}")
        if self.intra_op_threads < 1:
            raise ConfigError(f"intra-op threads must be at least 1, got {self.intra_op_threads}")


@dataclass(frozen=True)
class _Measurement:
    result: dict[str, Any]
    predictions: np.ndarray[Any, Any]
    confidences: np.ndarray[Any, Any]
    golden: GoldenVectors


def profile_variants(
    reference: ModelFacts,
    variants: Sequence[ModelFacts],
    validation: ValidationSet,
    settings: ProfileSettings,
    on_progress: Callable[[str], None] | None = None,
) -> dict[str, VariantProfile]:
    """Profiles the reference and every variant, each in its own process.

    Args:
        reference: The fp32 model the others are compared with (profiled too).
        variants: Other variants (the reference may be repeated; it is measured once).
        validation: Rows to measure accuracy on.
        settings: How to measure.
        on_progress: Called with the file name before each variant is measured.

    Returns:
        Profiles keyed by each file's sha256.

    Raises:
        InvalidArgumentError: The validation set does not fit a model.
        InvalidModelError: A variant cannot be measured (its process failed or timed out).
    """
    say = on_progress or (lambda _msg: None)
    check_fits(validation, reference.signature, "for the reference model")
    with tempfile.TemporaryDirectory(prefix="edgecascade-profile-") as tmp:
        workdir = Path(tmp)
        validation_file = workdir / "validation.npz"
        validation.save(validation_file)
        say(reference.path.name)
        ref = _measure(reference, validation_file, settings, workdir / "reference")
        labels = validation.labels if validation.labels is not None else ref.predictions
        profiles = {reference.sha256: _profile(reference, ref, ref, labels, validation, settings)}
        for facts in variants:
            if facts.sha256 in profiles:
                continue
            check_fits(validation, facts.signature, f"for {facts.path.name}")
            say(facts.path.name)
            measured = _measure(facts, validation_file, settings, workdir / facts.sha256[:16])
            profiles[facts.sha256] = _profile(facts, measured, ref, labels, validation, settings)
    return profiles


def _profile(
    facts: ModelFacts,
    measured: _Measurement,
    reference: _Measurement,
    labels: np.ndarray[Any, Any],
    validation: ValidationSet,
    settings: ProfileSettings,
) -> VariantProfile:
    reference_correct = reference.predictions == labels
    correct = measured.predictions == labels
    result = measured.result
    return VariantProfile(
        file_sha256=facts.sha256,
        file_bytes=facts.size,
        signature=facts.signature,
        opset=facts.opset,
        load_time_ms=float(result["load_time_ms"]),
        batches=tuple(BatchProfile(**b) for b in result["batches"]),
        metric=validation.metric,
        accuracy=float(correct.mean()),
        reference_accuracy=float(reference_correct.mean()),
        agreement=float((measured.predictions == reference.predictions).mean()),
        validation_size=validation.size,
        validation_source=validation.source,
        confidence_threshold=calibrate_threshold(measured.confidences, correct, settings.target_accuracy),
        target_accuracy=settings.target_accuracy,
        onnxruntime_version=str(result["onnxruntime_version"]),
        machine=str(result["machine"]),
        intra_op_threads=settings.intra_op_threads,
        golden=measured.golden,
    )


def _measure(facts: ModelFacts, validation_file: Path, settings: ProfileSettings, out_dir: Path) -> _Measurement:
    out_dir.mkdir(parents=True)
    # Measure the bytes that were inspected (and will be published), not whatever is at the path now.
    model_file = out_dir / facts.path.name
    model_file.write_bytes(facts.data)
    request = {
        "model": str(model_file),
        "validation": str(validation_file),
        "batch_sizes": list(settings.batch_sizes),
        "latency_runs": settings.latency_runs,
        "latency_budget_s": settings.latency_budget_s,
        "golden_rows": settings.golden_rows,
        "intra_op_threads": settings.intra_op_threads,
        "out_dir": str(out_dir),
    }
    request_file = out_dir / "request.json"
    request_file.write_text(json.dumps(request))
    # One thread per BLAS/OpenMP pool too, so the measuring process is shaped like a device's.
    env = {**os.environ, "OMP_NUM_THREADS": str(settings.intra_op_threads)}
    try:
        done = subprocess.run(
            [sys.executable, "-m", "tier2_region.registry.profile_worker", str(request_file)],
            capture_output=True,
            text=True,
            timeout=settings.timeout_s,
            env=env,
            check=False,
        )
    except subprocess.TimeoutExpired:
        raise InvalidModelError(
            f"profiling {facts.path.name} took longer than {settings.timeout_s:.0f} s; it was stopped"
        ) from None
    if done.returncode != 0:
        last = (done.stderr.strip().splitlines() or ["no message"])[-1][:300]
        raise InvalidModelError(f"{facts.path.name} could not be profiled: {last}")
    result = json.loads((out_dir / "result.json").read_text())
    with np.load(out_dir / "outputs.npz", allow_pickle=False) as npz:
        arrays = {k: npz[k] for k in npz.files}
    golden = GoldenVectors(
        inputs={k.split(":", 1)[1]: v for k, v in arrays.items() if k.startswith("golden_in:")},
        outputs={k.split(":", 1)[1]: v for k, v in arrays.items() if k.startswith("golden_out:")},
    )
    return _Measurement(result, arrays["predictions"], arrays["confidences"], golden)
