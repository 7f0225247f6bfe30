"""The names of the metrics a node exports and the region reads: one vocabulary for both ends of OTLP.

Devices and edges record these (``services.rpc.fleet_metrics``) and export them by
OTLP to their upstream; the region's telemetry store reads the same names
(``tier2_region.fleet.figures`` states them for its side, with the same values:
a unit test holds the two equal). Every point carries the node's resource
attributes (:data:`NODE_ID`, :data:`NODE_TIER`, :data:`HARDWARE_CLASS`) and the
model's (:data:`MODEL_NAME`, :data:`MODEL_VERSION`, :data:`MODEL_VARIANT`).
"""

from __future__ import annotations

# Resource attributes of a node's telemetry.
NODE_ID = "edgecascade.node_id"
NODE_TIER = "edgecascade.tier"  # tier0 (device), tier1 (edge) or tier2 (region)
HARDWARE_CLASS = "edgecascade.hardware_class"

# Point attributes.
MODEL_NAME = "edgecascade.model.name"
MODEL_VERSION = "edgecascade.model.version"
MODEL_VARIANT = "edgecascade.model.variant"  # "" when the node does not know it (not installed by its updater)
OUTCOME = "edgecascade.outcome"  # one of OUTCOMES
FALLBACK_REASON = "edgecascade.fallback_reason"  # set when the call went upward (a FallbackReason value)
UPDATE_STATE = "edgecascade.update.state"  # an UpdateState value: assigned … committed, or refused

# Metrics (OTLP names).
REQUESTS = "edgecascade.requests"  # monotonic sum, by model, version, variant, outcome (and fallback_reason)
LATENCY = "edgecascade.request.duration"  # histogram in milliseconds, by model, version, variant (and outcome)
CONFIDENCE = "edgecascade.answer.confidence"  # histogram in [0, 1], by model, version, variant
UPDATE_OUTCOMES = "edgecascade.updates"  # monotonic sum, by model, version, variant and update state
# A rollout's shadow stage: the shadow version runs beside the serving one on sampled requests. Every
# shadow point carries MODEL_VERSION = the *shadow's* version (the rollout's), so the region reads one
# version's comparison without knowing which version served.
SHADOW_RUNS = "edgecascade.shadow.runs"  # monotonic sum, by model, version, variant, outcome (ok, error or shed)
SHADOW_AGREEMENT = "edgecascade.shadow.agreement"  # histogram in [0, 1] per run: share of rows with equal top-1
SHADOW_DIFFERENCE = "edgecascade.shadow.difference"  # histogram per run: mean absolute difference of outputs
SHADOW_LATENCY = "edgecascade.shadow.duration"  # histogram in ms: the shadow's run on a sampled request
SHADOW_SERVING_LATENCY = "edgecascade.shadow.serving_duration"  # histogram in ms: the serving run, same requests

# The confidence cascade and the guarded upstream (issue 11): read by operators, not by the region's gates.
DEGRADED_ANSWERS = "edgecascade.requests.degraded"  # monotonic sum, by model, version, variant and DEGRADED_REASON
DEGRADED_REASON = "edgecascade.degraded.reason"  # the edgecascade.degraded value: circuit_open, upstream_unavailable …
UPSTREAM = "edgecascade.upstream.address"  # attribute of the upstream metrics: host:port of the next tier
BREAKER_STATE = "edgecascade.breaker.state"  # attribute: closed, open or half_open (a BreakerState value)
BREAKER_TRANSITIONS = "edgecascade.upstream.breaker.transitions"  # monotonic sum, by UPSTREAM and state entered
BREAKER_STATES = "edgecascade.upstream.breaker.states"  # gauge, by UPSTREAM and BREAKER_STATE: 1 for the current one
BREAKER_REJECTED = "edgecascade.upstream.breaker.rejected"  # monotonic sum, by UPSTREAM: calls refused at once
RESULT = "edgecascade.result"  # attribute: hit or miss (cache lookups), sent or refused (retries)
UPSTREAM_RETRIES = "edgecascade.upstream.retries"  # monotonic sum, by UPSTREAM and RESULT (sent, or refused by budget)
RESULT_CACHE_LOOKUPS = "edgecascade.upstream.cache.lookups"  # monotonic sum, by UPSTREAM and RESULT (hit or miss)
RESULT_CACHE_HIT_RATE = "edgecascade.upstream.cache.hit_rate"  # gauge in [0, 1], by UPSTREAM (after the first lookup)
RESULT_CACHE_BYTES = "edgecascade.upstream.cache.bytes"  # gauge, by UPSTREAM: bytes of the cached answers

