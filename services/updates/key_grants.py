"""A variant's content key, granted to exactly one node.

The region wraps a content key to a node's X25519 public key: a fresh
ephemeral X25519 key agrees a shared secret with the node's key, HKDF-SHA256
(with a random salt) derives an AES-256-GCM key from it, and that key seals the
content key. The node id, the target path and the key id are the associated
data, so a grant replayed to another node, or presented for another target or
key, fails to open — as does a tampered one. Only the holder of the node's
X25519 private key can unwrap it.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from services.errors import IntegrityError

_INFO = b"edgecascade key grant v1"
SALT_BYTES = 16
NONCE_BYTES = 12
CONTENT_KEY_BYTES = 32
PUBLIC_KEY_BYTES = 32


@dataclass(frozen=True)
class KeyGrant:
    """A content key wrapped to one node (the fields of the ``KeyGrant`` message)."""

    key_id: str
    ephemeral_public_key: bytes
    salt: bytes
    nonce: bytes
    wrapped_key: bytes


def _associated_data(node_id: str, target_path: str, key_id: str) -> bytes:
    # Length-prefixed so that no two different triples give the same bytes.
    parts = [part.encode("utf-8") for part in (node_id, target_path, key_id)]
    return b"".join(len(part).to_bytes(4, "big") + part for part in parts)


def _wrapping_key(shared: bytes, salt: bytes) -> bytes:
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=salt, info=_INFO).derive(shared)


def wrap_key(content_key: bytes, node_public_key: bytes, node_id: str, target_path: str, key_id: str) -> KeyGrant:
    """Wraps ``content_key`` so that only the node holding the X25519 key for ``node_public_key`` can open it.

    Raises:
        IntegrityError: The content key is not 32 bytes or the public key is not a raw X25519 key.
    """
    if len(content_key) != CONTENT_KEY_BYTES:
        raise IntegrityError(f"content key {key_id} must be {CONTENT_KEY_BYTES} bytes, got {len(content_key)}")
    try:
        peer = X25519PublicKey.from_public_bytes(node_public_key)
    except ValueError:
        raise IntegrityError(f"node {node_id} has no valid X25519 public key") from None
    ephemeral = X25519PrivateKey.generate()
    salt, nonce = os.urandom(SALT_BYTES), os.urandom(NONCE_BYTES)
    key = _wrapping_key(ephemeral.exchange(peer), salt)
    sealed = AESGCM(key).encrypt(nonce, content_key, _associated_data(node_id, target_path, key_id))
    return KeyGrant(key_id, ephemeral.public_key().public_bytes_raw(), salt, nonce, sealed)


def unwrap_key(grant: KeyGrant, node_private_key: X25519PrivateKey, node_id: str, target_path: str) -> bytes:
    """Opens a grant made for this node and target.

    Raises:
        IntegrityError: The grant is malformed, tampered with, or was made for
            another node, target or key.
    """
    if len(grant.ephemeral_public_key) != PUBLIC_KEY_BYTES or len(grant.nonce) != NONCE_BYTES:
        raise IntegrityError(f"the key grant for {target_path} is malformed")
    try:
        shared = node_private_key.exchange(X25519PublicKey.from_public_bytes(grant.ephemeral_public_key))
        key = _wrapping_key(shared, grant.salt)
        content_key = AESGCM(key).decrypt(
            grant.nonce, grant.wrapped_key, _associated_data(node_id, target_path, grant.key_id)
        )
    except (InvalidTag, ValueError):
        raise IntegrityError(
            f"the key grant for {target_path} does not open for node {node_id}: "
            "made for another node, target or key, or altered"
        ) from None
    if len(content_key) != CONTENT_KEY_BYTES:
        raise IntegrityError(f"the key grant for {target_path} holds no {CONTENT_KEY_BYTES}-byte key")
    return content_key
