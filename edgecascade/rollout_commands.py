"""``edgecascade rollout …``: staged rollouts of a model version, gated on what the new version does on the nodes.

Commands::

    edgecascade rollout start NAME VERSION [--steps 1,10,50,100] [--interval-s S] [--min-devices N]
        [--min-requests N] [--max-error-rate-increase X] [--max-p99-ratio R]
        [--max-fallback-rate-increase X] [--max-failed-installs N]
    edgecascade rollout status [NAME] [--json]     the latest rollout of each model (or of NAME, with its history)
    edgecascade rollout pause|resume|abort|promote NAME

They work on the region's fleet inventory the way ``edgecascade fleet`` does
(``--fleet``, ``--state-dir`` or ``--config``; the registry at ``--registry``
or beside it). The region moves a rollout on at its ticks; these verbs only
start it, show it and change its state, so they work whether the region runs
or not.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict
from datetime import UTC, datetime
from typing import Any

from rich.console import Console
from rich.table import Table

from edgecascade.fleet_commands import NoVariants, _location_args, _registry_dir, inventory_path
from services.config import load_config
from services.errors import NotFoundError
from tier2_region.config import RegionConfig
from tier2_region.fleet.catalog import RegistryCatalog, VariantCatalog
from tier2_region.fleet.fleet import Fleet
from tier2_region.fleet.inventory import Inventory
from tier2_region.fleet.rollout import DEFAULT_STEPS, Rollout, RolloutPlan
from tier2_region.fleet.rollout_controller import RolloutController, RolloutStatus
from tier2_region.registry.registry import ModelRegistry

_DEFAULTS = RolloutPlan()
# (option, plan field, type, metavar, help): the gates and limits `rollout start` takes, each defaulting to
# RolloutPlan's.
_PLAN_OPTIONS: tuple[tuple[str, str, type, str, str], ...] = (
    ("--interval-s", "interval_s", float, "S", "seconds each stage runs before its gates are read"),
    ("--min-devices", "min_devices", int, "N", "cohort nodes that must report the new version to judge a stage"),
    ("--min-requests", "min_requests", int, "N", "requests the cohort must answer on the new version to judge a stage"),
    (
        "--max-error-rate-increase",
        "max_error_rate_increase",
        float,
        "X",
        "largest allowed rise of the error share over the previous version (0.01 = one point)",
    ),
    (
        "--max-p99-ratio",
        "max_p99_ratio",
        float,
        "R",
        "largest allowed p99 latency as a multiple of the previous version's",
    ),
    (
        "--max-fallback-rate-increase",
        "max_fallback_rate_increase",
        float,
        "X",
        "largest allowed rise of the share of requests sent upstream",
    ),
    (
        "--max-failed-installs",
        "max_failed_installs",
        int,
        "N",
        "cohort nodes whose install may fail before the rollout is rolled back",
    ),
)
_VERBS = (
    ("pause", "hold the rollout at its stage: the cohort keeps the new version, no gate is read"),
    ("resume", "go on with a paused rollout; its stage's window starts again"),
    ("abort", "end the rollout and give its cohort the previous version again"),
    ("promote", "skip the remaining stages: the new version becomes the deployed version now"),
)


def _steps(text: str) -> tuple[float, ...]:
    try:
        return tuple(float(part) for part in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a comma-separated list of percentages such as 1,10,50,100"
        ) from None


def add_parsers(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Adds ``rollout`` and its verbs to the ``edgecascade`` parser."""
    rollout = subparsers.add_parser(
        "rollout",
        help="roll a model version out in stages, gated on its live metrics, rolled back when it is worse",
        description="Roll a new version of a deployed model out to a growing share of the eligible nodes (those "
        "whose deployment names the current version and that a variant of the new one fits), chosen by a stable "
        "hash of their id. After each stage's interval the region compares the new version on the cohort with the "
        "previous one beside it: error rate, p99 latency, fallback rate, failed installs. A stage without enough "
        "data waits; a failed gate rolls the cohort back. At 100 % the new version becomes the deployed version.",
    )
    verbs = rollout.add_subparsers(dest="rollout_command", required=True)

    start = verbs.add_parser(
        "start",
        help="start rolling out a version",
        description="Start rolling out VERSION of NAME in place of the version its deployments name. The registry "
        "must hold VERSION and the model must be deployed (edgecascade deploy); one rollout per model at a time.",
    )
    start.add_argument("name", metavar="NAME", help="model name")
    start.add_argument("version", metavar="VERSION", help="the version to roll out")
    start.add_argument(
        "--steps",
        type=_steps,
        metavar="P,P,…",
        help="the cohort's share of the eligible nodes at each stage, in percent, increasing to 100 "
        f"(default {','.join(f'{s:g}' for s in DEFAULT_STEPS)})",
    )
    for option, field, kind, metavar, text in _PLAN_OPTIONS:
        start.add_argument(
            option, dest=field, type=kind, metavar=metavar, help=f"{text} (default {getattr(_DEFAULTS, field):g})"
        )
    _location_args(start, registry=True)
    start.set_defaults(handler=start_rollout)

    status = verbs.add_parser(
        "status",
        help="show the latest rollout of each model, or of NAME with its history",
        description="Show the latest rollout of each model (or of NAME, with its history): state, stage, cohort, "
        "why it waits or why it ended, and the figures its gates last read.",
    )
    status.add_argument("name", metavar="NAME", nargs="?", help="model name (default: every model)")
    status.add_argument("--json", action="store_true", help="print as JSON")
    _location_args(status, registry=True)
    status.set_defaults(handler=show_status)

    for verb, text in _VERBS:
        parser = verbs.add_parser(verb, help=text, description=f"{text[0].upper()}{text[1:]}.")
        parser.add_argument("name", metavar="NAME", help="model name")
        _location_args(parser)
        parser.set_defaults(handler=change_rollout)


