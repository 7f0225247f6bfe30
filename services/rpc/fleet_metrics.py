"""The metrics the region's fleet reads of a node: requests by outcome, latency, confidence, update outcomes,
and a rollout's shadow runs (:meth:`FleetMetrics.shadow_run`).

Names and attributes are :mod:`services.telemetry_names`'. The servicer calls
:meth:`FleetMetrics.record` once per request, with the :class:`CallRoute` the data
plane filled in through its ``routed`` callback.

Cheap on the hot path: request counts are plain integers in a dict, read by an
observable counter only when a reader collects, so counting a request costs a
dict lookup and an increment (well under a microsecond); the SDK histogram record
of its latency is the bulk of the cost (10-25 µs a call, see
``bench/fleet_metrics_overhead.py``). Bounded: a model and
version this node answered with are recorded as they are (its repository bounds
them); names and versions that only a caller vouches for — a call that went
upward or failed before a model was chosen — are admitted up to ``max_models``
names and ``max_versions`` versions per name, and recorded as
:data:`~services.telemetry_names.OTHER` beyond, so no caller can grow the
node's series without bound.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from opentelemetry.metrics import CallbackOptions, Observation
from opentelemetry.sdk.metrics import MeterProvider

from services.circuit_breaker import BreakerState
from services.engine.model_repository import check_model_name, check_version
from services.engine.shadow import Comparison
from services.errors import InvalidArgumentError
from services.inference import NodeIdentity, ParamValue
from services.rpc.anomaly_log import AnomalyLog
from services.rpc.guarded_upstream import UpstreamStatus
from services.rpc.telemetry import annotate_span
from services.telemetry_names import (
    AGREEMENT_BOUNDS,
    BREAKER_REJECTED,
    BREAKER_STATE,
    BREAKER_STATES,
    BREAKER_TRANSITIONS,
    CONFIDENCE,
    CONFIDENCE_BOUNDS,
    DEGRADED_ANSWERS,
    DEGRADED_REASON,
    DIFFERENCE_BOUNDS,
    ERROR,
    FALLBACK_REASON,
    LATENCY,
    LATENCY_BOUNDS_MS,
    MODEL_NAME,
    MODEL_VARIANT,
    MODEL_VERSION,
    OK,
    OTHER,
    OUTCOME,
    REJECTED,
    REQUESTS,
    RESULT,
    RESULT_CACHE_BYTES,
    RESULT_CACHE_HIT_RATE,
    RESULT_CACHE_LOOKUPS,
    SHADOW_AGREEMENT,
    SHADOW_DIFFERENCE,
    SHADOW_LATENCY,
    SHADOW_RUNS,
    SHADOW_SERVING_LATENCY,
    UNRESOLVED,
    UPDATE_OUTCOMES,
    UPDATE_STATE,
    UPSTREAM,
    UPSTREAM_RETRIES,
)

# Update states after which the version named serves (on trial, then committed): its variant is known from then.
SERVING_STATES = frozenset({"trial", "committed"})

VariantOf = Callable[[str, str], str]


class CallRoute:
    """Where one call went, as the data plane reports it; annotates the call's span on the way.

    ``local`` turns true once a local model was chosen: its name and version are then
    this node's own, and stay so if its full queue sends the call upward after all.
    """

    __slots__ = ("identity", "local", "name", "reason", "version")

    def __init__(self, identity: NodeIdentity, name: str, version: str) -> None:
        self.identity = identity
        self.name = name
        self.version = version
        self.reason = ""
        self.local = False

    def routed(self, name: str, version: str, reason: str) -> None:
        """The data plane's ``routed`` callback (see :class:`~services.dataplane.InferCall`)."""
        annotate_span(self.identity, name, version, reason)
        if not reason:
            self.name, self.version, self.local = name, version, True
        self.reason = reason


@dataclass(eq=False)
class _Series:
    """One request series: its count and the attribute sets of its points."""

    name: str
    version: str
    outcome: str
    reason: str
    count: int = 0
    counted: dict[str, str] | None = None  # REQUESTS: the model's attributes, outcome and reason
    timed: dict[str, str] | None = None  # LATENCY: the model's attributes and outcome
    model: dict[str, str] | None = None  # CONFIDENCE: the model's attributes

    def label(self, variant: str) -> None:
        """(Re)builds the attribute sets; each is replaced whole, so a collecting thread sees an old or a new one."""
        model = {MODEL_NAME: self.name, MODEL_VERSION: self.version, MODEL_VARIANT: variant}
        timed = {**model, OUTCOME: self.outcome}
        self.counted = {**timed, FALLBACK_REASON: self.reason} if self.reason else timed
        self.timed = timed
        self.model = model


