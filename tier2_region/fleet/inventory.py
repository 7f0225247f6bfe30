"""The fleet inventory in SQLite: nodes, enrollment tokens, deployments and the nonces seen lately.

Tables::

    nodes        one row per enrolled node: its facts, public keys, revoked flag, and what its
                 last check-in reported (installed models as JSON, update state, last error, last seen)
    tokens       enrollment tokens by their SHA-256 (the token itself is never stored), expiry, use
    deployments  the desired version of a model for the nodes matching a tier and hardware-class
                 filter ("" = any); one row per (name, tier, hardware class)
    nonces       (node, nonce) of recent check-ins, pruned once no report carrying them can be fresh

The rollouts' tables live in the same file (:mod:`~tier2_region.fleet.rollout_store`).

Writers are serialised twice: in this process by a lock around the one
connection (the fleet service calls from worker threads), across processes
(the region and the operator's CLI) by SQLite's write lock, taken up front by
``BEGIN IMMEDIATE`` and waited for up to :data:`BUSY_TIMEOUT_S`. The journal is
a write-ahead log with ``synchronous=FULL``: a committed enrollment or use of
a token survives a crash. Times are Unix seconds (floats).
"""

from __future__ import annotations

import hashlib
import json
import os
import sqlite3
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from services.errors import NotFoundError
from tier2_region.fleet.domain import InstalledModel, NodeFacts

BUSY_TIMEOUT_S = 10.0

_SCHEMA = """
CREATE TABLE IF NOT EXISTS nodes (
    node_id TEXT PRIMARY KEY,
    tier TEXT NOT NULL,
    hardware_class TEXT NOT NULL,
    memory_budget_bytes INTEGER NOT NULL,
    onnxruntime_version TEXT NOT NULL,
    free_disk_bytes INTEGER NOT NULL,
    identity_public_key BLOB NOT NULL,
    agreement_public_key BLOB NOT NULL,
    enrolled_at REAL NOT NULL,
    revoked INTEGER NOT NULL DEFAULT 0,
    last_seen REAL,
    installed_json TEXT NOT NULL DEFAULT '[]',
    update_state TEXT NOT NULL DEFAULT '',
    last_error TEXT NOT NULL DEFAULT ''
);
CREATE TABLE IF NOT EXISTS tokens (
    token_sha256 TEXT PRIMARY KEY,
    created_at REAL NOT NULL,
    expires_at REAL NOT NULL,
    used_at REAL,
    used_by TEXT
);
CREATE TABLE IF NOT EXISTS deployments (
    name TEXT NOT NULL,
    version TEXT NOT NULL,
    tier TEXT NOT NULL,
    hardware_class TEXT NOT NULL,
    created_at REAL NOT NULL,
    PRIMARY KEY (name, tier, hardware_class)
);
CREATE TABLE IF NOT EXISTS nonces (
    node_id TEXT NOT NULL,
    nonce BLOB NOT NULL,
    seen_at REAL NOT NULL,
    PRIMARY KEY (node_id, nonce)
);
CREATE INDEX IF NOT EXISTS nonces_seen_at ON nonces (seen_at);
"""


def token_digest(token: str) -> str:
    """The SHA-256 (hex) of a token: what the inventory keeps instead of it."""
    return hashlib.sha256(token.encode("utf-8")).hexdigest()


@dataclass(frozen=True)
class TokenRecord:
    """An enrollment token as stored (without the token)."""

    token_sha256: str
    created_at: float
    expires_at: float
    used_at: float | None
    used_by: str | None


@dataclass(frozen=True)
class NodeRecord:
    """An enrolled node as the inventory knows it."""

    facts: NodeFacts
    identity_public_key: bytes
    agreement_public_key: bytes
    enrolled_at: float
    revoked: bool
    last_seen: float | None
    installed: tuple[InstalledModel, ...]
    update_state: str
    last_error: str

    @property
    def node_id(self) -> str:
        """The node's id."""
        return self.facts.node_id


@dataclass(frozen=True)
class Deployment:
    """The desired version of a model for the nodes matching its filters ("" = any tier or hardware class)."""

    name: str
    version: str
    tier: str
    hardware_class: str
    created_at: float

    def matches(self, facts: NodeFacts) -> bool:
        """Whether a node with these facts is one the deployment is for.

        A hardware-class filter names the class a node states: a node that states none is not in it.
        """
        return (not self.tier or self.tier == facts.tier) and (
            not self.hardware_class or self.hardware_class == facts.hardware_class
        )

    @property
    def specificity(self) -> int:
        """How many filters it sets (0-2): a more specific deployment of a model wins over a broader one."""
        return int(bool(self.tier)) + int(bool(self.hardware_class))


