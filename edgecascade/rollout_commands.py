"""``edgecascade rollout …``: staged rollouts of a model version, gated on what the new version does on the nodes.

Commands::

    edgecascade rollout start NAME VERSION [--steps 1,10,50,100] [--interval-s S] [--min-devices N]
        [--min-requests N] [--max-error-rate-increase X] [--max-p99-ratio R]
        [--max-fallback-rate-increase X] [--max-failed-installs N]
        [--shadow-percent P [--shadow-interval-s S] [--min-agreement A] [--max-mean-difference D]]
    edgecascade rollout status [NAME] [--json]     the latest rollout of each model (or of NAME, with its history)
    edgecascade rollout pause|resume|abort|promote NAME

They work on the region's fleet inventory the way ``edgecascade fleet`` does
(``--fleet``, ``--state-dir`` or ``--config``; the registry at ``--registry``
or beside it). The region moves a rollout on at its ticks; these verbs only
start it, show it and change its state, so they work whether the region runs
or not.

With ``--shadow-percent P`` the rollout begins with a shadow phase: the first
stage's cohort keeps serving the current version and runs the new one beside
it on P % of its requests, answers compared and discarded; after
``--shadow-interval-s`` the region reads the shadow's agreement, latency and
errors, and only then does stage 1 serve the new version. ``rollout status
--json`` shows that phase as ``"phase": "shadow"`` with ``"stage": null`` (no
stage serves the new version yet); stages count from 1 after it.
"""

from __future__ import annotations

import argparse
import json
import re
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict
from datetime import UTC, datetime
from typing import Any

from rich.console import Console
from rich.table import Table

