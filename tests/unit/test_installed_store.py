"""The installed store: complete-or-absent versions, the last readable commit marker serves, two committed kept."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from services.updates.installed_store import COMMIT_FILE, InstalledStore
from services.updates.key_grants import KeyGrant

GRANT = KeyGrant("k", bytes(32), bytes(16), bytes(12), b"wrapped")


def facts(version: str) -> dict[str, Any]:
    return {
        "task": "char-lm",
        "properties": {"edgecascade.context_length": "4"},
        "max_batch_size": 8,
        "peak_memory_bytes": {"1": 1000, "8": 2000},
        "plaintext_length": 10,
        "encryption": {"key_id": "k"},
        "version": version,
    }


def add(store: InstalledStore, tmp: Path, version: str) -> None:
    blob = tmp / f"blob-{version}"
    blob.write_bytes(b"ECM1" + bytes(40))
    store.add("lm", version, "fp32", f"models/lm/{version}/fp32", blob, GRANT, facts(version), 44, "0" * 64, b"{}")
    assert not blob.exists()  # moved in, not copied


def test_versions_serve_only_once_committed_and_two_are_kept(tmp_path: Path) -> None:
    store = InstalledStore(tmp_path / "store")
    add(store, tmp_path, "1")
    assert store.names() == [] and store.serving("lm") == []
    store.begin_trial("lm", "1")
    assert [v.version for v in store.serving("lm")] == ["1"]
    store.commit("lm", "1")
    store.end_trial("lm")
    for version in ("2", "3"):
        add(store, tmp_path, version)
        store.commit("lm", version)
    assert sorted(p.name for p in (tmp_path / "store" / "lm").iterdir()) == ["2", "3"]
    reopened = InstalledStore(tmp_path / "store")
    assert (reopened.committed("lm").version, reopened.previous("lm").version) == ("3", "2")  # type: ignore[union-attr]
    entry = reopened.repository().resolve("lm")
    assert (entry.version, entry.task, entry.max_batch_size) == ("3", "char-lm", 8)
    assert entry.properties["edgecascade.peak_memory_bytes"] == "2000"


def test_a_torn_commit_marker_never_wins(tmp_path: Path) -> None:
    store = InstalledStore(tmp_path / "store")
    for version in ("1", "2"):
        add(store, tmp_path, version)
        store.commit("lm", version)
    (tmp_path / "store" / "lm" / "2" / COMMIT_FILE).write_bytes(b'{"se')
    reopened = InstalledStore(tmp_path / "store")
    assert reopened.committed("lm").version == "1"  # type: ignore[union-attr]
    assert [e.version for e in reopened.repository().versions("lm")] == ["1"]


def test_half_written_versions_are_never_listed_and_are_removed_at_start(tmp_path: Path) -> None:
    store = InstalledStore(tmp_path / "store")
    add(store, tmp_path, "1")
    store.commit("lm", "1")
    model_dir = tmp_path / "store" / "lm"
    (model_dir / ".2.123.456.tmp").mkdir()  # a crash while assembling version 2
    (model_dir / ".2.123.456.tmp" / "model.ecm").write_bytes(b"ECM1")
    truncated = model_dir / "3"
    truncated.mkdir()  # a version directory whose blob is shorter than signed
    for name in ("facts.json", "grant.json", "golden.json"):
        (truncated / name).write_bytes((model_dir / "1" / name).read_bytes())
    (truncated / "model.ecm").write_bytes(b"ECM1")
    reopened = InstalledStore(tmp_path / "store")
    assert [v.version for v in reopened.all("lm")] == ["1"]
    assert not (model_dir / ".2.123.456.tmp").exists()


def test_discard_and_clean_remove_only_uncommitted_versions(tmp_path: Path) -> None:
    store = InstalledStore(tmp_path / "store")
    add(store, tmp_path, "1")
    store.commit("lm", "1")
    add(store, tmp_path, "2")
    add(store, tmp_path, "3")
    store.discard("lm", "1")  # committed: stays
    assert store.clean(keep={("lm", "3")}) == [("lm", "2")]
    assert sorted(v.version for v in store.all("lm")) == ["1", "3"]
