"""Keeping a registry alive for years: targets re-signed before they expire, root rotated, expiries reported.

Real TUF repositories on disk, real keys, and python-tuf's own ngclient as the
client; time moves by a fake clock handed to the registry, never by sleeping.
"""

from __future__ import annotations

import json
import logging
import stat
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from tuf.api.metadata import Metadata, Root
from tuf.ngclient import Updater

from services.errors import ConfigError
from services.updates.tuf_client import METADATA_BASE, TARGETS_BASE, ArtifactFetcher
from tests.support.registry import DirectorySource, FakeClock, new_registry, publish_lm
from tier2_region.registry.metadata_expiry import expiry_warnings, read_expiries
from tier2_region.registry.registry import ModelRegistry
from tier2_region.registry.signing_keys import generate_keys, load_keys, root_key_files
from tier2_region.registry.tuf_repository import ExpiryPolicy


def _versions(registry: ModelRegistry) -> tuple[int, int, int]:
    state = registry.repository.state()
    return state.timestamp.signed.version, state.snapshot.signed.version, state.targets.signed.version


def _updater(registry: ModelRegistry, trusted_root: bytes, client_dir: Path) -> Updater:
    """python-tuf's ngclient, holding only ``trusted_root``, over the repository directory."""
    client_dir.mkdir(parents=True, exist_ok=True)
    return Updater(
        str(client_dir),
        METADATA_BASE,
        target_dir=None,
        target_base_url=TARGETS_BASE,
        fetcher=ArtifactFetcher(DirectorySource(registry.repository_dir)),
        bootstrap=trusted_root,
    )


def _trusted_root_version(client_dir: Path) -> int:
    return int(json.loads((client_dir / "root.json").read_bytes())["signed"]["version"])


def test_targets_are_re_signed_by_refresh_online_before_they_expire(tmp_path: Path) -> None:
    clock = FakeClock()
    kit = new_registry(tmp_path, clock, ExpiryPolicy(targets=timedelta(days=90)))
    publish_lm(kit)
    signed_before = kit.registry.repository.state().targets.signed.targets
    clock.advance(timedelta(days=59))  # 31 days left: outside the 30-day margin
    assert "targets" not in kit.registry.refresh_online(kit.keys)
    assert kit.registry.repository.state().targets.signed.version == 2
    clock.advance(timedelta(days=2))  # 29 days left
    assert kit.registry.refresh_online(kit.keys) == ["targets", "snapshot", "timestamp"]
    state = kit.registry.repository.state()
    assert state.targets.signed.version == 3
    assert state.targets.signed.expires == clock.now.replace(microsecond=0) + timedelta(days=90)
    assert state.snapshot.signed.meta["targets.json"].version == 3
    # The same targets, signed again by the key root names for targets.
    assert state.targets.signed.targets == signed_before
    state.root.signed.verify_delegate("targets", state.targets.signed_bytes, state.targets.signatures)
    assert "targets" not in kit.registry.refresh_online(kit.keys)