class Inventory:
    """Opens (and creates) the inventory file.

    Args:
        path: The SQLite file (created with mode 0600, in a directory created if needed).
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)
        if not path.exists():
            # Public keys and token hashes only, but nobody else has any business reading or writing them.
            os.close(os.open(path, os.O_WRONLY | os.O_CREAT, 0o600))
        self._lock = threading.Lock()
        self._db = sqlite3.connect(path, isolation_level=None, check_same_thread=False, timeout=BUSY_TIMEOUT_S)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.executescript(_SCHEMA)

    def close(self) -> None:
        """Closes the connection."""
        with self._lock:
            self._db.close()

    @contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        """Runs a block in one write transaction (this process's and SQLite's writer); rolls back on any exception."""
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                yield self._db
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")

    def _read(self, query: str, args: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
        with self._lock:
            return self._db.execute(query, args).fetchall()

    def read(self, query: str, args: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
        """The rows of one read-only query, outside any transaction (for the tables other fleet modules own)."""
        return self._read(query, args)

    # Tokens

    def add_token(self, token: str, now: float, expires_at: float) -> None:
        """Stores a new token's hash and expiry."""
        with self.transaction() as db:
            db.execute("INSERT INTO tokens VALUES (?, ?, ?, NULL, NULL)", (token_digest(token), now, expires_at))

    @staticmethod
    def token(db: sqlite3.Connection, token: str) -> TokenRecord | None:
        """The stored record of ``token`` (inside a transaction), or None."""
        row = db.execute("SELECT * FROM tokens WHERE token_sha256 = ?", (token_digest(token),)).fetchone()
        return None if row is None else TokenRecord(row[0], row[1], row[2], row[3], row[4])

    @staticmethod
    def use_token(db: sqlite3.Connection, token: str, node_id: str, now: float) -> None:
        """Marks ``token`` used by ``node_id`` (inside a transaction)."""
        db.execute(
            "UPDATE tokens SET used_at = ?, used_by = ? WHERE token_sha256 = ?", (now, node_id, token_digest(token))
        )

    def tokens(self) -> list[TokenRecord]:
        """Every token's record, oldest first."""
        rows = self._read("SELECT * FROM tokens ORDER BY created_at")
        return [TokenRecord(r[0], r[1], r[2], r[3], r[4]) for r in rows]

    # Nodes

    @staticmethod
    def node_in(db: sqlite3.Connection, node_id: str) -> NodeRecord | None:
        """The node with this id (inside a transaction), or None."""
        row = db.execute("SELECT * FROM nodes WHERE node_id = ?", (node_id,)).fetchone()
        return None if row is None else _node(row)

    @staticmethod
    def put_node(
        db: sqlite3.Connection, facts: NodeFacts, identity: bytes, agreement: bytes, now: float, keep: bool
    ) -> None:
        """Enrolls a node (inside a transaction).

        Args:
            db: The transaction.
            facts: What the node says it is.
            identity: Its raw Ed25519 public key.
            agreement: Its raw X25519 public key.
            now: The enrollment time.
            keep: Keep what earlier check-ins recorded (the node enrolls again with the same keys);
                else start afresh (a new node, or one that was revoked).
        """
        if keep:
            db.execute(
                "UPDATE nodes SET tier = ?, hardware_class = ?, memory_budget_bytes = ?, onnxruntime_version = ?, "
                "free_disk_bytes = ? WHERE node_id = ?",
                (*_fact_values(facts), facts.node_id),
            )
            return
        db.execute(
            "INSERT OR REPLACE INTO nodes (node_id, tier, hardware_class, memory_budget_bytes, onnxruntime_version, "
            "free_disk_bytes, identity_public_key, agreement_public_key, enrolled_at, revoked) "
            "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, 0)",
            (facts.node_id, *_fact_values(facts), identity, agreement, now),
        )

    def node(self, node_id: str) -> NodeRecord | None:
        """The node with this id, or None."""
        rows = self._read("SELECT * FROM nodes WHERE node_id = ?", (node_id,))
        return _node(rows[0]) if rows else None

    def nodes(self) -> list[NodeRecord]:
        """Every enrolled node (revoked ones too), by id."""
        return [_node(row) for row in self._read("SELECT * FROM nodes ORDER BY node_id")]

    def presence(self) -> list[tuple[NodeFacts, bool, float | None]]:
        """Every enrolled node's facts, revoked flag and last check-in, by id: a cheaper scan than :meth:`nodes`."""
        rows = self._read(
            "SELECT node_id, tier, hardware_class, memory_budget_bytes, onnxruntime_version, free_disk_bytes, "
            "revoked, last_seen FROM nodes ORDER BY node_id"
        )
        return [
            (NodeFacts(r[0], r[1], r[2], int(r[3]), r[4], int(r[5])), bool(r[6]), None if r[7] is None else float(r[7]))
            for r in rows
        ]

    def revoke(self, node_id: str) -> None:
        """Marks a node revoked: its check-ins are refused, and it may enroll again with other keys.

        Raises:
            NotFoundError: No node has this id.
        """
        with self.transaction() as db:
            if db.execute("UPDATE nodes SET revoked = 1 WHERE node_id = ?", (node_id,)).rowcount == 0:
                raise NotFoundError(f"no node {node_id!r} is enrolled")

    @staticmethod
    def record_check_in(
        db: sqlite3.Connection, report_facts: NodeFacts, installed: tuple[InstalledModel, ...], now: float
    ) -> None:
        """Records what a check-in reported (inside a transaction)."""
        state, error = summary(installed)
        db.execute(
            "UPDATE nodes SET tier = ?, hardware_class = ?, memory_budget_bytes = ?, onnxruntime_version = ?, "
            "free_disk_bytes = ?, last_seen = ?, installed_json = ?, update_state = ?, last_error = ? "
            "WHERE node_id = ?",
            (
                *_fact_values(report_facts),
                now,
                json.dumps([asdict(m) for m in installed], sort_keys=True),
                state,
                error,
                report_facts.node_id,
            ),
        )

    # Nonces

    @staticmethod
    def remember_nonce(db: sqlite3.Connection, node_id: str, nonce: bytes, now: float, forget_before: float) -> bool:
        """Forgets nonces seen before ``forget_before``, then records this one (inside a transaction).

        Returns:
            False if the node used this nonce already (and it is still remembered).
        """
        db.execute("DELETE FROM nonces WHERE seen_at < ?", (forget_before,))
        try:
            db.execute("INSERT INTO nonces VALUES (?, ?, ?)", (node_id, nonce, now))
        except sqlite3.IntegrityError:
            return False
        return True

    def nonce_count(self) -> int:
        """How many nonces are remembered."""
        return int(self._read("SELECT COUNT(*) FROM nonces")[0][0])

    # Deployments

    def deploy(self, deployment: Deployment) -> Deployment | None:
        """Sets the desired version of a model for the nodes matching its filters.

        Returns:
            The deployment it replaced (same model and filters), or None.
        """
        d = deployment
        with self.transaction() as db:
            row = db.execute(
                "SELECT * FROM deployments WHERE name = ? AND tier = ? AND hardware_class = ?",
                (d.name, d.tier, d.hardware_class),
            ).fetchone()
            db.execute(
                "INSERT OR REPLACE INTO deployments VALUES (?, ?, ?, ?, ?)",
                (d.name, d.version, d.tier, d.hardware_class, d.created_at),
            )
        return None if row is None else Deployment(*row)

    @staticmethod
    def set_deployed_version(db: sqlite3.Connection, name: str, old: str, new: str) -> int:
        """Makes every deployment of ``name`` that names version ``old`` name ``new`` (inside a transaction).

        Returns:
            How many deployments changed.
        """
        return db.execute(
            "UPDATE deployments SET version = ? WHERE name = ? AND version = ?", (new, name, old)
        ).rowcount

    def deployments(self) -> list[Deployment]:
        """Every deployment, by model name, then filters."""
        rows = self._read("SELECT * FROM deployments ORDER BY name, tier, hardware_class")
        return [Deployment(*row) for row in rows]


