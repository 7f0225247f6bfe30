"""What the region knows about a model version's live behaviour: the contract between telemetry and rollouts.

The telemetry store folds the nodes' OTLP metrics into windows and answers
:class:`FiguresSource` queries; the rollout controller reads them to gate a
stage and never sees OTLP. A figure nobody reported is ``None``, never 0:
"no data" must not pass a gate.

The metric names and attributes below are what nodes export and what the
store reads. Every point carries the node's resource attributes
(:data:`NODE_ID`, :data:`NODE_TIER`, :data:`HARDWARE_CLASS`) and the model's
(:data:`MODEL_NAME`, :data:`MODEL_VERSION`, :data:`MODEL_VARIANT`).
"""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass
from typing import Protocol

# Resource attributes of a node's telemetry (the node id and tier as services/rpc/telemetry.py names them).
NODE_ID = "edgecascade.node_id"
NODE_TIER = "edgecascade.tier"  # tier0 (device) or tier1 (edge)
HARDWARE_CLASS = "edgecascade.hardware_class"
# Point attributes.
MODEL_NAME = "edgecascade.model.name"
MODEL_VERSION = "edgecascade.model.version"
MODEL_VARIANT = "edgecascade.model.variant"
OUTCOME = "edgecascade.outcome"  # ok, error or forwarded (requests); ok, error or shed (shadow runs)
FALLBACK_REASON = "edgecascade.fallback_reason"  # set when the outcome is forwarded

# Metrics (OTLP names).
REQUESTS = "edgecascade.requests"  # monotonic sum, by model, version, variant, outcome (and fallback_reason)
LATENCY = "edgecascade.request.duration"  # histogram in milliseconds, by model, version, variant
CONFIDENCE = "edgecascade.answer.confidence"  # histogram in [0, 1], by model, version, variant
UPDATE_OUTCOMES = "edgecascade.updates"  # monotonic sum, by model, version and edgecascade.update.state
# A rollout's shadow stage (MODEL_VERSION is the shadow's version on every point).
SHADOW_RUNS = "edgecascade.shadow.runs"  # monotonic sum, by outcome: ok, error or shed
# Histogram in [0, 1] per compared run whose outputs have a top-1 class (its mean is the agreement).
SHADOW_AGREEMENT = "edgecascade.shadow.agreement"
# Histogram per compared run, every one: the mean absolute difference of the outputs (its count: compared runs).
SHADOW_DIFFERENCE = "edgecascade.shadow.difference"
SHADOW_LATENCY = "edgecascade.shadow.duration"  # histogram in ms: the shadow's runs
SHADOW_SERVING_LATENCY = "edgecascade.shadow.serving_duration"  # histogram in ms: the serving runs, same requests


@dataclass(frozen=True)
class VersionFigures:
    """One model version's behaviour over a window, over the nodes asked about.

    Attributes:
        nodes: Nodes that reported any point for the version in the window.
        requests: Requests answered or forwarded (every outcome).
        errors: Requests that ended in an error.
        fallbacks: Requests forwarded upstream (any reason).
        p50_ms, p99_ms, p999_ms: Latency quantiles from the merged histograms (None without data).
        mean_confidence: Mean answer confidence (None without data).
        failed_installs: Nodes whose update to this version ended refused.
    """

    name: str
    version: str
    nodes: int = 0
    requests: int = 0
    errors: int = 0
    fallbacks: int = 0
    p50_ms: float | None = None
    p99_ms: float | None = None
    p999_ms: float | None = None
    mean_confidence: float | None = None
    failed_installs: int = 0

    @property
    def error_rate(self) -> float | None:
        """Errors per request, or None without requests."""
        return self.errors / self.requests if self.requests else None

    @property
    def fallback_rate(self) -> float | None:
        """Forwarded requests per request, or None without requests."""
        return self.fallbacks / self.requests if self.requests else None


@dataclass(frozen=True)
class ShadowFigures:
    """A version's shadow runs (a rollout's shadow stage) over a window, over the nodes asked about.

    Attributes:
        nodes: Nodes that reported compared runs (a difference or an agreement) of the version in the window.
        ok: Shadow runs that answered (their answers compared with the serving version's, then discarded).
        errors: Shadow runs that failed.
        shed: Shadow runs skipped because the node was busy (neither a success nor a failure of the version).
        compared: Runs whose answers were compared (the difference histogram's count: every compared run
            records a difference, while outputs without a top-1 record no agreement).
        agreement: Mean top-1 agreement with the serving version, in [0, 1] (None without data, and always
            None for outputs without a top-1 class, e.g. a regressor's or an [N, 1] score).
        mean_difference: Mean of the runs' mean absolute differences of the outputs (None without data).
        p99_ms: The shadow's p99 latency (None without data).
        serving_p99_ms: The serving version's p99 latency on the same sampled requests (None without data).
    """

    name: str
    version: str
    nodes: int = 0
    ok: int = 0
    errors: int = 0
    shed: int = 0
    compared: int = 0
    agreement: float | None = None
    mean_difference: float | None = None
    p99_ms: float | None = None
    serving_p99_ms: float | None = None

    @property
    def error_rate(self) -> float | None:
        """Failed runs per run that ran (shed ones did not), or None without runs."""
        ran = self.ok + self.errors
        return self.errors / ran if ran else None


class FiguresSource(Protocol):
    """Answers what a version did, from the telemetry the region received."""

    def figures(self, name: str, version: str, since: float, node_ids: Collection[str] | None = None) -> VersionFigures:
        """The version's figures from points received at or after Unix time ``since``.

        Args:
            name: Model name.
            version: Model version.
            since: Start of the window (Unix seconds).
            node_ids: Only these nodes (a rollout's cohort); None for every node.
        """
        ...

    def failed_installs(self, name: str, version: str, since: float, node_ids: Collection[str] | None = None) -> int:
        """How many nodes refused to install the version since ``since`` (cheap: the rollout checks it every tick)."""
        ...

    def shadow(self, name: str, version: str, since: float, node_ids: Collection[str] | None = None) -> ShadowFigures:
        """The version's shadow runs from points received at or after Unix time ``since`` (its SHADOW_* metrics).

        Args:
            name: Model name.
            version: The shadow's version (the rollout's).
            since: Start of the window (Unix seconds).
            node_ids: Only these nodes (the shadow cohort); None for every node.
        """
        ...
