"""Rollouts over a fleet of simulated nodes against a real region process (issue 10 #3 and #4).

The region is ``python -m tier2_region`` (``bench.fleet_region``) with a registry holding versions
1 and 2 of a model, a one-second check interval and one-second telemetry windows. The nodes are
``bench.fleet_sim`` nodes on this test's event loop: real keys and one-time tokens, signed
check-ins, installs of what their desired state names, and traffic whose behaviour depends on the
version they serve, exported by the stock OTLP exporter through one OpenTelemetry MeterProvider
per node. The region's rollout ticker (every 2 s) judges each stage on what it received.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest

from bench.fleet_region import MODEL, CliResult, RegionProcess, edgecascade, publish_registry
from bench.fleet_sim import FleetSim, SimSettings, VersionProfile, wait_for
from tier2_region.fleet.rollout import COMPLETED, ROLLED_BACK, WAITING, RolloutPlan, cohort_position
from tier2_region.fleet.rollout_controller import OFFLINE_CHECKS, RolloutStatus

NODES = 24
GOOD = VersionProfile(requests_per_s=30.0, p50_ms=10.0, p99_ms=14.0)
# Interval 3 s, judged on the region's 2 s ticks: a stage takes 3-5 s when its data is there.
PLAN = RolloutPlan(steps=(10.0, 50.0, 100.0), interval_s=3.0, min_devices=2, min_requests=50, max_p99_ratio=2.0)
PLAN_ARGS = ["--steps", "10,50,100", "--interval-s", "3", "--min-devices", "2", "--min-requests", "50"]
# Room for every stage of a rollout on a busy 2-vCPU machine; a passing run takes a fraction of it.
ROLLOUT_TIMEOUT_S = 90.0
SWITCH_TIMEOUT_S = 30.0


@pytest.fixture
async def region(tmp_path: Path) -> AsyncIterator[RegionProcess]:
    process = RegionProcess(tmp_path / "region", publish_registry(tmp_path / "registry"))
    await process.start_and_wait()
    try:
        yield process
    finally:
        process.stop()


@asynccontextmanager
async def running_fleet(
    region: RegionProcess, profiles: Mapping[str, VersionProfile], count: int = NODES
) -> AsyncIterator[FleetSim]:
    """``count`` nodes enrolled with tokens from the region's inventory, running, all serving version 1."""
    sim = FleetSim(SimSettings(region.address, timeout_s=2.0), profiles, default=GOOD)
    await sim.enroll(sim.add_nodes(count), region.issue_tokens(count))
    sim.start()
    try:
        await wait_for(lambda: set(sim.serving(MODEL).values()) == {"1"}, SWITCH_TIMEOUT_S, "every node on version 1")
        yield sim
    finally:
        await sim.stop()
    assert sim.errors == 0


def deploy_v1(region: RegionProcess) -> None:
    with region.fleet() as fleet:
        fleet.deploy(MODEL, "1")


def status(region: RegionProcess) -> RolloutStatus:
    with region.controller() as controller:
        return controller.status(MODEL)[0]


async def wait_for_status(region: RegionProcess, done: Any, what: str) -> RolloutStatus:
    """Polls the rollout (on the loop, so the nodes keep running) until ``done(status)`` holds."""
    seen: list[RolloutStatus] = []

    def check() -> bool:
        seen.append(status(region))
        return bool(done(seen[-1]))

    try:
        await wait_for(check, ROLLOUT_TIMEOUT_S, what, poll_s=0.25)
    except TimeoutError:
        last = seen[-1].rollout if seen else None
        pytest.fail(f"{what}: last seen {last}\nregion log:\n{region.log_tail()}")
    return seen[-1]


def messages(found: RolloutStatus) -> list[str]:
    return [event.message for event in found.history]


def cohort_of_first_stage(found: RolloutStatus) -> int:
    """How many nodes the rollout's first event says were in the first stage's cohort."""
    started = messages(found)[0]
    assert started.startswith("started from version 1 at stage 1 of 3 (10 %): "), started
    return int(started.split(": ", 1)[1].split(" of ", 1)[0])


def switched_to(sim: FleetSim, version: str, before: float = float("inf")) -> set[str]:
    """The nodes that started serving ``version`` before Unix time ``before``."""
    return {n.node_id for n in sim.nodes for at, _, v in n.history if v == version and at < before}