@contextmanager
def _controller(args: argparse.Namespace, registry: bool) -> Iterator[RolloutController]:
    """A controller over the inventory (and, with ``registry``, the registry) the verb names."""
    config = load_config(RegionConfig, getattr(args, "config", None))
    path = inventory_path(args, config)
    if not path.is_file():
        raise NotFoundError(f"no fleet inventory at {path}; give --fleet, --state-dir or --config")
    opened: ModelRegistry | None = None
    catalog: VariantCatalog = NoVariants()
    if registry:
        directory = _registry_dir(args, config)
        if not directory.is_dir():
            raise NotFoundError(f"no registry in {directory}; give --registry or --state-dir")
        opened = ModelRegistry(directory)
        catalog = RegistryCatalog(opened)
    inventory = Inventory(path)
    try:
        yield RolloutController(Fleet(inventory, catalog, config.fleet))
    finally:
        inventory.close()
        if opened is not None:
            opened.close()


def _plan(args: argparse.Namespace) -> RolloutPlan:
    given: dict[str, Any] = {field: getattr(args, field) for _, field, _, _, _ in _PLAN_OPTIONS}
    if args.steps is not None:
        given["steps"] = args.steps
    return RolloutPlan(**{k: v for k, v in given.items() if v is not None})


def start_rollout(args: argparse.Namespace, console: Console) -> int:
    """``rollout start NAME VERSION``: starts a rollout."""
    plan = _plan(args)
    with _controller(args, registry=True) as controller:
        rollout = controller.start(args.name, args.version, plan)
        counts = controller.status(args.name)[0].counts
    cohort = "" if counts is None else f", {counts.cohort} of {counts.eligible} eligible node(s) in the cohort"
    if counts is not None and counts.unfit:
        cohort += (
            f" ({counts.unfit} more run version {rollout.baseline} but fit no variant of version {rollout.version}: "
            "they keep it during the rollout and get none once it completes)"
        )
    console.print(
        f"started the rollout of {rollout.name} version {rollout.version} (from version {rollout.baseline}): "
        f"{rollout.label}{cohort}. The region judges each stage after {plan.interval_s:g} s with at least "
        f"{plan.min_devices} device(s) and {plan.min_requests} request(s) on the new version; follow it with "
        f"`edgecascade rollout status {rollout.name}`",
        markup=False,
        soft_wrap=True,
    )
    return 0


