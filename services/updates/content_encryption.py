"""Model bytes encrypted at rest and in transit: AES-256-GCM with a fresh key per artifact.

Blob layout (what the TUF target's length and hashes cover)::

    b"ECM1" | nonce (12 bytes) | ciphertext | GCM tag (16 bytes)

The associated data is the TUF target path, so a blob moved to another path
fails to decrypt even under the right key. A content key is 32 random bytes made
for one artifact and never reused; the region keeps it (the registry database)
to grant it to devices later. Encryption protects confidentiality; integrity of
the blob against the registry's intent is TUF's job (signed length and hashes).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from services.errors import IntegrityError

MAGIC = b"ECM1"
NONCE_BYTES = 12
TAG_BYTES = 16
KEY_BYTES = 32
ALGORITHM = "AES-256-GCM"


@dataclass(frozen=True)
class EncryptedArtifact:
    """An encrypted blob and the key that opens it."""

    blob: bytes
    key: bytes


def encrypt_artifact(plaintext: bytes, target_path: str) -> EncryptedArtifact:
    """Encrypts ``plaintext`` under a new random key, bound to ``target_path``."""
    key = AESGCM.generate_key(bit_length=8 * KEY_BYTES)
    nonce = os.urandom(NONCE_BYTES)
    sealed = AESGCM(key).encrypt(nonce, plaintext, target_path.encode("utf-8"))
    return EncryptedArtifact(MAGIC + nonce + sealed, key)


def decrypt_artifact(blob: bytes, key: bytes, target_path: str) -> bytes:
    """Opens a blob made by :func:`encrypt_artifact`.

    Raises:
        IntegrityError: The blob is not in this format, the key is wrong, or
            the blob or its path was altered.
    """
    if len(key) != KEY_BYTES:
        raise IntegrityError(f"content key for {target_path} must be {KEY_BYTES} bytes, got {len(key)}")
    if len(blob) < len(MAGIC) + NONCE_BYTES + TAG_BYTES or not blob.startswith(MAGIC):
        raise IntegrityError(f"artifact {target_path} is not an {ALGORITHM} blob of edgecascade")
    nonce = blob[len(MAGIC) : len(MAGIC) + NONCE_BYTES]
    try:
        return AESGCM(key).decrypt(nonce, blob[len(MAGIC) + NONCE_BYTES :], target_path.encode("utf-8"))
    except InvalidTag:
        raise IntegrityError(f"artifact {target_path} does not decrypt with its content key") from None
