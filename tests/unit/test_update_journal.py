"""The updater's journal: durable states per model, legal moves only, and a torn or garbage file never wins."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import pytest

from services.errors import InvalidArgumentError, PreconditionError
from services.updates.key_grants import KeyGrant
from services.updates.update_journal import Assignment, JournalEntry, UpdateJournal, UpdateState

GRANT = KeyGrant("k1", bytes(range(32)), b"s" * 16, b"n" * 12, b"wrapped-key-bytes")
A2 = Assignment("lm", "2", "fp32", "models/lm/2/fp32", GRANT)
A3 = Assignment("lm", "3", "int8", "models/lm/3/int8", GRANT)

HAPPY = [UpdateState.ASSIGNED, UpdateState.DOWNLOADING, UpdateState.VERIFIED, UpdateState.TRIAL, UpdateState.COMMITTED]


def test_each_state_is_durable_and_read_back_by_a_new_journal(tmp_path: Path) -> None:
    for state in HAPPY:
        UpdateJournal(tmp_path).record(A2, state)
        entry = UpdateJournal(tmp_path).read("lm")  # as a restarted process reads it
        assert entry == JournalEntry(A2, state)
    assert entry is not None and entry.assignment.grant == GRANT  # the wrapped key, kept wrapped
    assert oct((tmp_path / "lm.json").stat().st_mode & 0o777) == "0o600"
    assert [p.name for p in tmp_path.iterdir()] == ["lm.json"]  # no temporary file left


def test_only_legal_moves_are_written(tmp_path: Path) -> None:
    journal = UpdateJournal(tmp_path)
    with pytest.raises(PreconditionError, match="must be assigned"):
        journal.record(A2, UpdateState.DOWNLOADING)
    journal.record(A2, UpdateState.ASSIGNED)
    with pytest.raises(PreconditionError, match="cannot go from assigned to trial"):
        journal.record(A2, UpdateState.TRIAL)
    journal.record(A2, UpdateState.DOWNLOADING)
    journal.record(A2, UpdateState.DOWNLOADING)  # resumed after a restart
    journal.record(A2, UpdateState.ASSIGNED)  # started again (its files were lost)
    journal.record(A2, UpdateState.REFUSED, "golden vectors differ")
    with pytest.raises(PreconditionError, match="already refused"):
        journal.record(A2, UpdateState.DOWNLOADING)
    assert journal.read("lm") == JournalEntry(A2, UpdateState.REFUSED, "golden vectors differ")
    # Another assignment starts afresh, at assigned.
    assert journal.record(A3, UpdateState.ASSIGNED).assignment == A3


def test_note_keeps_the_state_and_settle_follows_the_store(tmp_path: Path) -> None:
    journal = UpdateJournal(tmp_path)
    entry = journal.record(A2, UpdateState.ASSIGNED)
    journal.note(entry, "upstream test-source is unavailable")
    assert journal.read("lm") == JournalEntry(A2, UpdateState.ASSIGNED, "upstream test-source is unavailable")
    journal.settle(A2, UpdateState.COMMITTED)
    assert journal.read("lm") == JournalEntry(A2, UpdateState.COMMITTED)


@pytest.mark.parametrize(
    "content",
    [
        b"",
        b'{"format": 1, "assignment": {"name": "lm", "vers',  # torn
        b"\x00\xff garbage \x13",
        b'{"format": 99, "assignment": {}, "state": "trial", "last_error": ""}',
        b'{"format": 1, "assignment": {"name": "lm"}, "state": "trial", "last_error": ""}',
        b"[1, 2, 3]",
    ],
    ids=["empty", "torn", "garbage", "future-format", "missing-fields", "not-an-object"],
)
def test_an_unreadable_file_is_no_update_in_progress(
    tmp_path: Path, content: bytes, caplog: pytest.LogCaptureFixture
) -> None:
    journal = UpdateJournal(tmp_path)
    journal.record(A3, UpdateState.ASSIGNED)
    (tmp_path / "lm.json").write_bytes(content)
    with caplog.at_level(logging.ERROR, "edgecascade.updates"):
        assert journal.read("lm") is None
        assert journal.entries() == []
    assert "no update in progress" in caplog.text
    # A new assignment is recorded over it.
    assert journal.record(A2, UpdateState.ASSIGNED).state is UpdateState.ASSIGNED


def test_an_entry_under_another_models_name_is_refused(tmp_path: Path) -> None:
    journal = UpdateJournal(tmp_path)
    journal.record(A2, UpdateState.ASSIGNED)
    os.replace(tmp_path / "lm.json", tmp_path / "other.json")
    assert journal.read("other") is None
    assert journal.entries() == []


def test_a_crash_while_writing_leaves_the_previous_state(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    journal = UpdateJournal(tmp_path)
    journal.record(A2, UpdateState.ASSIGNED)
    journal.record(A2, UpdateState.DOWNLOADING)

    def crash(src: str, dst: str) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(OSError, match="No space left"):
        journal.record(A2, UpdateState.VERIFIED)
    monkeypatch.undo()
    assert journal.read("lm") == JournalEntry(A2, UpdateState.DOWNLOADING)
    assert [p.name for p in tmp_path.iterdir()] == ["lm.json"]


def test_entries_skips_garbage_and_temporary_files(tmp_path: Path) -> None:
    journal = UpdateJournal(tmp_path)
    journal.record(A2, UpdateState.ASSIGNED)
    journal.record(Assignment("vision", "1", "fp32", "models/vision/1/fp32", GRANT), UpdateState.ASSIGNED)
    (tmp_path / "broken.json").write_text("{")
    (tmp_path / ".lm.json.abc.tmp").write_text(json.dumps({"half": True}))
    (tmp_path / "..json").write_text("{}")
    assert [e.assignment.name for e in journal.entries()] == ["lm", "vision"]


def test_model_names_cannot_escape_the_directory(tmp_path: Path) -> None:
    with pytest.raises(InvalidArgumentError):
        UpdateJournal(tmp_path).read("../etc/passwd")