async def test_a_good_version_completes_every_stage_and_every_online_node_runs_it(region: RegionProcess) -> None:
    deploy_v1(region)
    async with running_fleet(region, {"1": GOOD, "2": GOOD}) as sim:
        with region.controller() as controller:
            controller.start(MODEL, "2", PLAN)
        found = await wait_for_status(region, lambda s: not s.rollout.active, "the rollout to end")
        assert found.rollout.state == COMPLETED, found.rollout.reason
        history = messages(found)
        passed = [m for m in history if "passed its gates" in m]
        assert [m.split(" passed", 1)[0] for m in passed] == [
            "stage 1 of 3 (10 %)",
            "stage 2 of 3 (50 %)",
            "stage 3 of 3 (100 %)",
        ]
        assert passed[-1].endswith("version 2 is now the deployed version")
        await wait_for(lambda: set(sim.serving(MODEL).values()) == {"2"}, SWITCH_TIMEOUT_S, "every node on version 2")
        # Stage by stage: only the first cohort ran version 2 before the first stage passed.
        first_pass = next(e.at for e in found.history if "stage 1 of 3 (10 %) passed" in e.message)
        early = switched_to(sim, "2", before=first_pass)
        assert PLAN.min_devices <= len(early) <= cohort_of_first_stage(found) < NODES // 2
        with region.fleet() as fleet:
            assert {d.version for d in fleet.inventory.deployments() if d.name == MODEL} == {"2"}


async def cli(region: RegionProcess, *args: str) -> CliResult:
    result = await edgecascade(*args, *region.location_args())
    assert result.returncode == 0, f"edgecascade {' '.join(args)}:\n{result.stdout}\n{result.stderr}"
    return result


async def cli_status(region: RegionProcess) -> dict[str, Any]:
    data: dict[str, Any] = json.loads((await cli(region, "rollout", "status", MODEL, "--json")).stdout)
    return data


BAD = {
    # p99 five times the baseline's.
    "p99_latency": VersionProfile(requests_per_s=30.0, p50_ms=40.0, p99_ms=70.0),
    # A third of the requests fail.
    "error_rate": VersionProfile(requests_per_s=30.0, p50_ms=10.0, p99_ms=14.0, error_share=0.3),
    # Every node refuses to install it.
    "failed_installs": VersionProfile(requests_per_s=30.0, refuse_share=1.0),
}


@pytest.mark.parametrize("gate", list(BAD))
async def test_a_bad_version_is_rolled_back_at_the_first_stage_with_the_gate_named(
    region: RegionProcess, gate: str
) -> None:
    await cli(region, "deploy", MODEL, "1")
    async with running_fleet(region, {"1": GOOD, "2": BAD[gate]}) as sim:
        await cli(region, "rollout", "start", MODEL, "2", *PLAN_ARGS)
        deadline = time.monotonic() + ROLLOUT_TIMEOUT_S
        data = await cli_status(region)
        while data["state"] not in (ROLLED_BACK, COMPLETED, "aborted"):
            assert data["stage"] == 1, data  # a bad version never gets past the first stage
            assert time.monotonic() < deadline, f"not rolled back in time: {data}\n{region.log_tail()}"
            await asyncio.sleep(0.25)  # polling; each CLI run takes a second of its own too
            data = await cli_status(region)
        assert data["state"] == ROLLED_BACK, data
        assert data["stage"] == 1
        assert data["reason"].startswith(f"gate {gate} failed at stage 1 of 3 (10 %): "), data["reason"]
        assert data["reason"].endswith("the cohort goes back to version 1")
        assert data["history"][-1]["state"] == ROLLED_BACK
        # The canary cohort gets version 1 back; nobody outside it ever ran version 2.
        await wait_for(
            lambda: set(sim.serving(MODEL).values()) == {"1"}, SWITCH_TIMEOUT_S, "every node on version 1 again"
        )
        canaries = switched_to(sim, "2")
        bound = data["cohort_bound"]
        assert all(cohort_position(MODEL, node_id) < bound for node_id in canaries)
        if gate == "failed_installs":
            assert canaries == set()
            assert data["figures"]["failed_installs"] >= 1
        else:
            assert canaries, "the cohort ran version 2 before it was judged"
            for node_id in canaries:
                assert [v for _, _, v in sim.node(node_id).history][-2:] == ["2", "1"]
        # What the nodes report settles: the withdrawn assignment is no longer pending or refused.
        await wait_for(
            lambda: all(m.state == "committed" for n in sim.nodes for m in n.models.values()),
            SWITCH_TIMEOUT_S,
            "every node reporting its version committed",
        )


