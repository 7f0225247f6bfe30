"""What a rollout does next: a pure function of its stored state, its nodes, the figures and the time.

:func:`step` is the whole automatic part. For a running or waiting rollout:

1. If no deployment of the model names the baseline any more (a deploy
   replaced it), the rollout ends ``aborted``: there is nothing to return to.
2. The cohort bound is widened when fewer than ``min_devices`` online eligible
   nodes are in the cohort but enough are online (:func:`widen`): a 1 % stage
   of 20 nodes would otherwise hold no node and could never be judged. Each
   cohort node whose install failed (within the budget) adds one to that
   need, since it will never report the new version.
3. Failed installs in the cohort since the rollout began are read at every
   step: more than ``max_failed_installs`` rolls back at once, without waiting
   for the interval.
4. Before ``interval_s`` has passed since the stage began, nothing else happens.
5. Then the stage is judged over its window: too few devices or requests on
   the new version, or too few requests on the baseline to compare with, and
   it waits (``waiting``, saying what is missing); a failed gate rolls back
   (``rolled_back``, naming the gates); a gate without data waits; otherwise
   the next stage starts, or after the last one the rollout is ``completed``.

In the shadow phase (:attr:`~tier2_region.fleet.rollout.Rollout.shadow`) steps 1-3
are the same (the cohort is the first stage's; a refused shadow install is a
failed install) and the phase is judged after ``shadow_interval_s`` on the
shadow's runs over the cohort since the phase began
(:meth:`~tier2_region.fleet.figures.FiguresSource.shadow`): a shadow whose runs
fail too often rolls back as soon as ``min_requests`` runs ran (it would never
be compared); too few compared runs or comparing nodes waits; a failed shadow
gate (agreement, mean difference, p99 latency against the serving version on
the same requests, errors) rolls back; otherwise stage 1 starts, serving the
new version to the same cohort.

The baseline is read over the eligible nodes outside the cohort in the same
window; when they answered fewer than ``min_requests`` (at 100 % there are
none), over every eligible node since the rollout began — the baseline as the
same nodes ran it before they moved.

:func:`pause`, :func:`resume`, :func:`abort` and :func:`promote` are the
operator's transitions; each refuses a state it does not apply to with a
:class:`~services.errors.PreconditionError` saying what would work.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, replace

from services.errors import PreconditionError
from tier2_region.fleet import rollout_gate as gates
from tier2_region.fleet.figures import FiguresSource, ShadowFigures, VersionFigures
from tier2_region.fleet.rollout import (
    ABORTED,
    COMPLETED,
    PAUSED,
    ROLLED_BACK,
    RUNNING,
    WAITING,
    GateFigures,
    Rollout,
    RolloutPlan,
    stage_label,
)


@dataclass(frozen=True)
class Member:
    """An eligible node of a rollout: where it falls, and whether it checked in lately."""

    node_id: str
    position: float
    online: bool


@dataclass(frozen=True)
class Population:
    """The nodes a rollout is about, at one moment.

    Attributes:
        members: The eligible nodes (enrolled, not revoked, deployed the baseline, a variant of the new version fits).
        deployed: The versions the model's deployments name now.
        unfit: Nodes whose deployment names the baseline but that no variant of the new version fits: they
            keep the baseline while the rollout runs, and get no variant once it completes.
    """

    members: tuple[Member, ...]
    deployed: tuple[str, ...]
    unfit: int = 0

    def cohort(self, bound: float) -> list[Member]:
        """The eligible nodes in a cohort with this bound."""
        return [m for m in self.members if m.position < bound]

    def outside(self, bound: float) -> list[Member]:
        """The eligible nodes outside a cohort with this bound."""
        return [m for m in self.members if m.position >= bound]


@dataclass(frozen=True)
class Transition:
    """A rollout's next stored state, and the line its history gets ("" for none)."""

    rollout: Rollout
    event: str = ""


