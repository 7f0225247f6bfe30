"""A node's own keys: Ed25519 to prove who it is, X25519 to receive content keys.

Keys come from a :class:`KeyProvider`. :class:`FileKeyProvider` — the default —
creates both key pairs on first use and keeps them as PEM files with mode 0600
in a directory with mode 0700 (a TPM or PKCS#11 provider can take its place:
the rest of the code sees only the provider). Files are written atomically, so
a crash while creating them leaves either no key or a whole one.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from services.atomic_files import fsync_directory, write_atomically
from services.errors import ConfigError

IDENTITY_FILE = "identity.pem"
AGREEMENT_FILE = "agreement.pem"


@dataclass(frozen=True)
class NodeKeys:
    """A node's private keys (what a provider hands out)."""

    identity: Ed25519PrivateKey
    agreement: X25519PrivateKey

    @property
    def identity_public(self) -> bytes:
        """The raw 32-byte Ed25519 public key."""
        return self.identity.public_key().public_bytes_raw()

    @property
    def agreement_public(self) -> bytes:
        """The raw 32-byte X25519 public key."""
        return self.agreement.public_key().public_bytes_raw()

    def sign(self, data: bytes) -> bytes:
        """An Ed25519 signature of ``data`` by the identity key."""
        return self.identity.sign(data)


class KeyProvider(Protocol):
    """Where a node's keys live."""

    def keys(self) -> NodeKeys:
        """The node's keys, created on first use.

        Raises:
            ConfigError: The keys exist but cannot be read or used.
        """
        ...


class FileKeyProvider:
    """Keys as PEM files (0600) in a directory (0700), created on first use.

    Args:
        directory: Where the key files are.
    """

    def __init__(self, directory: Path) -> None:
        self.directory = directory

    def keys(self) -> NodeKeys:
        """The node's keys, created on first use.

        Raises:
            ConfigError: A key file exists but is not a key of the right kind, or the directory is not private.
        """
        self.directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        mode = self.directory.stat().st_mode & 0o777
        if mode & 0o077:
            raise ConfigError(f"key directory {self.directory} is readable by others (mode {mode:o}); it must be 0700")
        identity = self._load_or_create(IDENTITY_FILE, Ed25519PrivateKey)
        agreement = self._load_or_create(AGREEMENT_FILE, X25519PrivateKey)
        assert isinstance(identity, Ed25519PrivateKey)
        assert isinstance(agreement, X25519PrivateKey)
        return NodeKeys(identity, agreement)

    def _load_or_create(
        self, name: str, kind: type[Ed25519PrivateKey] | type[X25519PrivateKey]
    ) -> Ed25519PrivateKey | X25519PrivateKey:
        path = self.directory / name
        if path.is_file():
            try:
                key = serialization.load_pem_private_key(path.read_bytes(), password=None)
            except (ValueError, TypeError):
                raise ConfigError(f"{path} is not a private key") from None
            if not isinstance(key, kind):
                raise ConfigError(f"{path} holds a {type(key).__name__}, expected {kind.__name__}")
            return key
        created = kind.generate()
        pem = created.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
        # Created 0600 before a byte is written: the key is never readable by others, even for a moment.
        write_atomically(path, pem, mode=0o600)
        fsync_directory(self.directory)
        return created
