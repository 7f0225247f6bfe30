"""``edgecascade hard-examples …``: the hard examples the region keeps for retraining (issue 11, item 5).

Commands::

    edgecascade hard-examples export [--format jsonl] [--model NAME] [--since ISO] [--limit N] [--out FILE]
                                     one JSON object per line, oldest first (fields below)
    edgecascade hard-examples stats [--json]
                                     held, received and pruned examples, bytes, per model

Nodes send hard examples only when an operator sets their ``[telemetry]
hard_examples_rate`` above 0 (a privacy switch: the escalated inputs leave the
devices). The store is ``--telemetry FILE``, else ``[telemetry] path`` of
``--config``, else ``<state-dir>/region-1/telemetry.sqlite``. Each exported line
is :func:`tier2_region.telemetry.hard_examples.export_line`: ``id``,
``node_id``, ``received_at``, ``time``, ``trace_id``, ``span_id``, ``kind``
(request | generation), ``model`` and ``upstream`` ({name, version}),
``confidence``, ``threshold`` and ``example`` (the body the node built: for a
request its ``inputs`` and the device's and upstream's answers, for a generation
its ``prompt``, ``output`` and ``escalations``).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path
from typing import TextIO

from rich.console import Console

from services.config import load_config
from services.errors import InvalidArgumentError, NotFoundError
from tier2_region.config import RegionConfig
from tier2_region.telemetry.hard_example_table import stats_json
from tier2_region.telemetry.hard_examples import export_line
from tier2_region.telemetry.store import TelemetryStore

DEFAULT_STATE_DIR = Path(".edgecascade")
REGION_DIR = "region-1"
TELEMETRY_FILE = "telemetry.sqlite"
PAGE = 500  # examples read at a time (each up to the region's hard_examples_max_bytes)
FORMATS = ("jsonl",)


def _location_args(p: argparse.ArgumentParser) -> None:
    where = p.add_mutually_exclusive_group()
    where.add_argument(
        "--state-dir",
        type=Path,
        metavar="DIR",
        help=f"the mesh's state directory: the store is <state-dir>/{REGION_DIR}/{TELEMETRY_FILE} "
        f"(default {DEFAULT_STATE_DIR})",
    )
    where.add_argument("--telemetry", type=Path, metavar="FILE", help="the region's telemetry store (SQLite) itself")
    p.add_argument("--config", type=Path, metavar="FILE", help="the region's TOML file ([telemetry] path and bounds)")


def add_parsers(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Adds ``hard-examples export`` and ``hard-examples stats`` to the ``edgecascade`` parser."""
    group = subparsers.add_parser(
        "hard-examples",
        help="export the escalated inputs the region keeps for retraining",
        description="Hard examples are requests and generations a node escalated because its model was unsure, "
        "with its answer and the upstream's. Nodes send a sample of them (their [telemetry] hard_examples_rate, "
        "default 0 = off, since the inputs leave the device) and the region keeps the newest "
        "[telemetry] hard_examples_max_rows.",
    )
    verbs = group.add_subparsers(dest="hard_examples_command", required=True)
    export = verbs.add_parser(
        "export",
        help="write the held hard examples, one JSON object per line",
        description="Write the held hard examples, oldest first, one JSON object per line (JSON Lines): id, "
        "node_id, received_at and time (ISO 8601, UTC: the region's clock and the node's), trace_id, span_id, "
        "kind (request | generation), model and upstream ({name, version}), confidence, threshold, and example: "
        "the body the node built (a request's inputs as {datatype, shape, data} tensors, device_answer and "
        "upstream_answer, in full or as top_k; a generation's prompt, output and escalations). Exporting "
        "removes nothing.",
    )
    export.add_argument("--format", choices=FORMATS, default="jsonl", help="output format (default jsonl)")
    export.add_argument("--model", default="", metavar="NAME", help="only this model's examples (default: every model)")
    export.add_argument(
        "--since",
        metavar="ISO",
        help="only examples the region received at or after this ISO 8601 time (e.g. 2025-01-31T12:00:00Z; "
        "without a zone: UTC)",
    )
    export.add_argument("--limit", type=int, metavar="N", help="at most N examples (the oldest N that match)")
    export.add_argument("--out", type=Path, metavar="FILE", help="write to FILE (default: standard output)")
    _location_args(export)
    export.set_defaults(handler=export_examples)
    stats = verbs.add_parser(
        "stats",
        help="how many hard examples are held, received and pruned",
        description="Show how many hard examples the region holds (and their bytes, oldest and newest, per model), "
        "how many it received since its store was made, and how many of those it pruned to keep its bound.",
    )
    stats.add_argument("--json", action="store_true", help="print the stats as JSON")
    _location_args(stats)
    stats.set_defaults(handler=show_stats)


