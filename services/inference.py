"""Transport-neutral inference types.

These frozen dataclasses are what the cores take and return; the gRPC adapters
in ``services.rpc.converters`` translate them from and to protobuf.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

import numpy as np

# A request or response parameter value, as the protocol's InferParameter holds it.
ParamValue = bool | int | float | str

# Response parameter names the mesh sets, all in one place.
SERVED_BY = "edgecascade.served_by"
FALLBACK_REASON = "edgecascade.fallback_reason"
ROUTE = "edgecascade.route"
TOKEN_PROBABILITY = "edgecascade.token_probability"
# On the final response of a generation.
TOKENS = "edgecascade.tokens"
FINISH_REASON = "edgecascade.finish_reason"
CONFIDENCE = "edgecascade.confidence"
MIN_TOKEN_PROBABILITY = "edgecascade.min_token_probability"
# Triton's flag on the last response of a decoupled (streamed) request.
FINAL_RESPONSE = "triton_final_response"
# The confidence cascade (issue 11). Request parameters:
CASCADE = "edgecascade.cascade"  # off | confidence | speculative (CASCADE_MODES)
THRESHOLD = "edgecascade.threshold"  # the request's own confidence threshold in [0, 1]
CASCADE_OFF = "off"
CASCADE_CONFIDENCE = "confidence"
CASCADE_SPECULATIVE = "speculative"
CASCADE_MODES = (CASCADE_OFF, CASCADE_CONFIDENCE, CASCADE_SPECULATIVE)
# Response parameters (CONFIDENCE above is on every local answer of a classifier-style output):
TOKEN_ORIGIN = "edgecascade.token_origin"  # on each streamed token: local | upstream (TOKEN_ORIGINS)
TOKEN_LOCAL = "local"  # sampled from this node's model (or a draft it kept, in speculative mode)
TOKEN_UPSTREAM = "upstream"  # sampled from the upstream model's distribution (or its correction)
TOKEN_ORIGINS = (TOKEN_LOCAL, TOKEN_UPSTREAM)
TOKENS_LOCAL = "edgecascade.tokens_local"  # final response: tokens from this node's model
TOKENS_ESCALATED = "edgecascade.tokens_escalated"  # final response: tokens from the upstream's distribution
UPSTREAM_CALLS = "edgecascade.upstream_calls"  # final response: calls made to the upstream for this generation
DRAFTS = "edgecascade.drafts"  # final response of a speculative generation: tokens the device drafted
DRAFTS_ACCEPTED = "edgecascade.drafts_accepted"  # ... and how many of them the upstream accepted
# Set on an answer computed here in place of the upstream's because the upstream could not be reached
# (its value says why, e.g. "upstream_unavailable" or "circuit_open"); absent on a normal answer.
DEGRADED = "edgecascade.degraded"


class FallbackReason(StrEnum):
    """Why a node sent a request to the next tier up (``edgecascade.fallback_reason``)."""

    MODEL_NOT_HELD = "model_not_held"
    MODEL_UNAVAILABLE = "model_unavailable"
    MEMORY = "memory"
    QUEUE_FULL = "queue_full"
    LOW_CONFIDENCE = "low_confidence"  # the local answer's confidence was under the threshold (the cascade)
    THERMAL = "thermal"  # the device is too hot to take new work (its thermal policy)


@dataclass(frozen=True)
class TensorSpec:
    """Name, protocol datatype and shape of a model input or output (-1 = any size)."""

    name: str
    datatype: str
    shape: tuple[int, ...]


@dataclass(frozen=True)
class ModelSignature:
    """The inputs and outputs of a model."""

    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]

    @property
    def batchable(self) -> bool:
        """Whether every input and output has a leading variable-size (batch) axis."""
        specs = (*self.inputs, *self.outputs)
        return bool(specs) and all(s.shape and s.shape[0] == -1 for s in specs)


@dataclass(frozen=True)
class InferRequest:
    """One decoded inference request."""

    model_name: str
    model_version: str
    request_id: str
    inputs: Mapping[str, np.ndarray[Any, Any]]
    requested_outputs: tuple[str, ...] = ()
    parameters: Mapping[str, ParamValue] = field(default_factory=dict)


@dataclass(frozen=True)
class InferResult:
    """The outputs of one inference, plus response parameters."""

    model_name: str
    model_version: str
    request_id: str
    outputs: Mapping[str, np.ndarray[Any, Any]]
    parameters: Mapping[str, ParamValue] = field(default_factory=dict)


@dataclass(frozen=True)
class NodeIdentity:
    """Which tier and node this process is, as reported in ``edgecascade.served_by``."""

    tier: str
    node_id: str

    @property
    def served_by(self) -> str:
        """The value of the ``edgecascade.served_by`` response parameter, e.g. ``tier0:device-1``."""
        return f"{self.tier}:{self.node_id}"
