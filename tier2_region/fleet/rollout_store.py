"""Rollouts in the fleet inventory's SQLite file, so a region restarted mid-rollout goes on where it was.

Tables (created if absent, beside the inventory's own)::

    rollouts        one row per rollout: model, version, baseline, plan (JSON), state, stage,
                    cohort bound, stage start, reason, last gate figures (JSON), revision, and
                    whether it is in its shadow phase; a partial unique index allows one active
                    (running, waiting, paused) rollout per model
    rollout_events  its history: when, state, stage (-1 in the shadow phase) and what happened

Every write names the revision it was computed from and bumps it; a write
whose revision is no longer stored is not applied. The region's ticker and
the operator's CLI (another process) may both act on a rollout: the later of
two conflicting writes loses and is recomputed from what won. Completing a
rollout makes its version the deployments' version in the same transaction.

Columns added since the tables first shipped (:data:`_ADDED_COLUMNS`) are
added to an older file when it is opened, with defaults that read as what the
older region meant (``shadow`` 0: no shadow phase); keys the plan's and the
figures' JSON lack take their defaults.
"""

from __future__ import annotations

import json
import sqlite3
from dataclasses import asdict, dataclass, fields
from typing import Any

from services.errors import PreconditionError
from tier2_region.fleet.figures import ShadowFigures, VersionFigures
from tier2_region.fleet.inventory import Inventory
from tier2_region.fleet.rollout import ACTIVE_STATES, COMPLETED, GateFigures, Rollout, RolloutPlan

_ACTIVE_SQL = ", ".join(f"'{s}'" for s in ACTIVE_STATES)
_SCHEMA = (
    """CREATE TABLE IF NOT EXISTS rollouts (
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
        revision INTEGER NOT NULL DEFAULT 0,
        shadow INTEGER NOT NULL DEFAULT 0
    )""",
    f"CREATE UNIQUE INDEX IF NOT EXISTS rollouts_one_active ON rollouts (name) WHERE state IN ({_ACTIVE_SQL})",
    """CREATE TABLE IF NOT EXISTS rollout_events (
        rollout_id INTEGER NOT NULL REFERENCES rollouts (id),
        at REAL NOT NULL,
        state TEXT NOT NULL,
        stage INTEGER NOT NULL,
        message TEXT NOT NULL
    )""",
    "CREATE INDEX IF NOT EXISTS rollout_events_by_rollout ON rollout_events (rollout_id, at)",
)
# The stage an event of the shadow phase is stored with.
_SHADOW_STAGE = -1
# Columns of `rollouts` a file written by an older region lacks: (name, definition).
_ADDED_COLUMNS = (("shadow", "INTEGER NOT NULL DEFAULT 0"),)
_COLUMNS = (
    "id, name, version, baseline, plan_json, state, stage, cohort_bound, stage_started_at, started_at, "
    "updated_at, ended_at, reason, figures_json, revision, shadow"
)


@dataclass(frozen=True)
class RolloutEvent:
    """One line of a rollout's history.

    Attributes:
        at: When (Unix seconds).
        state: The rollout's state after it.
        stage: Index of the rollout's stage after it (0 in the shadow phase, as :attr:`Rollout.stage`).
        message: What happened.
        shadow: Whether the rollout was in its shadow phase after it (stored as stage -1: the table has
            no column for it, and an older region's writes name none).
    """

    at: float
    state: str
    stage: int
    message: str
    shadow: bool = False


