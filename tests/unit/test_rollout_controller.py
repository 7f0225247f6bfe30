"""The rollout controller over a real SQLite inventory, a simulated fleet, fake telemetry and a fake clock (issue 10).

:class:`Sim` plays the fleet: every 10 simulated seconds each online node
reports the traffic it served on the version it runs (to :class:`Telemetry`,
the fake :class:`~tier2_region.fleet.figures.FiguresSource`), checks in (the
inventory records it) and moves to the version its desired state names —
unless that version's :class:`Behaviour` fails to install, which the
telemetry hears as a failed install. A node given a shadow assignment (a
rollout's shadow phase) installs it the same way and from then on reports its
shadow runs on the assignment's share of its traffic. Then the controller ticks.
"""

from __future__ import annotations

import functools
import itertools
import logging
import os
import sqlite3
from collections.abc import Callable, Collection
from dataclasses import dataclass, field, replace
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from services.errors import (
    InvalidArgumentError,
    ModelNotFoundError,
    NotFoundError,
    PreconditionError,
)
from services.updates.key_grants import unwrap_key
from tier2_region.config import FleetSection
from tier2_region.fleet.assignment import VariantOffer
from tier2_region.fleet.domain import Assignment, NodeFacts
from tier2_region.fleet.figures import ShadowFigures, VersionFigures
from tier2_region.fleet.fleet import Fleet
from tier2_region.fleet.inventory import Deployment, Inventory
from tier2_region.fleet.rollout import (
    ABORTED,
    COMPLETED,
    PAUSED,
    ROLLED_BACK,
    RUNNING,
    WAITING,
    Rollout,
    RolloutPlan,
    cohort_position,
)
from tier2_region.fleet.rollout_controller import RolloutController

MB = 1024 * 1024
T0 = 1_900_000_000.0
STEP_S = 10.0
NODE_KEY = X25519PrivateKey.generate()  # every simulated node's agreement key (one will do)
AGREEMENT = NODE_KEY.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)
PLAN = RolloutPlan(interval_s=60, min_devices=2, min_requests=100)


@dataclass
class Clock:
    now: float = T0

    def __call__(self) -> float:
        return self.now


@dataclass
class Catalog:
    """Hand-made variants: {(name, version): [offers]} and their content keys."""

    models: dict[tuple[str, str], list[VariantOffer]] = field(default_factory=dict)
    keys: dict[str, bytes] = field(default_factory=dict)

    def add(self, name: str, version: str, memory_mb: int = 60) -> None:
        key_id = f"{name}-{version}"
        self.keys[key_id] = os.urandom(32)
        offer = VariantOffer("int8", f"models/{name}/{version}/int8", key_id, memory_mb * MB, (), "1.9", 0.5)
        self.models[(name, version)] = [offer]

    def offers(self, name: str, version: str) -> list[VariantOffer]:
        return list(self.models.get((name, version), []))

    def content_key(self, key_id: str) -> bytes:
        return self.keys[key_id]


@dataclass(frozen=True)
class Behaviour:
    """What a version does on a node, per check-in period."""

    error_share: float = 0.01
    fallback_share: float = 0.05
    p99_ms: float = 20.0
    installs: bool = True
    # As a shadow beside version 1 (run on the same sampled requests):
    agreement: float = 0.97
    difference: float = 0.02
    shadow_error_share: float = 0.0
    shadow_shed_share: float = 0.0


GOOD = Behaviour()


@dataclass(frozen=True)
class Report:
    node_id: str
    version: str
    at: float
    requests: int
    errors: int
    fallbacks: int
    p99_ms: float


@dataclass(frozen=True)
class ShadowReport:
    """What a node's shadow did on its sampled requests since its last check-in."""

    node_id: str
    version: str
    at: float
    ok: int
    errors: int
    shed: int
    agreement: float
    difference: float
    p99_ms: float
    serving_p99_ms: float


