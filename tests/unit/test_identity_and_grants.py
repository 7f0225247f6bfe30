"""A node's keys (0600 files in a 0700 directory) and content keys granted to exactly one node."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from services.errors import ConfigError, IntegrityError
from services.updates.identity import AGREEMENT_FILE, IDENTITY_FILE, FileKeyProvider
from services.updates.key_grants import KeyGrant, unwrap_key, wrap_key

KEY = bytes(range(32))
TARGET = "models/lm/1/int8"


def test_keys_are_created_once_private_and_stable(tmp_path: Path) -> None:
    provider = FileKeyProvider(tmp_path / "keys")
    first = provider.keys()
    assert oct((tmp_path / "keys").stat().st_mode & 0o777) == "0o700"
    for name in (IDENTITY_FILE, AGREEMENT_FILE):
        assert oct((tmp_path / "keys" / name).stat().st_mode & 0o777) == "0o600"
    again = FileKeyProvider(tmp_path / "keys").keys()
    assert (again.identity_public, again.agreement_public) == (first.identity_public, first.agreement_public)
    assert len(first.identity_public) == 32 and len(first.agreement_public) == 32
    first.identity.public_key().verify(first.sign(b"report"), b"report")


def test_a_directory_others_can_read_or_a_wrong_key_file_is_refused(tmp_path: Path) -> None:
    loose = tmp_path / "loose"
    loose.mkdir(mode=0o755)
    os.chmod(loose, 0o755)
    with pytest.raises(ConfigError, match="must be 0700"):
        FileKeyProvider(loose).keys()
    keys = tmp_path / "keys"
    FileKeyProvider(keys).keys()
    (keys / IDENTITY_FILE).write_bytes((keys / AGREEMENT_FILE).read_bytes())
    with pytest.raises(ConfigError, match="expected Ed25519PrivateKey"):
        FileKeyProvider(keys).keys()


def test_a_grant_opens_for_its_node_and_target_only() -> None:
    node, other = X25519PrivateKey.generate(), X25519PrivateKey.generate()
    public = node.public_key().public_bytes_raw()
    grant = wrap_key(KEY, public, "device-1", TARGET, "k1")
    assert unwrap_key(grant, node, "device-1", TARGET) == KEY
    attempts: dict[str, Callable[[], bytes]] = {
        "another node's key": lambda: unwrap_key(grant, other, "device-1", TARGET),
        "replayed to another node id": lambda: unwrap_key(grant, node, "device-2", TARGET),
        "another target": lambda: unwrap_key(grant, node, "device-1", "models/lm/1/fp32"),
        "another key id": lambda: unwrap_key(
            KeyGrant("k2", grant.ephemeral_public_key, grant.salt, grant.nonce, grant.wrapped_key),
            node,
            "device-1",
            TARGET,
        ),
        "a tampered wrapped key": lambda: unwrap_key(
            KeyGrant(grant.key_id, grant.ephemeral_public_key, grant.salt, grant.nonce, b"\0" + grant.wrapped_key[1:]),
            node,
            "device-1",
            TARGET,
        ),
        "a truncated ephemeral key": lambda: unwrap_key(
            KeyGrant(grant.key_id, grant.ephemeral_public_key[:5], grant.salt, grant.nonce, grant.wrapped_key),
            node,
            "device-1",
            TARGET,
        ),
    }
    for what, attempt in attempts.items():
        with pytest.raises(IntegrityError, match=r"does not open|malformed"):
            attempt()
        assert what  # named for the failure message


def test_wrapping_refuses_bad_inputs() -> None:
    public = X25519PrivateKey.generate().public_key().public_bytes_raw()
    with pytest.raises(IntegrityError, match="must be 32 bytes"):
        wrap_key(b"short", public, "d", TARGET, "k")
    with pytest.raises(IntegrityError, match="no valid X25519 public key"):
        wrap_key(KEY, b"nope", "d", TARGET, "k")
