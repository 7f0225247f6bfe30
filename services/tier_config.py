"""The configuration every tier shares.

Sections and their environment variables (``EDGECASCADE_<SECTION>__<KEY>``):

``[server]``
    ``host`` (default ``127.0.0.1``: loopback unless told otherwise), ``port``
    (0 = any free port), ``node_id`` (default ``<tier>-<hostname>``),
    ``max_message_bytes``, ``grace_seconds`` for graceful shutdown,
    ``port_file``: a JSON file written once the node serves, saying where, and
    ``event_loop``: ``auto`` (uvloop where installed), ``uvloop`` or ``asyncio``.
``[repository]``
    ``path`` of the model repository and ``preload`` (load every model at start).
``[upstream]``
    ``address`` (``host:port``) of the next tier up; empty at the top. How every
    call to it is guarded (:mod:`services.rpc.guarded_upstream`): the circuit
    breaker (``breaker_failures`` in a row, or a ``breaker_failure_rate`` over
    ``breaker_window_s`` with at least ``breaker_min_calls``, open it for
    ``breaker_open_s``, doubling up to ``breaker_max_open_s`` while probes fail;
    a timeout of a call given less than ``breaker_min_timeout_s`` is not counted),
    retries of UNAVAILABLE (``retry_attempts``, backoff from
    ``retry_initial_backoff_s`` to ``retry_max_backoff_s``, within a budget of
    ``retry_budget_tokens`` refilled by ``retry_token_ratio`` per answered call),
    and the result cache of its answers (``cache_max_bytes``, 0 = off;
    ``cache_max_entry_bytes``; ``cache_ttl_s``).
``[runtime]``
    ``intra_op_threads`` per onnxruntime run and ``max_concurrent_runs``
    (0 = the cores but one, the event loop's, ÷ intra_op_threads, at least 1);
    their product may not exceed the cores.
``[requests]``
    ``max_timeout_us``, the largest ``timeout`` parameter accepted, and
    ``max_hops``, how many times a request may be forwarded before a node
    refuses it as a loop (FAILED_PRECONDITION naming the route).
``[batching]``
    ``max_batch_size`` (1 turns batching off), ``max_queue_delay_us``,
    ``max_queue_size``, ``priority_levels``, ``default_timeout_us`` (the
    deadline of a request that brings none) and ``inline_run_us`` (batches
    predicted to run within it run on the event loop); a model's metadata may override
    them with ``edgecascade.batching.<key>`` properties.
``[cache]``
    ``memory_budget_bytes`` for loaded models (0 = half of the cgroup limit or
    of the memory available at start).
``[log]``
    ``level`` of the process log.

``[updates]`` (devices and edges)
    ``state_dir`` (keys and enrollment; empty: no enrollment or check-in),
    ``enrollment_token`` or ``enrollment_token_file``, ``check_interval_s``,
    ``jitter``, ``hardware_class``, ``call_timeout_s``, ``transfer_timeout_s`` (the
    deadline of one artifact file's transfer) and ``trusted_root`` (the registry's
    root metadata: set, the node installs its assignments through its updater and
    serves only what it installed).

``[cascade]`` (devices and edges)
    The request-level confidence cascade (:mod:`services.cascade`): ``mode``, the
    ``edgecascade.cascade`` of a request that sends none (``confidence``, the
    default: answers under their threshold go upward; ``off``; ``speculative``,
    which a single inference treats as ``confidence``); ``thresholds``, a list of
    ``model=threshold`` (in [0, 1]) overriding a model version's signed
    ``confidence_threshold`` (a model with neither, and a request without
    ``edgecascade.threshold``, is never escalated); ``outputs``, a list of
    ``model=output`` naming the output whose max probability is the confidence
    (default: the first floating-point output with more than one class). In the
    environment, lists are comma-separated: ``EDGECASCADE_CASCADE__THRESHOLDS=lin=0.8,lm=0.5``.

``[token_cascade]`` (devices and edges)
    How generators cascade token by token (:mod:`services.cascade_generation`):
    ``pairs``, a list of ``device_model=upstream_model`` (beats a model's signed
    ``edgecascade.cascade.upstream_model``; a generator with neither never
    cascades); ``threshold``, the token threshold of a paired model that has none
    from the request, ``[cascade] thresholds`` or its signed metadata; ``signal``,
    ``chosen_prob`` (the device's probability of the token it sampled; default) or
    ``max_prob``; speculative decoding's ``k_min`` and ``k_max`` drafts per block
    (``k + 1`` also stays within the upstream model's ``max_batch_size``) and
    ``draft_cost_ratio`` (draft step ÷ upstream call time, for the adaptive ``k``);
    ``call_timeout_s``, the most one upstream call of a generation may take
    before the generation goes on alone, marked degraded. In the environment:
    ``EDGECASCADE_TOKEN_CASCADE__PAIRS=charlm-device=charlm-edge``.

``[telemetry]`` (devices and edges)
    ``export``: send the node's metrics by OTLP/gRPC (default off), every
    ``interval_s``, each export given up after ``timeout_s`` (retries included), to
    ``endpoint`` (``host:port``; empty = the ``[upstream]`` address: the edge relays
    its devices' metrics to the region). The edge adds the bounds of its relay.
    With export on, ``logs`` (default true) sends anomalies as OTLP logs to the same
    endpoint: errors, fallbacks, requests slower than ``slow_factor`` × their model
    version's running p99 (0 = off) and failed updates, at most ``anomalies_per_s``
    on average and ``anomaly_burst`` at once; ordinary requests are logged at
    ``routine_sample_rate``, raised to ``elevated_sample_rate`` for ``elevated_s``
    after each anomaly. ``hard_examples_rate`` (default 0 = off) is a **privacy
    switch**: above 0, that share of escalated requests and generations — their
    *inputs* (tensors, prompts), the node's answer and the upstream's — leave the
    node as OTLP log records for retraining (:mod:`services.hard_examples`); an
    example over ``hard_examples_max_bytes`` of JSON is dropped and counted; at
    most ``hard_examples_per_s`` (``hard_examples_burst`` at once) are sent.

A tier adds its own sections in its own package (``[registry]`` in
``tier2_region.config``, ``[artifacts]`` in ``tier1_edge.config``); a section
on a tier that does not have it stops start-up as unknown.
"""