@dataclass
class Telemetry:
    """The fake FiguresSource: folds what the simulated nodes reported."""

    reports: list[Report] = field(default_factory=list)
    refusals: list[tuple[str, str, float]] = field(default_factory=list)
    silent: set[str] = field(default_factory=set)  # versions whose figures never arrive
    shadows: list[ShadowReport] = field(default_factory=list)

    def shadow(self, name: str, version: str, since: float, node_ids: Collection[str] | None = None) -> ShadowFigures:
        ids = None if node_ids is None else set(node_ids)
        rows = [
            r
            for r in self.shadows
            if r.version == version
            and r.at >= since
            and (ids is None or r.node_id in ids)
            and version not in self.silent
        ]
        compared = [r for r in rows if r.ok]
        seen = ShadowFigures(
            name,
            version,
            nodes=len({r.node_id for r in compared}),
            ok=sum(r.ok for r in rows),
            errors=sum(r.errors for r in rows),
            shed=sum(r.shed for r in rows),
            compared=sum(r.ok for r in rows),
        )
        if not compared:
            return seen
        return replace(
            seen,
            agreement=sum(r.agreement * r.ok for r in compared) / seen.compared,
            mean_difference=sum(r.difference * r.ok for r in compared) / seen.compared,
            p99_ms=max(r.p99_ms for r in compared),
            serving_p99_ms=max(r.serving_p99_ms for r in compared),
        )

    def failed_installs(self, name: str, version: str, since: float, node_ids: Collection[str] | None = None) -> int:
        return self.figures(name, version, since, node_ids).failed_installs

    def figures(self, name: str, version: str, since: float, node_ids: Collection[str] | None = None) -> VersionFigures:
        ids = None if node_ids is None else set(node_ids)

        def wanted(node: str, v: str, at: float) -> bool:
            return v == version and at >= since and (ids is None or node in ids) and v not in self.silent

        rows = [r for r in self.reports if wanted(r.node_id, r.version, r.at)]
        failed = len({n for n, v, at in self.refusals if wanted(n, v, at)})
        if not rows:
            return VersionFigures(name, version, failed_installs=failed)
        return VersionFigures(
            name,
            version,
            nodes=len({r.node_id for r in rows}),
            requests=sum(r.requests for r in rows),
            errors=sum(r.errors for r in rows),
            fallbacks=sum(r.fallbacks for r in rows),
            p99_ms=max(r.p99_ms for r in rows),
            failed_installs=failed,
        )


def facts(node_id: str, budget_mb: int = 128) -> NodeFacts:
    return NodeFacts(node_id, "device", "cpu-x86_64", budget_mb * MB, "1.20.1", 10 * MB)