def widen(plan: RolloutPlan, stage: int, bound: float, members: Sequence[Member], spare: int = 0) -> float:
    """The cohort bound of a stage: at least its step and the current bound, and wide enough for ``min_devices``.

    The bound never shrinks (a node in the cohort stays in it). When fewer than
    ``min_devices`` + ``spare`` online eligible nodes are below it, it grows to
    take in that many online ones with the lowest positions — unless so many
    are not online, in which case the stage waits for them at its own step
    rather than handing the new version to everyone.
    """
    bound = max(bound, plan.steps[stage])
    online = sorted(m.position for m in members if m.online)
    needed = plan.min_devices + spare
    if len(online) >= needed and sum(p < bound for p in online) < needed:
        bound = math.nextafter(online[needed - 1], math.inf)
    return bound


def _ids(members: Sequence[Member]) -> list[str]:
    return [m.node_id for m in members]


def _figures(source: FiguresSource, name: str, version: str, since: float, members: Sequence[Member]) -> VersionFigures:
    if not members:
        return VersionFigures(name, version)  # asking about no node answers nothing: no data
    return source.figures(name, version, since, _ids(members))


def _end(rollout: Rollout, state: str, now: float, reason: str, seen: GateFigures | None = None) -> Transition:
    ended = replace(
        rollout,
        state=state,
        reason=reason,
        ended_at=now,
        updated_at=now,
        figures=seen if seen is not None else rollout.figures,
    )
    return Transition(ended, reason)


def step(rollout: Rollout, population: Population, figures: FiguresSource, now: float) -> Transition | None:
    """What a rollout does at ``now``; None when nothing changes.

    Args:
        rollout: Its stored state.
        population: Its eligible nodes and the model's deployed versions now.
        figures: The telemetry it is judged on.
        now: Unix seconds.
    """
    if rollout.state not in (RUNNING, WAITING):
        return None
    if rollout.baseline not in population.deployed:
        now_deployed = ", ".join(population.deployed) or "none"
        return _end(
            rollout,
            ABORTED,
            now,
            f"the deployments of '{rollout.name}' no longer name version {rollout.baseline} "
            f"(now: {now_deployed}); a deploy replaced the rollout",
        )
    bound, failed = _bound(rollout, population, figures)
    installs = gates.failed_installs(rollout.plan, rollout.version, failed)
    if installs.status == gates.FAIL:
        nothing = GateFigures(
            VersionFigures(rollout.name, rollout.version), VersionFigures(rollout.name, rollout.baseline)
        )
        return _roll_back(rollout, now, (installs,), replace(nothing, failed_installs=failed))
    judged = None
    if now >= rollout.stage_started_at + rollout.interval_s:
        judge = _judge_shadow if rollout.shadow else _judge
        judged = judge(replace(rollout, cohort_bound=bound), population, figures, failed, now)
    if judged is None and bound != rollout.cohort_bound:
        return Transition(replace(rollout, cohort_bound=bound, updated_at=now))
    return judged


def _bound(rollout: Rollout, population: Population, figures: FiguresSource) -> tuple[float, int]:
    """The stage's cohort bound now, and how many cohort nodes failed to install the version since the start."""
    plan, stage, members = rollout.plan, rollout.stage, population.members
    bound = widen(plan, stage, rollout.cohort_bound, members)
    failed = _failed(figures, rollout, population.cohort(bound))
    if failed:
        wider = widen(plan, stage, bound, members, spare=failed)
        if wider != bound:
            bound, failed = wider, _failed(figures, rollout, population.cohort(wider))
    return bound, failed


def _failed(figures: FiguresSource, rollout: Rollout, cohort: Sequence[Member]) -> int:
    # Since the rollout began, not the stage: the budget is the rollout's, and a node that refused a
    # version does not try it again to be counted in the next stage's window.
    # Every tick, not only when a stage is judged: one cheap count, not the figures.
    return figures.failed_installs(rollout.name, rollout.version, rollout.started_at, [m.node_id for m in cohort])


