"""The rollout controller: starts rollouts, moves them on at each tick, and carries out the operator's verbs.

Nothing lives in memory between calls: every call reads the rollouts from the
fleet inventory (:class:`~tier2_region.fleet.rollout_store.RolloutStore`),
computes what changes (:mod:`~tier2_region.fleet.rollout_policy`) and writes
it back only if nobody wrote in between. So the region's ticker and the
operator's CLI (another process) can act on the same file, and a region
restarted mid-rollout simply goes on at its next tick.

A node is *online* when it checked in within the last :data:`OFFLINE_CHECKS`
check intervals. Offline nodes keep their desired state (a cohort node gets
the new version whenever it next checks in); they count towards no stage
until they report.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Collection
from dataclasses import dataclass, replace

from services.engine.model_repository import check_model_name, check_version
from services.errors import ModelNotFoundError, NotFoundError, PreconditionError, UnavailableError
from tier2_region.fleet import rollout_policy as policy
from tier2_region.fleet.figures import FiguresSource, ShadowFigures, VersionFigures
from tier2_region.fleet.fleet import Fleet, applicable
from tier2_region.fleet.inventory import Deployment
from tier2_region.fleet.rollout import (
    ABORTED,
    ROLLED_BACK,
    RUNNING,
    Rollout,
    RolloutPlan,
    canary_variant,
    cohort_position,
    stage_label,
)
from tier2_region.fleet.rollout_policy import Member, Population
from tier2_region.fleet.rollout_store import RolloutEvent

log = logging.getLogger("edgecascade.rollouts")

# A node that missed this many check-ins in a row is offline (one late check-in is jitter, not absence).
OFFLINE_CHECKS = 3
# An operator's write that keeps losing to the region's ticker is tried this often before giving up.
MAX_WRITE_ATTEMPTS = 5

Clock = Callable[[], float]
Verb = Callable[[Rollout, float], policy.Transition]


class NoFigures:
    """A :class:`~tier2_region.fleet.figures.FiguresSource` that heard nothing: every stage waits for data."""

    def figures(self, name: str, version: str, since: float, node_ids: Collection[str] | None = None) -> VersionFigures:
        """Empty figures (no data, which passes no gate)."""
        return VersionFigures(name, version)

    def failed_installs(self, name: str, version: str, since: float, node_ids: Collection[str] | None = None) -> int:
        """None heard of."""
        return 0

    def shadow(self, name: str, version: str, since: float, node_ids: Collection[str] | None = None) -> ShadowFigures:
        """No shadow run heard of (no data, which passes no gate)."""
        return ShadowFigures(name, version)


@dataclass(frozen=True)
class CohortCounts:
    """How many eligible nodes a rollout has, how many of them are in its cohort (and online), how many are unfit."""

    eligible: int
    online: int
    cohort: int
    cohort_online: int
    unfit: int


@dataclass(frozen=True)
class RolloutStatus:
    """A rollout as ``rollout status`` shows it.

    Attributes:
        rollout: Its stored state.
        counts: Its nodes now (None once it has ended: its cohort is gone).
        gate_at: When the current stage's (or the shadow phase's) gates are first read (None unless running).
        history: What happened, oldest first.
    """

    rollout: Rollout
    counts: CohortCounts | None
    gate_at: float | None
    history: tuple[RolloutEvent, ...]


class RolloutController:
    """Rollouts over one fleet.

    Args:
        fleet: The fleet (its inventory holds the rollouts; its catalog says which variants fit).
        figures: The telemetry stages are judged on (default: none, so every stage waits for data).
        clock: Unix time in seconds (tests pass a fake one).
        offline_after_s: Seconds without a check-in after which a node is offline
            (default :data:`OFFLINE_CHECKS` check intervals).
    """

    def __init__(
        self,
        fleet: Fleet,
        figures: FiguresSource | None = None,
        clock: Clock = time.time,
        offline_after_s: float | None = None,
    ) -> None:
        self.fleet = fleet
        self.store = fleet.rollouts
        self.figures: FiguresSource = figures if figures is not None else NoFigures()
        self.clock = clock
        self.offline_after_s = (
            offline_after_s if offline_after_s is not None else OFFLINE_CHECKS * fleet.settings.check_interval_s
        )

    # The operator's verbs

    def start(self, name: str, version: str, plan: RolloutPlan | None = None) -> Rollout:
        """Starts rolling out ``version`` of ``name`` in place of the version its deployments name.

        Raises:
            InvalidArgumentError: The name or version is not valid.
            PreconditionError: The model has an active rollout, is deployed nowhere, its deployments name
                different versions, or they name ``version`` already.
            ModelNotFoundError: The registry has no variant of the version.
        """
        plan = plan if plan is not None else RolloutPlan()
        check_model_name(name)
        check_version(version)
        active = self.store.active(name)
        if active:
            current = active[0]
            raise PreconditionError(
                f"a rollout of '{name}' to version {current.version} is {current.state} ({current.label}); "
                f"one rollout per model at a time: end it first (edgecascade rollout abort {name}, or promote {name})"
            )
        if not self.fleet.catalog.offers(name, version):
            raise ModelNotFoundError(
                f"the registry has no model '{name}' version {version}; publish it first (edgecascade model publish)"
            )
        baseline = self._baseline(name, version)
        now = self.clock()
        draft = Rollout(name, version, baseline, plan, RUNNING, 0, 0.0, now, now, now, shadow=plan.has_shadow)
        population = self.population(draft, now)
        draft = replace(draft, cohort_bound=policy.widen(plan, 0, 0.0, population.members))
        cohort = population.cohort(draft.cohort_bound)
        event = (
            f"started from version {baseline} at {draft.label}: {len(cohort)} of {len(population.members)} "
            "eligible node(s) in the cohort"
        )
        if draft.shadow:
            event += (
                f", running version {version} beside version {baseline} on {plan.shadow_percent:g} % of their "
                f"requests (its answers discarded) until {stage_label(plan, 0)} serves it"
            )
        if population.unfit:
            event += (
                f"; {population.unfit} node(s) running version {baseline} fit no variant of version {version}: they "
                "keep it during the rollout and get none once it completes"
            )
        rollout = self.store.add(draft, event)
        log.info("rollout of %s to version %s %s", name, version, event)
        return rollout

    def _baseline(self, name: str, version: str) -> str:
        deployed = sorted({d.version for d in self.fleet.inventory.deployments() if d.name == name})
        if not deployed:
            raise PreconditionError(
                f"model '{name}' is deployed to no node, so there is nothing to roll out from: deploy its current "
                f"version first (edgecascade deploy {name} VERSION)"
            )
        if len(deployed) > 1:
            raise PreconditionError(
                f"the deployments of '{name}' name versions {', '.join(deployed)}; a rollout replaces one version: "
                f"deploy one version to every filter first (edgecascade deploy {name} VERSION …)"
            )
        if deployed[0] == version:
            raise PreconditionError(f"version {version} of '{name}' is deployed already; there is nothing to roll out")
        return deployed[0]

    def pause(self, name: str) -> Rollout:
        """Holds the model's rollout at its stage (see :func:`~tier2_region.fleet.rollout_policy.pause`)."""
        return self._operate(name, policy.pause)

    def resume(self, name: str) -> Rollout:
        """Goes on with the model's paused rollout (see :func:`~tier2_region.fleet.rollout_policy.resume`)."""
        return self._operate(name, policy.resume)

    def abort(self, name: str) -> Rollout:
        """Ends the model's rollout; its cohort gets the previous version back."""
        return self._operate(name, policy.abort)

    def promote(self, name: str) -> Rollout:
        """Ends the model's rollout by making its version the deployed version now, skipping the remaining stages."""
        return self._operate(name, policy.promote)

    def _operate(self, name: str, verb: Verb) -> Rollout:
        """Applies an operator's verb to the model's active rollout (or its latest, which then refuses it).

        Raises:
            NotFoundError: The model never had a rollout.
            PreconditionError: The verb does not apply to the rollout's state.
            UnavailableError: The region's ticker kept changing the rollout meanwhile.
        """
        for _ in range(MAX_WRITE_ATTEMPTS):
            found = self.store.active(name) or self.store.latest(name)
            if not found:
                raise NotFoundError(
                    f"model '{name}' has no rollout; start one with edgecascade rollout start {name} VERSION"
                )
            transition = verb(found[0], self.clock())
            saved = self.store.save(found[0], transition.rollout, transition.event)
            if saved is not None:
                log.info("rollout of %s to version %s: %s", name, saved.version, transition.event)
                return saved
        raise UnavailableError(f"the rollout of '{name}' kept changing while being written; try again")

    def status(self, name: str | None = None) -> list[RolloutStatus]:
        """The latest rollout of each model (or of ``name``), with its nodes and history.

        Raises:
            NotFoundError: ``name`` never had a rollout.
        """
        rollouts = self.store.latest(name)
        if name is not None and not rollouts:
            raise NotFoundError(
                f"model '{name}' has no rollout; start one with edgecascade rollout start {name} VERSION"
            )
        now = self.clock()
        return [self._status(r, now) for r in rollouts]

    def _status(self, rollout: Rollout, now: float) -> RolloutStatus:
        counts = None
        if rollout.active:
            population = self.population(rollout, now)
            members = population.members
            cohort = [m for m in members if m.position < rollout.cohort_bound]
            counts = CohortCounts(
                len(members),
                sum(m.online for m in members),
                len(cohort),
                sum(m.online for m in cohort),
                population.unfit,
            )
        gate_at = rollout.stage_started_at + rollout.interval_s if rollout.state == RUNNING else None
        return RolloutStatus(rollout, counts, gate_at, tuple(self.store.history(rollout.id)))

    # The region's ticker

    def tick(self, now: float | None = None) -> list[Rollout]:
        """Moves every active rollout on by one :func:`~tier2_region.fleet.rollout_policy.step`.

        A rollout that cannot be moved on (its figures cannot be read, say) is
        logged and tried again at the next tick; the others go on.

        Returns:
            The rollouts that changed, as stored.
        """
        now = self.clock() if now is None else now
        changed = []
        for rollout in self.store.active():
            try:
                saved = self._step(rollout, now)
            except Exception:
                log.exception(
                    "the rollout of %s to version %s could not be moved on; it is tried again at the next tick",
                    rollout.name,
                    rollout.version,
                )
                continue
            if saved is not None:
                changed.append(saved)
        return changed

    def _step(self, rollout: Rollout, now: float) -> Rollout | None:
        transition = policy.step(rollout, self.population(rollout, now), self.figures, now)
        if transition is None:
            return None
        # None: an operator changed it meanwhile; the next tick starts from what they wrote.
        saved = self.store.save(rollout, transition.rollout, transition.event)
        if saved is not None and transition.event:
            level = logging.WARNING if saved.state in (ROLLED_BACK, ABORTED) else logging.INFO
            log.log(level, "rollout of %s to version %s: %s", saved.name, saved.version, transition.event)
        return saved

    def population(self, rollout: Rollout, now: float) -> Population:
        """The rollout's eligible nodes at ``now`` (see :func:`~tier2_region.fleet.rollout.canary_variant`)."""
        deployments = self.fleet.inventory.deployments()
        offers = self.fleet.catalog.offers(rollout.name, rollout.version)
        # A fleet has few distinct kinds of node: decide each kind once, not each of 10,000 nodes.
        # The fit reads the deployment and the node's class, budget and runtime only.
        fits: dict[tuple[Deployment, str, int, str], bool] = {}
        members = []
        unfit = 0
        for facts, revoked, last_seen in self.fleet.inventory.presence():
            deployment = next((d for d in applicable(facts, deployments) if d.name == rollout.name), None)
            if revoked or deployment is None or deployment.version != rollout.baseline:
                continue
            kind = (deployment, facts.hardware_class, facts.memory_budget_bytes, facts.onnxruntime_version)
            if kind not in fits:
                fits[kind] = canary_variant(rollout, facts, deployment, offers) is not None
            if not fits[kind]:
                unfit += 1
                continue
            online = last_seen is not None and now - last_seen <= self.offline_after_s
            members.append(Member(facts.node_id, cohort_position(rollout.name, facts.node_id), online))
        deployed = tuple(sorted({d.version for d in deployments if d.name == rollout.name}))
        return Population(tuple(members), deployed, unfit)