class Sim:
    """A fleet of nodes running model ``lm``, deployed at version 1."""

    def __init__(
        self,
        path: Path,
        nodes: int = 24,
        behaviours: dict[str, Behaviour] | None = None,
        offline: Collection[str] = (),
        small: Collection[str] = (),
    ) -> None:
        self.path = path
        self.clock = Clock()
        self.catalog = Catalog()
        self.catalog.add("lm", "1")
        self.catalog.add("lm", "2")
        self.catalog.add("lm", "3", memory_mb=100)  # fits no node of 64 MB
        self.catalog.add("other", "1")
        self.telemetry = Telemetry()
        self.behaviours = behaviours or {}
        self.ids = [f"device-{i:02d}" for i in range(nodes)]
        self.offline = set(offline)
        self.reporting = True
        self.facts = {n: facts(n, 64 if n in small else 128) for n in self.ids}
        self.running = dict.fromkeys(self.ids, "1")
        self.shadowing: dict[str, Assignment] = {}  # node → the shadow it runs
        self._open()
        with self.inventory.transaction() as db:
            for node in self.ids:
                Inventory.put_node(db, self.facts[node], b"i" * 32, AGREEMENT, T0, keep=False)
        self.fleet.deploy("lm", "1")
        self.advance()  # the fleet has been running: its online nodes have checked in

    def _open(self) -> None:
        self.inventory = Inventory(self.path)
        settings = FleetSection(check_interval_s=int(STEP_S))
        self.fleet = Fleet(self.inventory, self.catalog, settings, self.clock)
        self.controller = RolloutController(self.fleet, self.telemetry, self.clock)

    def restart(self) -> None:
        """A region restarted: the same file, a new inventory, fleet and controller."""
        self.inventory.close()
        self._open()

    def assignments(self, node: str) -> tuple[Assignment, ...]:
        """The node's desired state's assignments of lm."""
        return tuple(a for a in self.fleet.desired_state(self.facts[node], AGREEMENT).assignments if a.name == "lm")

    def desired(self, node: str) -> str:
        """The version of lm the node should serve."""
        return next(a.version for a in self.assignments(node) if not a.shadow)

    def shadow(self, node: str) -> Assignment | None:
        """The node's shadow assignment of lm, if it has one."""
        return next((a for a in self.assignments(node) if a.shadow), None)

    def shadowed(self) -> set[str]:
        """The nodes told to run a shadow of lm."""
        return {n for n in self.ids if self.shadow(n) is not None}

    def on(self, version: str) -> set[str]:
        """The nodes whose desired state names ``version`` of lm."""
        return {n for n in self.ids if self.desired(n) == version}

    def check_in(self, node: str) -> None:
        """A node reports what it served since its last check-in, then moves to its desired version."""
        now = self.clock.now
        running = self.running[node]
        b = self.behaviours.get(running, GOOD)
        if self.reporting:
            n = 100
            report = Report(node, running, now, n, round(n * b.error_share), round(n * b.fallback_share), b.p99_ms)
            self.telemetry.reports.append(report)
            if node in self.shadowing:
                self._report_shadow(node, self.shadowing[node], b.p99_ms)
        shadow = self.shadow(node)
        if shadow is None:
            self.shadowing.pop(node, None)
        elif self.shadowing.get(node) != shadow:
            if self.behaviours.get(shadow.version, GOOD).installs:
                self.shadowing[node] = shadow
            else:
                self.telemetry.refusals.append((node, shadow.version, now))
        desired = self.desired(node)
        if desired != running:
            if self.behaviours.get(desired, GOOD).installs:
                self.running[node] = desired
            else:
                self.telemetry.refusals.append((node, desired, now))

    def _report_shadow(self, node: str, shadow: Assignment, serving_p99_ms: float) -> None:
        b = self.behaviours.get(shadow.version, GOOD)
        sampled = round(100 * shadow.shadow_share)
        shed = round(sampled * b.shadow_shed_share)
        errors = round((sampled - shed) * b.shadow_error_share)
        ok = sampled - shed - errors
        report = ShadowReport(
            node, shadow.version, self.clock.now, ok, errors, shed, b.agreement, b.difference, b.p99_ms, serving_p99_ms
        )
        self.telemetry.shadows.append(report)

    def advance(self, seconds: float = STEP_S) -> None:
        end = self.clock.now + seconds
        while self.clock.now < end:
            self.clock.now += STEP_S
            online = [n for n in self.ids if n not in self.offline]
            # One transaction for the round: the inventory's fsync per check-in would dominate the test's time.
            with self.inventory.transaction() as db:
                for node in online:
                    Inventory.record_check_in(db, self.facts[node], (), self.clock.now)
            for node in online:
                self.check_in(node)
            self.controller.tick()

    def rollout(self) -> Rollout:
        return self.controller.status("lm")[0].rollout

    def run_until(self, done: Callable[[Rollout], bool], limit_s: float = 3600) -> Rollout:
        start = self.clock.now
        while not done(self.rollout()):
            assert self.clock.now - start < limit_s, f"still {self.rollout().state}: {self.rollout().reason}"
            self.advance()
        return self.rollout()

    def history(self) -> list[str]:
        return [e.message for e in self.controller.status("lm")[0].history]


def ended(r: Rollout) -> bool:
    return not r.active


def reached(stage: int, r: Rollout) -> bool:
    return r.stage >= stage or ended(r)


def by_position(nodes: int = 24) -> list[str]:
    """The ids of a Sim's nodes, in the order cohorts take them."""
    return sorted((f"device-{i:02d}" for i in range(nodes)), key=lambda n: cohort_position("lm", n))


