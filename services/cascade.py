"""The request-level confidence cascade: a node keeps the answers it is sure of and sends the rest upward.

After a local answer the data plane asks this policy three things:

* **How confident is the answer?** The maximum probability of the model's
  classifier-style output: the output named for the model in ``[cascade]
  outputs`` (else its ``edgecascade.confidence_output`` property), else the first
  floating-point output whose last axis has more than one element. Rows that are
  already probabilities (non-negative, summing to 1) are used as they are, other
  rows (logits) go through a softmax; an answer of several rows is as confident
  as its least confident row. A model without such an output has no confidence
  and is never escalated. (An offline study on the demo char-LM — ``bench/README.md``,
  "Cascade" — found the max probability the best single signal.)
* **Against which threshold?** The request's ``edgecascade.threshold`` (a number
  in [0, 1]), else ``[cascade] thresholds`` for the model, else the model
  version's signed ``edgecascade.confidence_threshold`` property (calibrated at
  publish; an installed variant carries its signed ``confidence_threshold`` fact
  under that name), else none: no cascade for that model.
* **Is the cascade on?** The request's ``edgecascade.cascade`` (``off`` |
  ``confidence`` | ``speculative``; on a single inference ``speculative`` acts like
  ``confidence``), else ``[cascade] mode``.

Below the threshold the data plane sends the same call upward with
``fallback_reason = low_confidence``. When that fails it answers with the local
answer marked ``edgecascade.degraded`` with the reason :func:`degraded_reason`
gives; an upstream that does not hold the model is remembered for a while
(:meth:`Cascade.upstream_lacks`) and the local answer stands unmarked, since
nothing better exists above.

Domain core: numpy and the domain types only.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from services.errors import (
    CapacityError,
    CircuitOpenError,
    ConfigError,
    DeadlineExceededError,
    EdgecascadeError,
    InvalidArgumentError,
    NotFoundError,
    UnavailableError,
)
from services.inference import (
    CASCADE,
    CASCADE_CONFIDENCE,
    CASCADE_MODES,
    CASCADE_OFF,
    THRESHOLD,
    ParamValue,
    TensorSpec,
)

# Model properties (ONNX metadata or signed facts) the cascade reads.
THRESHOLD_PROPERTY = "edgecascade.confidence_threshold"
OUTPUT_PROPERTY = "edgecascade.confidence_output"

# Values of edgecascade.degraded: why the local answer stands in for the upstream's.
DEGRADED_CIRCUIT_OPEN = "circuit_open"  # the upstream's breaker is open: it was not even asked
DEGRADED_UNAVAILABLE = "upstream_unavailable"  # unreachable, or it refused with UNAVAILABLE
DEGRADED_TIMEOUT = "upstream_timeout"  # it did not answer within the time this node could give it
DEGRADED_OVERLOADED = "upstream_overloaded"  # it refused for capacity (its queue or memory)
DEGRADED_ERROR = "upstream_error"  # any other failure of the upstream
DEGRADED_DEADLINE = "deadline"  # too little of the request's deadline was left to ask the upstream

FLOAT_TYPES = frozenset({"FP16", "FP32", "FP64", "BF16"})
# Of the time left when a call goes upward with a local answer to fall back on, the share kept back to
# return that answer if the upstream does not answer in time (between the two bounds, in seconds).
# Generous on purpose: when a slow edge times out, every request in flight needs its local answer sent at
# the same moment, on a busy event loop; 100 ms was measured too little for 16 of them on 2 vCPUs (CI).
RESERVE_SHARE = 0.2
RESERVE_MIN_S = 0.005
RESERVE_MAX_S = 0.5
# An upstream attempt with less time than this is not worth sending.
MIN_UPSTREAM_S = 0.005
# How long "the upstream does not hold this model" is believed, and how many such models are remembered.
NOT_HELD_TTL_S = 30.0
NOT_HELD_MAX = 1024

Array = np.ndarray[Any, Any]


@dataclass(frozen=True)
class CascadeSettings:
    """A node's defaults for the cascade (``[cascade]``).

    Attributes:
        mode: The mode of a request that names none (one of :data:`~services.inference.CASCADE_MODES`).
        thresholds: Threshold per model name, overriding the model's signed one.
        outputs: The output whose confidence counts, per model name.
    """

    mode: str = CASCADE_CONFIDENCE
    thresholds: Mapping[str, float] = field(default_factory=dict)
    outputs: Mapping[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.mode not in CASCADE_MODES:
            raise ConfigError(f"cascade mode must be one of {', '.join(CASCADE_MODES)}, got {self.mode!r}")
        for model, value in self.thresholds.items():
            if not (math.isfinite(value) and 0.0 <= value <= 1.0):
                raise ConfigError(f"cascade threshold of model '{model}' must be in [0, 1], got {value}")


@dataclass(frozen=True)
class CascadeAsk:
    """What one request asks of the cascade.

    Attributes:
        mode: ``off``, ``confidence`` or ``speculative``.
        threshold: The request's own threshold, or None (the model's applies).
    """

    mode: str
    threshold: float | None = None

    @property
    def on(self) -> bool:
        """Whether a low-confidence answer may go upward."""
        return self.mode != CASCADE_OFF


def parse_request(parameters: Mapping[str, ParamValue], default_mode: str = CASCADE_CONFIDENCE) -> CascadeAsk:
    """Reads and checks the request's ``edgecascade.cascade`` and ``edgecascade.threshold``.

    Raises:
        InvalidArgumentError: The mode is not one of the modes, or the threshold is not a number in [0, 1].
    """
    mode = parameters.get(CASCADE, default_mode)
    if not isinstance(mode, str) or mode not in CASCADE_MODES:
        raise InvalidArgumentError(
            f"parameter '{CASCADE}' must be one of {', '.join(CASCADE_MODES)} (a string), got {mode!r}"
        )
    threshold = parameters.get(THRESHOLD)
    if threshold is None:
        return CascadeAsk(mode)
    if (
        isinstance(threshold, bool)
        or not isinstance(threshold, int | float)
        or not (math.isfinite(threshold) and 0.0 <= threshold <= 1.0)
    ):
        raise InvalidArgumentError(
            f"parameter '{THRESHOLD}' must be a number in [0, 1] (a double or int parameter), got {threshold!r}"
        )
    return CascadeAsk(mode, float(threshold))


# How far from 1 a row's sum may be for the row to count as probabilities already
# (numpy's allclose at atol 1e-3 with its default rtol 1e-5, as this was first written).
PROBABILITY_SUM_TOLERANCE = 1e-3 + 1e-5


def row_confidence(array: Array) -> float | None:
    """The confidence of a classifier-style answer: max probability of its least confident row.

    ``array``'s last axis holds the classes; every other axis counts rows. Rows that
    are probabilities already are used as they are, others are taken as logits.
    None for an answer without rows or classes; 0 for one with non-finite values.
    """
    if array.ndim < 1 or array.shape[-1] < 2 or array.size == 0:
        return None
    # On every local answer, so few passes over the data: no float64 copy, no allclose.
    rows = array.reshape(-1, array.shape[-1])
    if rows.dtype.kind != "f" or rows.dtype.itemsize < 4:
        rows = rows.astype(np.float64)
    sums = rows.sum(axis=-1, dtype=np.float64)
    if not math.isfinite(float(sums.sum())):  # any NaN or infinity makes the sum non-finite
        return 0.0
    top = rows.max(axis=-1)
    if rows.min() >= 0 and float(np.abs(sums - 1.0).max()) <= PROBABILITY_SUM_TOLERANCE:
        return float(top.min())
    # Logits: the largest softmax probability of a row is 1 / sum(exp(x - max)).
    spread = np.exp(rows - top[:, None]).sum(axis=-1, dtype=np.float64)
    return float(1.0 / spread.max())


def pick_output(specs: Sequence[TensorSpec], outputs: Mapping[str, Array], named: str = "") -> str | None:
    """The output whose confidence counts: ``named`` if given, else the first classifier-style one answered."""
    if named:
        return named if named in outputs else None
    for spec in specs:
        array = outputs.get(spec.name)
        if (
            array is not None
            and spec.datatype in FLOAT_TYPES
            and array.ndim >= 1
            and array.shape[-1] > 1
            and np.issubdtype(array.dtype, np.floating)
        ):
            return spec.name
    return None


def reserve(remaining: float) -> float:
    """Seconds of ``remaining`` kept back, when asking the upstream, to answer locally if it does not answer."""
    return min(max(remaining * RESERVE_SHARE, RESERVE_MIN_S), RESERVE_MAX_S)


def degraded_reason(exc: EdgecascadeError) -> str:
    """The ``edgecascade.degraded`` value for an upstream call that failed with ``exc``."""
    if isinstance(exc, CircuitOpenError):
        return DEGRADED_CIRCUIT_OPEN
    if isinstance(exc, UnavailableError):
        return DEGRADED_UNAVAILABLE
    if isinstance(exc, DeadlineExceededError):
        return DEGRADED_TIMEOUT
    if isinstance(exc, CapacityError):
        return DEGRADED_OVERLOADED
    return DEGRADED_ERROR


class Cascade:
    """The cascade policy of one node (see the module docstring).

    Args:
        settings: The node's ``[cascade]`` settings.
        clock: Monotonic seconds (for how long a model's absence upstream is remembered).
    """

    def __init__(self, settings: CascadeSettings | None = None, clock: Callable[[], float] = time.monotonic) -> None:
        self.settings = settings or CascadeSettings()
        self._clock = clock
        self._not_held: dict[tuple[str, str], float] = {}  # (model, version asked) → until when

    def ask(self, parameters: Mapping[str, ParamValue]) -> CascadeAsk:
        """What a request asks (:func:`parse_request` with this node's default mode)."""
        return parse_request(parameters, self.settings.mode)

    def confidence(
        self, name: str, properties: Mapping[str, str], specs: Sequence[TensorSpec], outputs: Mapping[str, Array]
    ) -> float | None:
        """The confidence of a local answer of model ``name``, or None when it has no classifier-style output."""
        named = self.settings.outputs.get(name) or properties.get(OUTPUT_PROPERTY, "")
        chosen = pick_output(specs, outputs, named)
        return None if chosen is None else row_confidence(np.asarray(outputs[chosen]))

    def threshold(self, name: str, properties: Mapping[str, str], ask: CascadeAsk) -> float | None:
        """The threshold that applies: the request's, the configured one, the signed one, or None."""
        if ask.threshold is not None:
            return ask.threshold
        configured = self.settings.thresholds.get(name)
        if configured is not None:
            return configured
        signed = properties.get(THRESHOLD_PROPERTY)
        if signed is None:
            return None
        try:
            value = float(signed)
        except ValueError:
            return None
        return value if math.isfinite(value) and 0.0 <= value <= 1.0 else None

    def upstream_lacks(self, name: str, version: str) -> bool:
        """Whether the upstream said recently that it does not hold this model (version): no use asking."""
        until = self._not_held.get((name, version))
        if until is None:
            return False
        if self._clock() < until:
            return True
        del self._not_held[(name, version)]
        return False

    def not_held(self, name: str, version: str, exc: EdgecascadeError) -> bool:
        """Notes an upstream's refusal; returns whether it said it does not hold the model (remembered)."""
        if not isinstance(exc, NotFoundError):
            return False
        if len(self._not_held) >= NOT_HELD_MAX:
            self._not_held.pop(next(iter(self._not_held)))
        self._not_held[(name, version)] = self._clock() + NOT_HELD_TTL_S
        return True
