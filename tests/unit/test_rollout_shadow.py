"""A rollout's shadow phase over a real SQLite inventory, the simulated fleet of test_rollout_controller, fake
telemetry and a fake clock (issue 10, item 3: "an optional shadow stage first").

The new version is installed beside the serving one on the first stage's cohort and runs on a share of its
requests; nobody serves it until the shadow's agreement, latency and errors pass their gates.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Collection
from dataclasses import replace
from pathlib import Path

import pytest

from edgecascade.rollout_commands import rollout_json
from services.errors import InvalidArgumentError
from services.updates.key_grants import unwrap_key
from tests.unit.test_rollout_controller import (
    NODE_KEY,
    STEP_S,
    T0,
    Behaviour,
    Catalog,
    Sim,
    by_position,
    ended,
)
from tier2_region.config import FleetSection
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

SHADOW = RolloutPlan(interval_s=60, min_devices=2, min_requests=100, shadow_percent=25, shadow_interval_s=90)


def in_shadow(r: Rollout) -> bool:
    return r.shadow and r.active


def serving(r: Rollout) -> bool:
    return not r.shadow or ended(r)


def cohort(sim: Sim) -> set[str]:
    bound = sim.rollout().cohort_bound
    return {n for n in sim.ids if cohort_position("lm", n) < bound}


# The plan


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"shadow_percent": -1}, "shadow_percent is the share of a cohort node's requests"),
        ({"shadow_percent": 101}, "above 0 and at most 100"),
        ({"shadow_percent": float("nan")}, "shadow_percent"),
        ({"shadow_percent": 5, "shadow_interval_s": 0}, "shadow_interval_s must be a positive number of seconds"),
        ({"shadow_percent": 5, "shadow_interval_s": 1e9}, "shadow_interval_s must be a positive number"),
        ({"shadow_percent": 5, "min_agreement": 1.5}, "min_agreement is the share of compared answers"),
        ({"shadow_percent": 5, "min_agreement": -0.1}, "between 0 and 1"),
        ({"shadow_percent": 5, "max_mean_difference": -1}, "max_mean_difference must be 0 or more"),
        ({"shadow_interval_s": 30}, "^shadow_interval_s applies to a shadow phase; give shadow_percent too$"),
        ({"max_mean_difference": 0.1}, "^max_mean_difference applies to a shadow phase; give shadow_percent too$"),
        (
            {"shadow_interval_s": 30, "max_mean_difference": 0.1},
            "^shadow_interval_s and max_mean_difference apply to a shadow phase; give shadow_percent too$",
        ),
    ],
)
def test_a_plan_refuses_a_shadow_phase_that_makes_no_sense(changes: dict[str, float], message: str) -> None:
    with pytest.raises(InvalidArgumentError, match=message):
        RolloutPlan(**changes)  # type: ignore[arg-type]


def test_a_plan_s_shadow_phase_defaults_to_none_and_its_interval_to_the_stages() -> None:
    plain = RolloutPlan(interval_s=120)
    assert (plain.has_shadow, plain.shadow_share, plain.shadow_interval) == (False, 0.0, 120)
    shadow = RolloutPlan(interval_s=120, shadow_percent=5)
    assert (shadow.has_shadow, shadow.shadow_share, shadow.shadow_interval) == (True, 0.05, 120)
    assert RolloutPlan(shadow_percent=100, shadow_interval_s=30).shadow_interval == 30


# Starting, and what the nodes are told


def test_a_shadow_rollout_starts_in_the_shadow_phase_on_the_first_stage_s_cohort(tmp_path: Path) -> None:
    sim = Sim(tmp_path / "fleet.sqlite")
    started = sim.controller.start("lm", "2", RolloutPlan(min_devices=2, shadow_percent=5))
    assert (started.state, started.shadow, started.stage) == (RUNNING, True, 0)
    assert started.label == "shadow (5 % of requests)"
    # The same cohort as a rollout without a shadow phase: the first stage's, widened to min_devices.
    assert started.cohort_bound == sim.controller.store.active()[0].cohort_bound
    assert cohort(sim) == set(by_position()[:2])
    (event,) = sim.history()
    assert event.startswith("started from version 1 at shadow (5 % of requests): 2 of 24 eligible node(s)")
    assert "beside version 1 on 5 % of their requests" in event
    status = sim.controller.status("lm")[0]
    assert status.gate_at == started.stage_started_at + started.plan.interval_s  # the shadow interval's default


def test_the_shadow_cohort_keeps_the_baseline_and_gets_the_new_version_as_a_shadow(tmp_path: Path) -> None:
    sim = Sim(tmp_path / "fleet.sqlite")
    sim.controller.start("lm", "2", SHADOW)
    inside = cohort(sim)
    assert len(inside) == 2
    for node in sim.ids:
        assigned = sim.assignments(node)
        if node not in inside:
            assert [(a.version, a.shadow) for a in assigned] == [("1", False)]
            continue
        serving_one, shadow = assigned
        assert (serving_one.version, serving_one.shadow, serving_one.shadow_share) == ("1", False, 0.0)
        assert (shadow.version, shadow.variant, shadow.target_path) == ("2", "int8", "models/lm/2/int8")
        assert (shadow.shadow, shadow.shadow_share) == (True, 0.25)
        # Its content key is granted to the node like any assignment's.
        key = unwrap_key(shadow.grant, NODE_KEY, node, shadow.target_path)
        assert key == sim.catalog.keys["lm-2"]
    assert sim.on("2") == set()  # nobody serves it


# The shadow gates


def test_a_shadow_without_data_waits_says_why_and_never_serves(tmp_path: Path) -> None:
    sim = Sim(tmp_path / "fleet.sqlite")
    sim.telemetry.silent.add("2")
    sim.controller.start("lm", "2", SHADOW)
    sim.advance(3 * SHADOW.shadow_interval)
    r = sim.rollout()
    assert (r.state, r.shadow) == (WAITING, True)
    assert r.reason == (
        "waiting for data at shadow (25 % of requests): shadow: 0 of 100 compared runs, 0 of 2 node(s) "
        "(2 in the cohort, 2 online)"
    )
    assert r.figures is not None and r.figures.shadow is not None and r.figures.shadow.compared == 0
    assert sim.on("2") == set() and len(sim.shadowed()) == 2


def test_a_shadow_waits_until_enough_runs_were_compared(tmp_path: Path) -> None:
    sim = Sim(tmp_path / "fleet.sqlite", behaviours={"2": Behaviour(shadow_shed_share=0.8)})
    sim.controller.start("lm", "2", SHADOW)
    sim.advance(SHADOW.shadow_interval)
    r = sim.rollout()
    # Each node ran 25 sampled requests per check-in, of which 20 were shed: 5 compared.
    assert r.state == WAITING and r.reason.startswith("waiting for data at shadow (25 % of requests): shadow: ")
    assert "of 100 compared runs, 2 of 2 node(s)" in r.reason and "run(s) shed (the nodes were busy)" in r.reason
    assert sim.run_until(serving).state == RUNNING  # more check-ins bring enough comparisons


def test_a_good_shadow_goes_on_to_stage_1_which_serves_the_new_version(tmp_path: Path) -> None:
    sim = Sim(tmp_path / "fleet.sqlite")
    sim.controller.start("lm", "2", SHADOW)
    inside = cohort(sim)
    sim.advance(SHADOW.shadow_interval - STEP_S)
    assert in_shadow(sim.rollout())  # its gates are read only after the shadow interval
    sim.advance()
    r = sim.rollout()
    assert (r.state, r.shadow, r.stage, r.label) == (RUNNING, False, 0, "stage 1 of 4 (1 %)")
    assert r.stage_started_at == sim.clock.now
    assert r.figures is not None and r.figures.shadow is not None
    assert r.figures.shadow.agreement == pytest.approx(0.97) and r.figures.shadow.nodes == 2
    assert sim.history()[-1].startswith(
        "shadow (25 % of requests) passed its gates (top-1 agreement 0.97 ≥ 0.90 (over 400 compared run(s) on 2 "
        "node(s)); shadow p99 latency 20.0 ms vs 20.0 ms serving the same requests"
    )
    assert sim.history()[-1].endswith("; stage 1 of 4 (1 %) started: the cohort serves version 2")
    # The same cohort now serves it, with no shadow any more.
    assert sim.on("2") == inside and sim.shadowed() == set()
    assert all(len(sim.assignments(n)) == 1 for n in sim.ids)
    done = sim.run_until(ended)
    assert done.state == COMPLETED and sim.on("2") == set(sim.ids)


@pytest.mark.parametrize(
    ("behaviour", "plan", "gate", "detail"),
    [
        (Behaviour(agreement=0.62), SHADOW, "agreement", "top-1 agreement 0.62 < 0.90"),
        (
            Behaviour(agreement=0.93),
            RolloutPlan(min_devices=2, interval_s=60, shadow_percent=25, min_agreement=0.95),
            "agreement",
            "top-1 agreement 0.93 < 0.95",
        ),
        (Behaviour(p99_ms=45.0), SHADOW, "p99_latency", "shadow p99 latency 45.0 ms vs 20.0 ms serving"),
        (Behaviour(shadow_error_share=0.2), SHADOW, "error_rate", "20.0 % of the shadow's runs failed"),
        (
            Behaviour(difference=0.3),
            RolloutPlan(min_devices=2, interval_s=60, shadow_percent=25, max_mean_difference=0.1),
            "mean_difference",
            "mean absolute difference of the outputs 0.3 > 0.1",
        ),
    ],
)
def test_a_shadow_that_disagrees_or_is_slow_or_fails_is_rolled_back_naming_the_gate(
    tmp_path: Path, behaviour: Behaviour, plan: RolloutPlan, gate: str, detail: str
) -> None:
    sim = Sim(tmp_path / "fleet.sqlite", behaviours={"2": behaviour})
    sim.controller.start("lm", "2", plan)
    served: set[str] = set()
    while not ended(sim.rollout()):
        assert sim.clock.now < T0 + 3600, sim.rollout().reason
        sim.advance()
        served |= {n for n, v in sim.running.items() if v == "2"}
    r = sim.rollout()
    assert r.state == ROLLED_BACK and r.shadow
    assert r.reason.startswith(f"shadow gate {gate} failed at shadow (25 % of requests): ")
    assert detail in r.reason
    assert r.reason.endswith("; the shadow is removed and the cohort keeps version 1")
    assert served == set()  # never served by anyone
    assert sim.shadowed() == set() and sim.on("1") == set(sim.ids)
    assert [d.version for d in sim.inventory.deployments()] == ["1"]
    assert r.figures is not None and r.figures.shadow is not None  # what decided it, for `rollout status`


def test_a_mean_difference_is_not_gated_unless_asked(tmp_path: Path) -> None:
    sim = Sim(tmp_path / "fleet.sqlite", behaviours={"2": Behaviour(difference=5.0)})
    sim.controller.start("lm", "2", SHADOW)
    assert sim.run_until(serving).state == RUNNING


class NoTop1:
    """The simulated telemetry of a model whose outputs have no top-1 class (a regressor, an [N, 1] score):
    its compared runs record a difference and no agreement."""

    def __init__(self, sim: Sim) -> None:
        self.telemetry = sim.telemetry

    def figures(self, name: str, version: str, since: float, node_ids: Collection[str] | None = None) -> VersionFigures:
        return self.telemetry.figures(name, version, since, node_ids)

    def failed_installs(self, name: str, version: str, since: float, node_ids: Collection[str] | None = None) -> int:
        return self.telemetry.failed_installs(name, version, since, node_ids)

    def shadow(self, name: str, version: str, since: float, node_ids: Collection[str] | None = None) -> ShadowFigures:
        return replace(self.telemetry.shadow(name, version, since, node_ids), agreement=None)


def test_a_shadow_without_a_top_1_waits_telling_the_operator_to_gate_the_mean_difference(tmp_path: Path) -> None:
    sim = Sim(tmp_path / "fleet.sqlite")
    sim.controller.figures = NoTop1(sim)
    sim.controller.start("lm", "2", SHADOW)
    sim.advance(3 * SHADOW.shadow_interval)
    r = sim.rollout()
    assert (r.state, r.shadow) == (WAITING, True)
    assert r.figures is not None and r.figures.shadow is not None
    assert r.figures.shadow.compared >= SHADOW.min_requests and r.figures.shadow.agreement is None
    assert r.reason.startswith("waiting for data at shadow (25 % of requests): no top-1 output to compare in ")
    assert "start it again with --max-mean-difference D" in r.reason
    assert sim.on("2") == set()


def test_a_shadow_without_a_top_1_is_judged_on_its_mean_difference(tmp_path: Path) -> None:
    sim = Sim(tmp_path / "fleet.sqlite")
    sim.controller.figures = NoTop1(sim)
    sim.controller.start("lm", "2", replace(SHADOW, max_mean_difference=0.1))
    r = sim.run_until(serving)
    assert (r.state, r.shadow, r.label) == (RUNNING, False, "stage 1 of 4 (1 %)")
    passed = next(e for e in sim.history() if "passed its gates" in e)
    assert passed.startswith(
        "shadow (25 % of requests) passed its gates (no top-1 output to compare; judged on the mean difference"
    )
    assert "mean absolute difference of the outputs 0.02 ≤ 0.1" in passed


def test_a_shadow_without_a_top_1_fails_on_its_mean_difference(tmp_path: Path) -> None:
    sim = Sim(tmp_path / "fleet.sqlite", behaviours={"2": Behaviour(difference=0.3)})
    sim.controller.figures = NoTop1(sim)
    sim.controller.start("lm", "2", replace(SHADOW, max_mean_difference=0.1))
    r = sim.run_until(ended)
    assert r.state == ROLLED_BACK and r.reason.startswith("shadow gate mean_difference failed at shadow")


def test_a_shadow_that_fails_every_run_is_rolled_back_without_waiting_for_comparisons(tmp_path: Path) -> None:
    sim = Sim(tmp_path / "fleet.sqlite", behaviours={"2": Behaviour(shadow_error_share=1.0)})
    sim.controller.start("lm", "2", SHADOW)
    r = sim.run_until(ended)
    assert r.state == ROLLED_BACK
    assert "shadow gate error_rate failed" in r.reason and "100.0 % of the shadow's runs failed" in r.reason


def test_a_refused_shadow_install_rolls_back_at_once(tmp_path: Path) -> None:
    sim = Sim(tmp_path / "fleet.sqlite", behaviours={"2": Behaviour(installs=False)})
    sim.controller.start("lm", "2", SHADOW)
    sim.advance(2 * STEP_S)  # well before the shadow interval
    r = sim.rollout()
    assert r.state == ROLLED_BACK
    assert r.reason.startswith("shadow gate failed_installs failed at shadow (25 % of requests): ")
    assert "failed to install version 2" in r.reason
    assert sim.shadowed() == set() and sim.on("2") == set()


# The operator's verbs


def test_pause_keeps_the_shadow_and_resume_starts_its_window_again(tmp_path: Path) -> None:
    sim = Sim(tmp_path / "fleet.sqlite")
    sim.controller.start("lm", "2", SHADOW)
    sim.advance(STEP_S)
    paused = sim.controller.pause("lm")
    assert paused.state == PAUSED and paused.reason.startswith("paused by the operator at shadow (25 % of requests)")
    sim.advance(3 * SHADOW.shadow_interval)
    assert sim.rollout().state == PAUSED and len(sim.shadowed()) == 2
    resumed = sim.controller.resume("lm")
    assert (resumed.state, resumed.shadow, resumed.stage_started_at) == (RUNNING, True, sim.clock.now)
    sim.advance(SHADOW.shadow_interval - STEP_S)
    assert in_shadow(sim.rollout())
    sim.advance()
    assert serving(sim.rollout()) and sim.rollout().state == RUNNING


def test_abort_removes_the_shadow(tmp_path: Path) -> None:
    sim = Sim(tmp_path / "fleet.sqlite")
    sim.controller.start("lm", "2", SHADOW)
    sim.advance(STEP_S)
    assert len(sim.shadowed()) == 2
    aborted = sim.controller.abort("lm")
    assert aborted.state == ABORTED and aborted.reason == (
        "aborted by the operator at shadow (25 % of requests); the shadow is removed and the cohort keeps version 1"
    )
    assert sim.shadowed() == set() and sim.on("1") == set(sim.ids)
    sim.advance()
    assert sim.shadowing == {}  # the nodes dropped it at their next check-in


def test_promote_skips_the_shadow_and_every_stage(tmp_path: Path) -> None:
    sim = Sim(tmp_path / "fleet.sqlite")
    sim.controller.start("lm", "2", SHADOW)
    promoted = sim.controller.promote("lm")
    assert (promoted.state, promoted.shadow, promoted.stage, promoted.cohort_bound) == (COMPLETED, False, 3, 100.0)
    assert promoted.reason.startswith("promoted by the operator at shadow (25 % of requests)")
    assert sim.on("2") == set(sim.ids) and sim.shadowed() == set()


# Durable state


def test_a_region_restarted_in_the_shadow_phase_goes_on_with_it(tmp_path: Path) -> None:
    sim = Sim(tmp_path / "fleet.sqlite")
    sim.controller.start("lm", "2", SHADOW)
    sim.advance(SHADOW.shadow_interval - STEP_S)
    sim.controller.tick()  # a reading before the interval is over changes nothing
    before = sim.rollout()
    assert in_shadow(before)
    sim.restart()
    after = sim.rollout()
    assert after == before and after.plan == SHADOW
    assert len(sim.shadowed()) == 2
    r = sim.run_until(serving)
    assert (r.state, r.stage) == (RUNNING, 0)
    # The shadow's figures survive a restart too.
    sim.restart()
    kept = sim.rollout()
    assert kept.figures == r.figures and kept.figures is not None and kept.figures.shadow is not None


# The columns of an older inventory's rollouts table (before the shadow phase).
_OLD_ROLLOUTS = """CREATE TABLE rollouts (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    name TEXT NOT NULL,
    version TEXT NOT NULL,
    baseline TEXT NOT NULL,
    plan_json TEXT NOT NULL,
    state TEXT NOT NULL,
    stage INTEGER NOT NULL,
    cohort_bound REAL NOT NULL,
    stage_started_at REAL NOT NULL,
    started_at REAL NOT NULL,
    updated_at REAL NOT NULL,
    ended_at REAL,
    reason TEXT NOT NULL DEFAULT '',
    figures_json TEXT,
    revision INTEGER NOT NULL DEFAULT 0
)"""


def test_an_inventory_from_before_the_shadow_phase_opens_and_keeps_its_rollouts(tmp_path: Path) -> None:
    path = tmp_path / "fleet.sqlite"
    old = Inventory(path)
    old.deploy(Deployment("lm", "1", "", "", T0))
    old.close()
    db = sqlite3.connect(path)
    db.execute(_OLD_ROLLOUTS)
    plan = '{"interval_s": 60.0, "max_failed_installs": 0, "min_devices": 1, "min_requests": 100, "steps": [50, 100]}'
    figures = (
        '{"canary": {"name": "lm", "version": "2", "requests": 120}, "baseline": {"name": "lm", "version": "1"}, '
        '"failed_installs": 0}'
    )
    db.execute(
        "INSERT INTO rollouts VALUES (NULL, 'lm', '2', '1', ?, 'running', 0, 50.0, ?, ?, ?, NULL, '', ?, 3)",
        (plan, T0, T0, T0, figures),
    )
    db.commit()
    db.close()
    for _ in range(2):  # adding the column twice is harmless
        inventory = Inventory(path)
        fleet = Fleet(inventory, Catalog(), FleetSection())
        (r,) = fleet.rollouts.active()
        assert (r.version, r.shadow, r.state, r.revision, r.plan.steps, r.plan.shadow_percent) == (
            "2",
            False,
            RUNNING,
            3,
            (50.0, 100.0),
            0.0,
        )
        assert r.figures is not None and r.figures.canary.requests == 120 and r.figures.shadow is None
        inventory.close()
    # And it takes a shadow rollout once that one ended.
    inventory = Inventory(path)
    catalog = Catalog()
    catalog.add("lm", "1")
    catalog.add("lm", "3")
    fleet = Fleet(inventory, catalog, FleetSection())
    controller = RolloutController(fleet, clock=lambda: T0 + 10)
    controller.abort("lm")
    started = controller.start("lm", "3", RolloutPlan(shadow_percent=10))
    assert started.shadow and controller.status("lm")[0].rollout == started
    inventory.close()


def test_the_new_column_is_in_a_new_inventory(tmp_path: Path) -> None:
    inventory = Inventory(tmp_path / "fleet.sqlite")
    Fleet(inventory, Catalog(), FleetSection())
    columns = {row[1] for row in inventory.read("PRAGMA table_info(rollouts)")}
    assert "shadow" in columns
    inventory.close()


def test_the_history_and_the_json_tell_the_shadow_phase_from_the_stages(tmp_path: Path) -> None:
    sim = Sim(tmp_path / "fleet.sqlite")
    sim.controller.start("lm", "2", SHADOW)
    status = sim.controller.status("lm")[0]
    shown = rollout_json(status)
    assert (shown["phase"], shown["stage"], shown["label"]) == ("shadow", None, "shadow (25 % of requests)")
    sim.run_until(serving)
    status = sim.controller.status("lm")[0]
    assert [(e.shadow, e.stage) for e in status.history] == [(True, 0), (False, 0)]
    shown = rollout_json(status)
    assert (shown["phase"], shown["stage"]) == ("serving", 1)
    assert [(h["phase"], h["stage"]) for h in shown["history"]] == [("shadow", None), ("serving", 1)]
    # A rollout rolled back in its shadow phase ended there.
    sim.controller.abort("lm")
    sim2 = Sim(tmp_path / "other.sqlite", behaviours={"2": Behaviour(agreement=0.5)})
    sim2.controller.start("lm", "2", SHADOW)
    sim2.run_until(ended)
    shown = rollout_json(sim2.controller.status("lm")[0])
    assert (shown["state"], shown["phase"], shown["stage"]) == (ROLLED_BACK, "shadow", None)
    assert [h["stage"] for h in shown["history"]] == [None, None]