# A good version


def test_a_good_version_completes_every_stage_over_24_nodes_with_nested_cohorts(tmp_path: Path) -> None:
    sim = Sim(tmp_path / "fleet.sqlite")
    started = sim.controller.start("lm", "2", PLAN)
    assert (started.state, started.stage, started.baseline) == (RUNNING, 0, "1")
    cohorts: list[set[str]] = []
    for stage in range(4):
        r = sim.run_until(functools.partial(reached, stage))
        assert r.stage == stage and r.state == RUNNING
        cohort = sim.on("2")
        # The cohort is exactly the nodes below the bound, never fewer than min_devices, at least the step's share.
        assert cohort == {n for n in sim.ids if cohort_position("lm", n) < r.cohort_bound}
        assert len(cohort) >= max(PLAN.min_devices, PLAN.steps[stage] / 100 * len(sim.ids) - 1)
        cohorts.append(cohort)
    assert all(a <= b for a, b in itertools.pairwise(cohorts))  # nested
    assert len(cohorts[0]) == 2 and len(cohorts[2]) > len(cohorts[1]) and cohorts[-1] == set(sim.ids)
    done = sim.run_until(ended)
    assert done.state == COMPLETED and done.reason == "every stage passed its gates"
    assert [d.version for d in sim.inventory.deployments()] == ["2"]
    assert sim.on("2") == set(sim.ids)
    history = sim.history()
    assert history[0].startswith("started from version 1 at stage 1 of 4 (1 %): 2 of 24 eligible node(s)")
    assert [h.split(" passed")[0] for h in history[1:]] == [
        f"stage {k} of 4 ({p} %)" for k, p in ((1, 1), (2, 10), (3, 50), (4, 100))
    ]
    assert history[-1].endswith("version 2 is now the deployed version")
    assert done.figures is not None and done.figures.canary.requests >= PLAN.min_requests


def test_a_cohort_node_gets_the_new_version_s_variant_with_its_key(tmp_path: Path) -> None:
    sim = Sim(tmp_path / "fleet.sqlite")
    sim.controller.start("lm", "2", PLAN)
    canary, other = by_position()[0], by_position()[-1]
    for node, version in ((canary, "2"), (other, "1")):
        (assignment,) = sim.fleet.desired_state(sim.facts[node], AGREEMENT).assignments
        assert (assignment.version, assignment.target_path) == (version, f"models/lm/{version}/int8")
        key = unwrap_key(assignment.grant, NODE_KEY, node, assignment.target_path)
        assert key == sim.catalog.keys[f"lm-{version}"]


def test_cohorts_are_stable_across_rollouts_of_the_same_model(tmp_path: Path) -> None:
    first, second = Sim(tmp_path / "a.sqlite"), Sim(tmp_path / "b.sqlite")
    first.controller.start("lm", "2", PLAN)
    second.controller.start("lm", "2", PLAN)
    assert first.on("2") == second.on("2") == set(by_position()[:2])


# Bad versions are rolled back at the first stage, the gate named


@pytest.mark.parametrize(
    ("bad", "gate", "figure"),
    [
        (Behaviour(p99_ms=60.0), "p99_latency", "p99 latency 60.0 ms on version 2 vs 20.0 ms on version 1 (×3.00"),
        (Behaviour(error_share=0.2), "error_rate", "error rate 20.0 % on version 2 vs 1.0 % on version 1"),
        (Behaviour(fallback_share=0.3), "fallback_rate", "fallback rate 30.0 % on version 2 vs 5.0 % on version 1"),
    ],
)
def test_a_worse_version_is_rolled_back_at_the_first_stage_naming_the_gate(
    tmp_path: Path, bad: Behaviour, gate: str, figure: str
) -> None:
    sim = Sim(tmp_path / "fleet.sqlite", behaviours={"2": bad})
    sim.controller.start("lm", "2", PLAN)
    canaries = sim.on("2")
    assert len(canaries) == 2
    r = sim.run_until(ended)
    assert (r.state, r.stage) == (ROLLED_BACK, 0)
    assert r.reason.startswith(f"gate {gate} failed at stage 1 of 4 (1 %): ")
    assert figure in r.reason and r.reason.endswith("the cohort goes back to version 1")
    assert sim.history()[-1] == r.reason
    assert sim.on("2") == set()  # the cohort gets the previous version at its next check-in
    sim.advance()
    assert set(sim.running.values()) == {"1"}
    assert [d.version for d in sim.inventory.deployments()] == ["1"]


