"""The thermal policy: a state machine over temperature readings, with hysteresis.

States and what the engine does in each (:class:`ThermalDecision`):

* ``normal`` — at or below the soft limit: nothing changes.
* ``hot`` — above the soft limit: each period above it halves the batch cap and the onnxruntime
  threads once more (down to their floors), and the int8 variant is preferred where one is installed.
  Between the soft limit and the soft limit minus the hysteresis the caps hold where they are.
* ``critical`` — above the hard limit: new work goes upstream (fallback reason ``thermal``); what
  cannot go up is served locally at the floors.

The node returns to ``normal`` only below ``soft_limit_c - hysteresis_c``, and from ``critical`` to
``hot`` only below ``hard_limit_c - hysteresis_c``, so a temperature hovering at a limit does not
flap. A reading of ``normal`` restores the caps at once: the device is cool again.

**No reading.** None (no valid sensor value this period) — or a value that is not finite or outside
the plausible range — never moves the state by itself: the last state is kept. A node that has had
no valid reading for ``stale_periods`` periods in a row relaxes one level (``critical`` → ``hot``,
then ``hot`` → ``normal`` after as many again), as a node left alone cools down. Holding the last
state forever would let a dead sensor forward all of a device's work upstream for good; the kernel's
own thermal throttling still protects the hardware meanwhile. ``stale_periods = 0`` keeps the last
state forever.

Every transition is logged once to ``edgecascade.thermal`` and counted.
"""

from __future__ import annotations

import logging
import math
from collections import Counter
from dataclasses import dataclass
from enum import StrEnum

from services.engine.throttle import Throttle
from services.errors import ConfigError

log = logging.getLogger("edgecascade.thermal")

# Halvings after which every cap is at its floor: [batching] max_batch_size is at most 4096 = 2**12.
MAX_SHRINK_STEPS = 12


class ThermalState(StrEnum):
    """The device's thermal state (the value is its label in logs and metrics)."""

    NORMAL = "normal"
    SOFT = "hot"
    HARD = "critical"


class TransitionReason(StrEnum):
    """What moved the state."""

    TEMPERATURE = "temperature"
    NO_READING = "no_reading"


@dataclass(frozen=True)
class ThermalLimits:
    """The policy's settings for one device class (see the module docstring).

    Raises:
        ConfigError: The limits are out of order or a value out of range (messages name the ``[thermal]`` key).
    """

    soft_limit_c: float = 80.0
    hard_limit_c: float = 95.0
    hysteresis_c: float = 5.0
    min_plausible_c: float = -40.0
    max_plausible_c: float = 150.0
    batch_floor: int = 1
    thread_floor: int = 1
    stale_periods: int = 30

    def __post_init__(self) -> None:
        for key in ("soft_limit_c", "hard_limit_c", "hysteresis_c", "min_plausible_c", "max_plausible_c"):
            if not math.isfinite(getattr(self, key)):
                raise ConfigError(f"{key} must be a finite number of degrees Celsius, got {getattr(self, key)}")
        if not self.min_plausible_c < self.soft_limit_c < self.hard_limit_c < self.max_plausible_c:
            raise ConfigError(
                f"the limits must rise min_plausible_c < soft_limit_c < hard_limit_c < max_plausible_c, got "
                f"{self.min_plausible_c} < {self.soft_limit_c} < {self.hard_limit_c} < {self.max_plausible_c}"
            )
        if not self.hysteresis_c > 0:
            raise ConfigError(
                f"hysteresis_c must be above 0 (0 lets a node flap at the limit), got {self.hysteresis_c}"
            )
        if self.soft_limit_c - self.hysteresis_c <= self.min_plausible_c:
            raise ConfigError(
                f"soft_limit_c - hysteresis_c ({self.soft_limit_c - self.hysteresis_c}) must be above "
                f"min_plausible_c ({self.min_plausible_c}), or a hot node could never cool back to normal: "
                "lower hysteresis_c"
            )
        if not 1 <= self.batch_floor <= 4096:
            raise ConfigError(f"batch_floor must be from 1 to 4096, got {self.batch_floor}")
        if not 1 <= self.thread_floor <= 256:
            raise ConfigError(f"thread_floor must be from 1 to 256, got {self.thread_floor}")
        if not 0 <= self.stale_periods <= 1_000_000:
            raise ConfigError(
                f"stale_periods must be from 0 (keep the last state) to 1000000, got {self.stale_periods}"
            )


@dataclass(frozen=True)
class ThermalDecision:
    """What the engine should do now.

    Attributes:
        state: The thermal state.
        shrink_steps: Halvings of the batch cap and threads in force (0 in ``normal``).
        batch_floor: The smallest batch cap.
        thread_floor: The fewest onnxruntime threads.
        prefer_int8: Serve a model's int8 variant where one is installed.
        forward_new_work: Send new work upstream (fallback reason ``thermal``,
            :attr:`services.inference.FallbackReason.THERMAL`); serve
            locally only what cannot go up.
    """

    state: ThermalState = ThermalState.NORMAL
    shrink_steps: int = 0
    batch_floor: int = 1
    thread_floor: int = 1
    prefer_int8: bool = False
    forward_new_work: bool = False

    @property
    def batch_factor(self) -> float:
        """The share of the configured batch cap in force (1 in ``normal``)."""
        return 0.5**self.shrink_steps

    def batch_cap(self, configured: int) -> int:
        """The batch cap in force for a model configured with ``configured`` (never above it)."""
        return self._limits().rows(configured)

    def thread_cap(self, configured: int) -> int:
        """The run slots in force for a pool configured with ``configured`` (never above it)."""
        return self._limits().slots(configured)

    def _limits(self) -> Throttle:
        # The engine's own arithmetic, so that what is reported is what the engine applies.
        return Throttle(shrink_steps=self.shrink_steps, batch_floor=self.batch_floor, slot_floor=self.thread_floor)


