"""A staged rollout of one model version: its plan, its state, and who is in its cohort.

A rollout of model NAME to VERSION replaces the version every deployment of
NAME names (the *baseline*) stage by stage. Stage ``k`` serves VERSION to the
*cohort*: the eligible nodes whose :func:`cohort_position` — a stable hash of
the model name and node id onto [0, 100) — is below the rollout's
:attr:`Rollout.cohort_bound`. The bound is at least ``plan.steps[k]``,
wider when that would hold fewer than ``min_devices`` online nodes
(:func:`~tier2_region.fleet.rollout_policy.widen`), and only grows, so a node
once in the cohort stays in it and the cohorts of later stages contain those
of earlier ones. A node is
*eligible* when the deployment of NAME that applies to it names the baseline
and a variant of VERSION fits it (:func:`~tier2_region.fleet.assignment.choose_variant`);
the other nodes keep what their deployment says.

States::

    running ──interval over, data short──▶ waiting ──data, gates pass──▶ running (next stage) / completed
       │  ▲                                   │
       │  └──────────── resume ◀── paused ◀───┤ pause (from running or waiting)
       ├── gate failed / failed installs ─────┴──▶ rolled_back
       ├── abort ──▶ aborted              promote ──▶ completed

With ``plan.shadow_percent`` > 0 the rollout begins with a *shadow phase*
(:attr:`Rollout.shadow`) in the same states: the cohort is the first stage's
(same bound, same widening) and keeps serving the baseline, and each cohort
node gets VERSION as a second, *shadow* assignment that runs beside the
serving one on ``shadow_percent`` % of its requests, its answers compared with
the serving ones and discarded. After ``shadow_interval_s`` the shadow gates
(agreement, latency, errors, failed installs) are read; when they pass, the
phase ends and stage 1 starts serving VERSION to the same cohort; when one
fails, the rollout is rolled back (the shadows are removed: nobody is sent a
shadow assignment any more). Nobody serves VERSION during the shadow phase.

A rollout is *active* while running, waiting or paused: only then does its
cohort get VERSION (as a shadow during the shadow phase). ``completed`` makes VERSION the deployments' version;
``rolled_back`` and ``aborted`` leave the deployments at the baseline, so the
cohort gets the baseline again at its next check-in.
"""

from __future__ import annotations

import functools
import hashlib
import itertools
import math
from collections.abc import Sequence
from dataclasses import dataclass

from services.errors import InvalidArgumentError
from tier2_region.fleet.assignment import VariantOffer, choose_variant
from tier2_region.fleet.domain import NodeFacts
from tier2_region.fleet.figures import ShadowFigures, VersionFigures
from tier2_region.fleet.inventory import Deployment

RUNNING = "running"
WAITING = "waiting"
PAUSED = "paused"
COMPLETED = "completed"
ROLLED_BACK = "rolled_back"
ABORTED = "aborted"
ACTIVE_STATES = (RUNNING, WAITING, PAUSED)
STATES = (*ACTIVE_STATES, COMPLETED, ROLLED_BACK, ABORTED)

DEFAULT_STEPS = (1.0, 10.0, 50.0, 100.0)
MAX_STEPS = 20
# Longer than anyone watches one stage (a month): a larger value is a typo, e.g. milliseconds.
MAX_INTERVAL_S = 30 * 86400.0
# The largest position: a node is in a cohort bounded at 100 whatever its hash.
_LAST_POSITION = math.nextafter(100.0, 0.0)


# Positions never change; a tick over a large fleet asks for every node's, every time.
@functools.lru_cache(maxsize=65536)
def cohort_position(name: str, node_id: str) -> float:
    """Where a node falls in rollouts of a model: a number in [0, 100), the same on every call and process.

    The model name is hashed in so that the canaries of one model are not
    always the canaries of every model.
    """
    digest = hashlib.sha256(f"{name}\0{node_id}".encode()).digest()
    # 53 bits: exactly what a float holds, so equal hashes give equal positions everywhere.
    fraction = (int.from_bytes(digest[:8], "big") >> 11) / 2**53
    return min(fraction * 100, _LAST_POSITION)


def stage_label(plan: RolloutPlan, stage: int) -> str:
    """``stage 2 of 4 (10 %)``."""
    return f"stage {stage + 1} of {len(plan.steps)} ({plan.steps[stage]:g} %)"


def shadow_label(plan: RolloutPlan) -> str:
    """``shadow (5 % of requests)``."""
    return f"shadow ({plan.shadow_percent:g} % of requests)"


