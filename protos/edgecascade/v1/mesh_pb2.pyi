from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Tier(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    TIER_UNSPECIFIED: _ClassVar[Tier]
    TIER_DEVICE: _ClassVar[Tier]
    TIER_EDGE: _ClassVar[Tier]
    TIER_REGION: _ClassVar[Tier]
TIER_UNSPECIFIED: Tier
TIER_DEVICE: Tier
TIER_EDGE: Tier
TIER_REGION: Tier

class GetTierInfoRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class HeldModel(_message.Message):
    __slots__ = ("name", "version", "state", "reason", "footprint_bytes", "footprint_measured", "queue_depth", "shed")
    class ShedEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: int
        def __init__(self, key: _Optional[str] = ..., value: _Optional[int] = ...) -> None: ...
    NAME_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    FOOTPRINT_BYTES_FIELD_NUMBER: _ClassVar[int]
    FOOTPRINT_MEASURED_FIELD_NUMBER: _ClassVar[int]
    QUEUE_DEPTH_FIELD_NUMBER: _ClassVar[int]
    SHED_FIELD_NUMBER: _ClassVar[int]
    name: str
    version: str
    state: str
    reason: str
    footprint_bytes: int
    footprint_measured: bool
    queue_depth: int
    shed: _containers.ScalarMap[str, int]
    def __init__(self, name: _Optional[str] = ..., version: _Optional[str] = ..., state: _Optional[str] = ..., reason: _Optional[str] = ..., footprint_bytes: _Optional[int] = ..., footprint_measured: _Optional[bool] = ..., queue_depth: _Optional[int] = ..., shed: _Optional[_Mapping[str, int]] = ...) -> None: ...

class CacheStatus(_message.Message):
    __slots__ = ("budget_bytes", "used_bytes", "hits", "misses", "loads", "evictions", "refusals")
    BUDGET_BYTES_FIELD_NUMBER: _ClassVar[int]
    USED_BYTES_FIELD_NUMBER: _ClassVar[int]
    HITS_FIELD_NUMBER: _ClassVar[int]
    MISSES_FIELD_NUMBER: _ClassVar[int]
    LOADS_FIELD_NUMBER: _ClassVar[int]
    EVICTIONS_FIELD_NUMBER: _ClassVar[int]
    REFUSALS_FIELD_NUMBER: _ClassVar[int]
    budget_bytes: int
    used_bytes: int
    hits: int
    misses: int
    loads: int
    evictions: int
    refusals: int
    def __init__(self, budget_bytes: _Optional[int] = ..., used_bytes: _Optional[int] = ..., hits: _Optional[int] = ..., misses: _Optional[int] = ..., loads: _Optional[int] = ..., evictions: _Optional[int] = ..., refusals: _Optional[int] = ...) -> None: ...

class ArtifactCacheStatus(_message.Message):
    __slots__ = ("max_bytes", "used_bytes", "blobs", "in_flight_bytes", "hits", "misses", "evictions", "evicted_bytes", "too_large")
    MAX_BYTES_FIELD_NUMBER: _ClassVar[int]
    USED_BYTES_FIELD_NUMBER: _ClassVar[int]
    BLOBS_FIELD_NUMBER: _ClassVar[int]
    IN_FLIGHT_BYTES_FIELD_NUMBER: _ClassVar[int]
    HITS_FIELD_NUMBER: _ClassVar[int]
    MISSES_FIELD_NUMBER: _ClassVar[int]
    EVICTIONS_FIELD_NUMBER: _ClassVar[int]
    EVICTED_BYTES_FIELD_NUMBER: _ClassVar[int]
    TOO_LARGE_FIELD_NUMBER: _ClassVar[int]
    max_bytes: int
    used_bytes: int
    blobs: int
    in_flight_bytes: int
    hits: int
    misses: int
    evictions: int
    evicted_bytes: int
    too_large: int
    def __init__(self, max_bytes: _Optional[int] = ..., used_bytes: _Optional[int] = ..., blobs: _Optional[int] = ..., in_flight_bytes: _Optional[int] = ..., hits: _Optional[int] = ..., misses: _Optional[int] = ..., evictions: _Optional[int] = ..., evicted_bytes: _Optional[int] = ..., too_large: _Optional[int] = ...) -> None: ...

class GetTierInfoResponse(_message.Message):
    __slots__ = ("tier", "tier_name", "node_id", "version", "upstream", "models", "cache", "artifact_cache", "updates", "upstream_status", "thermal")
    TIER_FIELD_NUMBER: _ClassVar[int]
    TIER_NAME_FIELD_NUMBER: _ClassVar[int]
    NODE_ID_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    UPSTREAM_FIELD_NUMBER: _ClassVar[int]
    MODELS_FIELD_NUMBER: _ClassVar[int]
    CACHE_FIELD_NUMBER: _ClassVar[int]
    ARTIFACT_CACHE_FIELD_NUMBER: _ClassVar[int]
    UPDATES_FIELD_NUMBER: _ClassVar[int]
    UPSTREAM_STATUS_FIELD_NUMBER: _ClassVar[int]
    THERMAL_FIELD_NUMBER: _ClassVar[int]
    tier: Tier
    tier_name: str
    node_id: str
    version: str
    upstream: str
    models: _containers.RepeatedCompositeFieldContainer[HeldModel]
    cache: CacheStatus
    artifact_cache: ArtifactCacheStatus
    updates: UpdateStatus
    upstream_status: UpstreamStatus
    thermal: ThermalStatus
    def __init__(self, tier: _Optional[_Union[Tier, str]] = ..., tier_name: _Optional[str] = ..., node_id: _Optional[str] = ..., version: _Optional[str] = ..., upstream: _Optional[str] = ..., models: _Optional[_Iterable[_Union[HeldModel, _Mapping]]] = ..., cache: _Optional[_Union[CacheStatus, _Mapping]] = ..., artifact_cache: _Optional[_Union[ArtifactCacheStatus, _Mapping]] = ..., updates: _Optional[_Union[UpdateStatus, _Mapping]] = ..., upstream_status: _Optional[_Union[UpstreamStatus, _Mapping]] = ..., thermal: _Optional[_Union[ThermalStatus, _Mapping]] = ...) -> None: ...

class ThermalStatus(_message.Message):
    __slots__ = ("enabled", "device_class", "state", "temperature_c", "temperature_source", "temperature_origin", "power_watts", "power_source", "frequency_mhz", "utilization", "shrink_steps", "run_slots", "configured_run_slots", "batch_caps", "prefer_int8", "forwarding", "faults", "faults_by_sensor", "transitions", "polls", "ignored_readings", "soft_limit_c", "hard_limit_c", "hysteresis_c", "joules", "measured_joules", "estimated_joules", "idle_joules", "energy")
    class FaultsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: int
        def __init__(self, key: _Optional[str] = ..., value: _Optional[int] = ...) -> None: ...
    class FaultsBySensorEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: int
        def __init__(self, key: _Optional[str] = ..., value: _Optional[int] = ...) -> None: ...
    class TransitionsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: int
        def __init__(self, key: _Optional[str] = ..., value: _Optional[int] = ...) -> None: ...
    ENABLED_FIELD_NUMBER: _ClassVar[int]
    DEVICE_CLASS_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    TEMPERATURE_C_FIELD_NUMBER: _ClassVar[int]
    TEMPERATURE_SOURCE_FIELD_NUMBER: _ClassVar[int]
    TEMPERATURE_ORIGIN_FIELD_NUMBER: _ClassVar[int]
    POWER_WATTS_FIELD_NUMBER: _ClassVar[int]
    POWER_SOURCE_FIELD_NUMBER: _ClassVar[int]
    FREQUENCY_MHZ_FIELD_NUMBER: _ClassVar[int]
    UTILIZATION_FIELD_NUMBER: _ClassVar[int]
    SHRINK_STEPS_FIELD_NUMBER: _ClassVar[int]
    RUN_SLOTS_FIELD_NUMBER: _ClassVar[int]
    CONFIGURED_RUN_SLOTS_FIELD_NUMBER: _ClassVar[int]
    BATCH_CAPS_FIELD_NUMBER: _ClassVar[int]
    PREFER_INT8_FIELD_NUMBER: _ClassVar[int]
    FORWARDING_FIELD_NUMBER: _ClassVar[int]
    FAULTS_FIELD_NUMBER: _ClassVar[int]
    FAULTS_BY_SENSOR_FIELD_NUMBER: _ClassVar[int]
    TRANSITIONS_FIELD_NUMBER: _ClassVar[int]
    POLLS_FIELD_NUMBER: _ClassVar[int]
    IGNORED_READINGS_FIELD_NUMBER: _ClassVar[int]
    SOFT_LIMIT_C_FIELD_NUMBER: _ClassVar[int]
    HARD_LIMIT_C_FIELD_NUMBER: _ClassVar[int]
    HYSTERESIS_C_FIELD_NUMBER: _ClassVar[int]
    JOULES_FIELD_NUMBER: _ClassVar[int]
    MEASURED_JOULES_FIELD_NUMBER: _ClassVar[int]
    ESTIMATED_JOULES_FIELD_NUMBER: _ClassVar[int]
    IDLE_JOULES_FIELD_NUMBER: _ClassVar[int]
    ENERGY_FIELD_NUMBER: _ClassVar[int]
    enabled: bool
    device_class: str
    state: str
    temperature_c: float
    temperature_source: str
    temperature_origin: str
    power_watts: float
    power_source: str
    frequency_mhz: float
    utilization: float
    shrink_steps: int
    run_slots: int
    configured_run_slots: int
    batch_caps: _containers.RepeatedCompositeFieldContainer[BatchCap]
    prefer_int8: bool
    forwarding: bool
    faults: _containers.ScalarMap[str, int]
    faults_by_sensor: _containers.ScalarMap[str, int]
    transitions: _containers.ScalarMap[str, int]
    polls: int
    ignored_readings: int
    soft_limit_c: float
    hard_limit_c: float
    hysteresis_c: float
    joules: float
    measured_joules: float
    estimated_joules: float
    idle_joules: float
    energy: _containers.RepeatedCompositeFieldContainer[VersionEnergy]
    def __init__(self, enabled: _Optional[bool] = ..., device_class: _Optional[str] = ..., state: _Optional[str] = ..., temperature_c: _Optional[float] = ..., temperature_source: _Optional[str] = ..., temperature_origin: _Optional[str] = ..., power_watts: _Optional[float] = ..., power_source: _Optional[str] = ..., frequency_mhz: _Optional[float] = ..., utilization: _Optional[float] = ..., shrink_steps: _Optional[int] = ..., run_slots: _Optional[int] = ..., configured_run_slots: _Optional[int] = ..., batch_caps: _Optional[_Iterable[_Union[BatchCap, _Mapping]]] = ..., prefer_int8: _Optional[bool] = ..., forwarding: _Optional[bool] = ..., faults: _Optional[_Mapping[str, int]] = ..., faults_by_sensor: _Optional[_Mapping[str, int]] = ..., transitions: _Optional[_Mapping[str, int]] = ..., polls: _Optional[int] = ..., ignored_readings: _Optional[int] = ..., soft_limit_c: _Optional[float] = ..., hard_limit_c: _Optional[float] = ..., hysteresis_c: _Optional[float] = ..., joules: _Optional[float] = ..., measured_joules: _Optional[float] = ..., estimated_joules: _Optional[float] = ..., idle_joules: _Optional[float] = ..., energy: _Optional[_Iterable[_Union[VersionEnergy, _Mapping]]] = ...) -> None: ...

class BatchCap(_message.Message):
    __slots__ = ("name", "version", "rows", "configured_rows")
    NAME_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    ROWS_FIELD_NUMBER: _ClassVar[int]
    CONFIGURED_ROWS_FIELD_NUMBER: _ClassVar[int]
    name: str
    version: str
    rows: int
    configured_rows: int
    def __init__(self, name: _Optional[str] = ..., version: _Optional[str] = ..., rows: _Optional[int] = ..., configured_rows: _Optional[int] = ...) -> None: ...

class VersionEnergy(_message.Message):
    __slots__ = ("name", "version", "variant", "joules", "measured_joules", "estimated_joules", "compute_s", "inferences", "tokens", "inferences_per_joule", "joules_per_token", "source")
    NAME_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    VARIANT_FIELD_NUMBER: _ClassVar[int]
    JOULES_FIELD_NUMBER: _ClassVar[int]
    MEASURED_JOULES_FIELD_NUMBER: _ClassVar[int]
    ESTIMATED_JOULES_FIELD_NUMBER: _ClassVar[int]
    COMPUTE_S_FIELD_NUMBER: _ClassVar[int]
    INFERENCES_FIELD_NUMBER: _ClassVar[int]
    TOKENS_FIELD_NUMBER: _ClassVar[int]
    INFERENCES_PER_JOULE_FIELD_NUMBER: _ClassVar[int]
    JOULES_PER_TOKEN_FIELD_NUMBER: _ClassVar[int]
    SOURCE_FIELD_NUMBER: _ClassVar[int]
    name: str
    version: str
    variant: str
    joules: float
    measured_joules: float
    estimated_joules: float
    compute_s: float
    inferences: int
    tokens: int
    inferences_per_joule: float
    joules_per_token: float
    source: str
    def __init__(self, name: _Optional[str] = ..., version: _Optional[str] = ..., variant: _Optional[str] = ..., joules: _Optional[float] = ..., measured_joules: _Optional[float] = ..., estimated_joules: _Optional[float] = ..., compute_s: _Optional[float] = ..., inferences: _Optional[int] = ..., tokens: _Optional[int] = ..., inferences_per_joule: _Optional[float] = ..., joules_per_token: _Optional[float] = ..., source: _Optional[str] = ...) -> None: ...

class UpstreamStatus(_message.Message):
    __slots__ = ("address", "breaker_state", "breaker_opened", "breaker_rejected", "breaker_failures", "breaker_successes", "breaker_retry_in_s", "last_failure", "retries", "retries_refused", "cache_hits", "cache_misses", "cache_bytes", "cache_entries")
    ADDRESS_FIELD_NUMBER: _ClassVar[int]
    BREAKER_STATE_FIELD_NUMBER: _ClassVar[int]
    BREAKER_OPENED_FIELD_NUMBER: _ClassVar[int]
    BREAKER_REJECTED_FIELD_NUMBER: _ClassVar[int]
    BREAKER_FAILURES_FIELD_NUMBER: _ClassVar[int]
    BREAKER_SUCCESSES_FIELD_NUMBER: _ClassVar[int]
    BREAKER_RETRY_IN_S_FIELD_NUMBER: _ClassVar[int]
    LAST_FAILURE_FIELD_NUMBER: _ClassVar[int]
    RETRIES_FIELD_NUMBER: _ClassVar[int]
    RETRIES_REFUSED_FIELD_NUMBER: _ClassVar[int]
    CACHE_HITS_FIELD_NUMBER: _ClassVar[int]
    CACHE_MISSES_FIELD_NUMBER: _ClassVar[int]
    CACHE_BYTES_FIELD_NUMBER: _ClassVar[int]
    CACHE_ENTRIES_FIELD_NUMBER: _ClassVar[int]
    address: str
    breaker_state: str
    breaker_opened: int
    breaker_rejected: int
    breaker_failures: int
    breaker_successes: int
    breaker_retry_in_s: float
    last_failure: str
    retries: int
    retries_refused: int
    cache_hits: int
    cache_misses: int
    cache_bytes: int
    cache_entries: int
    def __init__(self, address: _Optional[str] = ..., breaker_state: _Optional[str] = ..., breaker_opened: _Optional[int] = ..., breaker_rejected: _Optional[int] = ..., breaker_failures: _Optional[int] = ..., breaker_successes: _Optional[int] = ..., breaker_retry_in_s: _Optional[float] = ..., last_failure: _Optional[str] = ..., retries: _Optional[int] = ..., retries_refused: _Optional[int] = ..., cache_hits: _Optional[int] = ..., cache_misses: _Optional[int] = ..., cache_bytes: _Optional[int] = ..., cache_entries: _Optional[int] = ...) -> None: ...

class UpdateStatus(_message.Message):
    __slots__ = ("enrolled", "installs", "check_ins", "failed_check_ins", "last_check_in_age_s", "installed", "desired", "last_error")
    ENROLLED_FIELD_NUMBER: _ClassVar[int]
    INSTALLS_FIELD_NUMBER: _ClassVar[int]
    CHECK_INS_FIELD_NUMBER: _ClassVar[int]
    FAILED_CHECK_INS_FIELD_NUMBER: _ClassVar[int]
    LAST_CHECK_IN_AGE_S_FIELD_NUMBER: _ClassVar[int]
    INSTALLED_FIELD_NUMBER: _ClassVar[int]
    DESIRED_FIELD_NUMBER: _ClassVar[int]
    LAST_ERROR_FIELD_NUMBER: _ClassVar[int]
    enrolled: bool
    installs: bool
    check_ins: int
    failed_check_ins: int
    last_check_in_age_s: float
    installed: _containers.RepeatedCompositeFieldContainer[InstalledModel]
    desired: _containers.RepeatedCompositeFieldContainer[DesiredVersion]
    last_error: str
    def __init__(self, enrolled: _Optional[bool] = ..., installs: _Optional[bool] = ..., check_ins: _Optional[int] = ..., failed_check_ins: _Optional[int] = ..., last_check_in_age_s: _Optional[float] = ..., installed: _Optional[_Iterable[_Union[InstalledModel, _Mapping]]] = ..., desired: _Optional[_Iterable[_Union[DesiredVersion, _Mapping]]] = ..., last_error: _Optional[str] = ...) -> None: ...

class InstalledModel(_message.Message):
    __slots__ = ("name", "version", "variant", "state", "last_error", "shadow")
    NAME_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    VARIANT_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    LAST_ERROR_FIELD_NUMBER: _ClassVar[int]
    SHADOW_FIELD_NUMBER: _ClassVar[int]
    name: str
    version: str
    variant: str
    state: str
    last_error: str
    shadow: bool
    def __init__(self, name: _Optional[str] = ..., version: _Optional[str] = ..., variant: _Optional[str] = ..., state: _Optional[str] = ..., last_error: _Optional[str] = ..., shadow: _Optional[bool] = ...) -> None: ...

class DesiredVersion(_message.Message):
    __slots__ = ("name", "version", "variant")
    NAME_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    VARIANT_FIELD_NUMBER: _ClassVar[int]
    name: str
    version: str
    variant: str
    def __init__(self, name: _Optional[str] = ..., version: _Optional[str] = ..., variant: _Optional[str] = ...) -> None: ...