def test_failed_installs_roll_back_at_once_without_waiting_for_the_interval(tmp_path: Path) -> None:
    sim = Sim(tmp_path / "fleet.sqlite", behaviours={"2": Behaviour(installs=False)})
    start = sim.controller.start("lm", "2", PLAN).started_at
    r = sim.run_until(ended)
    assert r.state == ROLLED_BACK and r.ended_at is not None and r.ended_at - start < PLAN.interval_s
    assert r.reason.startswith(
        "gate failed_installs failed at stage 1 of 4 (1 %): 2 cohort node(s) failed to install version 2 "
        "(at most 0 allowed)"
    )


def test_failed_installs_within_the_budget_do_not_stop_a_rollout(tmp_path: Path) -> None:
    lowest = by_position()[0]
    sim = Sim(tmp_path / "fleet.sqlite")
    original = sim.check_in

    def one_node_refuses(node: str) -> None:
        if node == lowest and sim.desired(node) == "2" and sim.running[node] == "1":
            sim.telemetry.refusals.append((node, "2", sim.clock.now))
            return
        original(node)

    sim.check_in = one_node_refuses  # type: ignore[method-assign]
    sim.controller.start("lm", "2", replace(PLAN, max_failed_installs=1))
    assert sim.run_until(ended).state == COMPLETED


# No data is not success


def test_a_stage_without_data_waits_says_why_and_never_advances(tmp_path: Path) -> None:
    sim = Sim(tmp_path / "fleet.sqlite")
    sim.reporting = False
    sim.controller.start("lm", "2", PLAN)
    sim.advance(PLAN.interval_s)
    r = sim.rollout()
    assert (r.state, r.stage) == (WAITING, 0)
    assert r.reason == (
        "waiting for data at stage 1 of 4 (1 %): 0 of the 2 device(s) needed report version 2 "
        "(2 in the cohort, 2 online); 0 of the 100 request(s) needed were answered on version 2"
    )
    sim.advance(5 * PLAN.interval_s)
    assert (sim.rollout().state, sim.rollout().stage) == (WAITING, 0)
    assert sum(h.startswith("waiting for data") for h in sim.history()) == 1  # noted once, not at every tick
    assert len(sim.on("2")) == 2  # the cohort keeps the new version while it waits
    sim.reporting = True
    r = sim.run_until(lambda r: r.stage == 1)
    assert r.state == RUNNING


def test_a_stage_waits_for_a_baseline_to_compare_with(tmp_path: Path) -> None:
    sim = Sim(tmp_path / "fleet.sqlite")
    sim.telemetry.silent.add("1")
    sim.controller.start("lm", "2", PLAN)
    sim.advance(2 * PLAN.interval_s)
    r = sim.rollout()
    assert (r.state, r.stage) == (WAITING, 0)
    assert r.reason == (
        "waiting for data at stage 1 of 4 (1 %): only 0 request(s) on the baseline version 1 to compare with "
        "(100 needed)"
    )


def test_a_region_without_telemetry_keeps_every_rollout_waiting(tmp_path: Path) -> None:
    sim = Sim(tmp_path / "fleet.sqlite")
    controller = RolloutController(sim.fleet, clock=sim.clock)  # no figures source: NoFigures
    controller.start("lm", "2", PLAN)
    sim.clock.now += 10 * PLAN.interval_s
    controller.tick()
    assert controller.status("lm")[0].rollout.state == WAITING


# Durable state