from __future__ import annotations

import logging
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

from services.cascade import CascadeSettings
from services.cascade_generation import SIGNAL_CHOSEN, TokenCascadeSettings
from services.circuit_breaker import BreakerSettings
from services.engine.batcher import BatchingConfig
from services.engine.memory import default_budget
from services.errors import ConfigError
from services.event_loops import EVENT_LOOPS
from services.result_cache import ResultCacheSettings
from services.retry_budget import RetrySettings

MIN_CHUNK_BYTES = 1024
# Bounds of [telemetry] hard_examples_max_bytes: an example is one log record's body, held in the node's export
# queue and in the region's store, so it stays well under a message.
MIN_HARD_EXAMPLE_BYTES = 1024
MAX_HARD_EXAMPLE_BYTES = 1024 * 1024
MAX_CHUNK_BYTES = 16 * 1024 * 1024
# Node ids travel in gRPC metadata (the forwarding route) and file names: plain ASCII, no separators.
_NODE_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,127}")


def check_node_id(node_id: str) -> str:
    """Returns ``node_id`` if it is 1-128 ASCII letters, digits, '_', '.' or '-', starting with a letter or digit.

    Raises:
        ConfigError: It is not.
    """
    if not _NODE_ID.fullmatch(node_id):
        raise ConfigError(
            f"[server] node_id {node_id!r} is not valid: use 1-128 ASCII letters, digits, '_', '.' or '-', "
            "starting with a letter or digit"
        )
    return node_id


