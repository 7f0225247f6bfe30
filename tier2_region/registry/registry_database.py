"""The registry's own state in SQLite: variants, their content keys, where the signing keys live.

Tables::

    variants       one row per published (or being published) model variant
    content_keys   the AES-256-GCM key of each encrypted blob, by key id
    signing_keys   role → key id and the file that holds it (never the key itself)
    settings       the repository's parameters (root version and threshold, expiries) and the
                   new root keys of a rotation not yet settled (``root_rotation_pending``)

A variant row is written as ``pending`` (with its content key) *before* the TUF
commit and marked ``published`` after it, so a crash never loses the key of a
blob the repository serves; :meth:`RegistryDatabase.reconcile` settles pending
rows against the committed targets on the next open. The file is created with
mode 0600: it holds content keys.
"""

from __future__ import annotations

import json
import os
import sqlite3
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from services.errors import NotFoundError

PENDING = "pending"
PUBLISHED = "published"

_SCHEMA = """
CREATE TABLE IF NOT EXISTS variants (
    name TEXT NOT NULL,
    version TEXT NOT NULL,
    variant TEXT NOT NULL,
    target_path TEXT NOT NULL UNIQUE,
    golden_path TEXT NOT NULL,
    blob_sha256 TEXT NOT NULL,
    blob_length INTEGER NOT NULL,
    key_id TEXT NOT NULL REFERENCES content_keys(key_id),
    custom_json TEXT NOT NULL,
    state TEXT NOT NULL CHECK (state IN ('pending', 'published')),
    created_at TEXT NOT NULL,
    PRIMARY KEY (name, version, variant)
);
CREATE TABLE IF NOT EXISTS content_keys (
    key_id TEXT PRIMARY KEY,
    algorithm TEXT NOT NULL,
    key BLOB NOT NULL
);
CREATE TABLE IF NOT EXISTS signing_keys (
    role TEXT NOT NULL,
    key_id TEXT NOT NULL,
    location TEXT NOT NULL,
    PRIMARY KEY (role, key_id)
);
CREATE TABLE IF NOT EXISTS settings (
    name TEXT PRIMARY KEY,
    value TEXT NOT NULL
);
"""


@dataclass(frozen=True)
class VariantRecord:
    """One variant as the registry database knows it."""

    name: str
    version: str
    variant: str
    target_path: str
    golden_path: str
    blob_sha256: str
    blob_length: int
    key_id: str
    custom: dict[str, Any]
    state: str
    created_at: str