class FleetMetrics:
    """Records what the region's fleet reads of this node (see the module docstring).

    Args:
        provider: The node's meter provider.
        max_models: Model names admitted from callers (beyond those this node answered with).
        max_versions: Versions admitted from callers, per model name.
    """

    def __init__(self, provider: MeterProvider, max_models: int = 32, max_versions: int = 8) -> None:
        meter = provider.get_meter("edgecascade.fleet")
        meter.create_observable_counter(
            REQUESTS, [self._observe_requests], unit="{request}", description="Requests by model and outcome"
        )
        self._latency = meter.create_histogram(
            LATENCY,
            unit="ms",
            description="Time from a request's arrival to its answer",
            explicit_bucket_boundaries_advisory=LATENCY_BOUNDS_MS,
        )
        self._confidence = meter.create_histogram(
            CONFIDENCE,
            unit="1",
            description="Confidence of the answers this node computed",
            explicit_bucket_boundaries_advisory=CONFIDENCE_BOUNDS,
        )
        self._updates = meter.create_counter(
            UPDATE_OUTCOMES, unit="{update}", description="Model updates reaching each state"
        )
        # A rollout's shadow stage. Nothing is exported before the first shadow run: an instrument without
        # points sends none, and the run counter observes an empty dict.
        meter.create_observable_counter(
            SHADOW_RUNS,
            [self._observe_shadow_runs],
            unit="{request}",
            description="Requests sampled for a shadow version, by outcome (ok, error, shed)",
        )
        self._agreement = meter.create_histogram(
            SHADOW_AGREEMENT,
            unit="1",
            description="Per shadow run: share of rows whose top-1 equals the serving answer's",
            explicit_bucket_boundaries_advisory=AGREEMENT_BOUNDS,
        )
        self._difference = meter.create_histogram(
            SHADOW_DIFFERENCE,
            unit="1",
            description="Per shadow run: mean absolute difference of its outputs from the serving answer's",
            explicit_bucket_boundaries_advisory=DIFFERENCE_BOUNDS,
        )
        self._shadow_latency = meter.create_histogram(
            SHADOW_LATENCY,
            unit="ms",
            description="Run time of a shadow version on a sampled request",
            explicit_bucket_boundaries_advisory=LATENCY_BOUNDS_MS,
        )
        self._serving_latency = meter.create_histogram(
            SHADOW_SERVING_LATENCY,
            unit="ms",
            description="Run time of the serving version on the requests its shadow ran on",
            explicit_bucket_boundaries_advisory=LATENCY_BOUNDS_MS,
        )
        # The cascade and the guarded upstream (issue 11).
        self._degraded = meter.create_counter(
            DEGRADED_ANSWERS,
            unit="{request}",
            description="Answers computed here in place of the upstream's because it could not be reached, by reason",
        )
        self._breaker_moves = meter.create_counter(
            BREAKER_TRANSITIONS, unit="{transition}", description="Upstream breaker transitions, by state entered"
        )
        self._upstreams: list[Callable[[], UpstreamStatus]] = []
        meter.create_observable_gauge(
            BREAKER_STATES, [self._observe_breakers], unit="1", description="1 for the upstream breaker's state now"
        )
        meter.create_observable_counter(
            BREAKER_REJECTED, [self._observe_rejected], unit="{call}", description="Upstream calls the breaker refused"
        )
        meter.create_observable_counter(
            UPSTREAM_RETRIES, [self._observe_retries], unit="{call}", description="Upstream retries sent or refused"
        )
        meter.create_observable_counter(
            RESULT_CACHE_LOOKUPS, [self._observe_lookups], unit="{lookup}", description="Result cache hits and misses"
        )
        meter.create_observable_gauge(
            RESULT_CACHE_HIT_RATE, [self._observe_hit_rate], unit="1", description="Result cache hits per lookup"
        )
        meter.create_observable_gauge(
            RESULT_CACHE_BYTES, [self._observe_cache_bytes], unit="By", description="Bytes of cached upstream answers"
        )
        # (name, shadow version, variant) → attributes, and → outcome → (count, attributes of the count)
        self._shadow_models: dict[tuple[str, str, str], dict[str, str]] = {}
        self._shadow_runs: dict[tuple[str, str, str, str], tuple[int, dict[str, str]]] = {}
        self._series: dict[tuple[str, str, str, str], _Series] = {}
        self._max_models = max_models
        self._max_versions = max_versions
        self._admitted: dict[str, set[str]] = {}  # caller-named model → caller-named versions
        self._callers_names = 0  # names admitted that this node never answered with
        self._local_names: set[str] = set()
        self._variant_of: VariantOf = lambda name, version: ""
        self.log: AnomalyLog | None = None  # the node's adaptive logging, when it sends logs

    def use_log(self, log: AnomalyLog) -> None:
        """Hands each request recorded from now on to ``log`` too (which judges it an anomaly or samples it)."""
        self.log = log

    def use_variants(self, variant_of: VariantOf) -> None:
        """Reads the variant of a model version from ``variant_of`` (the node's installed store) from now on."""
        self._variant_of = variant_of
        for series in list(self._series.values()):
            series.label(self._variant(series.name, series.version))

    def record(
        self,
        route: CallRoute,
        outcome: str,
        seconds: float,
        confidence: ParamValue | None = None,
        error: BaseException | None = None,
    ) -> None:
        """Records one request: its outcome, its latency unless it failed, its answer's confidence if it has one.

        Called in the request's context (its trace), so an anomaly logged for it carries its trace id.

        Args:
            route: Where the call went.
            outcome: ``ok``, ``error``, ``forwarded`` or ``rejected`` (the caller's mistake).
            seconds: From its arrival to its answer.
            confidence: The answer's ``edgecascade.confidence`` parameter, if any (recorded when in [0, 1]).
            error: What it failed with (only its class is logged).
        """
        if route.local:
            key = (route.name, route.version, outcome, route.reason)
        else:
            name, version = self._bounded(route.name, route.version)
            key = (name, version, outcome, route.reason)
        series = self._series.get(key)
        if series is None:
            series = self._add(key, route.local)
        series.count += 1
        if outcome not in (ERROR, REJECTED):  # a failed call's time says nothing about the version's speed
            self._latency.record(seconds * 1000.0, series.timed)
        if confidence is not None:
            value = _unit_interval(confidence)
            if value is not None:
                self._confidence.record(value, series.model)
        log = self.log
        if log is not None:
            error_type = "" if error is None else type(error).__name__
            log.request(series.name, series.version, series.model or {}, outcome, route.reason, seconds, error_type)

    def degraded(self, route: CallRoute, reason: ParamValue | None) -> None:
        """Counts an answer marked ``edgecascade.degraded`` (``reason`` is its value; None: not degraded)."""
        if reason is None:
            return
        series = self._series.get((route.name, route.version, OK, route.reason))
        model = series.model if series is not None and series.model is not None else {MODEL_NAME: route.name}
        self._degraded.add(1, {**model, DEGRADED_REASON: str(reason)})

    def breaker_moved(self, address: str, state: BreakerState) -> None:
        """Counts one transition of an upstream's circuit breaker into ``state`` (its ``on_change``)."""
        self._breaker_moves.add(1, {UPSTREAM: address, BREAKER_STATE: state.value})

    def watch_upstream(self, status: Callable[[], UpstreamStatus]) -> None:
        """Exports the breaker state, rejections, retries and result cache of an upstream (read at each collection)."""
        self._upstreams.append(status)

    def _statuses(self) -> list[UpstreamStatus]:
        return [status() for status in list(self._upstreams)]

    def _observe_breakers(self, options: CallbackOptions) -> Iterable[Observation]:
        return [
            Observation(int(s.breaker_state is state), {UPSTREAM: s.address, BREAKER_STATE: state.value})
            for s in self._statuses()
            for state in BreakerState
        ]

    def _observe_rejected(self, options: CallbackOptions) -> Iterable[Observation]:
        return [Observation(s.breaker_rejected, {UPSTREAM: s.address}) for s in self._statuses()]

    def _observe_retries(self, options: CallbackOptions) -> Iterable[Observation]:
        return [
            Observation(count, {UPSTREAM: s.address, RESULT: result})
            for s in self._statuses()
            for result, count in (("sent", s.retries), ("refused", s.retries_refused))
        ]

    def _observe_lookups(self, options: CallbackOptions) -> Iterable[Observation]:
        return [
            Observation(count, {UPSTREAM: s.address, RESULT: result})
            for s in self._statuses()
            for result, count in (("hit", s.cache_hits), ("miss", s.cache_misses))
        ]

    def _observe_hit_rate(self, options: CallbackOptions) -> Iterable[Observation]:
        return [
            Observation(s.cache_hit_rate, {UPSTREAM: s.address})
            for s in self._statuses()
            if s.cache_hit_rate is not None
        ]

    def _observe_cache_bytes(self, options: CallbackOptions) -> Iterable[Observation]:
        return [Observation(s.cache_bytes, {UPSTREAM: s.address}) for s in self._statuses()]

    def updated(self, state: str, name: str, version: str, variant: str) -> None:
        """Counts one update reaching ``state`` (the updater's ``on_state``), on the event loop."""
        self._updates.add(1, {MODEL_NAME: name, MODEL_VERSION: version, MODEL_VARIANT: variant, UPDATE_STATE: state})
        if state in SERVING_STATES:
            for series in list(self._series.values()):
                if (series.name, series.version) == (name, version):
                    series.label(variant)

    def shadow_run(
        self,
        name: str,
        version: str,
        variant: str,
        outcome: str,
        comparison: Comparison | None = None,
        shadow_seconds: float = 0.0,
        serving_seconds: float = 0.0,
    ) -> None:
        """Records one request sampled for a shadow version (the shadow runner's recorder), on the event loop.

        Every point carries the *shadow's* model, version and variant. An ``ok`` run records its agreement
        and difference (those it has) and both run times; ``error`` and ``shed`` are only counted. Names
        and versions are the node's shadow store's (one shadow per model), and a removed shadow's run
        counts are dropped (:meth:`forget_shadow`), so the series stay bounded.
        """
        model_key = (name, version, variant)
        attributes = self._shadow_models.get(model_key)
        if attributes is None:
            attributes = self._shadow_models[model_key] = {
                MODEL_NAME: name,
                MODEL_VERSION: version,
                MODEL_VARIANT: variant,
            }
        key = (*model_key, outcome)
        counted = self._shadow_runs.get(key)
        self._shadow_runs[key] = (
            (counted[0] + 1, counted[1]) if counted is not None else (1, {**attributes, OUTCOME: outcome})
        )
        if outcome != OK:
            return
        if comparison is not None:
            if comparison.agreement is not None:
                self._agreement.record(comparison.agreement, attributes)
            if comparison.difference is not None:
                self._difference.record(comparison.difference, attributes)
        self._shadow_latency.record(shadow_seconds * 1000.0, attributes)
        self._serving_latency.record(serving_seconds * 1000.0, attributes)

    def forget_shadow(self, name: str, keep: str = "") -> None:
        """Drops the shadow-run series of model ``name``'s shadow versions but ``keep`` (its shadow was removed).

        Called when the node removes a shadow, so that the series stay bounded over the node's lifetime
        (one model has one shadow at a time, but a long-lived node sees many). A version run again later
        counts from zero, as after a restart.
        """
        for key in [k for k in self._shadow_models if k[0] == name and k[1] != keep]:
            del self._shadow_models[key]
        for run in [k for k in self._shadow_runs if k[0] == name and k[1] != keep]:
            del self._shadow_runs[run]

    def _observe_shadow_runs(self, options: CallbackOptions) -> Iterable[Observation]:
        return [Observation(count, attributes) for count, attributes in list(self._shadow_runs.values())]

    def _add(self, key: tuple[str, str, str, str], local: bool) -> _Series:
        series = self._series[key] = _Series(*key)
        series.label(self._variant(series.name, series.version))
        if local:
            # A name this node answered with is its own: admitted for callers too, outside their bound.
            self._local_names.add(series.name)
        return series

    def _variant(self, name: str, version: str) -> str:
        return "" if version in (OTHER, UNRESOLVED) else self._variant_of(name, version)

    def _bounded(self, name: str, version: str) -> tuple[str, str]:
        """A caller's model name and version, or the stand-ins beyond the bounds."""
        versions = self._admitted.get(name)
        if versions is None:
            own = name in self._local_names
            if not own and (self._callers_names >= self._max_models or not _valid(check_model_name, name)):
                return OTHER, OTHER if version else UNRESOLVED
            self._callers_names += 0 if own else 1
            versions = self._admitted[name] = set()
        if not version:
            return name, UNRESOLVED
        if version not in versions:
            if len(versions) >= self._max_versions or not _valid(check_version, version):
                return name, OTHER
            versions.add(version)
        return name, version

    def _observe_requests(self, options: CallbackOptions) -> Iterable[Observation]:
        # list() copies in one step: the loop may add a series while the reader's thread collects.
        return [Observation(s.count, s.counted) for s in list(self._series.values())]


def _valid(check: Callable[[str], str], text: str) -> bool:
    try:
        check(text)
    except InvalidArgumentError:
        return False
    return True


def _unit_interval(value: ParamValue) -> float | None:
    """A confidence parameter as a float in [0, 1] (the region refuses a point outside it), or None."""
    if isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value) and 0 <= value <= 1:
        return float(value)
    return None