def summary(installed: tuple[InstalledModel, ...]) -> tuple[str, str]:
    """A node's update state and last error, from its installed models.

    The state is ``refused`` if any model's update was refused, else the state of
    an update in progress (any other than ``committed``), else ``committed``
    ("" when it reports no models); the error is the first one reported.
    """
    states = [m.state for m in installed if m.state]
    if "refused" in states:
        state = "refused"
    else:
        state = next((s for s in states if s != "committed"), "committed" if states else "")
    error = next((m.last_error for m in installed if m.last_error), "")
    return state, error


def _fact_values(facts: NodeFacts) -> tuple[Any, ...]:
    return (
        facts.tier,
        facts.hardware_class,
        facts.memory_budget_bytes,
        facts.onnxruntime_version,
        facts.free_disk_bytes,
    )


def _node(row: tuple[Any, ...]) -> NodeRecord:
    facts = NodeFacts(row[0], row[1], row[2], int(row[3]), row[4], int(row[5]))
    installed = tuple(InstalledModel(**m) for m in json.loads(row[11]))
    return NodeRecord(
        facts=facts,
        identity_public_key=bytes(row[6]),
        agreement_public_key=bytes(row[7]),
        enrolled_at=float(row[8]),
        revoked=bool(row[9]),
        last_seen=None if row[10] is None else float(row[10]),
        installed=installed,
        update_state=row[12],
        last_error=row[13],
    )