def test_a_region_restarted_mid_rollout_resumes_it(tmp_path: Path) -> None:
    sim = Sim(tmp_path / "fleet.sqlite")
    sim.controller.start("lm", "2", PLAN)
    before = sim.run_until(lambda r: r.stage == 2)
    sim.restart()
    after = sim.rollout()
    assert after == before  # every stored field, the plan and the last gate figures too
    assert sim.on("2") == {n for n in sim.ids if cohort_position("lm", n) < before.cohort_bound}
    done = sim.run_until(ended)
    assert done.state == COMPLETED
    starts = [h for h in sim.history() if h.startswith("started")]
    assert len(starts) == 1
    assert sum("stage 3 of 4 (50 %) started" in h for h in sim.history()) == 1


def test_the_rollout_tables_join_an_existing_inventory_and_keep_its_data(tmp_path: Path) -> None:
    path = tmp_path / "fleet.sqlite"
    old = Inventory(path)  # an inventory written before rollouts existed
    with old.transaction() as db:
        Inventory.put_node(db, facts("device-1"), b"i" * 32, AGREEMENT, T0, keep=False)
    old.deploy(Deployment("lm", "1", "", "", T0))
    tables = {r[0] for r in old.read("SELECT name FROM sqlite_master WHERE type = 'table'")}
    assert "rollouts" not in tables
    old.close()
    for _ in range(2):  # creating them twice is harmless
        inventory = Inventory(path)
        Fleet(inventory, Catalog(), FleetSection())
        inventory.close()
    db = sqlite3.connect(path)
    tables = {r[0] for r in db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
    assert {"rollouts", "rollout_events", "nodes", "deployments"} <= tables
    assert db.execute("SELECT node_id FROM nodes").fetchall() == [("device-1",)]
    db.close()


def test_a_write_based_on_a_stale_rollout_is_not_applied(tmp_path: Path) -> None:
    sim = Sim(tmp_path / "fleet.sqlite")
    stale = sim.controller.start("lm", "2", PLAN)
    sim.controller.pause("lm")  # the operator, in another process
    assert sim.controller.store.save(stale, replace(stale, stage=3)) is None
    assert (sim.rollout().state, sim.rollout().stage) == (PAUSED, 0)


# Offline nodes


def test_offline_nodes_count_for_nothing_and_catch_up_after_the_rollout(tmp_path: Path) -> None:
    offline = by_position()[:2] + by_position()[-2:]  # two in the first cohort, two in the last
    sim = Sim(tmp_path / "fleet.sqlite", offline=offline)
    sim.controller.start("lm", "2", PLAN)
    counts = sim.controller.status("lm")[0].counts
    assert counts is not None
    # The first stage took in two *online* nodes; the offline ones below them are in the cohort but count for nothing.
    assert (counts.eligible, counts.online, counts.cohort, counts.cohort_online) == (24, 20, 4, 2)
    assert all(sim.desired(n) == "2" for n in offline[:2])  # their desired state waits for them
    sim.advance(PLAN.interval_s)
    assert sim.rollout().stage == 1  # judged on the two that reported
    done = sim.run_until(ended)
    assert done.state == COMPLETED
    assert all(sim.desired(n) == "2" for n in offline)  # what they get when they come back


def test_nodes_coming_online_during_a_wait_widen_the_cohort_to_min_devices(tmp_path: Path) -> None:
    order = by_position()
    sim = Sim(tmp_path / "fleet.sqlite", offline=order[:-1])  # only the node with the highest position is online
    sim.controller.start("lm", "2", replace(PLAN, steps=(1, 100)))
    sim.advance(PLAN.interval_s)
    r = sim.rollout()
    assert (r.state, r.cohort_bound) == (WAITING, 1.0)  # too few online to widen: it waits at its step's size
    assert "0 of the 2 device(s) needed report version 2 (0 in the cohort, 0 online)" in r.reason
    sim.offline.clear()
    sim.advance()
    widened = sim.rollout()
    assert cohort_position("lm", order[1]) < widened.cohort_bound <= cohort_position("lm", order[2])
    assert sim.on("2") == set(order[:2])
    assert sim.run_until(lambda r: r.stage == 1).state == RUNNING


def test_an_offline_node_of_a_rolled_back_cohort_gets_the_previous_version(tmp_path: Path) -> None:
    offline = by_position()[:1]
    sim = Sim(tmp_path / "fleet.sqlite", behaviours={"2": Behaviour(p99_ms=90.0)}, offline=offline)
    sim.controller.start("lm", "2", PLAN)
    assert sim.desired(offline[0]) == "2"
    assert sim.run_until(ended).state == ROLLED_BACK
    assert sim.desired(offline[0]) == "1"


# Eligibility


def test_nodes_the_new_version_does_not_fit_keep_the_baseline_and_are_not_counted(tmp_path: Path) -> None:
    small = by_position()[:6]  # the first nodes any cohort would take
    sim = Sim(tmp_path / "fleet.sqlite", small=small)
    started = sim.controller.start("lm", "3", PLAN)
    assert "6 node(s) running version 1 fit no variant of version 3" in sim.history()[0]
    counts = sim.controller.status("lm")[0].counts
    assert counts is not None and (counts.eligible, counts.unfit) == (18, 6)
    assert sim.on("3") and not sim.on("3") & set(small)
    assert started.cohort_bound > cohort_position("lm", small[-1])  # below the bound, yet not in the cohort
    done = sim.run_until(ended)
    assert done.state == COMPLETED
    # As after `deploy lm 3`: a node no variant fits is unassigned, with the reason.
    state = sim.fleet.desired_state(sim.facts[small[0]], AGREEMENT)
    assert not state.assignments and state.unassigned[0].reason.startswith("no variant fits")


# The operator's verbs


def test_pause_holds_the_stage_and_resume_starts_its_window_again(tmp_path: Path) -> None:
    sim = Sim(tmp_path / "fleet.sqlite")
    sim.controller.start("lm", "2", PLAN)
    sim.advance(20)
    paused = sim.controller.pause("lm")
    assert paused.state == PAUSED and paused.reason.startswith("paused by the operator at stage 1 of 4 (1 %)")
    sim.advance(3 * PLAN.interval_s)
    assert (sim.rollout().state, sim.rollout().stage) == (PAUSED, 0)
    assert len(sim.on("2")) == 2  # the cohort keeps the new version
    resumed = sim.controller.resume("lm")
    assert (resumed.state, resumed.stage_started_at) == (RUNNING, sim.clock.now)
    sim.advance(PLAN.interval_s - STEP_S)
    assert sim.rollout().stage == 0  # a whole interval after the resume
    sim.advance(2 * STEP_S)
    assert sim.rollout().stage == 1


def test_abort_gives_the_cohort_the_previous_version(tmp_path: Path) -> None:
    sim = Sim(tmp_path / "fleet.sqlite")
    sim.controller.start("lm", "2", PLAN)
    sim.run_until(lambda r: r.stage == 1)
    assert sim.on("2")
    aborted = sim.controller.abort("lm")
    assert aborted.state == ABORTED and aborted.reason == (
        "aborted by the operator at stage 2 of 4 (10 %); the cohort goes back to version 1"
    )
    assert sim.on("2") == set() and [d.version for d in sim.inventory.deployments()] == ["1"]
    sim.advance(PLAN.interval_s)
    assert sim.rollout().state == ABORTED  # the ticker leaves an ended rollout alone


def test_promote_makes_the_version_the_deployed_one_at_once(tmp_path: Path) -> None:
    sim = Sim(tmp_path / "fleet.sqlite")
    sim.controller.start("lm", "2", PLAN)
    promoted = sim.controller.promote("lm")
    assert (promoted.state, promoted.stage, promoted.cohort_bound) == (COMPLETED, 3, 100.0)
    assert promoted.reason.startswith("promoted by the operator at stage 1 of 4 (1 %)")
    assert [d.version for d in sim.inventory.deployments()] == ["2"]
    assert sim.on("2") == set(sim.ids)


def test_verbs_refuse_a_state_they_do_not_apply_to(tmp_path: Path) -> None:
    sim = Sim(tmp_path / "fleet.sqlite")
    with pytest.raises(NotFoundError, match="edgecascade rollout start lm VERSION"):
        sim.controller.pause("lm")
    sim.controller.start("lm", "2", PLAN)
    with pytest.raises(PreconditionError, match="is running, not paused"):
        sim.controller.resume("lm")
    sim.controller.pause("lm")
    with pytest.raises(PreconditionError, match="is paused; only a running or waiting one can be paused"):
        sim.controller.pause("lm")
    sim.controller.abort("lm")
    for verb in (sim.controller.abort, sim.controller.promote):
        with pytest.raises(PreconditionError, match=r"has ended \(aborted\); there is nothing to"):
            verb("lm")


# Starting: what is refused, and why


def test_start_refuses_what_cannot_be_rolled_out_saying_what_to_do(tmp_path: Path) -> None:
    sim = Sim(tmp_path / "fleet.sqlite")
    start = sim.controller.start
    with pytest.raises(InvalidArgumentError, match=r"model name '\.\./lm' is not valid"):
        start("../lm", "2")
    with pytest.raises(InvalidArgumentError, match="model version 'v2' is not valid"):
        start("lm", "v2")
    with pytest.raises(ModelNotFoundError, match="the registry has no model 'lm' version 9; publish it first"):
        start("lm", "9")
    with pytest.raises(PreconditionError, match="version 1 of 'lm' is deployed already"):
        start("lm", "1")
    with pytest.raises(PreconditionError, match=r"'other' is deployed to no node.*edgecascade deploy other VERSION"):
        start("other", "1")
    with pytest.raises(InvalidArgumentError, match="must end at 100"):
        start("lm", "2", RolloutPlan(steps=(1, 10)))
    start("lm", "2", PLAN)
    with pytest.raises(PreconditionError, match="one rollout per model at a time: end it first"):
        start("lm", "3")
    assert [r.version for r in sim.controller.store.active()] == ["2"]


def test_a_model_deployed_at_several_versions_has_no_single_baseline(tmp_path: Path) -> None:
    sim = Sim(tmp_path / "fleet.sqlite")
    sim.fleet.deploy("lm", "2", tier="edge")
    with pytest.raises(PreconditionError, match="the deployments of 'lm' name versions 1, 2"):
        sim.controller.start("lm", "3")


def test_a_deploy_during_a_rollout_is_refused_and_a_deploy_behind_its_back_aborts_it(tmp_path: Path) -> None:
    sim = Sim(tmp_path / "fleet.sqlite")
    sim.controller.start("lm", "2", PLAN)
    with pytest.raises(PreconditionError, match="edgecascade rollout abort lm"):
        sim.fleet.deploy("lm", "3")
    sim.inventory.deploy(Deployment("lm", "3", "", "", sim.clock.now))  # e.g. an older CLI
    sim.advance()
    r = sim.rollout()
    assert r.state == ABORTED and "no longer name version 1 (now: 3)" in r.reason
    sim.fleet.deploy("lm", "2")  # nothing active: deploys work again


def test_one_rollout_that_cannot_be_read_does_not_stop_the_ticker(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    sim = Sim(tmp_path / "fleet.sqlite")
    sim.controller.start("lm", "2", PLAN)

    class Broken:
        def figures(
            self, name: str, version: str, since: float, node_ids: Collection[str] | None = None
        ) -> VersionFigures:
            raise OSError("telemetry store unreadable")

        def failed_installs(
            self, name: str, version: str, since: float, node_ids: Collection[str] | None = None
        ) -> int:
            raise OSError("telemetry store unreadable")

        def shadow(
            self, name: str, version: str, since: float, node_ids: Collection[str] | None = None
        ) -> ShadowFigures:
            raise OSError("telemetry store unreadable")

    sim.controller.figures = Broken()
    with caplog.at_level(logging.ERROR, "edgecascade.rollouts"):
        assert sim.controller.tick() == []
    assert "could not be moved on" in caplog.text
    sim.controller.figures = sim.telemetry
    assert sim.run_until(ended).state == COMPLETED