class RolloutStore:
    """The rollouts of one fleet inventory.

    Args:
        inventory: The inventory whose file holds them (its tables are created if absent).
    """

    def __init__(self, inventory: Inventory) -> None:
        self.inventory = inventory
        with inventory.transaction() as db:
            for statement in _SCHEMA:
                db.execute(statement)
            have = {row[1] for row in db.execute("PRAGMA table_info(rollouts)")}
            for column, definition in _ADDED_COLUMNS:
                if column not in have:
                    db.execute(f"ALTER TABLE rollouts ADD COLUMN {column} {definition}")

    def active(self, name: str | None = None) -> list[Rollout]:
        """The active rollouts (of one model, if named), by model."""
        if name is None:
            rows = self.inventory.read(f"SELECT {_COLUMNS} FROM rollouts WHERE state IN ({_ACTIVE_SQL}) ORDER BY name")
        else:
            rows = self.inventory.read(
                f"SELECT {_COLUMNS} FROM rollouts WHERE state IN ({_ACTIVE_SQL}) AND name = ?", (name,)
            )
        return [_rollout(row) for row in rows]

    def latest(self, name: str | None = None) -> list[Rollout]:
        """The latest rollout of each model (or of the named one), active or ended, by model."""
        query = f"SELECT {_COLUMNS} FROM rollouts WHERE id IN (SELECT MAX(id) FROM rollouts GROUP BY name)"
        if name is None:
            rows = self.inventory.read(f"{query} ORDER BY name")
        else:
            rows = self.inventory.read(f"{query} AND name = ?", (name,))
        return [_rollout(row) for row in rows]

    def history(self, rollout_id: int) -> list[RolloutEvent]:
        """What happened to a rollout, oldest first."""
        rows = self.inventory.read(
            "SELECT at, state, stage, message FROM rollout_events WHERE rollout_id = ? ORDER BY at, rowid",
            (rollout_id,),
        )
        return [RolloutEvent(float(r[0]), r[1], max(int(r[2]), 0), r[3], int(r[2]) < 0) for r in rows]

    def add(self, rollout: Rollout, event: str) -> Rollout:
        """Stores a new rollout with the first line of its history.

        Raises:
            PreconditionError: The model has an active rollout already (started by someone else meanwhile).
        """
        try:
            with self.inventory.transaction() as db:
                cursor = db.execute(
                    f"INSERT INTO rollouts ({_COLUMNS}) VALUES (NULL, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, 0, ?)",
                    (rollout.name, rollout.version, rollout.baseline, *_values(rollout), int(rollout.shadow)),
                )
                rollout_id = int(cursor.lastrowid or 0)
                _note(db, rollout_id, rollout, event)
        except sqlite3.IntegrityError:
            raise PreconditionError(
                f"model '{rollout.name}' has an active rollout already; see `edgecascade rollout status {rollout.name}`"
            ) from None
        return self._get(rollout_id)

    def save(self, before: Rollout, after: Rollout, event: str = "") -> Rollout | None:
        """Stores ``after`` if the stored rollout is still ``before`` (same revision).

        Completing the rollout (``after`` is completed, ``before`` was not) sets
        the deployments of the model that name the baseline to the new version.

        Returns:
            The stored rollout (its revision bumped), or None if it changed meanwhile.
        """
        with self.inventory.transaction() as db:
            cursor = db.execute(
                "UPDATE rollouts SET plan_json = ?, state = ?, stage = ?, cohort_bound = ?, stage_started_at = ?, "
                "started_at = ?, updated_at = ?, ended_at = ?, reason = ?, figures_json = ?, shadow = ?, "
                "revision = revision + 1 WHERE id = ? AND revision = ?",
                (*_values(after), int(after.shadow), before.id, before.revision),
            )
            if cursor.rowcount == 0:
                return None
            if after.state == COMPLETED and before.state != COMPLETED:
                Inventory.set_deployed_version(db, after.name, after.baseline, after.version)
            if event:
                _note(db, after.id, after, event)
        return self._get(after.id)

    def _get(self, rollout_id: int) -> Rollout:
        rows = self.inventory.read(f"SELECT {_COLUMNS} FROM rollouts WHERE id = ?", (rollout_id,))
        return _rollout(rows[0])


def _note(db: sqlite3.Connection, rollout_id: int, rollout: Rollout, message: str) -> None:
    db.execute(
        "INSERT INTO rollout_events VALUES (?, ?, ?, ?, ?)",
        (rollout_id, rollout.updated_at, rollout.state, _SHADOW_STAGE if rollout.shadow else rollout.stage, message),
    )


def _values(r: Rollout) -> tuple[Any, ...]:
    """The columns from plan_json to figures_json."""
    figures = None if r.figures is None else json.dumps(asdict(r.figures), sort_keys=True)
    plan = json.dumps(asdict(r.plan), sort_keys=True)
    return (
        plan,
        r.state,
        r.stage,
        r.cohort_bound,
        r.stage_started_at,
        r.started_at,
        r.updated_at,
        r.ended_at,
        r.reason,
        figures,
    )


def _plan(text: str) -> RolloutPlan:
    # Keys this version does not know are skipped and missing ones take their defaults, so a file
    # written by a newer or older region still loads.
    known = {f.name for f in fields(RolloutPlan)}
    data = {k: v for k, v in json.loads(text).items() if k in known}
    if "steps" in data:
        data["steps"] = tuple(data["steps"])
    return RolloutPlan(**data)


def _version_figures(data: dict[str, Any]) -> VersionFigures:
    known = {f.name for f in fields(VersionFigures)}
    return VersionFigures(**{k: v for k, v in data.items() if k in known})


def _shadow_figures(data: dict[str, Any] | None) -> ShadowFigures | None:
    if data is None:
        return None
    known = {f.name for f in fields(ShadowFigures)}
    return ShadowFigures(**{k: v for k, v in data.items() if k in known})


def _figures(text: str | None) -> GateFigures | None:
    if text is None:
        return None
    data = json.loads(text)
    return GateFigures(
        _version_figures(data["canary"]),
        _version_figures(data["baseline"]),
        int(data.get("failed_installs", 0)),
        _shadow_figures(data.get("shadow")),
    )


def _rollout(row: tuple[Any, ...]) -> Rollout:
    return Rollout(
        id=int(row[0]),
        name=row[1],
        version=row[2],
        baseline=row[3],
        plan=_plan(row[4]),
        state=row[5],
        stage=int(row[6]),
        cohort_bound=float(row[7]),
        stage_started_at=float(row[8]),
        started_at=float(row[9]),
        updated_at=float(row[10]),
        ended_at=None if row[11] is None else float(row[11]),
        reason=row[12],
        figures=_figures(row[13]),
        revision=int(row[14]),
        shadow=bool(row[15]),
    )
