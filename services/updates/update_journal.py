"""The updater's durable journal: one small JSON file per model, each state written atomically and fsynced.

States of one assignment (a model's desired version and variant, with its key grant)::

    assigned → downloading → verified → trial → committed
        └──────────┴────────────┴─────────┴──→ refused (with a reason)

* ``assigned``: the assignment is recorded (with its wrapped key, never a plain one); nothing fetched.
* ``downloading``: the gates passed; the encrypted blob is being fetched into staging (resumable).
* ``verified``: the blob matched its signed length and hash, the grant opened, the plaintext
  matched its signed sha256; the blob is in the installed store (not yet serving).
* ``trial``: the version is loading into onnxruntime (warm-up, golden vectors, footprint).
* ``committed``: it serves, and the store names it the committed version.
* ``refused``: a check failed; ``last_error`` says which. Not retried until the assignment changes.

Every write replaces ``<directory>/<model>.json`` with :func:`~services.atomic_files.write_atomically`
(temporary file, fsync, rename, fsync of the directory): a reader — or a restart after a crash —
sees the old state or the new one, never half of one. A file that is unreadable anyway (a disk
that lied, a hand edit) never wins: it is logged and read as "no update in progress", so the
node keeps what its store says is committed and the next assignment starts afresh.
The journal says how far an update got; what serves is the installed store's to say.
"""

from __future__ import annotations

import base64
import json
import logging
from dataclasses import dataclass, replace
from enum import StrEnum
from pathlib import Path
from typing import Any

from services.atomic_files import fsync_directory, write_atomically
from services.engine.model_repository import check_model_name, check_version
from services.errors import IntegrityError, InvalidArgumentError, PreconditionError
from services.updates.checkin import AssignedVariant
from services.updates.key_grants import KeyGrant

log = logging.getLogger("edgecascade.updates")

FORMAT = 1
SUFFIX = ".json"


class UpdateState(StrEnum):
    """Where one assignment stands."""

    ASSIGNED = "assigned"
    DOWNLOADING = "downloading"
    VERIFIED = "verified"
    TRIAL = "trial"
    COMMITTED = "committed"
    REFUSED = "refused"

    @property
    def final(self) -> bool:
        """Whether nothing more happens to this assignment."""
        return self in (UpdateState.COMMITTED, UpdateState.REFUSED)


# Allowed moves; a state may be written again (an update resumed after a restart), and an unfinished
# update may start again from ``assigned`` (its verified files were lost).
_NEXT: dict[UpdateState, frozenset[UpdateState]] = {
    # Straight to verified: a rollback to the version kept on the node (checked against the metadata, no download).
    UpdateState.ASSIGNED: frozenset({UpdateState.DOWNLOADING, UpdateState.VERIFIED}),
    UpdateState.DOWNLOADING: frozenset({UpdateState.VERIFIED, UpdateState.ASSIGNED}),
    UpdateState.VERIFIED: frozenset({UpdateState.TRIAL, UpdateState.ASSIGNED}),
    UpdateState.TRIAL: frozenset({UpdateState.COMMITTED, UpdateState.ASSIGNED}),
    UpdateState.COMMITTED: frozenset(),
    UpdateState.REFUSED: frozenset(),
}


def grant_to_json(grant: KeyGrant) -> dict[str, str]:
    """A key grant as JSON (the wrapped key stays wrapped)."""
    return {
        "key_id": grant.key_id,
        "ephemeral_public_key": base64.b64encode(grant.ephemeral_public_key).decode(),
        "salt": base64.b64encode(grant.salt).decode(),
        "nonce": base64.b64encode(grant.nonce).decode(),
        "wrapped_key": base64.b64encode(grant.wrapped_key).decode(),
    }


def grant_from_json(data: Any) -> KeyGrant:
    """Parses :func:`grant_to_json` output.

    Raises:
        IntegrityError: The data is not a key grant.
    """
    try:
        return KeyGrant(
            str(data["key_id"]),
            base64.b64decode(data["ephemeral_public_key"], validate=True),
            base64.b64decode(data["salt"], validate=True),
            base64.b64decode(data["nonce"], validate=True),
            base64.b64decode(data["wrapped_key"], validate=True),
        )
    except (KeyError, TypeError, ValueError) as exc:
        raise IntegrityError(f"stored key grant is malformed: {exc}") from None


@dataclass(frozen=True)
class Assignment:
    """What the region wants a node to run for one model: version, variant, and the content key wrapped to the node."""

    name: str
    version: str
    variant: str
    target_path: str
    grant: KeyGrant

    @classmethod
    def of(cls, assigned: AssignedVariant | Assignment) -> Assignment:
        """The assignment the region sent at check-in (:class:`~services.updates.checkin.AssignedVariant`)."""
        if isinstance(assigned, Assignment):
            return assigned
        return cls(assigned.name, assigned.version, assigned.variant, assigned.target_path, assigned.grant)

    @property
    def key(self) -> tuple[str, str]:
        """What makes it another assignment (a refused one is retried only when this changes)."""
        return (self.version, self.variant)

    def to_json(self) -> dict[str, Any]:
        """JSON-ready form."""
        return {
            "name": self.name,
            "version": self.version,
            "variant": self.variant,
            "target_path": self.target_path,
            "grant": grant_to_json(self.grant),
        }

    @classmethod
    def from_json(cls, data: Any) -> Assignment:
        """Parses :meth:`to_json` output.

        Raises:
            IntegrityError: The data is not an assignment.
        """
        try:
            return cls(
                check_model_name(str(data["name"])),
                check_version(str(data["version"])),
                str(data["variant"]),
                str(data["target_path"]),
                grant_from_json(data["grant"]),
            )
        except (KeyError, TypeError) as exc:
            raise IntegrityError(f"stored assignment is malformed: {exc}") from None
        except InvalidArgumentError as exc:
            raise IntegrityError(f"stored assignment is malformed: {exc.message}") from None