class RegistryDatabase:
    """Opens (and creates) the registry database file.

    Args:
        path: The SQLite file.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        if not path.exists():
            # Create it 0600 before SQLite writes a byte: it will hold content keys.
            os.close(os.open(path, os.O_WRONLY | os.O_CREAT, 0o600))
        # Used from worker threads too (the region re-signs off its event loop); writers are
        # serialised by the registry's file lock, and one connection is never used by two threads at once.
        self._db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.execute("PRAGMA foreign_keys=ON")
        self._db.executescript(_SCHEMA)

    def close(self) -> None:
        """Closes the connection."""
        self._db.close()

    @contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        """Runs a block in one write transaction; rolls back on any exception."""
        self._db.execute("BEGIN IMMEDIATE")
        try:
            yield self._db
        except BaseException:
            self._db.execute("ROLLBACK")
            raise
        self._db.execute("COMMIT")

    def add_pending(self, records: Iterable[VariantRecord], keys: dict[str, bytes], algorithm: str) -> None:
        """Stores variants about to be committed, with their content keys, in one transaction."""
        with self.transaction() as db:
            for key_id, key in keys.items():
                db.execute("INSERT INTO content_keys VALUES (?, ?, ?)", (key_id, algorithm, key))
            for r in records:
                db.execute(
                    "INSERT INTO variants VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    (
                        r.name,
                        r.version,
                        r.variant,
                        r.target_path,
                        r.golden_path,
                        r.blob_sha256,
                        r.blob_length,
                        r.key_id,
                        json.dumps(r.custom, sort_keys=True),
                        PENDING,
                        r.created_at,
                    ),
                )

    def mark_published(self, target_paths: Iterable[str]) -> None:
        """Marks pending variants as committed to the repository."""
        with self.transaction() as db:
            for path in target_paths:
                db.execute("UPDATE variants SET state = ? WHERE target_path = ?", (PUBLISHED, path))

    def reconcile(self, committed: set[str]) -> tuple[list[str], list[str]]:
        """Settles pending rows left by an interrupted publish.

        Args:
            committed: Target paths in the repository's committed targets metadata.

        Returns:
            ``(published, dropped)``: pending target paths now marked published
            because the commit happened, and those removed because it did not.
        """
        published: list[str] = []
        dropped: list[str] = []
        with self.transaction() as db:
            rows = db.execute("SELECT target_path, key_id FROM variants WHERE state = ?", (PENDING,)).fetchall()
            for path, key_id in rows:
                if path in committed:
                    db.execute("UPDATE variants SET state = ? WHERE target_path = ?", (PUBLISHED, path))
                    published.append(path)
                else:
                    db.execute("DELETE FROM variants WHERE target_path = ?", (path,))
                    db.execute("DELETE FROM content_keys WHERE key_id = ?", (key_id,))
                    dropped.append(path)
        return published, dropped

    def variants(self, name: str = "", version: str = "", *, include_pending: bool = False) -> list[VariantRecord]:
        """Variants, sorted by name, numeric version and variant."""
        query = "SELECT * FROM variants WHERE 1=1"
        args: list[str] = []
        if not include_pending:
            query += " AND state = ?"
            args.append(PUBLISHED)
        if name:
            query += " AND name = ?"
            args.append(name)
        if version:
            query += " AND version = ?"
            args.append(version)
        rows = [self._record(row) for row in self._db.execute(query, args).fetchall()]
        return sorted(rows, key=lambda r: (r.name, int(r.version) if r.version.isdigit() else 0, r.variant))

    def content_key(self, key_id: str) -> bytes:
        """The content key with this id.

        Raises:
            NotFoundError: No such key.
        """
        row = self._db.execute("SELECT key FROM content_keys WHERE key_id = ?", (key_id,)).fetchone()
        if row is None:
            raise NotFoundError(f"content key {key_id} is not in the registry")
        return bytes(row[0])

    def record_signing_keys(self, rows: Iterable[tuple[str, str, str]]) -> None:
        """Stores where each signing key is: ``(role, key id, location)`` rows."""
        with self.transaction() as db:
            db.executemany("INSERT OR REPLACE INTO signing_keys VALUES (?, ?, ?)", list(rows))

    def replace_signing_keys(self, role: str, rows: Iterable[tuple[str, str, str]]) -> None:
        """Replaces every row of ``role`` with ``rows`` (after a key rotation)."""
        with self.transaction() as db:
            db.execute("DELETE FROM signing_keys WHERE role = ?", (role,))
            db.executemany("INSERT OR REPLACE INTO signing_keys VALUES (?, ?, ?)", list(rows))

    def signing_keys(self) -> list[tuple[str, str, str]]:
        """``(role, key id, location)`` of every signing key, by role."""
        rows = self._db.execute("SELECT role, key_id, location FROM signing_keys ORDER BY role, key_id").fetchall()
        return [(str(a), str(b), str(c)) for a, b, c in rows]

    def set_settings(self, values: dict[str, str]) -> None:
        """Stores named settings."""
        with self.transaction() as db:
            db.executemany("INSERT OR REPLACE INTO settings VALUES (?, ?)", list(values.items()))

    def settings(self) -> dict[str, str]:
        """All named settings."""
        return {str(k): str(v) for k, v in self._db.execute("SELECT name, value FROM settings").fetchall()}

    @staticmethod
    def _record(row: tuple[Any, ...]) -> VariantRecord:
        return VariantRecord(
            name=row[0],
            version=row[1],
            variant=row[2],
            target_path=row[3],
            golden_path=row[4],
            blob_sha256=row[5],
            blob_length=int(row[6]),
            key_id=row[7],
            custom=json.loads(row[8]),
            state=row[9],
            created_at=row[10],
        )