def _judge(
    rollout: Rollout, population: Population, figures: FiguresSource, failed: int, now: float
) -> Transition | None:
    plan, bound = rollout.plan, rollout.cohort_bound
    cohort = population.cohort(bound)
    canary = _figures(figures, rollout.name, rollout.version, rollout.stage_started_at, cohort)
    online = sum(m.online for m in cohort)
    short = gates.shortfall(plan, canary, len(cohort), online)
    if short:
        nothing = VersionFigures(rollout.name, rollout.baseline)
        return _wait(rollout, now, short, GateFigures(canary, nothing, failed))
    baseline = _baseline(rollout, population, figures)
    seen = GateFigures(canary, baseline, failed)
    short = gates.baseline_shortfall(plan, baseline)
    if short:
        return _wait(rollout, now, short, seen)
    results = gates.judge(plan, canary, baseline)
    worse = [r for r in results if r.status == gates.FAIL]
    if worse:
        return _roll_back(rollout, now, worse, seen)
    missing = [r.detail for r in results if r.status == gates.NO_DATA]
    if missing:
        return _wait(rollout, now, "; ".join(missing), seen)
    return _advance(rollout, population, now, results, seen)


def _baseline(rollout: Rollout, population: Population, figures: FiguresSource) -> VersionFigures:
    rest = population.outside(rollout.cohort_bound)
    beside = _figures(figures, rollout.name, rollout.baseline, rollout.stage_started_at, rest)
    if beside.requests >= rollout.plan.min_requests:
        return beside
    return _figures(figures, rollout.name, rollout.baseline, rollout.started_at, population.members)


def _wait(rollout: Rollout, now: float, missing: str, seen: GateFigures) -> Transition | None:
    reason = f"waiting for data at {rollout.label}: {missing}"
    waiting = replace(rollout, state=WAITING, reason=reason, figures=seen)
    if waiting == rollout:
        return None
    # The history notes the start of a wait; the counts it quotes change at every step and live in `reason`.
    return Transition(replace(waiting, updated_at=now), reason if rollout.state != WAITING else "")


def _roll_back(rollout: Rollout, now: float, failed: Sequence[gates.GateResult], seen: GateFigures) -> Transition:
    names = ", ".join(r.gate for r in failed)
    details = "; ".join(r.detail for r in failed)
    if rollout.shadow:
        reason = (
            f"shadow gate {names} failed at {rollout.label}: {details}; the shadow is removed and the cohort keeps "
            f"version {rollout.baseline}"
        )
    else:
        reason = (
            f"gate {names} failed at {rollout.label}: {details}; the cohort goes back to version {rollout.baseline}"
        )
    return _end(rollout, ROLLED_BACK, now, reason, seen)


def _judge_shadow(
    rollout: Rollout, population: Population, figures: FiguresSource, failed: int, now: float
) -> Transition | None:
    plan = rollout.plan
    cohort = population.cohort(rollout.cohort_bound)
    if cohort:
        shadow = figures.shadow(rollout.name, rollout.version, rollout.stage_started_at, _ids(cohort))
    else:
        shadow = ShadowFigures(rollout.name, rollout.version)  # asking about no node answers nothing: no data
    nothing = (VersionFigures(rollout.name, rollout.version), VersionFigures(rollout.name, rollout.baseline))
    seen = GateFigures(*nothing, failed_installs=failed, shadow=shadow)
    errors = gates.shadow_errors(plan, shadow)
    if shadow.ok + shadow.errors >= plan.min_requests and errors.status == gates.FAIL:
        return _roll_back(rollout, now, (errors,), seen)
    short = gates.shadow_shortfall(plan, shadow, len(cohort), sum(m.online for m in cohort))
    if short:
        return _wait(rollout, now, short, seen)
    results = gates.judge_shadow(plan, shadow)
    worse = [r for r in results if r.status == gates.FAIL]
    if worse:
        return _roll_back(rollout, now, worse, seen)
    missing = [r.detail for r in results if r.status == gates.NO_DATA]
    if missing:
        return _wait(rollout, now, "; ".join(missing), seen)
    bound = widen(plan, 0, rollout.cohort_bound, population.members)
    serving = replace(
        rollout,
        shadow=False,
        state=RUNNING,
        stage=0,
        cohort_bound=bound,
        stage_started_at=now,
        updated_at=now,
        reason="",
        figures=seen,
    )
    passed = "; ".join(r.detail for r in results)
    return Transition(
        serving,
        f"{rollout.label} passed its gates ({passed}); {serving.label} started: the cohort serves version "
        f"{rollout.version}",
    )


