"""Confidence signals of a next-token distribution, for a token-level cascade.

A device serves a token itself when its confidence reaches a threshold and
asks the edge otherwise. This module computes the signals from the device's
``probs`` (``[N, V]``, rows summing to 1), a calibrated score (a logistic
regression over those signals whose coefficients can travel with a model
variant as metadata), and the measurements used to compare signals offline:
the cascade's accuracy against the share of tokens kept local, and AUROC.

Numpy only: no service imports, so the engine and the benchmarks share it.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

Array = np.ndarray[Any, Any]

FEATURES = ("max_prob", "margin", "neg_entropy")
CALIBRATION_PROPERTY = "edgecascade.confidence_calibration"


def max_probability(probs: Array) -> Array:
    """Returns the top-1 probability of each row of ``probs`` ``[N, V]``."""
    out: Array = np.asarray(probs, dtype=np.float64).max(axis=-1)
    return out


def margin(probs: Array) -> Array:
    """Returns top-1 minus top-2 probability of each row, in ``[0, 1]``."""
    top2 = np.partition(np.asarray(probs, dtype=np.float64), -2, axis=-1)[..., -2:]
    out: Array = top2[..., 1] - top2[..., 0]
    return out


def neg_entropy(probs: Array) -> Array:
    """Returns ``1 - H(p) / ln V`` of each row: 1 for a one-hot row, 0 for a uniform one."""
    p = np.asarray(probs, dtype=np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        plogp = np.where(p > 0, p * np.log(p), 0.0)
    entropy = -plogp.sum(axis=-1)
    out: Array = 1.0 - entropy / math.log(p.shape[-1])
    return out


def features(probs: Array) -> Array:
    """Returns the signals named in :data:`FEATURES` as columns, ``[N, 3]``."""
    return np.stack([max_probability(probs), margin(probs), neg_entropy(probs)], axis=-1)


def _sigmoid(z: Array) -> Array:
    out: Array = 0.5 * (1.0 + np.tanh(0.5 * z))  # overflow-free logistic
    return out


@dataclass(frozen=True)
class CalibratedScore:
    """A logistic regression over :data:`FEATURES`: ``P(device argmax is right)``.

    Attributes:
        weights: One weight per feature, in :data:`FEATURES` order.
        bias: The intercept.
    """

    weights: tuple[float, ...]
    bias: float

    def __call__(self, probs: Array) -> Array:
        """Returns the calibrated probability, in ``(0, 1)``, that each row's argmax is right."""
        z = features(probs) @ np.asarray(self.weights, dtype=np.float64) + self.bias
        return _sigmoid(z)

    def to_property(self) -> str:
        """Returns the JSON value stored (and signed) as :data:`CALIBRATION_PROPERTY` at publish."""
        return json.dumps({"features": list(FEATURES), "weights": list(self.weights), "bias": self.bias})

    @classmethod
    def from_properties(cls, properties: Mapping[str, str]) -> CalibratedScore | None:
        """Reads the score from a variant's metadata; ``None`` when absent or malformed."""
        raw = properties.get(CALIBRATION_PROPERTY)
        if raw is None:
            return None
        try:
            data = json.loads(raw)
            if tuple(data["features"]) != FEATURES or len(data["weights"]) != len(FEATURES):
                return None
            weights = tuple(float(w) for w in data["weights"])
            bias = float(data["bias"])
        except (ValueError, TypeError, KeyError):
            return None
        if not all(math.isfinite(v) for v in (*weights, bias)):
            return None
        return cls(weights, bias)


def fit_calibrated_score(probs: Array, correct: Array, l2: float = 1e-3, iterations: int = 25) -> CalibratedScore:
    """Fits :class:`CalibratedScore` by Newton's method (L2-regularised logistic regression).

    Args:
        probs: Device distributions ``[N, V]`` on a calibration split.
        correct: ``[N]`` bools, whether the device argmax was the true next token.
        l2: Ridge penalty on the weights (not the bias), per example.
        iterations: Newton steps (the problem is small and convex; ~10 suffice).
    """
    x = np.hstack([features(probs), np.ones((len(probs), 1))])
    y = np.asarray(correct, dtype=np.float64)
    n, d = x.shape
    ridge = np.diag([l2 * n] * (d - 1) + [0.0])
    w = np.zeros(d)
    for _ in range(iterations):
        p = _sigmoid(x @ w)
        grad = x.T @ (p - y) + ridge @ w
        hess = (x * (p * (1 - p))[:, None]).T @ x + ridge + 1e-9 * np.eye(d)
        step = np.linalg.solve(hess, grad)
        w -= step
        if float(np.abs(step).max()) < 1e-10:
            break
    return CalibratedScore(tuple(float(v) for v in w[:-1]), float(w[-1]))