# Thermal- and power-aware serving (issue 13): a device's own figures (tier0_device.thermal), read by operators
# and collectors; the region accepts them without storing them.
SOURCE = "edgecascade.source"  # attribute: measured (a sensor) or estimated (the device class's power profile)
STATE = "edgecascade.state"  # attribute of THERMAL_STATE: normal, hot or critical
THERMAL_TRANSITION = "edgecascade.thermal.transition"  # attribute: previous->state, e.g. normal->hot
FAULT_KIND = "edgecascade.fault.kind"  # attribute: missing, unreadable, non_numeric, absurd or backwards
THERMAL_STATE = "edgecascade.thermal.state"  # gauge, by STATE: 1 for the device's thermal state now, else 0
TEMPERATURE = "edgecascade.thermal.temperature"  # gauge in °C, by SOURCE (the hottest valid thermal zone)
THERMAL_TRANSITIONS = "edgecascade.thermal.transitions"  # monotonic sum, by THERMAL_TRANSITION
SENSOR_FAULTS = "edgecascade.thermal.sensor_faults"  # monotonic sum, by FAULT_KIND: sensor values left out
RUN_SLOTS = "edgecascade.thermal.run_slots"  # gauge: onnxruntime runs allowed at once now (fewer while hot)
CPU_FREQUENCY = "edgecascade.cpu.frequency"  # gauge in MHz: the mean current frequency of the cores
CPU_UTILIZATION = "edgecascade.cpu.utilization"  # gauge in [0, 1]: this process's share of its usable cores
POWER = "edgecascade.power.watts"  # gauge in W, by SOURCE: the latest period's mean power
ENERGY = "edgecascade.energy.joules"  # monotonic sum in J, by model, version, variant and SOURCE
INFERENCES_PER_JOULE = "edgecascade.energy.inferences_per_joule"  # gauge, by model, version, variant
JOULES_PER_TOKEN = "edgecascade.energy.joules_per_token"  # gauge, by model, version, variant (generators)

# Log records (OTLP logs): an anomaly is marked so the region keeps it whatever its severity.
ANOMALY = "edgecascade.anomaly"  # bool true on an anomaly record
ANOMALY_KIND = "edgecascade.anomaly.kind"  # one of ANOMALY_KINDS
ERROR_TYPE = "edgecascade.error.type"  # the error's class (a request that failed) or an update failure's kind
LATENCY_MS = "edgecascade.latency_ms"  # the request's latency (slow outliers and routine records)
P99_MS = "edgecascade.p99_ms"  # the model version's running p99 a slow outlier was judged against
ANOMALY_ERROR = "error"  # a request that ended in an error
ANOMALY_FALLBACK = "fallback"  # a request this node sent upward (with FALLBACK_REASON)
ANOMALY_SLOW = "slow"  # a local answer slower than [telemetry] slow_factor × its version's running p99
ANOMALY_UPDATE = "update_failed"  # an update refused or failed unexpectedly
ANOMALY_KINDS = (ANOMALY_ERROR, ANOMALY_FALLBACK, ANOMALY_SLOW, ANOMALY_UPDATE)

# Hard examples (issue 11 item 5): escalated inputs with the device's and the upstream's answers, sampled at
# [telemetry] hard_examples_rate (default 0: inputs leave the node only when an operator turns it on). An INFO
# log record whose body is the example as JSON (:mod:`services.hard_examples`); the region keeps it in a
# bounded table of its own (``tier2_region.telemetry.hard_examples`` states the same names).
HARD_EXAMPLE = "edgecascade.hard_example"  # bool true on a hard-example record
HARD_EXAMPLE_KIND = "edgecascade.hard_example.kind"  # one of HARD_EXAMPLE_KINDS
HARD_EXAMPLE_REQUEST = "request"  # a request-level escalation (low_confidence, answered upstream)
HARD_EXAMPLE_GENERATION = "generation"  # a generation with tokens escalated (the positions in its body)
HARD_EXAMPLE_KINDS = (HARD_EXAMPLE_REQUEST, HARD_EXAMPLE_GENERATION)
UPSTREAM_MODEL = "edgecascade.upstream.model.name"  # the model that answered upstream
UPSTREAM_VERSION = "edgecascade.upstream.model.version"  # its version ("" when the upstream does not say)
HARD_EXAMPLE_CONFIDENCE = "edgecascade.hard_example.confidence"  # the device's confidence (a generation: its mean)
HARD_EXAMPLE_THRESHOLD = "edgecascade.hard_example.threshold"  # the threshold it was judged against

# Values of OUTCOME.
OK = "ok"  # answered here
ERROR = "error"  # the caller got an error (here, or from upstream after forwarding)
FORWARDED = "forwarded"  # answered by the next tier up
# The caller's own mistake (bad input, a model nobody holds, a cancelled call): counted, but not the
# version's fault, so the region leaves it out of a version's requests and errors.
REJECTED = "rejected"
OUTCOMES = (OK, ERROR, FORWARDED, REJECTED)
SHED = "shed"  # a shadow run skipped because the node was busy (shadow work yields first); SHADOW_RUNS only

# Stand-ins a node records instead of what a caller sent, so a caller cannot grow the node's series
# without bound. Neither can be a model name or a version (names start with a letter or digit,
# versions are digits), so neither collides with a real one.
OTHER = "(other)"  # a model name or version beyond the node's bound, or not a valid one
UNRESOLVED = "(unresolved)"  # the call named no version and this node chose none (it went upward or failed first)

# Bucket bounds: latencies from 0.1 ms to 10 s at about 1.5-2x steps (tight enough for a p99
# ratio gate of 1.5), confidences in tenths with the top end split finer (where thresholds sit).
LATENCY_BOUNDS_MS = (
    0.1, 0.2, 0.3, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0, 5.0, 7.5, 10.0, 15.0, 20.0, 30.0, 50.0, 75.0, 100.0,
    150.0, 200.0, 300.0, 500.0, 750.0, 1000.0, 1500.0, 2000.0, 3000.0, 5000.0, 7500.0, 10000.0,
)  # fmt: skip
CONFIDENCE_BOUNDS = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.85, 0.9, 0.95, 0.99)
AGREEMENT_BOUNDS = (0.5, 0.9, 0.99)  # a single-row run agrees wholly (1) or not at all (0); the mean is what counts
DIFFERENCE_BOUNDS = (1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 0.1, 1.0)