@dataclass(frozen=True)
class ServerSection:
    """Where and how the node serves."""

    host: str = "127.0.0.1"
    port: int = 0
    node_id: str = ""
    max_message_bytes: int = 64 * 1024 * 1024
    grace_seconds: float = 5.0
    port_file: str = ""
    event_loop: str = "auto"

    def __post_init__(self) -> None:
        if self.event_loop not in EVENT_LOOPS:
            raise ConfigError(f"[server] event_loop must be one of {', '.join(EVENT_LOOPS)}, got {self.event_loop!r}")
        if not 0 <= self.port <= 65535:
            raise ConfigError(f"[server] port must be between 0 and 65535, got {self.port}")
        if self.max_message_bytes < 1024:
            raise ConfigError(f"[server] max_message_bytes must be at least 1024, got {self.max_message_bytes}")
        if self.grace_seconds < 0:
            raise ConfigError(f"[server] grace_seconds must not be negative, got {self.grace_seconds}")
        if self.node_id:
            check_node_id(self.node_id)


@dataclass(frozen=True)
class RepositorySection:
    """The node's model repository."""

    path: Path = Path("models")
    preload: bool = True


@dataclass(frozen=True)
class UpstreamSection:
    """The next tier up, and how calls to it are guarded (see the module docstring)."""

    address: str = ""
    breaker_failures: int = 5
    breaker_failure_rate: float = 0.5
    breaker_min_calls: int = 20
    breaker_window_s: float = 10.0
    breaker_open_s: float = 2.0
    breaker_max_open_s: float = 30.0
    breaker_min_timeout_s: float = 0.05
    retry_attempts: int = 3
    retry_initial_backoff_s: float = 0.02
    retry_max_backoff_s: float = 0.5
    retry_budget_tokens: float = 20.0
    retry_token_ratio: float = 0.1
    cache_max_bytes: int = 8 * 1024 * 1024
    cache_max_entry_bytes: int = 256 * 1024
    cache_ttl_s: float = 60.0

    def __post_init__(self) -> None:
        if self.address and (":" not in self.address or not self.address.rsplit(":", 1)[1].isdigit()):
            raise ConfigError(f"[upstream] address must be host:port, got {self.address!r}")
        for build in (self.breaker, self.retry, self.result_cache):
            try:
                build()
            except ConfigError as exc:
                raise ConfigError(f"[upstream] {exc.message}") from None

    def breaker(self) -> BreakerSettings:
        """The circuit breaker's settings."""
        return BreakerSettings(
            consecutive_failures=self.breaker_failures,
            failure_rate=self.breaker_failure_rate,
            min_calls=self.breaker_min_calls,
            window_s=self.breaker_window_s,
            open_s=self.breaker_open_s,
            max_open_s=self.breaker_max_open_s,
            min_timeout_s=self.breaker_min_timeout_s,
        )

    def retry(self) -> RetrySettings:
        """The retries' settings and budget."""
        return RetrySettings(
            attempts=self.retry_attempts,
            initial_backoff_s=self.retry_initial_backoff_s,
            max_backoff_s=self.retry_max_backoff_s,
            max_tokens=self.retry_budget_tokens,
            token_ratio=self.retry_token_ratio,
        )

    def result_cache(self) -> ResultCacheSettings:
        """The result cache's size and freshness."""
        return ResultCacheSettings(
            max_bytes=self.cache_max_bytes, max_entry_bytes=self.cache_max_entry_bytes, ttl_s=self.cache_ttl_s
        )