SHADOW_ARGS = [*PLAN_ARGS, "--shadow-percent", "50", "--shadow-interval-s", "3", "--min-agreement", "0.9"]


async def test_a_good_shadow_is_compared_on_the_nodes_then_served(region: RegionProcess) -> None:
    await cli(region, "deploy", MODEL, "1")
    async with running_fleet(region, {"1": GOOD, "2": GOOD}) as sim:
        await cli(region, "rollout", "start", MODEL, "2", *SHADOW_ARGS)
        started = await cli_status(region)
        assert (started["phase"], started["label"]) == ("shadow", "shadow (50 % of requests)"), started
        await wait_for(
            lambda: any(n.shadowing(MODEL) == "2" for n in sim.nodes), SWITCH_TIMEOUT_S, "a node to run the shadow"
        )
        shadowing = {n.node_id for n in sim.nodes if n.shadowing(MODEL) == "2"}
        assert all(cohort_position(MODEL, node_id) < started["cohort_bound"] for node_id in shadowing)
        assert {n.serving(MODEL) for n in sim.nodes if n.node_id in shadowing} == {"1"}  # beside what serves
        found = await wait_for_status(region, lambda s: not s.rollout.shadow, "the shadow to pass its gates")
        assert found.rollout.active or found.rollout.state == COMPLETED, found.rollout.reason
        passed = next(e for e in found.history if "passed its gates" in e.message)
        assert passed.message.startswith("shadow (50 % of requests) passed its gates (top-1 agreement 1.00 ≥ 0.90")
        assert passed.message.endswith("stage 1 of 3 (10 %) started: the cohort serves version 2")
        seen = found.rollout.figures.shadow if found.rollout.figures else None
        assert seen is not None and seen.compared >= PLAN.min_requests and seen.nodes >= PLAN.min_devices
        assert seen.errors == 0 and seen.p99_ms is not None and seen.serving_p99_ms is not None
        assert switched_to(sim, "2", before=passed.at) == set()  # nobody served it while it was a shadow
        # Serving stages send no shadow: every node drops its shadow (the later stages are the other tests' work).
        await wait_for(lambda: all(not n.shadows for n in sim.nodes), SWITCH_TIMEOUT_S, "every shadow removed")


async def test_a_shadow_that_disagrees_is_stopped_before_anyone_serves_it(region: RegionProcess) -> None:
    await cli(region, "deploy", MODEL, "1")
    # As fast and as reliable as version 1, but its top-1 answer differs on half the requests.
    disagrees = VersionProfile(requests_per_s=30.0, p50_ms=10.0, p99_ms=14.0, agreement=0.5, difference=0.3)
    async with running_fleet(region, {"1": GOOD, "2": disagrees}) as sim:
        await cli(region, "rollout", "start", MODEL, "2", *SHADOW_ARGS)
        await wait_for(
            lambda: any(n.shadowing(MODEL) == "2" for n in sim.nodes), SWITCH_TIMEOUT_S, "a node to run the shadow"
        )
        found = await wait_for_status(region, lambda s: not s.rollout.active, "the shadow to be judged")
        assert found.rollout.state == ROLLED_BACK, found.rollout.reason
        assert found.rollout.reason.startswith("shadow gate agreement failed at shadow (50 % of requests): top-1 ")
        assert found.rollout.reason.endswith("the shadow is removed and the cohort keeps version 1")
        data = await cli_status(region)
        assert data["figures"]["shadow"]["agreement"] < 0.9 and data["figures"]["shadow"]["nodes"] >= 2
        assert sim.first_served(MODEL, "2") is None  # nobody ever served it
        await wait_for(lambda: all(not n.shadows for n in sim.nodes), SWITCH_TIMEOUT_S, "every shadow removed")
        assert set(sim.serving(MODEL).values()) == {"1"}