@dataclass(frozen=True)
class JournalEntry:
    """One model's update: its assignment, its state, and the last error met (the refusal's reason when refused)."""

    assignment: Assignment
    state: UpdateState
    last_error: str = ""

    def to_json(self) -> dict[str, Any]:
        """JSON-ready form."""
        return {
            "format": FORMAT,
            "assignment": self.assignment.to_json(),
            "state": self.state.value,
            "last_error": self.last_error,
        }

    @classmethod
    def from_json(cls, data: Any) -> JournalEntry:
        """Parses :meth:`to_json` output.

        Raises:
            IntegrityError: The data is not a journal entry of this format.
        """
        try:
            if data["format"] != FORMAT:
                raise IntegrityError(f"journal format {data['format']!r} is not {FORMAT}")
            return cls(Assignment.from_json(data["assignment"]), UpdateState(data["state"]), str(data["last_error"]))
        except (KeyError, TypeError, ValueError) as exc:
            raise IntegrityError(f"journal entry is malformed: {exc}") from None


class UpdateJournal:
    """The per-model journal files under one directory (see the module docstring).

    Args:
        directory: Where the files are; created if missing.
    """

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        directory.mkdir(parents=True, exist_ok=True)

    def _path(self, name: str) -> Path:
        return self.directory / f"{check_model_name(name)}{SUFFIX}"

    def read(self, name: str) -> JournalEntry | None:
        """The model's last durable entry; None when there is none or it is unreadable (logged)."""
        path = self._path(name)
        try:
            raw = path.read_bytes()
        except FileNotFoundError:
            return None
        except OSError as exc:
            log.error("journal %s cannot be read (%s); treating it as no update in progress", path, exc.strerror)
            return None
        try:
            entry = JournalEntry.from_json(json.loads(raw))
        except (ValueError, IntegrityError) as exc:
            log.error("journal %s is not a valid entry (%s); treating it as no update in progress", path, exc)
            return None
        if entry.assignment.name != name:
            log.error("journal %s names model %r; treating it as no update in progress", path, entry.assignment.name)
            return None
        return entry

    def entries(self) -> list[JournalEntry]:
        """Every readable entry, by model name (unreadable ones are logged and skipped)."""
        found = []
        for path in sorted(self.directory.glob(f"*{SUFFIX}")):
            name = path.name[: -len(SUFFIX)]
            if name.startswith("."):
                continue  # a temporary file of write_atomically
            try:
                entry = self.read(name)
            except InvalidArgumentError:
                log.error("journal file %s does not name a model; skipped", path)
                continue
            if entry is not None:
                found.append(entry)
        return found

    def record(self, assignment: Assignment, state: UpdateState, last_error: str = "") -> JournalEntry:
        """Writes the model's new state durably (a new assignment starts at ``assigned``).

        Raises:
            PreconditionError: The move is not allowed from the recorded state of this assignment.
            OSError: The file cannot be written; the old entry is untouched.
        """
        current = self.read(assignment.name)
        if current is None or current.assignment.key != assignment.key:
            if state is not UpdateState.ASSIGNED:
                raise PreconditionError(
                    f"model '{assignment.name}' version {assignment.version} ({assignment.variant}) must be "
                    f"assigned before it can be {state.value}"
                )
        elif current.state.final and state is not current.state:
            raise PreconditionError(
                f"model '{assignment.name}' version {assignment.version} is already {current.state.value}"
            )
        elif state is not current.state and state is not UpdateState.REFUSED and state not in _NEXT[current.state]:
            raise PreconditionError(
                f"model '{assignment.name}' version {assignment.version} cannot go from "
                f"{current.state.value} to {state.value}"
            )
        entry = JournalEntry(assignment, state, last_error)
        self._write(entry)
        return entry

    def settle(self, assignment: Assignment, state: UpdateState, last_error: str = "") -> JournalEntry:
        """Writes a state without checking the move: for recovery, when the installed store's commit
        marker (the truth about what serves) is ahead of the journal.

        Raises:
            OSError: The file cannot be written; the old entry is untouched.
        """
        entry = JournalEntry(assignment, state, last_error)
        self._write(entry)
        return entry

    def note(self, entry: JournalEntry, last_error: str) -> JournalEntry:
        """Records an error that leaves the state as it is (upstream down, metadata expired …)."""
        noted = replace(entry, last_error=last_error)
        self._write(noted)
        return noted

    def remove(self, name: str) -> bool:
        """Deletes the model's entry (the model leaves the node); returns whether there was one.

        Raises:
            InvalidArgumentError: The name is not valid.
            OSError: The file cannot be deleted.
        """
        path = self._path(name)
        try:
            path.unlink()
        except FileNotFoundError:
            return False
        fsync_directory(self.directory)
        return True

    def _write(self, entry: JournalEntry) -> None:
        data = json.dumps(entry.to_json(), sort_keys=True).encode() + b"\n"
        # write_atomically fsyncs the file and, after the rename, the directory.
        write_atomically(self._path(entry.assignment.name), data, mode=0o600)