@dataclass(frozen=True)
class RuntimeSection:
    """onnxruntime's share of the CPU."""

    intra_op_threads: int = 1
    max_concurrent_runs: int = 0

    def __post_init__(self) -> None:
        cores = os.cpu_count() or 1
        if self.intra_op_threads < 1:
            raise ConfigError(f"[runtime] intra_op_threads must be at least 1, got {self.intra_op_threads}")
        if self.max_concurrent_runs < 0:
            raise ConfigError(f"[runtime] max_concurrent_runs must not be negative, got {self.max_concurrent_runs}")
        if self.intra_op_threads * self.concurrent_runs > cores:
            raise ConfigError(
                f"[runtime] intra_op_threads × max_concurrent_runs = "
                f"{self.intra_op_threads * self.concurrent_runs} exceeds the {cores} cores of this machine"
            )

    @property
    def concurrent_runs(self) -> int:
        """Runs allowed at once, with 0 resolved against the cores less the event loop's.

        The event loop (gRPC, decoding, batching) needs a core of its own: on two cores,
        two runs of a compute-bound model starved it, batches stayed at about 5 rows and
        the node served a third fewer requests than with one run at a time (bench/README.md).
        """
        cores = os.cpu_count() or 1
        return self.max_concurrent_runs or max(1, (cores - 1) // self.intra_op_threads)


@dataclass(frozen=True)
class RequestsSection:
    """Bounds on requests."""

    max_timeout_us: int = 3_600_000_000
    max_hops: int = 4

    def __post_init__(self) -> None:
        if self.max_timeout_us <= 0:
            raise ConfigError(f"[requests] max_timeout_us must be positive, got {self.max_timeout_us}")
        if not 1 <= self.max_hops <= 16:
            raise ConfigError(f"[requests] max_hops must be from 1 to 16, got {self.max_hops}")


@dataclass(frozen=True)
class CacheSection:
    """The model cache."""

    memory_budget_bytes: int = 0

    def __post_init__(self) -> None:
        if self.memory_budget_bytes < 0:
            raise ConfigError(
                "[cache] memory_budget_bytes must be 0 (automatic) or a number of bytes, "
                f"got {self.memory_budget_bytes}"
            )

    @property
    def budget(self) -> int:
        """The budget in bytes, with 0 resolved to half of the memory this node may use."""
        return self.memory_budget_bytes or default_budget()


def check_chunk_bytes(section: str, chunk_bytes: int) -> None:
    """Refuses a streamed-chunk size outside 1 KiB … 16 MiB."""
    if not MIN_CHUNK_BYTES <= chunk_bytes <= MAX_CHUNK_BYTES:
        raise ConfigError(
            f"[{section}] chunk_bytes must be between {MIN_CHUNK_BYTES} and {MAX_CHUNK_BYTES}, got {chunk_bytes}"
        )


@dataclass(frozen=True)
class UpdatesSection:
    """Enrollment and check-in with the region (devices and edges; an edge relays its devices').

    Attributes:
        state_dir: Where the node keeps its keys and enrollment (empty: it neither enrolls nor checks in).
        enrollment_token: The one-time token from ``edgecascade fleet token`` (or ``enrollment_token_file``).
        enrollment_token_file: A file holding the token (read at start; for secrets kept out of config).
        check_interval_s: Seconds between check-ins (the region may ask for another interval).
        jitter: Each wait is the interval times ``1 ± jitter``, so a fleet does not call in together.
        hardware_class: The device class variants are published for; empty = this machine's
            (``cpu-<architecture>``, the class the registry signs by default).
        call_timeout_s: Deadline of one enrollment or check-in call.
        transfer_timeout_s: Deadline of one file's transfer from the upstream's artifact service
            (TUF metadata or a model blob). An upstream that sends too slowly, or never ends, costs
            an update at most this long; the download resumes from what arrived at the next try.
        trusted_root: The registry's root metadata the node trusts (provisioned, never fetched
            on first use). Set, the node installs what it is assigned through its updater and
            serves only what it installed; empty, it checks in and reports but installs nothing.
    """

    state_dir: str = ""
    enrollment_token: str = ""
    enrollment_token_file: str = ""
    trusted_root: str = ""
    check_interval_s: float = 30.0
    jitter: float = 0.1
    hardware_class: str = ""
    call_timeout_s: float = 10.0
    transfer_timeout_s: float = 300.0

    def __post_init__(self) -> None:
        if not 0.1 <= self.check_interval_s <= 86_400:
            raise ConfigError(f"[updates] check_interval_s must be from 0.1 to 86400, got {self.check_interval_s}")
        if not 0 <= self.jitter <= 0.5:
            raise ConfigError(f"[updates] jitter must be from 0 to 0.5, got {self.jitter}")
        if not 0.1 <= self.call_timeout_s <= 600:
            raise ConfigError(f"[updates] call_timeout_s must be from 0.1 to 600, got {self.call_timeout_s}")
        if not 0.1 <= self.transfer_timeout_s <= 86_400:
            raise ConfigError(f"[updates] transfer_timeout_s must be from 0.1 to 86400, got {self.transfer_timeout_s}")
        if self.enrollment_token and self.enrollment_token_file:
            raise ConfigError("[updates] set enrollment_token or enrollment_token_file, not both")
        if len(self.hardware_class) > 64:
            raise ConfigError("[updates] hardware_class must be at most 64 characters")
        if self.trusted_root and not self.state_dir:
            raise ConfigError("[updates] trusted_root needs a state_dir to install into")


@dataclass(frozen=True)
class CascadeSection:
    """The confidence cascade's defaults (see the module docstring)."""

    mode: str = "confidence"
    thresholds: tuple[str, ...] = ()
    outputs: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        self.settings()

    def settings(self) -> CascadeSettings:
        """The cascade's settings.

        Raises:
            ConfigError: A list entry is not ``model=value``, a threshold is not a number in [0, 1], or the mode is
                unknown.
        """
        thresholds: dict[str, float] = {}
        for model, text in _pairs("thresholds", self.thresholds).items():
            try:
                thresholds[model] = float(text)
            except ValueError:
                raise ConfigError(f"[cascade] thresholds: {model}={text!r} is not a number in [0, 1]") from None
        try:
            return CascadeSettings(self.mode, thresholds, _pairs("outputs", self.outputs))
        except ConfigError as exc:
            raise ConfigError(f"[cascade] {exc.message}") from None


def _pairs(key: str, entries: tuple[str, ...]) -> dict[str, str]:
    pairs: dict[str, str] = {}
    for entry in entries:
        model, sep, value = entry.partition("=")
        if not sep or not model.strip() or not value.strip():
            raise ConfigError(f"[cascade] {key}: entries are model=value, got {entry!r}")
        pairs[model.strip()] = value.strip()
    return pairs


@dataclass(frozen=True)
class TokenCascadeSection:
    """How generators cascade token by token and decode speculatively (see the module docstring)."""

    pairs: tuple[str, ...] = ()
    threshold: float = 0.4
    signal: str = SIGNAL_CHOSEN
    k_min: int = 1
    k_max: int = 8
    draft_cost_ratio: float = 0.1
    call_timeout_s: float = 2.0

    def __post_init__(self) -> None:
        self.settings()

    def settings(self) -> TokenCascadeSettings:
        """The token cascade's settings.

        Raises:
            ConfigError: A pair is not ``device_model=upstream_model``, or a value is out of range.
        """
        pairs: dict[str, str] = {}
        for entry in self.pairs:
            model, sep, upstream = entry.partition("=")
            if not sep or not model.strip() or not upstream.strip():
                raise ConfigError(f"[token_cascade] pairs: entries are device_model=upstream_model, got {entry!r}")
            pairs[model.strip()] = upstream.strip()
        try:
            return TokenCascadeSettings(
                pairs=pairs,
                threshold=self.threshold,
                signal=self.signal,
                k_min=self.k_min,
                k_max=self.k_max,
                draft_cost_ratio=self.draft_cost_ratio,
                call_timeout_s=self.call_timeout_s,
            )
        except ValueError as exc:
            raise ConfigError(f"[token_cascade] {exc}") from None


@dataclass(frozen=True)
class TelemetrySection:
    """The node's own metrics, exported by OTLP to its upstream (devices and edges).

    Attributes:
        export: Whether to export at all; off, no exporter is built and nothing is sent.
        interval_s: Seconds between exports (collection and export run in the exporter's own thread).
        timeout_s: Deadline of one export, its retries included; a failed export is counted and dropped
            (with the default cumulative temporality the next export carries what this one lost).
        endpoint: ``host:port`` of the OTLP receiver; empty = the ``[upstream]`` address.
        logs: With ``export``, whether anomalies (and sampled routine records) go as OTLP logs to the same place.
        anomalies_per_s: Anomaly records sent per second on average (a token bucket); beyond, dropped and counted.
        anomaly_burst: Anomaly records sent at once after a quiet spell (the bucket's size).
        slow_factor: A local answer slower than this × its model version's running p99 is an anomaly (0 = never).
        routine_sample_rate: Share of ordinary answers logged as INFO records (0 to 1).
        elevated_sample_rate: That share while the detail is raised after an anomaly (routine_sample_rate to 1;
            each record sent costs the loop some 40 µs in the SDK, so 1.0 on a busy node costs it a share of its CPU).
        elevated_s: How long the detail stays raised after the latest anomaly.
        hard_examples_rate: Share of escalations (requests answered upstream for low confidence, generations
            with escalated tokens) sent as hard examples for retraining (0 to 1; default 0 = off). A privacy
            switch: above 0 the escalated *inputs* leave the node, with its answer and the upstream's.
        hard_examples_max_bytes: The largest example (its JSON body) sent; larger ones are dropped and counted.
        hard_examples_per_s: Hard examples sent per second on average (their own token bucket); beyond, dropped.
        hard_examples_burst: Hard examples sent at once after a quiet spell.
    """

    export: bool = False
    interval_s: float = 10.0
    timeout_s: float = 5.0
    endpoint: str = ""
    logs: bool = True
    anomalies_per_s: float = 1.0
    anomaly_burst: int = 20
    slow_factor: float = 3.0
    routine_sample_rate: float = 0.0
    elevated_sample_rate: float = 0.1
    elevated_s: float = 60.0
    hard_examples_rate: float = 0.0
    hard_examples_max_bytes: int = 64 * 1024
    hard_examples_per_s: float = 1.0
    hard_examples_burst: int = 10

    def __post_init__(self) -> None:
        self._check_logs()
        self._check_hard_examples()
        if not 0.1 <= self.interval_s <= 86_400:
            raise ConfigError(f"[telemetry] interval_s must be from 0.1 to 86400, got {self.interval_s}")
        if not 0.1 <= self.timeout_s <= 600:
            raise ConfigError(f"[telemetry] timeout_s must be from 0.1 to 600, got {self.timeout_s}")
        if self.endpoint and (":" not in self.endpoint or not self.endpoint.rsplit(":", 1)[1].isdigit()):
            raise ConfigError(f"[telemetry] endpoint must be host:port, got {self.endpoint!r}")

    def _check_logs(self) -> None:
        if not 0 < self.anomalies_per_s <= 10_000:
            raise ConfigError(
                f"[telemetry] anomalies_per_s must be above 0 and at most 10000, got {self.anomalies_per_s}"
            )
        if not 1 <= self.anomaly_burst <= 100_000:
            raise ConfigError(f"[telemetry] anomaly_burst must be from 1 to 100000, got {self.anomaly_burst}")
        if self.slow_factor != 0 and not 1 <= self.slow_factor <= 1000:
            raise ConfigError(f"[telemetry] slow_factor must be 0 (off) or from 1 to 1000, got {self.slow_factor}")
        for key in ("routine_sample_rate", "elevated_sample_rate"):
            rate = getattr(self, key)
            if not 0 <= rate <= 1:
                raise ConfigError(f"[telemetry] {key} must be from 0 to 1, got {rate}")
        if self.elevated_sample_rate < self.routine_sample_rate:
            raise ConfigError(
                f"[telemetry] elevated_sample_rate ({self.elevated_sample_rate}) must be at least "
                f"routine_sample_rate ({self.routine_sample_rate}): an anomaly raises the detail, never lowers it"
            )
        if not 0 < self.elevated_s <= 86_400:
            raise ConfigError(f"[telemetry] elevated_s must be above 0 and at most 86400, got {self.elevated_s}")

    def _check_hard_examples(self) -> None:
        if not 0 <= self.hard_examples_rate <= 1:
            raise ConfigError(f"[telemetry] hard_examples_rate must be from 0 to 1, got {self.hard_examples_rate}")
        if not MIN_HARD_EXAMPLE_BYTES <= self.hard_examples_max_bytes <= MAX_HARD_EXAMPLE_BYTES:
            raise ConfigError(
                f"[telemetry] hard_examples_max_bytes must be from {MIN_HARD_EXAMPLE_BYTES} to "
                f"{MAX_HARD_EXAMPLE_BYTES}, got {self.hard_examples_max_bytes}"
            )
        if not 0 < self.hard_examples_per_s <= 1000:
            raise ConfigError(
                f"[telemetry] hard_examples_per_s must be above 0 and at most 1000, got {self.hard_examples_per_s}"
            )
        if not 1 <= self.hard_examples_burst <= 10_000:
            raise ConfigError(
                f"[telemetry] hard_examples_burst must be from 1 to 10000, got {self.hard_examples_burst}"
            )

    @property
    def sends_hard_examples(self) -> bool:
        """Whether the node sends hard examples: it sends logs and ``hard_examples_rate`` is above 0."""
        return self.sends_logs and self.hard_examples_rate > 0

    @property
    def sends_logs(self) -> bool:
        """Whether the node sends OTLP logs: ``export`` and ``logs`` both on."""
        return self.export and self.logs

    def target(self, upstream: str) -> str:
        """Where the node's metrics go: ``endpoint``, else its upstream (empty when there is neither)."""
        return self.endpoint or upstream


@dataclass(frozen=True)
class LogSection:
    """Process logging."""

    level: str = "INFO"

    def __post_init__(self) -> None:
        if logging.getLevelName(self.level.upper()) not in (10, 20, 30, 40, 50):
            raise ConfigError(f"[log] level must be DEBUG, INFO, WARNING, ERROR or CRITICAL, got {self.level!r}")


@dataclass(frozen=True)
class TierConfig:
    """The whole configuration of one tier process."""

    server: ServerSection = field(default_factory=ServerSection)
    repository: RepositorySection = field(default_factory=RepositorySection)
    upstream: UpstreamSection = field(default_factory=UpstreamSection)
    runtime: RuntimeSection = field(default_factory=RuntimeSection)
    requests: RequestsSection = field(default_factory=RequestsSection)
    batching: BatchingConfig = field(default_factory=BatchingConfig)
    cache: CacheSection = field(default_factory=CacheSection)
    log: LogSection = field(default_factory=LogSection)

    def __post_init__(self) -> None:
        if self.requests.max_timeout_us < self.batching.default_timeout_us:
            raise ConfigError("[requests] max_timeout_us must be at least [batching] default_timeout_us")

    def check_chunk_fits(self, section: str, chunk_bytes: int) -> None:
        """Refuses a streamed chunk that would not fit one message (with a few bytes of framing).

        Raises:
            ConfigError: ``chunk_bytes`` is not at least 1 KiB below ``[server] max_message_bytes``.
        """
        if chunk_bytes + 1024 > self.server.max_message_bytes:
            raise ConfigError(
                f"[{section}] chunk_bytes ({chunk_bytes}) must be at least 1 KiB below [server] max_message_bytes "
                f"({self.server.max_message_bytes})"
            )