def test_without_the_targets_key_targets_are_left_alone_and_the_log_says_so(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    clock = FakeClock()
    kit = new_registry(tmp_path, clock)
    serving = load_keys(kit.key_dir, publisher=False)  # what the region process holds
    clock.advance(timedelta(days=61))
    with caplog.at_level(logging.WARNING, logger="edgecascade.registry"):
        roles = kit.registry.refresh_online(serving)
        kit.registry.refresh_online(serving)
    assert "targets" not in roles
    assert kit.registry.repository.state().targets.signed.version == 1
    warnings = [r.getMessage() for r in caplog.records if "resign-targets" in r.getMessage()]
    assert len(warnings) == 1  # once per targets version, not on every check
    # The operator's verb, where the targets key is, renews them.
    kit.registry.resign_targets(kit.keys)
    assert _versions(kit.registry)[2] == 2
    assert kit.registry.repository.state().targets.signed.expires == clock.now + timedelta(days=90)


def test_a_client_holding_only_the_first_root_follows_a_rotation(tmp_path: Path) -> None:
    kit = new_registry(tmp_path)  # real time: ngclient checks expiry against the real clock
    first_root = kit.registry.repository.trusted_root()
    publish_lm(kit)
    seen_v1 = tmp_path / "client-seen-v1"
    _updater(kit.registry, first_root, seen_v1).refresh()
    assert _trusted_root_version(seen_v1) == 1
    old_keyids = set(Metadata[Root].from_bytes(first_root).signed.roles["root"].keyids)

    rotation = kit.registry.rotate_root(kit.key_dir, new_key_count=3, threshold=2)

    assert rotation.version == 2 and rotation.threshold == 2
    metadata = kit.registry.repository.metadata_dir
    v1 = Metadata[Root].from_bytes(first_root)
    v2 = Metadata[Root].from_bytes((metadata / "2.root.json").read_bytes())
    assert (metadata / "root.json").read_bytes() == (metadata / "2.root.json").read_bytes()
    # Signed by the old root's threshold and by the new root's threshold.
    v1.signed.verify_delegate("root", v2.signed_bytes, v2.signatures)
    v2.signed.verify_delegate("root", v2.signed_bytes, v2.signatures)
    assert v2.signed.roles["root"].threshold == 2 and len(v2.signed.roles["root"].keyids) == 3
    assert not old_keyids & set(v2.signed.roles["root"].keyids)
    # New key material where the registry keeps root keys; the old key retired next to it.
    assert [p.name for p in rotation.key_files] == ["root-2.pem", "root-3.pem", "root-4.pem"]
    assert root_key_files(kit.key_dir) == rotation.key_files
    assert all(stat.S_IMODE(p.stat().st_mode) == 0o600 for p in rotation.key_files)
    assert [p.relative_to(kit.key_dir).as_posix() for p in rotation.retired] == ["retired-root-v1/root-1.pem"]
    assert {row[1] for row in kit.registry.database.signing_keys() if row[0] == "root"} == set(
        v2.signed.roles["root"].keyids
    )
    # Publishing and re-signing go on with the same targets and online keys.
    publish_lm(kit, version="2", seed=1)

    # A fresh client that embeds only 1.root.json walks 1 → 2 and refreshes.
    fresh = tmp_path / "client-fresh"
    updater = _updater(kit.registry, first_root, fresh)
    updater.refresh()
    assert _trusted_root_version(fresh) == 2
    assert updater.get_targetinfo("models/lm/2/int8") is not None
    # A client that trusted version 1 before the rotation follows it too.
    again = _updater(kit.registry, first_root, seen_v1)
    again.refresh()
    assert _trusted_root_version(seen_v1) == 2
    assert again.get_targetinfo("models/lm/2/int8") is not None

    # The next rotation needs the new keys (the retired one no longer counts): 1 → 2 → 3.
    third = kit.registry.rotate_root(kit.key_dir, new_key_count=1, threshold=1)
    assert third.version == 3
    fresh3 = tmp_path / "client-fresh-3"
    _updater(kit.registry, first_root, fresh3).refresh()
    assert _trusted_root_version(fresh3) == 3


def test_rotating_root_needs_a_threshold_of_the_current_root_keys(tmp_path: Path) -> None:
    key_dir, root_dir, stranger = tmp_path / "keys", tmp_path / "root", tmp_path / "stranger"
    generate_keys(key_dir, root_dir, root_keys=3)
    registry = ModelRegistry(tmp_path / "registry")
    registry.create(load_keys(key_dir, root_dir), 2, key_dir, root_dir)
    before = sorted(p.name for p in registry.repository.metadata_dir.iterdir())
    # One of the three keys is not enough for a threshold of two; keys root does not know count for nothing.
    (root_dir / "root-2.pem").rename(tmp_path / "root-2.pem")
    (root_dir / "root-3.pem").rename(tmp_path / "root-3.pem")
    generate_keys(stranger / "k", stranger, root_keys=2)
    for directory in (root_dir, stranger):
        with pytest.raises(ConfigError, match=r"rotating root version 1 needs 2 of its 3 root keys"):
            registry.rotate_root(directory)
    assert sorted(p.name for p in registry.repository.metadata_dir.iterdir()) == before
    assert [p.name for p in root_key_files(root_dir)] == ["root-1.pem"]  # no new key files were written
    # With two of them it goes ahead; the threshold cannot exceed the new keys.
    (tmp_path / "root-2.pem").rename(root_dir / "root-2.pem")
    with pytest.raises(ConfigError, match="root threshold must be between 1 and the number of new root keys"):
        registry.rotate_root(root_dir, new_key_count=1, threshold=2)
    assert registry.rotate_root(root_dir).version == 2
    registry.close()


def test_rotate_root_keeping_the_keys_renews_root_expiry(tmp_path: Path) -> None:
    clock = FakeClock()
    kit = new_registry(tmp_path, clock)
    old = Metadata[Root].from_bytes(kit.registry.repository.trusted_root()).signed
    clock.advance(timedelta(days=340))
    rotation = kit.registry.rotate_root(kit.key_dir, keep_keys=True)
    new = kit.registry.repository.state().root.signed
    assert rotation.version == new.version == 2 and rotation.retired == []
    assert new.expires == clock.now + timedelta(days=365)
    assert new.roles["root"].keyids == old.roles["root"].keyids
    assert [p.name for p in root_key_files(kit.key_dir)] == ["root-1.pem"]


def test_expiries_are_read_from_the_served_metadata_and_warned_about(tmp_path: Path) -> None:
    kit = new_registry(tmp_path, expiry=ExpiryPolicy(targets=timedelta(days=20)))
    expiries = read_expiries(DirectorySource(kit.registry.repository_dir))
    assert expiries == kit.registry.expiries()
    assert set(expiries) == {"root", "targets", "snapshot", "timestamp"}
    now = datetime.now(UTC)
    warnings = expiry_warnings(expiries, now)
    assert len(warnings) == 1 and warnings[0].startswith("registry targets metadata expires in 19 days")
    assert "edgecascade model resign-targets" in warnings[0]
    # Root a month before its year is up; an expired timestamp means the re-signer is not running.
    later = expiry_warnings(expiries, now + timedelta(days=340))
    assert any(w.startswith("registry root metadata expires in") and "rotate-root" in w for w in later)
    assert any(w.startswith("registry timestamp metadata EXPIRED") for w in later)
    assert expiry_warnings(new_registry(tmp_path / "fresh").registry.expiries(), now) == []
