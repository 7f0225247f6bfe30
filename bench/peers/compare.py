"""When a peer's answer is "the same number" as onnxruntime's: numpy only, so every virtualenv can use it.

Two checks, both against onnxruntime run on the same rows one at a time:

* **one request at a time** (nothing to batch with): the answer must be the
  same number within ``RTOL``/``ATOL``;
* **many requests at once** (a batching server runs them together): with a
  dynamically quantized model (``DynamicQuantizeLinear``, as the int8 char-LM)
  the activation scale is taken over the whole batch, so a row's numbers move
  with its neighbours (by up to ~0.02 in a probability here, and Tier 0's own
  batches do the same). There each answer must be within ``BATCHED_ATOL`` of
  its own row's expected numbers *and* closer to them than to any other row's,
  which is what a batcher that mixed rows up would fail.
"""

from __future__ import annotations

from typing import Any

import numpy as np

RTOL = 1e-4
ATOL = 1e-5
BATCHED_ATOL = 0.05


def compare(expected: np.ndarray[Any, Any], got: np.ndarray[Any, Any]) -> float:
    """The largest absolute difference; raises ``ValueError`` unless ``got`` is ``expected`` within RTOL/ATOL."""
    if got.shape != expected.shape:
        raise ValueError(f"the peer answered shape {got.shape}, onnxruntime {expected.shape}")
    worst = float(np.max(np.abs(got.astype(np.float64) - expected))) if got.size else 0.0
    if not np.allclose(got, expected, rtol=RTOL, atol=ATOL):
        raise ValueError(f"the peer's numbers differ from onnxruntime's by up to {worst:g}")
    return worst


def compare_batched(expected: np.ndarray[Any, Any], got: np.ndarray[Any, Any]) -> float:
    """Answers to rows sent at once: ``expected`` and ``got`` are ``[rows, ...]``, row ``i`` answering request ``i``.

    Returns the largest absolute difference; raises ``ValueError`` when a row is
    further than ``BATCHED_ATOL`` from its own expected numbers or nearer to
    another row's.
    """
    if got.shape != expected.shape:
        raise ValueError(f"the peer answered shape {got.shape}, onnxruntime {expected.shape}")
    rows = expected.shape[0]
    flat_expected = expected.reshape(rows, -1).astype(np.float64)
    flat_got = got.reshape(rows, -1).astype(np.float64)
    distance = np.abs(flat_got[:, None, :] - flat_expected[None, :, :]).max(axis=2)  # [answer, expected row]
    own = np.diagonal(distance)
    worst = float(own.max()) if rows else 0.0
    nearest = distance.argmin(axis=1)
    mixed = [i for i in range(rows) if nearest[i] != i and distance[i, nearest[i]] < own[i]]
    if mixed:
        raise ValueError(f"answers {mixed} are nearer to other requests' numbers than to their own")
    if worst > BATCHED_ATOL:
        raise ValueError(f"answers sent at once differ from onnxruntime's by up to {worst:g} (> {BATCHED_ATOL})")
    return worst