def store_path(args: argparse.Namespace, config: RegionConfig) -> Path:
    """The telemetry store the verb reads."""
    if args.telemetry is not None:
        return Path(args.telemetry)
    if args.state_dir is None and config.telemetry.path:
        return Path(config.telemetry.path)
    return (args.state_dir or DEFAULT_STATE_DIR) / REGION_DIR / TELEMETRY_FILE


@contextmanager
def _store(args: argparse.Namespace) -> Iterator[TelemetryStore]:
    config = load_config(RegionConfig, args.config)
    path = store_path(args, config)
    if not path.is_file():
        raise NotFoundError(f"no telemetry store at {path}; give --state-dir, --telemetry or --config")
    store = TelemetryStore(path, replace(config.telemetry, path=str(path)))
    try:
        yield store
    finally:
        store.close()


def parse_since(text: str | None) -> float | None:
    """Unix seconds of an ISO 8601 time (UTC when it names no zone), or None.

    Raises:
        InvalidArgumentError: It is not one.
    """
    if text is None:
        return None
    try:
        moment = datetime.fromisoformat(text)
    except ValueError:
        raise InvalidArgumentError(
            f"--since must be an ISO 8601 time such as 2025-01-31T12:00:00Z, got {text!r}"
        ) from None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return moment.timestamp()


def write_jsonl(store: TelemetryStore, out: TextIO, model: str, since: float | None, limit: int | None) -> int:
    """Writes the matching examples to ``out``, a page at a time; returns how many."""
    written, after = 0, 0
    while limit is None or written < limit:
        page = PAGE if limit is None else min(PAGE, limit - written)
        rows = store.hard_examples(model, since, page, after)
        for row_id, example in rows:
            out.write(json.dumps(export_line(row_id, example), ensure_ascii=False, separators=(",", ":")) + "\n")
        written += len(rows)
        if len(rows) < page:
            break
        after = rows[-1][0]
    return written


def export_examples(args: argparse.Namespace, console: Console) -> int:
    """``hard-examples export``: the held examples as JSON Lines."""
    if args.limit is not None and args.limit < 1:
        raise InvalidArgumentError(f"--limit must be at least 1, got {args.limit}")
    since = parse_since(args.since)
    with _store(args) as store:
        if args.out is None:
            count = write_jsonl(store, sys.stdout, args.model, since, args.limit)
            sys.stdout.flush()
            Console(stderr=True, highlight=False).print(f"exported {count} hard example(s)", markup=False)
            return 0
        args.out.parent.mkdir(parents=True, exist_ok=True)
        with args.out.open("w", encoding="utf-8") as out:
            count = write_jsonl(store, out, args.model, since, args.limit)
    console.print(f"exported {count} hard example(s) to {args.out}", markup=False)
    return 0


def show_stats(args: argparse.Namespace, console: Console) -> int:
    """``hard-examples stats``: what the store holds and what it pruned."""
    with _store(args) as store:
        stats = store.hard_example_stats()
    if args.json:
        console.print_json(json.dumps(stats_json(stats)))
        return 0

    def when(t: float | None) -> str:
        return "-" if t is None else datetime.fromtimestamp(t, UTC).isoformat(timespec="seconds")

    lines = [
        f"held: {stats.held} ({stats.bytes} bytes), oldest {when(stats.oldest)}, newest {when(stats.newest)}",
        f"received: {stats.received}; pruned to keep the bound: {stats.pruned}",
        *(f"  {model}: {n}" for model, n in stats.by_model.items()),
    ]
    for line in lines:
        console.print(line, markup=False)
    return 0
