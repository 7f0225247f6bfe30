"""How much memory a node has, and how much a model will take.

The budget defaults to half of what the node may really use: the cgroup limit
when it runs in a container, else the memory available when it starts. A
model's footprint is estimated before loading from what is measured here on
onnxruntime's CPU provider (about 10 MB fixed, about twice the file size once
weights are prepacked, plus activations for the batch size), unless its
metadata carries a measured peak; after loading and warm-up the estimate is
replaced by what the process really gained.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from pathlib import Path

import psutil

from services.inference import ModelSignature
from services.tensors import DATATYPES

FIXED_OVERHEAD_BYTES = 10 * 1024 * 1024
WEIGHT_FACTOR = 2
PEAK_PROPERTY = "edgecascade.peak_memory_bytes"

_CGROUP_FILES = (Path("/sys/fs/cgroup/memory.max"), Path("/sys/fs/cgroup/memory/memory.limit_in_bytes"))


def cgroup_limit() -> int | None:
    """The cgroup memory limit in bytes, or None when there is none."""
    for path in _CGROUP_FILES:
        try:
            text = path.read_text().strip()
        except OSError:
            continue
        if text.isdigit() and int(text) < 1 << 60:
            return int(text)
    return None


def default_budget() -> int:
    """Half of the memory this node may use (cgroup limit or available memory)."""
    available = psutil.virtual_memory().available
    limit = cgroup_limit()
    return int(min(available, limit) if limit else available) // 2


def process_rss() -> int:
    """Resident memory of this process in bytes."""
    return int(psutil.Process().memory_info().rss)


def estimate_footprint(file_bytes: int, properties: Mapping[str, str]) -> int:
    """Estimates the memory a model version takes once loaded, before loading it.

    Args:
        file_bytes: Size of the ONNX file.
        properties: The model's metadata; a measured peak wins over the estimate.
    """
    measured = properties.get(PEAK_PROPERTY, "")
    if measured.isdigit():
        return int(measured)
    return FIXED_OVERHEAD_BYTES + WEIGHT_FACTOR * file_bytes


def activation_bytes(signature: ModelSignature, max_batch_size: int) -> int:
    """Estimates the activation memory of a run at ``max_batch_size`` rows.

    Only inputs and outputs are known from the signature; intermediate tensors
    of typical graphs are covered by a factor of a few.
    """
    total = 0
    for spec in (*signature.inputs, *signature.outputs):
        if spec.datatype == "BYTES":
            continue
        dims = [max_batch_size if i == 0 and d < 0 else max(d, 1) for i, d in enumerate(spec.shape)]
        total += math.prod(dims) * DATATYPES[spec.datatype].dtype.itemsize
    return 4 * total


def megabytes(n: int) -> str:
    """``n`` bytes as a short human string."""
    return f"{n / (1024 * 1024):.1f} MB"