async def test_a_stage_without_data_waits_and_says_why_then_goes_on_when_data_comes(region: RegionProcess) -> None:
    deploy_v1(region)
    # The cohort installs version 2 and reports it, but nobody sends it a request.
    silent = VersionProfile(requests_per_s=0.0)
    async with running_fleet(region, {"1": GOOD, "2": silent}) as sim:
        with region.controller() as controller:
            controller.start(MODEL, "2", PLAN)
        found = await wait_for_status(region, lambda s: s.rollout.state != "running", "the first stage to be judged")
        assert found.rollout.state == WAITING, found.rollout.reason
        assert found.rollout.stage == 0
        assert found.rollout.reason.startswith("waiting for data at stage 1 of 3 (10 %): "), found.rollout.reason
        assert "0 of the 50 request(s) needed were answered on version 2" in found.rollout.reason
        assert switched_to(sim, "2"), "the cohort runs version 2: what is missing is its traffic"

        sim.set_profile("2", GOOD)
        found = await wait_for_status(region, lambda s: s.rollout.stage >= 1, "the stage to go on once data comes")
        history = messages(found)
        waited = next(i for i, m in enumerate(history) if m.startswith("waiting for data at stage 1 of 3"))
        passed = next(i for i, m in enumerate(history) if m.startswith("stage 1 of 3 (10 %) passed its gates"))
        assert waited < passed


@pytest.mark.slow
async def test_a_region_sigkilled_mid_rollout_resumes_it_to_completion(region: RegionProcess) -> None:
    deploy_v1(region)
    async with running_fleet(region, {"1": GOOD, "2": GOOD}) as sim:
        with region.controller() as controller:
            controller.start(MODEL, "2", PLAN)
        before = await wait_for_status(region, lambda s: s.rollout.stage >= 1, "the second stage to start")
        assert before.rollout.active
        failed_before = len([f for f in sim.checkins.failures if f])
        region.kill()
        await wait_for(
            lambda: len([f for f in sim.checkins.failures if f]) > failed_before,
            SWITCH_TIMEOUT_S,
            "a check-in to fail while the region is down",
        )
        await region.start_and_wait()

        found = await wait_for_status(region, lambda s: not s.rollout.active, "the resumed rollout to end")
        assert found.rollout.state == COMPLETED, found.rollout.reason
        history = messages(found)
        assert history[: len(before.history)] == messages(before)  # nothing was lost
        assert any(m.startswith("stage 3 of 3 (100 %) passed its gates") for m in history)
        await wait_for(lambda: set(sim.serving(MODEL).values()) == {"2"}, SWITCH_TIMEOUT_S, "every node on version 2")


@pytest.mark.slow
async def test_offline_nodes_are_left_out_of_the_stages_and_catch_up_after_the_rollout(region: RegionProcess) -> None:
    deploy_v1(region)
    async with running_fleet(region, {"1": GOOD, "2": GOOD}) as sim:
        # Two in the first stage's cohort and two outside it, so both kinds must catch up.
        by_position = sorted(sim.nodes, key=lambda n: cohort_position(MODEL, n.node_id))
        away = {n.node_id for n in (*by_position[:2], *by_position[-2:])}
        sim.set_offline(away)
        # Started once the region counts them offline (three missed check-ins).
        await wait_for(lambda: offline_count(region) == len(away), SWITCH_TIMEOUT_S, "the region to count 4 offline")
        with region.controller() as controller:
            controller.start(MODEL, "2", PLAN)
        counts = status(region).counts
        assert counts is not None
        assert (counts.eligible, counts.online) == (NODES, NODES - len(away))
        found = await wait_for_status(region, lambda s: not s.rollout.active, "the rollout to end")
        assert found.rollout.state == COMPLETED, found.rollout.reason
        online = {n.node_id for n in sim.nodes} - away
        await wait_for(
            lambda: {sim.node(n).serving(MODEL) for n in online} == {"2"}, SWITCH_TIMEOUT_S, "online nodes on 2"
        )
        assert {sim.node(n).serving(MODEL) for n in away} == {"1"}  # they heard nothing while away

        sim.set_offline(away, offline=False)
        await wait_for(
            lambda: {sim.node(n).serving(MODEL) for n in away} == {"2"},
            SWITCH_TIMEOUT_S,
            "the nodes that were away to catch up with version 2",
        )


def offline_count(region: RegionProcess) -> int:
    """Nodes the region counts offline now (no check-in for OFFLINE_CHECKS intervals)."""
    with region.fleet() as fleet:
        horizon = OFFLINE_CHECKS * region.settings.check_interval_s
        now = time.time()
        return sum(1 for _, _, seen in fleet.inventory.presence() if seen is None or now - seen > horizon)
