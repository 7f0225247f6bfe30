"""The device's thermal component: the monitor wired into the engine, the node's status and its metrics.

Built from the node's context (``[thermal]`` of the :class:`~tier0_device.config.DeviceConfig`):

* **Energy per version.** A run-observer factory is added to the cache's loader before any
  model loads, so every version's runs reach the monitor's accountant: inferences = rows,
  and for a generator tokens = rows too (each row of a decoding step is one token).
* **Limits.** Every :class:`~tier0_device.thermal.policy.ThermalDecision` becomes the engine's
  :class:`~services.engine.throttle.Throttle` (:func:`throttle_for`), put in force with
  ``cache.throttle_to``. Each shrink step halves every model's batch cap and the node's *run
  slots*: the policy's "threads" are shrunk as onnxruntime runs allowed at once (the run pool),
  because a session's intra-op threads are fixed when it is created, and recreating sessions on a
  hot device would cost more than it saves; fewer runs at once is what frees cores. Critical sends
  new work upstream with fallback reason ``thermal``.
* **Status.** ``GetTierInfo`` carries :class:`ThermalStatus` (``tier_info``).
* **Metrics.** Observable instruments read the monitor's snapshot at each collection (names in
  :mod:`services.telemetry_names`): temperature, thermal state, transitions, sensor faults, run
  slots, CPU frequency and utilization, power, and energy, inferences per joule and joules per
  token per model version.

With ``[thermal] enabled = false`` none of this happens and the status says only that.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from opentelemetry.metrics import CallbackOptions, Observation

from protos.edgecascade.v1 import mesh_pb2
from services.engine.batcher import BatchObserver
from services.engine.model_cache import ModelCache
from services.engine.model_repository import ModelEntry
from services.engine.throttle import VARIANT_PROPERTY, Throttle
from services.errors import ConfigError
from services.inference import FallbackReason
from services.rpc.components import NodeContext
from services.rpc.server import ServiceBinding
from services.telemetry_names import (
    CPU_FREQUENCY,
    CPU_UTILIZATION,
    ENERGY,
    FAULT_KIND,
    INFERENCES_PER_JOULE,
    JOULES_PER_TOKEN,
    MODEL_NAME,
    MODEL_VARIANT,
    MODEL_VERSION,
    POWER,
    RUN_SLOTS,
    SENSOR_FAULTS,
    SOURCE,
    STATE,
    TEMPERATURE,
    THERMAL_STATE,
    THERMAL_TRANSITION,
    THERMAL_TRANSITIONS,
)
from tier0_device.thermal.config import ThermalSection
from tier0_device.thermal.energy import VersionEnergy
from tier0_device.thermal.monitor import ThermalMonitor, ThermalSnapshot
from tier0_device.thermal.policy import ThermalDecision, ThermalState
from tier0_device.thermal.sensors import ProcessCpu, Sensors, Source


def throttle_for(decision: ThermalDecision) -> Throttle:
    """The engine limits of a thermal decision (the policy's thread floor is the run pool's slot floor)."""
    return Throttle(
        shrink_steps=decision.shrink_steps,
        batch_floor=decision.batch_floor,
        slot_floor=decision.thread_floor,
        prefer_int8=decision.prefer_int8,
        forward=FallbackReason.THERMAL if decision.forward_new_work else None,
    )


def thermal_settings(context: NodeContext) -> ThermalSection:
    """The ``[thermal]`` section of a device.

    Raises:
        ConfigError: The node's configuration has no ``[thermal]`` section (it is not a device's).
    """
    settings = getattr(context.config, "thermal", None)
    if not isinstance(settings, ThermalSection):
        raise ConfigError(f"the {context.identity.tier} configuration has no [thermal] section")
    return settings


class _VersionRuns:
    """Reports one model version's runs to the monitor (a :class:`~services.engine.batcher.BatchObserver`)."""

    def __init__(self, monitor: ThermalMonitor, name: str, version: str, generator: bool) -> None:
        self._record = monitor.record_run
        self._name = name
        self._version = version
        self._generator = generator

    def queued(self, seconds: float) -> None:
        pass  # waiting costs no energy of the version's own

    def ran(self, rows: int, seconds: float) -> None:
        self._record(self._name, self._version, seconds, rows, rows if self._generator else 0)