SIGNALS: dict[str, Callable[[Array], Array]] = {
    "max_prob": max_probability,
    "margin": margin,
    "neg_entropy": neg_entropy,
}


def auroc(scores: Array, labels: Array) -> float:
    """Returns the area under the ROC curve of ``scores`` for boolean ``labels`` (ties count half).

    Raises:
        ValueError: ``labels`` has no positive or no negative.
    """
    s = np.asarray(scores, dtype=np.float64)
    y = np.asarray(labels, dtype=bool)
    pos, neg = int(y.sum()), int((~y).sum())
    if pos == 0 or neg == 0:
        raise ValueError("AUROC needs both positive and negative labels")
    order = np.argsort(s, kind="mergesort")
    sorted_s = s[order]
    ranks = np.empty(len(s), dtype=np.float64)
    # Average ranks (1-based) over ties: the Mann-Whitney U statistic.
    _, first, counts = np.unique(sorted_s, return_index=True, return_counts=True)
    avg = first + (counts + 1) / 2.0
    ranks[order] = np.repeat(avg, counts)
    u = ranks[y].sum() - pos * (pos + 1) / 2.0
    return float(u / (pos * neg))


@dataclass(frozen=True)
class CascadeCurve:
    """The token-level cascade at a series of thresholds (keep local iff confidence ≥ threshold).

    Attributes:
        thresholds: ``[T]`` thresholds.
        local_share: ``[T]`` share of tokens the device keeps.
        accuracy: ``[T]`` accuracy of the cascade.
    """

    thresholds: Array
    local_share: Array
    accuracy: Array


def sweep(confidence: Array, device_correct: Array, edge_correct: Array, thresholds: Array) -> CascadeCurve:
    """Evaluates the cascade at the given ``thresholds``.

    At a position whose confidence is ≥ the threshold the device's answer is
    kept (right iff ``device_correct``), otherwise the edge's (``edge_correct``).
    """
    c = np.asarray(confidence, dtype=np.float64)
    dev = np.asarray(device_correct, dtype=bool)
    edge = np.asarray(edge_correct, dtype=bool)
    t = np.asarray(thresholds, dtype=np.float64)
    local = c[None, :] >= t[:, None]
    acc = np.where(local, dev[None, :], edge[None, :]).mean(axis=1)
    return CascadeCurve(t, local.mean(axis=1), acc)


def full_curve(confidence: Array, device_correct: Array, edge_correct: Array) -> CascadeCurve:
    """Evaluates the cascade at every distinct confidence value (from the most local to the least).

    Exact and ``O(N log N)``: positions sorted by confidence, device answers
    kept for a prefix, edge answers for the rest; cuts only between distinct values.
    """
    c = np.asarray(confidence, dtype=np.float64)
    order = np.argsort(-c, kind="mergesort")
    cs = c[order]
    dev = np.asarray(device_correct, dtype=np.float64)[order]
    edge = np.asarray(edge_correct, dtype=np.float64)[order]
    n = len(c)
    dev_prefix = np.concatenate([[0.0], np.cumsum(dev)])
    edge_suffix = np.concatenate([[0.0], np.cumsum(edge[::-1])])[::-1]
    # A cut after index i-1 (i kept local) is valid where the next value differs.
    cuts = np.flatnonzero(np.concatenate([cs[1:] != cs[:-1], [True]])) + 1
    acc = (dev_prefix[cuts] + edge_suffix[cuts]) / n
    return CascadeCurve(cs[cuts - 1], cuts / n, acc)


def gain_recovered(accuracy: Array | float, device_accuracy: float, edge_accuracy: float) -> Array:
    """Returns ``(cascade - device) / (edge - device)``: the share of the edge's accuracy gain recovered."""
    return (np.asarray(accuracy, dtype=np.float64) - device_accuracy) / (edge_accuracy - device_accuracy)


def best_local_share(
    curve: CascadeCurve, device_accuracy: float, edge_accuracy: float, min_gain: float = 0.95
) -> tuple[float, float] | None:
    """Returns ``(local_share, threshold)`` of the most local point recovering ≥ ``min_gain``; ``None`` if none does."""
    ok = np.flatnonzero(gain_recovered(curve.accuracy, device_accuracy, edge_accuracy) >= min_gain)
    if ok.size == 0:
        return None
    i = int(ok[np.argmax(curve.local_share[ok])])
    return float(curve.local_share[i]), float(curve.thresholds[i])