@dataclass(frozen=True)
class RolloutPlan:
    """How a rollout proceeds and what stops it.

    Attributes:
        steps: The cohort's share of the eligible nodes at each stage, in percent: increasing, ending at 100.
        interval_s: How long each stage runs before its gates are read.
        min_devices: Nodes of the cohort that must report the new version before a stage is judged.
        min_requests: Requests the cohort must have answered on the new version before a stage is judged
            (and the baseline must have, to compare with).
        max_error_rate_increase: Largest allowed rise of the error share (new − baseline; 0.01 = one point).
        max_p99_ratio: Largest allowed p99 latency of the new version as a multiple of the baseline's.
        max_fallback_rate_increase: Largest allowed rise of the share of requests sent upstream.
        max_failed_installs: Cohort nodes whose install of the new version may fail before it is rolled back.
        shadow_percent: 0 for no shadow phase; else the share of each cohort node's requests (in percent, above 0
            and at most 100) the new version runs on beside the serving one before it serves any (the shadow
            phase). Its gates reuse ``min_devices`` and ``min_requests`` (compared runs), ``max_p99_ratio``
            (against the serving version on the same requests), ``max_error_rate_increase`` (the share of the
            shadow's runs that fail) and ``max_failed_installs``.
        shadow_interval_s: How long the shadow phase runs before its gates are read (None: ``interval_s``).
        min_agreement: The lowest mean top-1 agreement of the shadow with the serving version that passes (0-1).
        max_mean_difference: The largest mean absolute difference of the shadow's outputs from the serving
            version's that passes; None leaves it ungated (outputs of different models need not be close).
    """

    steps: tuple[float, ...] = DEFAULT_STEPS
    interval_s: float = 300.0
    min_devices: int = 1
    min_requests: int = 100
    max_error_rate_increase: float = 0.01
    max_p99_ratio: float = 1.5
    max_fallback_rate_increase: float = 0.05
    max_failed_installs: int = 0
    shadow_percent: float = 0.0
    shadow_interval_s: float | None = None
    min_agreement: float = 0.9
    max_mean_difference: float | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "steps", tuple(float(s) for s in self.steps))
        _check_steps(self.steps)
        if not (math.isfinite(self.interval_s) and 0 < self.interval_s <= MAX_INTERVAL_S):
            raise InvalidArgumentError(
                f"interval_s must be a positive number of seconds up to {MAX_INTERVAL_S:g}, got {self.interval_s}"
            )
        if self.min_devices < 1:
            raise InvalidArgumentError(
                f"min_devices must be at least 1, got {self.min_devices}: a stage nobody reports on proves nothing"
            )
        if self.min_requests < 1:
            raise InvalidArgumentError(
                f"min_requests must be at least 1, got {self.min_requests}: a stage without traffic proves nothing"
            )
        for what in ("max_error_rate_increase", "max_fallback_rate_increase"):
            value = getattr(self, what)
            if not (math.isfinite(value) and 0 <= value <= 1):
                raise InvalidArgumentError(f"{what} is a share between 0 and 1 (0.01 = one point), got {value}")
        if not (math.isfinite(self.max_p99_ratio) and self.max_p99_ratio >= 1):
            raise InvalidArgumentError(
                f"max_p99_ratio must be at least 1 (1.5 = 50 % slower allowed), got {self.max_p99_ratio}"
            )
        if self.max_failed_installs < 0:
            raise InvalidArgumentError(f"max_failed_installs must be 0 or more, got {self.max_failed_installs}")
        self._check_shadow()

    def _check_shadow(self) -> None:
        if not (math.isfinite(self.shadow_percent) and 0 <= self.shadow_percent <= 100):
            raise InvalidArgumentError(
                f"shadow_percent is the share of a cohort node's requests the shadow runs on, above 0 and at most "
                f"100 (0 = no shadow phase), got {self.shadow_percent}"
            )
        interval = self.shadow_interval_s
        if interval is not None and not (math.isfinite(interval) and 0 < interval <= MAX_INTERVAL_S):
            raise InvalidArgumentError(
                f"shadow_interval_s must be a positive number of seconds up to {MAX_INTERVAL_S:g}, got {interval}"
            )
        if not (math.isfinite(self.min_agreement) and 0 <= self.min_agreement <= 1):
            raise InvalidArgumentError(
                f"min_agreement is the share of compared answers with the same top-1 class, between 0 and 1 "
                f"(0.9 = 90 %), got {self.min_agreement}"
            )
        limit = self.max_mean_difference
        if limit is not None and not (math.isfinite(limit) and limit >= 0):
            raise InvalidArgumentError(
                f"max_mean_difference must be 0 or more (the mean absolute difference of the outputs), got {limit}"
            )
        if self.shadow_percent == 0 and (interval is not None or limit is not None):
            given = " and ".join(
                name
                for name, value in (("shadow_interval_s", interval), ("max_mean_difference", limit))
                if value is not None
            )
            verb = "apply" if interval is not None and limit is not None else "applies"
            raise InvalidArgumentError(f"{given} {verb} to a shadow phase; give shadow_percent too")

    @property
    def has_shadow(self) -> bool:
        """Whether the rollout begins with a shadow phase."""
        return self.shadow_percent > 0

    @property
    def shadow_share(self) -> float:
        """The share of a cohort node's requests the shadow runs on, in (0, 1] (0 without a shadow phase)."""
        return self.shadow_percent / 100

    @property
    def shadow_interval(self) -> float:
        """How long the shadow phase runs before its gates are read."""
        return self.interval_s if self.shadow_interval_s is None else self.shadow_interval_s