def change_rollout(args: argparse.Namespace, console: Console) -> int:
    """``rollout pause|resume|abort|promote NAME``: the operator's verbs."""
    with _controller(args, registry=False) as controller:
        verbs = {
            "pause": controller.pause,
            "resume": controller.resume,
            "abort": controller.abort,
            "promote": controller.promote,
        }
        rollout = verbs[args.rollout_command](args.name)
        # The history's last line says what the verb did (a resumed rollout has no reason to show).
        done = controller.status(args.name)[0].history[-1].message
    console.print(f"{rollout.name} {rollout.baseline} → {rollout.version}: {done}", markup=False, soft_wrap=True)
    return 0


def _when(timestamp: float | None) -> str | None:
    return None if timestamp is None else datetime.fromtimestamp(timestamp, UTC).isoformat(timespec="seconds")


def rollout_json(status: RolloutStatus) -> dict[str, Any]:
    """A rollout as ``rollout status --json`` prints it (stages counted from 1)."""
    r = status.rollout
    return {
        "name": r.name,
        "version": r.version,
        "baseline": r.baseline,
        "state": r.state,
        "reason": r.reason,
        "stage": r.stage + 1,
        "stages": len(r.plan.steps),
        "percent": r.percent,
        "cohort_bound": r.cohort_bound,
        "plan": {**asdict(r.plan), "steps": list(r.plan.steps)},
        "started_at": _when(r.started_at),
        "stage_started_at": _when(r.stage_started_at),
        "gate_at": _when(status.gate_at),
        "updated_at": _when(r.updated_at),
        "ended_at": _when(r.ended_at),
        "nodes": None if status.counts is None else asdict(status.counts),
        "figures": None if r.figures is None else asdict(r.figures),
        "history": [
            {"at": _when(e.at), "state": e.state, "stage": e.stage + 1, "message": e.message} for e in status.history
        ],
    }


def _stage(rollout: Rollout) -> str:
    if rollout.active:
        return f"{rollout.stage + 1}/{len(rollout.plan.steps)} ({rollout.percent:g} %)"
    return f"ended at {rollout.stage + 1}/{len(rollout.plan.steps)}"


def show_status(args: argparse.Namespace, console: Console) -> int:
    """``rollout status [NAME]``: the latest rollouts (a table, or JSON with ``--json``)."""
    with _controller(args, registry=True) as controller:
        found = controller.status(args.name)
    if args.json:
        data: Any = rollout_json(found[0]) if args.name else [rollout_json(s) for s in found]
        console.print(json.dumps(data, indent=2), markup=False, highlight=False, soft_wrap=True)
        return 0
    if not found:
        console.print("no rollout yet; start one with `edgecascade rollout start NAME VERSION`", markup=False)
        return 0
    table = Table(title="rollouts")
    for column in ("model", "version", "state", "stage", "cohort", "why"):
        table.add_column(column)
    for status in found:
        r, counts = status.rollout, status.counts
        cohort = "-" if counts is None else f"{counts.cohort} of {counts.eligible} ({counts.cohort_online} online)"
        why = r.reason or (f"gates read at {_when(status.gate_at)}" if status.gate_at else "")
        table.add_row(r.name, f"{r.baseline} → {r.version}", r.state, _stage(r), cohort, why)
    console.print(table)
    if args.name:
        for event in found[0].history:
            console.print(f"{_when(event.at)}  {event.state:<11} {event.message}", markup=False, soft_wrap=True)
    return 0