def _advance(
    rollout: Rollout, population: Population, now: float, results: Sequence[gates.GateResult], seen: GateFigures
) -> Transition:
    passed = f"{rollout.label} passed its gates ({'; '.join(r.detail for r in results)})"
    if rollout.stage + 1 == len(rollout.plan.steps):
        done = replace(rollout, state=COMPLETED, reason="every stage passed its gates", figures=seen)
        return Transition(
            replace(done, ended_at=now, updated_at=now),
            f"{passed}; version {rollout.version} is now the deployed version",
        )
    stage = rollout.stage + 1
    bound = widen(rollout.plan, stage, rollout.cohort_bound, population.members)
    following = replace(
        rollout,
        state=RUNNING,
        stage=stage,
        cohort_bound=bound,
        stage_started_at=now,
        updated_at=now,
        reason="",
        figures=seen,
    )
    return Transition(following, f"{passed}; {stage_label(rollout.plan, stage)} started")


# The operator's transitions.


def _describe(rollout: Rollout) -> str:
    return f"the rollout of '{rollout.name}' to version {rollout.version}"


def pause(rollout: Rollout, now: float) -> Transition:
    """Holds a running or waiting rollout at its stage: its cohort keeps the new version (or its shadow), no gate
    is read.

    Raises:
        PreconditionError: It is paused already or has ended.
    """
    if rollout.state not in (RUNNING, WAITING):
        raise PreconditionError(f"{_describe(rollout)} is {rollout.state}; only a running or waiting one can be paused")
    reason = f"paused by the operator at {rollout.label}; `edgecascade rollout resume {rollout.name}` goes on"
    return Transition(replace(rollout, state=PAUSED, reason=reason, updated_at=now), reason)


def resume(rollout: Rollout, now: float) -> Transition:
    """Goes on with a paused rollout; its stage's window starts again, so the gates read what followed the pause.

    Raises:
        PreconditionError: It is not paused.
    """
    if rollout.state != PAUSED:
        raise PreconditionError(f"{_describe(rollout)} is {rollout.state}, not paused; there is nothing to resume")
    resumed = replace(rollout, state=RUNNING, reason="", stage_started_at=now, updated_at=now)
    return Transition(resumed, f"resumed by the operator at {rollout.label}")


def abort(rollout: Rollout, now: float) -> Transition:
    """Ends an active rollout and gives its cohort the baseline again.

    Raises:
        PreconditionError: It has ended already.
    """
    if not rollout.active:
        raise PreconditionError(f"{_describe(rollout)} has ended ({rollout.state}); there is nothing to abort")
    if rollout.shadow:
        reason = (
            f"aborted by the operator at {rollout.label}; the shadow is removed and the cohort keeps version "
            f"{rollout.baseline}"
        )
    else:
        reason = f"aborted by the operator at {rollout.label}; the cohort goes back to version {rollout.baseline}"
    return _end(rollout, ABORTED, now, reason)


def promote(rollout: Rollout, now: float) -> Transition:
    """Skips the remaining stages and gates: the new version becomes the deployed version at once.

    Raises:
        PreconditionError: It has ended already.
    """
    if not rollout.active:
        raise PreconditionError(f"{_describe(rollout)} has ended ({rollout.state}); there is nothing to promote")
    reason = (
        f"promoted by the operator at {rollout.label}: version {rollout.version} is deployed to every eligible node"
    )
    last = len(rollout.plan.steps) - 1
    return _end(replace(rollout, stage=last, cohort_bound=100.0, shadow=False), COMPLETED, now, reason)