from edgecascade.fleet_commands import NoVariants, _location_args, _registry_dir, inventory_path
from services.config import load_config
from services.errors import InvalidArgumentError, NotFoundError
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
# (option, plan field, type, metavar, help with its default): the shadow phase's.
_SHADOW_OPTIONS: tuple[tuple[str, str, type, str, str], ...] = (
    (
        "--shadow-percent",
        "shadow_percent",
        float,
        "P",
        "begin with a shadow phase: the first stage's cohort keeps serving the current version and runs the new "
        "one beside it on P %% of its requests (above 0, at most 100), its answers compared with the serving ones "
        "and discarded; the cohort serves it only once the shadow passed its gates (default 0: no shadow phase)",
    ),
    (
        "--shadow-interval-s",
        "shadow_interval_s",
        float,
        "S",
        "seconds the shadow phase runs before its gates are read (default: --interval-s)",
    ),
    (
        "--min-agreement",
        "min_agreement",
        float,
        "A",
        "lowest share of compared answers whose top-1 class the shadow shares with the serving version that "
        f"passes (default {_DEFAULTS.min_agreement:g})",
    ),
    (
        "--max-mean-difference",
        "max_mean_difference",
        float,
        "D",
        "largest mean absolute difference of the shadow's outputs from the serving version's that passes "
        "(default: not gated); needed for a model whose outputs have no top-1 class (a regressor, an [N, 1] "
        "score): its shadow is judged on this instead of --min-agreement",
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
        "data waits; a failed gate rolls the cohort back. At 100 % the new version becomes the deployed version. "
        "An optional shadow phase first runs the new version beside the current one on a share of the first "
        "cohort's requests and gates on their agreement, its latency and its errors before it serves anyone.",
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
    shadow = start.add_argument_group(
        "shadow phase",
        "Gated on compared runs: at least --min-devices nodes and --min-requests compared runs; the shadow's p99 "
        "at most --max-p99-ratio times the serving version's on the same requests; at most "
        "--max-error-rate-increase of its runs failed; --max-failed-installs as for any install.",
    )
    for option, field, kind, metavar, text in _SHADOW_OPTIONS:
        shadow.add_argument(option, dest=field, type=kind, metavar=metavar, help=text)
    _location_args(start, registry=True)
    start.set_defaults(handler=start_rollout)

    status = verbs.add_parser(
        "status",
        help="show the latest rollout of each model, or of NAME with its history",
        description="Show the latest rollout of each model (or of NAME, with its history): state, stage, cohort, "
        "why it waits or why it ended, and the figures its gates last read.",
    )
    status.add_argument("name", metavar="NAME", nargs="?", help="model name (default: every model)")
    status.add_argument(
        "--json",
        action="store_true",
        help='print as JSON: "stage" counts from 1 and is null during the shadow phase ("phase": "shadow" or '
        '"serving", "label" e.g. "shadow (5 %% of requests)"); history lines carry "phase" and "stage" the same way',
    )
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


# A plan field's name, as its message names it: the option that sets it (`steps` is both).
_FIELD = re.compile(r"\b(" + "|".join(field for _, field, _, _, _ in (*_PLAN_OPTIONS, *_SHADOW_OPTIONS)) + r")\b")
_OPTION = {field: option for option, field, _, _, _ in (*_PLAN_OPTIONS, *_SHADOW_OPTIONS)}


def _plan(args: argparse.Namespace) -> RolloutPlan:
    given: dict[str, Any] = {field: getattr(args, field) for _, field, _, _, _ in (*_PLAN_OPTIONS, *_SHADOW_OPTIONS)}
    if args.steps is not None:
        given["steps"] = args.steps
    if given["min_agreement"] is not None and not given["shadow_percent"]:
        raise InvalidArgumentError("--min-agreement gates a shadow phase; give --shadow-percent too")
    try:
        return RolloutPlan(**{k: v for k, v in given.items() if v is not None})
    except InvalidArgumentError as e:
        # The plan names its fields (shadow_percent); the operator typed options (--shadow-percent).
        raise InvalidArgumentError(_FIELD.sub(lambda m: _OPTION[m.group(1)], e.message)) from None


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
    shadow = ""
    if rollout.shadow:
        judged = f"top-1 agreement at least {plan.min_agreement:g}"
        if plan.max_mean_difference is not None:
            judged += f", mean difference at most {plan.max_mean_difference:g}"
        shadow = (
            f"The cohort keeps serving version {rollout.baseline} and runs version {rollout.version} beside it on "
            f"{plan.shadow_percent:g} % of its requests; the region judges the shadow after "
            f"{plan.shadow_interval:g} s on at least {plan.min_devices} device(s) and {plan.min_requests} compared "
            f"run(s) ({judged}) before stage 1 serves it. "
        )
    console.print(
        f"started the rollout of {rollout.name} version {rollout.version} (from version {rollout.baseline}): "
        f"{rollout.label}{cohort}. {shadow}The region judges each stage after {plan.interval_s:g} s with at least "
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
    """A rollout as ``rollout status --json`` prints it.

    ``stage`` counts from 1, and is null in the shadow phase (``phase`` "shadow", ``label`` saying so), when
    nobody serves the new version; ``percent`` is the cohort's share of the eligible nodes (in the shadow
    phase the first stage's). History lines carry ``phase`` and ``stage`` the same way.
    """
    r = status.rollout
    return {
        "name": r.name,
        "version": r.version,
        "baseline": r.baseline,
        "state": r.state,
        "phase": "shadow" if r.shadow else "serving",
        "label": r.label,
        "reason": r.reason,
        "stage": None if r.shadow else r.stage + 1,
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
            {
                "at": _when(e.at),
                "state": e.state,
                "phase": "shadow" if e.shadow else "serving",
                "stage": None if e.shadow else e.stage + 1,
                "message": e.message,
            }
            for e in status.history
        ],
    }


def _stage(rollout: Rollout) -> str:
    if rollout.shadow:
        return rollout.label if rollout.active else f"ended at {rollout.label}"
    if rollout.active:
        return f"{rollout.stage + 1}/{len(rollout.plan.steps)} ({rollout.percent:g} %)"
    return f"ended at {rollout.stage + 1}/{len(rollout.plan.steps)}"


def _number(value: float | None, text: str) -> str:
    return "none yet" if value is None else text.format(value)


def shadow_line(rollout: Rollout) -> str:
    """What the last reading of the rollout's shadow saw, in one line ("" when it had no shadow reading)."""
    seen = None if rollout.figures is None else rollout.figures.shadow
    if seen is None:
        return ""
    if seen.agreement is None and seen.compared >= rollout.plan.min_requests:
        agreement = "none: no top-1 output to compare"  # a regressor's outputs, an [N, 1] score
        if rollout.plan.max_mean_difference is not None:
            agreement += " (judged on the mean difference)"
    else:
        agreement = f"{_number(seen.agreement, '{:.3f}')} (at least {rollout.plan.min_agreement:g} needed)"
    return (
        f"{rollout.name}: shadow of version {rollout.version} on the cohort: {seen.compared} compared run(s) on "
        f"{seen.nodes} node(s) ({seen.ok} ok, {seen.errors} failed, {seen.shed} shed); "
        f"top-1 agreement {agreement}; "
        f"mean difference {_number(seen.mean_difference, '{:.4g}')}; "
        f"p99 {_number(seen.p99_ms, '{:.1f} ms')} vs {_number(seen.serving_p99_ms, '{:.1f} ms')} serving; "
        f"{rollout.figures.failed_installs if rollout.figures else 0} failed install(s)"
    )


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
    for status in found:
        line = shadow_line(status.rollout)
        if line:
            console.print(line, markup=False, soft_wrap=True)
    if args.name:
        for event in found[0].history:
            console.print(f"{_when(event.at)}  {event.state:<11} {event.message}", markup=False, soft_wrap=True)
    return 0