class ThermalService:
    """Thermal- and power-aware serving of one device (see the module docstring).

    Args:
        context: The node's context (a device's: its configuration has ``[thermal]``).
        sensors: The platform's sensors (default: sysfs under ``[thermal] sysfs_root``).
        cpu: This process's CPU meter (default: its own CPU time).

    Raises:
        ConfigError: The configuration has no ``[thermal]`` section, or thermal serving is on and
            the node has no model cache to throttle.
    """

    def __init__(self, context: NodeContext, sensors: Sensors | None = None, cpu: ProcessCpu | None = None) -> None:
        self.section = thermal_settings(context)
        self.monitor = ThermalMonitor(self.section, sensors=sensors, cpu=cpu)
        self._variants: dict[tuple[str, str], str] = {}
        self._cache: ModelCache | None = None
        if not self.section.enabled:
            return
        if context.cache is None:
            raise ConfigError("[thermal] enabled needs the node's model cache")
        self._cache = context.cache
        # Before any model loads (the node builds its components first), so every version's runs are counted.
        self._cache.loader.run_observers.append(self._observer)
        if context.meter_provider is not None:
            self._instruments(context)

    @property
    def cache(self) -> ModelCache | None:
        """The engine this component throttles (None while disabled)."""
        return self._cache

    @property
    def bindings(self) -> Sequence[ServiceBinding]:
        """None: the status goes out through ``GetTierInfo`` and the metrics."""
        return []

    async def start(self) -> None:
        """Puts the decision in force now and with every change, and starts polling the sensors."""
        if self._cache is None:
            return
        self.monitor.add_listener(self._apply)
        await self.monitor.start()

    async def stop(self) -> None:
        """Stops polling (the limits in force stay: the node is stopping)."""
        await self.monitor.stop()

    def _apply(self, decision: ThermalDecision) -> None:
        assert self._cache is not None
        self._cache.throttle_to(throttle_for(decision))

    def _observer(self, entry: ModelEntry, generator: bool) -> BatchObserver:
        self._variants[(entry.name, entry.version)] = entry.properties.get(VARIANT_PROPERTY, "")
        return _VersionRuns(self.monitor, entry.name, entry.version, generator)

    # --- GetTierInfo -------------------------------------------------------------------------------------------

    def tier_info(self, response: mesh_pb2.GetTierInfoResponse) -> None:
        """Adds the device's thermal state, limits in force and energy to the node's answer."""
        status = response.thermal
        status.SetInParent()  # present even when disabled: a device says so, an edge says nothing
        status.enabled = self.section.enabled
        if self._cache is None:
            return
        snap = self.monitor.snapshot()
        section, cache = self.section, self._cache
        status.device_class = snap.device_class
        status.state = snap.state.value
        status.soft_limit_c = section.soft_limit_c
        status.hard_limit_c = section.hard_limit_c
        status.hysteresis_c = section.hysteresis_c
        if snap.temperature is not None:
            status.temperature_c = snap.temperature.value
            status.temperature_source = snap.temperature.source.value
            status.temperature_origin = snap.temperature.origin
        power = snap.energy.power
        if power is not None:
            status.power_watts = power.value
            status.power_source = power.source.value
        if snap.frequency is not None:
            status.frequency_mhz = snap.frequency.value
        if snap.utilization is not None:
            status.utilization = snap.utilization.value
        throttle = cache.throttle
        status.shrink_steps = throttle.shrink_steps
        status.run_slots = cache.pool.limit
        status.configured_run_slots = cache.pool.slots
        status.prefer_int8 = throttle.prefer_int8
        status.forwarding = throttle.forward is not None
        for model in cache.loaded():
            status.batch_caps.add(
                name=model.name,
                version=model.version,
                rows=model.batcher.max_rows,
                configured_rows=model.batcher.config.max_batch_size,
            )
        status.faults.update(snap.faults)
        status.faults_by_sensor.update(snap.faults_by_sensor)
        status.transitions.update(snap.transitions)
        status.polls = snap.polls
        status.ignored_readings = snap.ignored_readings
        energy = snap.energy
        status.joules = energy.joules
        status.measured_joules = energy.measured_joules
        status.estimated_joules = energy.estimated_joules
        status.idle_joules = energy.idle_joules
        for v in energy.versions:
            row = status.energy.add(
                name=v.model,
                version=v.version,
                variant=self._variants.get((v.model, v.version), ""),
                joules=v.joules,
                measured_joules=v.measured_joules,
                estimated_joules=v.estimated_joules,
                compute_s=v.compute_s,
                inferences=v.inferences,
                tokens=v.tokens,
                source=v.source.value if v.source is not None else "",
            )
            if v.inferences_per_joule is not None:
                row.inferences_per_joule = v.inferences_per_joule
            if v.joules_per_token is not None:
                row.joules_per_token = v.joules_per_token

    # --- metrics -----------------------------------------------------------------------------------------------

    def _instruments(self, context: NodeContext) -> None:
        assert context.meter_provider is not None
        meter = context.meter_provider.get_meter("edgecascade.thermal")
        meter.create_observable_gauge(
            TEMPERATURE, [self._observe_temperature], unit="Cel", description="The hottest valid thermal zone"
        )
        meter.create_observable_gauge(
            THERMAL_STATE, [self._observe_state], unit="1", description="1 for the device's thermal state now"
        )
        meter.create_observable_counter(
            THERMAL_TRANSITIONS, [self._observe_transitions], unit="{transition}", description="Thermal state changes"
        )
        meter.create_observable_counter(
            SENSOR_FAULTS, [self._observe_faults], unit="{value}", description="Sensor values left out, by kind"
        )
        meter.create_observable_gauge(
            RUN_SLOTS, [self._observe_slots], unit="{run}", description="onnxruntime runs allowed at once now"
        )
        meter.create_observable_gauge(
            CPU_FREQUENCY, [self._observe_frequency], unit="MHz", description="Mean current frequency of the cores"
        )
        meter.create_observable_gauge(
            CPU_UTILIZATION, [self._observe_utilization], unit="1", description="This process's share of its cores"
        )
        meter.create_observable_gauge(
            POWER, [self._observe_power], unit="W", description="The device's mean power over the latest period"
        )
        meter.create_observable_counter(
            ENERGY, [self._observe_energy], unit="J", description="Energy given to each model version"
        )
        meter.create_observable_gauge(
            INFERENCES_PER_JOULE,
            [self._observe_inferences_per_joule],
            unit="{inference}/J",
            description="Inferences per joule of each model version",
        )
        meter.create_observable_gauge(
            JOULES_PER_TOKEN,
            [self._observe_joules_per_token],
            unit="J/{token}",
            description="Joules per generated token of each generator version",
        )

    def _model(self, v: VersionEnergy) -> dict[str, str]:
        return {
            MODEL_NAME: v.model,
            MODEL_VERSION: v.version,
            MODEL_VARIANT: self._variants.get((v.model, v.version), ""),
        }

    def _snapshot(self) -> ThermalSnapshot:
        # Read from the metric reader's thread: the snapshot copies what it reports (see ThermalMonitor.snapshot).
        return self.monitor.snapshot()

    def _observe_temperature(self, options: CallbackOptions) -> Iterable[Observation]:
        t = self._snapshot().temperature
        return [] if t is None else [Observation(t.value, {SOURCE: t.source.value})]

    def _observe_state(self, options: CallbackOptions) -> Iterable[Observation]:
        now = self.monitor.decision.state
        return [Observation(int(state is now), {STATE: state.value}) for state in ThermalState]

    def _observe_transitions(self, options: CallbackOptions) -> Iterable[Observation]:
        return [
            Observation(count, {THERMAL_TRANSITION: label}) for label, count in self._snapshot().transitions.items()
        ]

    def _observe_faults(self, options: CallbackOptions) -> Iterable[Observation]:
        return [Observation(count, {FAULT_KIND: kind}) for kind, count in self._snapshot().faults.items()]

    def _observe_slots(self, options: CallbackOptions) -> Iterable[Observation]:
        return [] if self._cache is None else [Observation(self._cache.pool.limit)]

    def _observe_frequency(self, options: CallbackOptions) -> Iterable[Observation]:
        f = self._snapshot().frequency
        return [] if f is None else [Observation(f.value)]

    def _observe_utilization(self, options: CallbackOptions) -> Iterable[Observation]:
        u = self._snapshot().utilization
        return [] if u is None else [Observation(u.value)]

    def _observe_power(self, options: CallbackOptions) -> Iterable[Observation]:
        p = self._snapshot().energy.power
        return [] if p is None else [Observation(p.value, {SOURCE: p.source.value})]

    def _observe_energy(self, options: CallbackOptions) -> Iterable[Observation]:
        # A version's series of a source appears once a period of that source gave it energy.
        return [
            Observation(joules, {**self._model(v), SOURCE: source.value})
            for v in self._snapshot().energy.versions
            for source, joules in ((Source.MEASURED, v.measured_joules), (Source.ESTIMATED, v.estimated_joules))
            if joules > 0
        ]

    def _observe_inferences_per_joule(self, options: CallbackOptions) -> Iterable[Observation]:
        return [
            Observation(v.inferences_per_joule, self._model(v))
            for v in self._snapshot().energy.versions
            if v.inferences_per_joule is not None
        ]

    def _observe_joules_per_token(self, options: CallbackOptions) -> Iterable[Observation]:
        return [
            Observation(v.joules_per_token, self._model(v))
            for v in self._snapshot().energy.versions
            if v.joules_per_token is not None
        ]