@dataclass(frozen=True)
class ThermalTransition:
    """One change of state.

    Attributes:
        previous: The state left.
        state: The state entered.
        reason: What moved it.
        temperature_c: The reading that moved it (None when the lack of readings did).
    """

    previous: ThermalState
    state: ThermalState
    reason: TransitionReason
    temperature_c: float | None

    @property
    def label(self) -> str:
        """``previous->state``, its counter's label."""
        return f"{self.previous}->{self.state}"


@dataclass(frozen=True)
class ThermalUpdate:
    """The outcome of one reading: the decision now in force and the transition it caused, if any."""

    decision: ThermalDecision
    transition: ThermalTransition | None = None


class ThermalPolicy:
    """The thermal state machine (see the module docstring).

    Args:
        limits: The device class's limits.
    """

    def __init__(self, limits: ThermalLimits) -> None:
        self.limits = limits
        self._state = ThermalState.NORMAL
        self._steps = 0
        self._stale = 0
        self._decision = self._decide()
        self.transitions: Counter[str] = Counter()
        self.ignored_readings = 0

    @property
    def decision(self) -> ThermalDecision:
        """The decision in force."""
        return self._decision

    @property
    def state(self) -> ThermalState:
        """The state in force."""
        return self._state

    def update(self, celsius: float | None) -> ThermalUpdate:
        """Feeds one period's temperature (None: no valid reading) and returns what is now in force."""
        limits = self.limits
        if celsius is None or not (
            math.isfinite(celsius) and limits.min_plausible_c <= celsius <= limits.max_plausible_c
        ):
            self.ignored_readings += 1
            return self._no_reading()
        self._stale = 0
        target = self._target(celsius)
        previous = self._state
        if target is ThermalState.HARD:
            self._steps = MAX_SHRINK_STEPS
        elif target is ThermalState.NORMAL:
            self._steps = 0
        elif celsius > limits.soft_limit_c and previous is not ThermalState.HARD:
            self._steps = min(MAX_SHRINK_STEPS, self._steps + 1)
        return self._enter(target, TransitionReason.TEMPERATURE, celsius)

    def _target(self, celsius: float) -> ThermalState:
        limits = self.limits
        if celsius > limits.hard_limit_c:
            return ThermalState.HARD
        if celsius < limits.soft_limit_c - limits.hysteresis_c:
            return ThermalState.NORMAL
        if self._state is ThermalState.HARD:
            return ThermalState.HARD if celsius >= limits.hard_limit_c - limits.hysteresis_c else ThermalState.SOFT
        if self._state is ThermalState.SOFT or celsius > limits.soft_limit_c:
            return ThermalState.SOFT
        return ThermalState.NORMAL

    def _no_reading(self) -> ThermalUpdate:
        self._stale += 1
        stale_periods = self.limits.stale_periods
        if not stale_periods or self._stale < stale_periods or self._state is ThermalState.NORMAL:
            return ThermalUpdate(self._decision)
        self._stale = 0
        if self._state is ThermalState.HARD:
            return self._enter(ThermalState.SOFT, TransitionReason.NO_READING, None)
        self._steps = 0
        return self._enter(ThermalState.NORMAL, TransitionReason.NO_READING, None)

    def _enter(self, state: ThermalState, reason: TransitionReason, celsius: float | None) -> ThermalUpdate:
        previous, self._state = self._state, state
        self._decision = self._decide()
        if state is previous:
            return ThermalUpdate(self._decision)
        transition = ThermalTransition(previous, state, reason, celsius)
        self.transitions[transition.label] += 1
        level = logging.INFO if state is ThermalState.NORMAL else logging.WARNING
        if reason is TransitionReason.NO_READING:
            log.log(
                level,
                "thermal state %s -> %s: no valid temperature for %d periods",
                previous,
                state,
                self.limits.stale_periods,
            )
        else:
            log.log(
                level,
                "thermal state %s -> %s at %.1f °C (soft limit %.1f °C, hard limit %.1f °C)",
                previous,
                state,
                celsius,
                self.limits.soft_limit_c,
                self.limits.hard_limit_c,
            )
        return ThermalUpdate(self._decision, transition)

    def _decide(self) -> ThermalDecision:
        limits = self.limits
        state = self._state
        return ThermalDecision(
            state=state,
            shrink_steps=self._steps,
            batch_floor=limits.batch_floor,
            thread_floor=limits.thread_floor,
            prefer_int8=state is not ThermalState.NORMAL,
            forward_new_work=state is ThermalState.HARD,
        )
