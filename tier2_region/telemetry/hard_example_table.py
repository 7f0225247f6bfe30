"""The telemetry store's bounded table of hard examples, and its counts.

Tables (in the telemetry store's SQLite file)::

    hard_examples        the newest ``max_rows`` hard examples received (oldest pruned at each write)
    hard_example_counts  received (stored) and pruned since the file was made, so a process that
                         only reads the file (``edgecascade hard-examples stats``) sees them too

Hard examples are not pruned by age (``retention_s``): they wait for a training
job to export them; the bound is on rows, and each row is at most ``[telemetry]
hard_examples_max_bytes`` of body. The functions take the store's connection and
run inside its transactions.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

from tier2_region.telemetry.points import HardExample

SCHEMA = """
CREATE TABLE IF NOT EXISTS hard_examples (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    node_id TEXT NOT NULL,
    received_at REAL NOT NULL,
    time_ns INTEGER NOT NULL,
    trace_id TEXT NOT NULL,
    span_id TEXT NOT NULL,
    kind TEXT NOT NULL,
    model TEXT NOT NULL,
    version TEXT NOT NULL,
    upstream_model TEXT NOT NULL,
    upstream_version TEXT NOT NULL,
    confidence REAL,
    threshold REAL,
    body TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS hard_examples_model ON hard_examples (model, received_at);
CREATE TABLE IF NOT EXISTS hard_example_counts (
    name TEXT PRIMARY KEY,
    value INTEGER NOT NULL
) WITHOUT ROWID;
"""
_COLUMNS = (
    "node_id, received_at, time_ns, trace_id, span_id, kind, model, version, upstream_model, upstream_version, "
    "confidence, threshold, body"
)
RECEIVED = "received"
PRUNED = "pruned"


@dataclass(frozen=True)
class HardExampleStats:
    """What the table holds and what became of what arrived.

    Attributes:
        held: Rows held now (at most the bound).
        received: Examples stored since the file was made.
        pruned: Of those, the oldest dropped to keep the bound.
        bytes: Bytes of the bodies held.
        oldest, newest: When the oldest and newest held arrived (Unix seconds; None when empty).
        by_model: Rows held per model name.
    """

    held: int
    received: int
    pruned: int
    bytes: int
    oldest: float | None
    newest: float | None
    by_model: dict[str, int]


def keep(db: sqlite3.Connection, examples: Sequence[HardExample], max_rows: int) -> int:
    """Stores the examples and prunes the oldest beyond ``max_rows``; returns how many were pruned."""
    db.executemany(
        f"INSERT INTO hard_examples ({_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
        [
            (
                e.node_id,
                e.received_at,
                e.time_ns,
                e.trace_id,
                e.span_id,
                e.kind,
                e.model,
                e.version,
                e.upstream_model,
                e.upstream_version,
                e.confidence,
                e.threshold,
                e.body,
            )
            for e in examples
        ],
    )
    # Ids only grow: the rows beyond the newest max_rows are those below the (max_rows)th newest id.
    row = db.execute("SELECT id FROM hard_examples ORDER BY id DESC LIMIT 1 OFFSET ?", (max_rows,)).fetchone()
    pruned = 0 if row is None else int(db.execute("DELETE FROM hard_examples WHERE id <= ?", (row[0],)).rowcount)
    _add(db, RECEIVED, len(examples))
    if pruned:
        _add(db, PRUNED, pruned)
    return pruned


def _add(db: sqlite3.Connection, name: str, n: int) -> None:
    db.execute(
        "INSERT INTO hard_example_counts VALUES (?, ?) ON CONFLICT DO UPDATE SET value = value + excluded.value",
        (name, n),
    )


def read(
    db: sqlite3.Connection, model: str = "", since: float | None = None, limit: int | None = None, after: int = 0
) -> list[tuple[int, HardExample]]:
    """Held examples, oldest first, with their ids: of ``model`` (all if ""), received at or after ``since``,
    with ids above ``after`` (to read the table a page at a time)."""
    where, args = _where(model, since, after)
    query = f"SELECT id, {_COLUMNS} FROM hard_examples{where} ORDER BY id"
    if limit is not None:
        query += " LIMIT ?"
        args.append(limit)
    return [(int(r[0]), HardExample(*r[1:])) for r in db.execute(query, args).fetchall()]


def _where(model: str, since: float | None, after: int) -> tuple[str, list[Any]]:
    clauses: list[str] = ["id > ?"]
    args: list[Any] = [after]
    if model:
        clauses.append("model = ?")
        args.append(model)
    if since is not None:
        clauses.append("received_at >= ?")
        args.append(since)
    return " WHERE " + " AND ".join(clauses), args


def stats(db: sqlite3.Connection) -> HardExampleStats:
    """What the table holds and its counts."""
    held, size, oldest, newest = db.execute(
        "SELECT COUNT(*), COALESCE(SUM(LENGTH(CAST(body AS BLOB))), 0), MIN(received_at), MAX(received_at) "
        "FROM hard_examples"
    ).fetchone()
    counts = dict(db.execute("SELECT name, value FROM hard_example_counts").fetchall())
    by_model = dict(db.execute("SELECT model, COUNT(*) FROM hard_examples GROUP BY model ORDER BY model").fetchall())
    return HardExampleStats(
        held=int(held),
        received=int(counts.get(RECEIVED, 0)),
        pruned=int(counts.get(PRUNED, 0)),
        bytes=int(size),
        oldest=oldest,
        newest=newest,
        by_model={str(k): int(v) for k, v in by_model.items()},
    )


def stats_json(s: HardExampleStats) -> dict[str, Any]:
    """The stats as JSON (``hard-examples stats --json``)."""
    return asdict(s)
