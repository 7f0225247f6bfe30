"""``edgecascade rollout start|status|pause|resume|abort|promote`` on a state directory (issue 10 #3)."""

from __future__ import annotations

import json
import shutil
import time
from dataclasses import replace
from pathlib import Path

import pytest

from edgecascade import __main__ as cli
from edgecascade import rollout_commands
from tests.support.registry import new_registry, publish_lm
from tier2_region.fleet.domain import NodeFacts
from tier2_region.fleet.figures import ShadowFigures, VersionFigures
from tier2_region.fleet.inventory import Inventory
from tier2_region.fleet.rollout import GateFigures, Rollout, RolloutPlan
from tier2_region.fleet.rollout_store import RolloutStore

MB = 1024 * 1024
AGREEMENT = bytes(range(32))


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str]:
    code = cli.main(list(argv))
    return code, capsys.readouterr().out


@pytest.fixture(scope="module")
def published(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A region directory with lm 1 and 2 published (made once: quantizing is the slow part)."""
    region = tmp_path_factory.mktemp("published") / "region-1"
    kit = new_registry(region)
    publish_lm(kit, version="1")
    publish_lm(kit, version="2", seed=1)
    kit.registry.close()
    return region


@pytest.fixture
def state(tmp_path: Path, published: Path) -> Path:
    """A state directory as `edgecascade up` lays it out: the published registry and ten devices that checked in."""
    shutil.copytree(published, tmp_path / "state" / "region-1")
    inventory = Inventory(tmp_path / "state" / "region-1" / "fleet.sqlite")
    now = time.time()
    with inventory.transaction() as db:
        for i in range(10):
            facts = NodeFacts(f"device-{i}", "device", "cpu-x86_64", 256 * MB, "1.40.0", MB)
            Inventory.put_node(db, facts, b"i" * 32, AGREEMENT, now, keep=False)
            Inventory.record_check_in(db, facts, (), now)
    inventory.close()
    return tmp_path / "state"


def deployed(state: Path) -> list[str]:
    inventory = Inventory(state / "region-1" / "fleet.sqlite")
    try:
        return [d.version for d in inventory.deployments()]
    finally:
        inventory.close()


def test_the_rollout_verbs_are_declared_with_their_handlers() -> None:
    parser = cli._parser()
    for argv, handler in (
        (["rollout", "start", "lm", "2"], rollout_commands.start_rollout),
        (["rollout", "status"], rollout_commands.show_status),
        (["rollout", "status", "lm", "--json"], rollout_commands.show_status),
        (["rollout", "pause", "lm"], rollout_commands.change_rollout),
        (["rollout", "resume", "lm"], rollout_commands.change_rollout),
        (["rollout", "abort", "lm"], rollout_commands.change_rollout),
        (["rollout", "promote", "lm"], rollout_commands.change_rollout),
    ):
        assert parser.parse_args(argv).handler is handler


def test_a_rollout_is_started_followed_paused_resumed_and_promoted(
    capsys: pytest.CaptureFixture[str], state: Path
) -> None:
    where = ("--state-dir", str(state))
    assert run(capsys, "deploy", "lm", "1", *where)[0] == 0
    code, out = run(
        capsys,
        "rollout",
        "start",
        "lm",
        "2",
        "--steps",
        "10,50,100",
        "--interval-s",
        "30",
        "--min-devices",
        "1",
        "--min-requests",
        "10",
        "--max-error-rate-increase",
        "0.02",
        "--max-p99-ratio",
        "1.2",
        "--max-fallback-rate-increase",
        "0.1",
        "--max-failed-installs",
        "1",
        *where,
    )
    assert code == 0, out
    assert out.startswith("started the rollout of lm version 2 (from version 1): stage 1 of 3 (10 %), ")
    assert "of 10 eligible node(s) in the cohort" in out and "edgecascade rollout status lm" in out

    code, out = run(capsys, "rollout", "status", "lm", "--json", *where)
    assert code == 0, out
    shown = json.loads(out)
    assert (shown["name"], shown["version"], shown["baseline"], shown["state"]) == ("lm", "2", "1", "running")
    assert (shown["stage"], shown["stages"], shown["percent"]) == (1, 3, 10.0)
    assert shown["plan"] == {
        "steps": [10.0, 50.0, 100.0],
        "interval_s": 30.0,
        "min_devices": 1,
        "min_requests": 10,
        "max_error_rate_increase": 0.02,
        "max_p99_ratio": 1.2,
        "max_fallback_rate_increase": 0.1,
        "max_failed_installs": 1,
        "shadow_percent": 0.0,
        "shadow_interval_s": None,
        "min_agreement": 0.9,
        "max_mean_difference": None,
    }
    assert shown["nodes"]["eligible"] == 10 and shown["nodes"]["online"] == 10 and shown["nodes"]["cohort"] >= 1
    assert shown["gate_at"] is not None and shown["ended_at"] is None
    assert shown["history"][0]["message"].startswith("started from version 1 at stage 1 of 3 (10 %)")

    code, out = run(capsys, "rollout", "pause", "lm", *where)
    assert code == 0 and "paused by the operator at stage 1 of 3 (10 %)" in out
    code, out = run(capsys, "rollout", "status", *where)
    assert code == 0 and "lm" in out and "paused" in out
    assert run(capsys, "rollout", "resume", "lm", *where)[0] == 0
    code, out = run(capsys, "rollout", "promote", "lm", *where)
    assert code == 0 and "promoted by the operator" in out
    assert deployed(state) == ["2"]
    shown = json.loads(run(capsys, "rollout", "status", "--json", *where)[1])
    assert [(s["name"], s["state"], s["nodes"]) for s in shown] == [("lm", "completed", None)]
    assert [h["state"] for h in shown[0]["history"]] == ["running", "paused", "running", "completed"]


def test_a_rollout_with_a_shadow_phase_shows_it_and_its_figures(
    capsys: pytest.CaptureFixture[str], state: Path
) -> None:
    where = ("--state-dir", str(state))
    run(capsys, "deploy", "lm", "1", *where)
    code, out = run(
        capsys,
        "rollout",
        "start",
        "lm",
        "2",
        "--shadow-percent",
        "5",
        "--shadow-interval-s",
        "120",
        "--min-agreement",
        "0.95",
        "--max-mean-difference",
        "0.2",
        *where,
    )
    assert code == 0, out
    text = " ".join(out.split())
    assert text.startswith("started the rollout of lm version 2 (from version 1): shadow (5 % of requests), ")
    assert "runs version 2 beside it on 5 % of its requests; the region judges the shadow after 120 s" in text
    assert "(top-1 agreement at least 0.95, mean difference at most 0.2) before stage 1 serves it" in text

    shown = json.loads(run(capsys, "rollout", "status", "lm", "--json", *where)[1])
    assert (shown["state"], shown["phase"], shown["label"], shown["stage"]) == (
        "running",
        "shadow",
        "shadow (5 % of requests)",
        None,  # no stage serves it yet
    )
    assert [(h["phase"], h["stage"]) for h in shown["history"]] == [("shadow", None)]
    plan = shown["plan"]
    assert (plan["shadow_percent"], plan["shadow_interval_s"], plan["min_agreement"]) == (5.0, 120.0, 0.95)
    assert plan["max_mean_difference"] == 0.2
    code, out = run(capsys, "rollout", "status", *where)
    assert code == 0 and "shadow (5 %" in out

    # What the region's last reading of the shadow saw (written as its ticker would).
    inventory = Inventory(state / "region-1" / "fleet.sqlite")
    store = RolloutStore(inventory)
    (before,) = store.active("lm")
    seen = ShadowFigures("lm", "2", 2, 40, 1, 3, 40, 0.875, 0.03, 14.0, 10.0)
    reading = GateFigures(VersionFigures("lm", "2"), VersionFigures("lm", "1"), 0, seen)
    reason = "waiting for data at shadow (5 % of requests): shadow: 40 of 100 compared runs, 2 of 1 node(s)"
    assert store.save(before, replace(before, state="waiting", reason=reason, figures=reading)) is not None
    inventory.close()
    code, out = run(capsys, "rollout", "status", "lm", *where)
    text = " ".join(out.split())
    assert code == 0 and "waiting" in text
    assert (
        "lm: shadow of version 2 on the cohort: 40 compared run(s) on 2 node(s) (40 ok, 1 failed, 3 shed); "
        "top-1 agreement 0.875 (at least 0.95 needed); mean difference 0.03; p99 14.0 ms vs 10.0 ms serving; "
        "0 failed install(s)"
    ) in text
    shown = json.loads(run(capsys, "rollout", "status", "lm", "--json", *where)[1])
    assert shown["figures"]["shadow"]["agreement"] == 0.875 and shown["figures"]["shadow"]["shed"] == 3


def test_abort_says_where_the_cohort_goes(capsys: pytest.CaptureFixture[str], state: Path) -> None:
    where = ("--state-dir", str(state))
    run(capsys, "deploy", "lm", "1", *where)
    assert run(capsys, "rollout", "start", "lm", "2", *where)[0] == 0
    code, out = run(capsys, "rollout", "abort", "lm", *where)
    assert code == 0 and "aborted by the operator at stage 1 of 4 (1 %); the cohort goes back to version 1" in out
    assert deployed(state) == ["1"]
    code, out = run(capsys, "rollout", "status", "lm", *where)
    assert code == 0 and "aborted" in out and "started from version 1" in out  # the table, then the history


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["rollout", "start", "lm", "2", "--steps", "10,5,100"], "steps 10,5,100 must increase"),
        (["rollout", "start", "lm", "2", "--steps", "1,10"], "must end at 100"),
        (["rollout", "start", "lm", "2", "--min-devices", "0"], "--min-devices must be at least 1, got 0"),
        (["rollout", "start", "lm", "2", "--max-p99-ratio", "0.5"], "--max-p99-ratio must be at least 1"),
        (["rollout", "start", "lm", "2", "--shadow-percent", "150"], "--shadow-percent is the share of a cohort node"),
        (["rollout", "start", "lm", "2", "--min-agreement", "0.9"], "--min-agreement gates a shadow phase"),
        (
            ["rollout", "start", "lm", "2", "--shadow-interval-s", "60"],
            "--shadow-interval-s applies to a shadow phase; give --shadow-percent too",
        ),
        (
            ["rollout", "start", "lm", "2", "--shadow-percent", "0", "--max-mean-difference", "0.1"],
            "--max-mean-difference applies to a shadow phase; give --shadow-percent too",
        ),
        (["rollout", "start", "lm", "2", "--interval-s", "0"], "--interval-s must be a positive number of seconds"),
        (
            ["rollout", "start", "lm", "2", "--max-error-rate-increase", "2"],
            "--max-error-rate-increase is a share between 0 and 1",
        ),
        (
            ["rollout", "start", "lm", "2", "--shadow-percent", "5", "--min-agreement", "2"],
            "--min-agreement is the share of compared answers with the same top-1 class, between 0 and 1",
        ),
        (["rollout", "start", "lm", "9"], "the registry has no model 'lm' version 9; publish it first"),
        (["rollout", "start", "lm", "1"], "version 1 of 'lm' is deployed already"),
        (["rollout", "pause", "lm"], "model 'lm' has no rollout; start one with edgecascade rollout start lm VERSION"),
        (["rollout", "status", "other"], "model 'other' has no rollout"),
    ],
)
def test_bad_requests_are_refused_with_what_to_do(
    capsys: pytest.CaptureFixture[str], state: Path, argv: list[str], message: str
) -> None:
    run(capsys, "deploy", "lm", "1", "--state-dir", str(state))
    code, out = run(capsys, *argv, "--state-dir", str(state))
    assert code == 2
    assert message in " ".join(out.split())


def test_a_second_rollout_of_a_model_is_refused(capsys: pytest.CaptureFixture[str], state: Path) -> None:
    where = ("--state-dir", str(state))
    run(capsys, "deploy", "lm", "1", *where)
    assert run(capsys, "rollout", "start", "lm", "2", *where)[0] == 0
    code, out = run(capsys, "rollout", "start", "lm", "2", *where)
    assert code == 2 and "one rollout per model at a time" in " ".join(out.split())
    code, out = run(capsys, "deploy", "lm", "2", *where)
    assert code == 2 and "edgecascade rollout abort lm" in " ".join(out.split())


def test_steps_that_are_not_numbers_are_a_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["rollout", "start", "lm", "2", "--steps", "1,ten,100"])
    assert exit_info.value.code == 2
    assert "is not a comma-separated list of percentages such as 1,10,50,100" in capsys.readouterr().err


def test_without_an_inventory_or_a_rollout_the_verbs_say_so(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    code, out = run(capsys, "rollout", "status", "--fleet", str(tmp_path / "none.sqlite"))
    assert code == 2 and "no fleet inventory at" in out
    assert not (tmp_path / "none.sqlite").exists()  # looking does not create one
    Inventory(tmp_path / "fleet.sqlite").close()
    new_registry(tmp_path / "region").registry.close()
    code, out = run(
        capsys,
        "rollout",
        "status",
        "--fleet",
        str(tmp_path / "fleet.sqlite"),
        "--registry",
        str(tmp_path / "region" / "registry"),
    )
    assert code == 0 and "no rollout yet; start one with `edgecascade rollout start NAME VERSION`" in out


def test_the_shadow_line_of_outputs_without_a_top_1_says_so() -> None:
    plan = RolloutPlan(min_requests=100, shadow_percent=5, max_mean_difference=0.1)
    seen = ShadowFigures("lm", "2", 2, 120, 0, 0, 120, None, 0.02, 14.0, 10.0)
    reading = GateFigures(VersionFigures("lm", "2"), VersionFigures("lm", "1"), 0, seen)
    rollout = Rollout("lm", "2", "1", plan, "running", 0, 1.0, 0.0, 0.0, 0.0, figures=reading, shadow=True)
    line = rollout_commands.shadow_line(rollout)
    assert "120 compared run(s) on 2 node(s)" in line
    assert "top-1 agreement none: no top-1 output to compare (judged on the mean difference); " in line
    few = replace(rollout, figures=replace(reading, shadow=replace(seen, compared=40)))
    assert "top-1 agreement none yet (at least 0.9 needed)" in rollout_commands.shadow_line(few)