def _check_steps(steps: Sequence[float]) -> None:
    shown = ",".join(f"{s:g}" for s in steps)
    if not steps or len(steps) > MAX_STEPS:
        raise InvalidArgumentError(f"a rollout has 1 to {MAX_STEPS} steps (percentages such as 1,10,50,100)")
    if any(not (math.isfinite(s) and 0 < s <= 100) for s in steps):
        raise InvalidArgumentError(f"steps {shown}: each step is a percentage above 0 and at most 100")
    if any(b <= a for a, b in itertools.pairwise(steps)):
        raise InvalidArgumentError(f"steps {shown} must increase, e.g. 1,10,50,100")
    if steps[-1] != 100:
        raise InvalidArgumentError(f"steps {shown} must end at 100 so that every eligible node gets the version")


@dataclass(frozen=True)
class GateFigures:
    """What the last gate reading saw: the new version on the cohort, the baseline beside it.

    In the shadow phase ``canary`` and ``baseline`` are empty (nobody serves the new version) and
    ``shadow`` holds what the shadow did.
    """

    canary: VersionFigures
    baseline: VersionFigures
    failed_installs: int = 0
    shadow: ShadowFigures | None = None  # in the shadow phase: the shadow's runs on the cohort


@dataclass(frozen=True)
class Rollout:
    """One rollout as stored.

    Attributes:
        name: The model.
        version: The version rolled out.
        baseline: The version the deployments of the model named when it started (what a rollback returns to).
        plan: Its steps and gates.
        state: One of :data:`STATES`.
        stage: Index of the current stage in ``plan.steps``.
        cohort_bound: Eligible nodes whose :func:`cohort_position` is below it are in the cohort (0-100).
        stage_started_at: Start of the current stage's window (Unix seconds).
        started_at: When the rollout started.
        updated_at: When it last changed.
        reason: Why it is in its state (what a waiting stage lacks, which gate failed, who ended it).
        ended_at: When it reached a final state, or None.
        figures: The last gate reading, or None before the first.
        id: Its row id (0 before it is stored).
        revision: Bumped at every write: a write based on an older revision is not applied.
        shadow: In the shadow phase (``stage`` is then 0: the cohort is the first stage's, serving the baseline).
    """

    name: str
    version: str
    baseline: str
    plan: RolloutPlan
    state: str
    stage: int
    cohort_bound: float
    stage_started_at: float
    started_at: float
    updated_at: float
    reason: str = ""
    ended_at: float | None = None
    figures: GateFigures | None = None
    id: int = 0
    revision: int = 0
    shadow: bool = False

    @property
    def active(self) -> bool:
        """Whether its cohort gets the new version (running, waiting or paused; as a shadow in the shadow phase)."""
        return self.state in ACTIVE_STATES

    @property
    def shadowing(self) -> bool:
        """Whether its cohort gets the new version as a shadow now (active, in the shadow phase)."""
        return self.shadow and self.active

    @property
    def percent(self) -> float:
        """The current stage's step, in percent (the shadow phase's cohort is the first stage's)."""
        return self.plan.steps[self.stage]

    @property
    def label(self) -> str:
        """``stage 2 of 4 (10 %)``, or ``shadow (5 % of requests)`` in the shadow phase."""
        return shadow_label(self.plan) if self.shadow else stage_label(self.plan, self.stage)

    @property
    def interval_s(self) -> float:
        """How long the current stage (or the shadow phase) runs before its gates are read."""
        return self.plan.shadow_interval if self.shadow else self.plan.interval_s

    def covers(self, node_id: str) -> bool:
        """Whether the node is in the cohort, if it is eligible (its position is below the bound)."""
        return cohort_position(self.name, node_id) < self.cohort_bound


def canary_variant(
    rollout: Rollout, facts: NodeFacts, deployment: Deployment, offers: Sequence[VariantOffer]
) -> VariantOffer | None:
    """The variant of the new version a node is eligible for, or None when it is not eligible.

    A node is eligible when the deployment of the model that applies to it
    names the rollout's baseline and a variant of the new version (``offers``)
    fits it. Whether it is in the cohort is :meth:`Rollout.covers`.
    """
    if deployment.name != rollout.name or deployment.version != rollout.baseline:
        return None
    choice = choose_variant(facts, offers)
    return None if isinstance(choice, str) else choice
