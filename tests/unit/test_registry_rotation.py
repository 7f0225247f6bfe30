"""Root rotation done safely: --keep-keys keeps every root key, new keys are durable before the
commit, an interrupted rotation is settled by the next one, and new clients get the newest root.

Real TUF repositories and keys on disk; crashes are simulated by an ``on_step`` hook that raises.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path

import pytest
from tuf.api.metadata import Metadata, Root
from tuf.ngclient import Updater

from edgecascade import __main__ as cli
from services.errors import ConfigError
from services.updates.tuf_client import METADATA_BASE, TARGETS_BASE, ArtifactFetcher
from tests.support.registry import DirectorySource, FakeClock, new_registry
from tier2_region.registry import registry as registry_module
from tier2_region.registry import signing_keys as signing_keys_module
from tier2_region.registry.metadata_expiry import read_expiries
from tier2_region.registry.registry import ModelRegistry
from tier2_region.registry.signing_keys import generate_keys, load_keys, load_signer, root_key_files
from tier2_region.registry.tuf_repository import TufRepository


class CrashError(Exception):
    """What the injected hook raises: the process 'dies' right after a step."""


def _crash_at(step: str) -> Callable[[str], None]:
    def hook(name: str) -> None:
        if name == step:
            raise CrashError(name)

    return hook


def _root(registry: ModelRegistry, version: int | None = None) -> Root:
    metadata = registry.repository.metadata_dir
    name = f"{version}.root.json" if version else f"{registry.repository.root_version()}.root.json"
    return Metadata[Root].from_bytes((metadata / name).read_bytes()).signed


def _keyid(path: Path) -> str:
    return load_signer(path).public_key.keyid


def _root_rows(registry: ModelRegistry) -> dict[str, str]:
    return {keyid: location for role, keyid, location in registry.database.signing_keys() if role == "root"}


def _three_key_registry(tmp_path: Path, clock: FakeClock | None = None) -> tuple[ModelRegistry, Path, Path]:
    key_dir, root_dir = tmp_path / "keys", tmp_path / "root"
    generate_keys(key_dir, root_dir, root_keys=3)
    registry = ModelRegistry(tmp_path / "registry", clock=clock or FakeClock())
    registry.create(load_keys(key_dir, root_dir), 2, key_dir, root_dir)
    return registry, key_dir, root_dir


def _client_refresh(registry: ModelRegistry, trusted: bytes, client_dir: Path) -> int:
    client_dir.mkdir(parents=True, exist_ok=True)
    Updater(
        str(client_dir),
        METADATA_BASE,
        target_dir=None,
        target_base_url=TARGETS_BASE,
        fetcher=ArtifactFetcher(DirectorySource(registry.repository_dir)),
        bootstrap=trusted,
    ).refresh()
    return int(json.loads((client_dir / "root.json").read_bytes())["signed"]["version"])


# --- 1. --keep-keys keeps the root role as it is -------------------------------------------------


def test_keep_keys_with_two_of_three_keys_present_keeps_all_three_and_the_threshold(tmp_path: Path) -> None:
    clock = FakeClock()
    registry, _, root_dir = _three_key_registry(tmp_path, clock)
    old = _root(registry, 1)
    offline = tmp_path / "elsewhere"
    offline.mkdir()
    (root_dir / "root-3.pem").rename(offline / "root-3.pem")  # the third key is in another safe
    clock.advance(timedelta(days=300))

    rotation = registry.rotate_root(root_dir, keep_keys=True)

    new = _root(registry, 2)
    assert rotation.version == 2 and rotation.threshold == 2 and rotation.retired == []
    assert new.roles["root"].keyids == old.roles["root"].keyids  # nothing revoked
    assert new.roles["root"].threshold == 2
    assert new.expires == clock.now + timedelta(days=365)
    assert new.keys == old.keys and {r: v.keyids for r, v in new.roles.items()} == {
        r: v.keyids for r, v in old.roles.items()
    }
    v2 = Metadata[Root].from_bytes((registry.repository.metadata_dir / "2.root.json").read_bytes())
    assert new.get_root_verification_result(old, v2.signed_bytes, v2.signatures).verified
    assert [p.name for p in root_key_files(root_dir)] == ["root-1.pem", "root-2.pem"]  # nothing moved
    assert set(_root_rows(registry)) == set(old.roles["root"].keyids)  # the absent key is still a root key
    # One key of the three is below the threshold: refused, nothing written.
    (root_dir / "root-2.pem").rename(offline / "root-2.pem")
    with pytest.raises(ConfigError, match="needs 2 of its 3 root keys"):
        registry.rotate_root(root_dir, keep_keys=True)
    assert registry.repository.root_version() == 2
    registry.close()


@pytest.mark.parametrize(
    "options",
    [
        ["--root-key-count", "2"],
        ["--new-root-keys-dir", "NEW"],
        ["--root-threshold", "1"],
    ],
)
def test_keep_keys_refuses_options_that_change_root_keys(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], options: list[str]
) -> None:
    kit = new_registry(tmp_path)
    registry, keys = str(kit.registry.directory), str(kit.key_dir)
    kit.registry.close()
    options = [str(tmp_path / "new") if o == "NEW" else o for o in options]
    code = cli.main(["model", "rotate-root", "--registry", registry, "--keys", keys, "--keep-keys", *options])
    assert code == 2
    out = capsys.readouterr().out
    assert "refused" in out and "--keep-keys" in out and options[0] in out
    assert not (kit.registry.repository.metadata_dir / "2.root.json").exists()
    assert not (tmp_path / "new").exists()


# --- 2. new keys durable before root N+1 is committed ----------------------------------------


def test_new_root_keys_and_retirements_are_fsynced_around_the_commit(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    kit = new_registry(tmp_path)
    events: list[str] = []
    real_commit = TufRepository.commit_root

    def record_fsync(path: Path) -> None:
        events.append(f"fsync {path}")

    def record_commit(self: TufRepository, root: Metadata[Root]) -> None:
        events.append("commit")
        real_commit(self, root)

    monkeypatch.setattr(registry_module, "fsync_directory", record_fsync)
    monkeypatch.setattr(signing_keys_module, "fsync_directory", record_fsync)
    monkeypatch.setattr(TufRepository, "commit_root", record_commit)
    new_dir = tmp_path / "offline" / "root-v2"  # neither exists yet

    kit.registry.rotate_root(kit.key_dir, new_key_dir=new_dir)

    assert "commit" in events
    before, after = events[: events.index("commit")], events[events.index("commit") + 1 :]
    assert f"fsync {new_dir}" in before  # the new key files' entries
    assert f"fsync {new_dir.parent}" in before  # the new directory's own entry
    assert f"fsync {tmp_path}" in before  # … and the parent created with it
    assert f"fsync {kit.key_dir / 'retired-root-v1'}" in after
    assert f"fsync {kit.key_dir}" in after
    # Nothing about the retirements before the commit: the old keys are needed until then.
    assert f"fsync {kit.key_dir / 'retired-root-v1'}" not in before


# --- 3. an interrupted rotation is settled by the next one -------------------------------------


def test_a_crash_after_the_new_keys_are_written_leaves_an_orphan_the_next_rotation_moves_away(
    tmp_path: Path,
) -> None:
    kit = new_registry(tmp_path)
    registry = kit.registry
    with pytest.raises(CrashError):
        registry.rotate_root(kit.key_dir, on_step=_crash_at("keys"))
    assert registry.repository.root_version() == 1
    orphan = kit.key_dir / "root-2.pem"
    orphan_id = _keyid(orphan)
    assert orphan_id not in _root(registry).roles["root"].keyids

    rotation = registry.rotate_root(kit.key_dir)

    v2 = _root(registry, 2)
    assert orphan_id not in v2.roles["root"].keyids
    moved = kit.key_dir / "retired-root-uncommitted" / "root-2.pem"
    assert moved.is_file() and _keyid(moved) == orphan_id
    assert rotation.reconciled == [moved]
    assert root_key_files(kit.key_dir) == rotation.key_files
    assert {_keyid(p) for p in root_key_files(kit.key_dir)} == set(v2.roles["root"].keyids)
    assert set(_root_rows(registry)) == set(v2.roles["root"].keyids)
    assert registry.database.settings()["root_version"] == "2"


def test_a_crash_after_the_commit_is_settled_by_reconcile_and_by_the_next_rotation(tmp_path: Path) -> None:
    registry, _, root_dir = _three_key_registry(tmp_path)
    old_ids = set(_root(registry, 1).roles["root"].keyids)
    with pytest.raises(CrashError):
        registry.rotate_root(root_dir, new_key_count=2, threshold=1, on_step=_crash_at("root"))
    v2 = _root(registry, 2)
    assert registry.repository.root_version() == 2
    # The old (possibly compromised) keys are still in the current directory; the database is stale.
    assert len(root_key_files(root_dir)) == 5
    assert set(_root_rows(registry)) == old_ids

    retired = registry.reconcile_root_keys(root_dir)

    assert sorted(p.relative_to(root_dir).as_posix() for p in retired) == [
        "retired-root-v1/root-1.pem",
        "retired-root-v1/root-2.pem",
        "retired-root-v1/root-3.pem",
    ]
    assert {_keyid(p) for p in root_key_files(root_dir)} == set(v2.roles["root"].keyids)
    rows = _root_rows(registry)
    assert set(rows) == set(v2.roles["root"].keyids)
    assert all(Path(loc).parent == root_dir for loc in rows.values())
    settings = registry.database.settings()
    assert settings["root_version"] == "2" and settings["root_threshold"] == "1"
    assert registry.reconcile_root_keys(root_dir) == []  # idempotent
    assert registry.rotate_root(root_dir, keep_keys=True).version == 3
    registry.close()


def test_the_next_rotation_retires_keys_a_crash_left_behind(tmp_path: Path) -> None:
    kit = new_registry(tmp_path)
    registry = kit.registry
    old_id = _keyid(kit.key_dir / "root-1.pem")
    with pytest.raises(CrashError):
        registry.rotate_root(kit.key_dir, on_step=_crash_at("root"))

    rotation = registry.rotate_root(kit.key_dir, keep_keys=True)  # needs the v2 key, not the stale v1 one

    assert rotation.version == 3
    assert [p.relative_to(kit.key_dir).as_posix() for p in rotation.reconciled] == ["retired-root-v1/root-1.pem"]
    assert old_id not in _root(registry, 3).roles["root"].keyids
    assert [p.name for p in root_key_files(kit.key_dir)] == ["root-2.pem"]
    assert set(_root_rows(registry)) == set(_root(registry, 3).roles["root"].keyids)


def test_keys_the_registry_never_made_are_left_where_they_are(tmp_path: Path) -> None:
    """A root key directory holding unrelated keys (another registry's, say) is not emptied."""
    kit = new_registry(tmp_path)
    foreign = tmp_path / "foreign"
    generate_keys(foreign, foreign, root_keys=2)
    assert kit.registry.reconcile_root_keys(foreign) == []
    assert [p.name for p in root_key_files(foreign)] == ["root-1.pem", "root-2.pem"]
    with pytest.raises(ConfigError, match="needs 1 of its 1 root keys"):
        kit.registry.rotate_root(foreign)
    assert [p.name for p in root_key_files(foreign)] == ["root-1.pem", "root-2.pem"]


# --- 5. new clients start from the newest root -----------------------------------------------


def test_trusted_root_is_the_newest_committed_root(tmp_path: Path) -> None:
    kit = new_registry(tmp_path)  # real time: ngclient checks expiry against the real clock
    registry = kit.registry
    assert Metadata[Root].from_bytes(registry.repository.trusted_root()).signed.version == 1
    registry.rotate_root(kit.key_dir)
    metadata = registry.repository.metadata_dir
    assert registry.repository.trusted_root() == (metadata / "2.root.json").read_bytes()
    # A crash between <N+1>.root.json and the root.json copy: the chain decides, not the copy.
    with pytest.raises(CrashError):
        registry.rotate_root(kit.key_dir, on_step=_crash_at("root"))
    (metadata / "root.json").write_bytes((metadata / "2.root.json").read_bytes())
    trusted = registry.repository.trusted_root()
    assert Metadata[Root].from_bytes(trusted).signed.version == 3
    # A device provisioned now starts from version 3 and refreshes.
    assert _client_refresh(registry, trusted, tmp_path / "client") == 3


def test_status_reads_the_newest_root_not_a_stale_root_json_copy(tmp_path: Path) -> None:
    clock = FakeClock()
    kit = new_registry(tmp_path, clock)
    clock.advance(timedelta(days=100))
    kit.registry.rotate_root(kit.key_dir, keep_keys=True)
    metadata = kit.registry.repository.metadata_dir
    (metadata / "root.json").write_bytes((metadata / "1.root.json").read_bytes())  # as if the copy was never made
    expiries = read_expiries(DirectorySource(kit.registry.repository_dir))
    assert expiries["root"] == _root(kit.registry, 2).expires == clock.now + timedelta(days=365)
