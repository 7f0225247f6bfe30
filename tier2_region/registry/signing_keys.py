"""The registry's Ed25519 signing keys, one PEM file per key.

Roles and files (TUF's top-level roles; snapshot and timestamp share one online key)::

    <root-key-dir>/root-1.pem … root-N.pem   root: offline, N keys, threshold configurable
    <key-dir>/targets.pem                    targets: the publisher
    <key-dir>/online.pem                     snapshot and timestamp: re-signed by the running region

Private keys are PKCS#8 PEM, created with mode 0600 in a 0700 directory, and a
key file that group or others may read is refused at load time. The root keys
are needed only to create (or rotate) root metadata; in production they live in
a directory the serving process cannot read, and the region process loads only
the online key (and the targets key with ``[registry] resign_targets``). For a
dev set-up both directories may be the same.

Rotating root (``edgecascade model rotate-root``) writes the new root keys with
the next free numbers (``root-2.pem`` …) in the new root key directory (the
current one unless told otherwise), and moves each key the committed root no
longer lists into ``retired-root-v<N>/`` next to it (N: the last root version
that listed it); a key written by a rotation that never committed goes to
``retired-root-uncommitted/``. A root key directory may hold only some of the
current root keys (the others kept elsewhere), or none (after a rotation that
put the new keys in another directory).

Key files and the directory entries that name them are fsynced before the
registry relies on them: a new root is committed only once its keys are on disk.
"""

from __future__ import annotations

import os
import stat
from dataclasses import dataclass
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from securesystemslib.signer import CryptoSigner

from services.atomic_files import fsync_directory
from services.errors import ConfigError

TARGETS_KEY_FILE = "targets.pem"
ONLINE_KEY_FILE = "online.pem"
ROOT_KEY_PREFIX = "root-"


@dataclass(frozen=True)
class SigningKeys:
    """The signers one process holds; a role it must not sign for is absent.

    Attributes:
        root: Root signers (empty in the serving process).
        targets: The publisher's signer, or None.
        online: The snapshot and timestamp signer, or None.
    """

    root: tuple[CryptoSigner, ...] = ()
    targets: CryptoSigner | None = None
    online: CryptoSigner | None = None


def generate_keys(key_dir: Path, root_key_dir: Path | None = None, root_keys: int = 1) -> list[Path]:
    """Generates a fresh set of registry keys (dev set-up).

    Args:
        key_dir: Receives ``targets.pem`` and ``online.pem``.
        root_key_dir: Receives ``root-1.pem`` … (default: ``key_dir``).
        root_keys: Number of root keys.

    Returns:
        The files written.

    Raises:
        ConfigError: ``root_keys`` is below 1, or a key file already exists
            (keys are never overwritten: that would orphan a repository).
    """
    if root_keys < 1:
        raise ConfigError(f"the registry needs at least one root key, got {root_keys}")
    root_key_dir = root_key_dir or key_dir
    plan = [root_key_dir / f"{ROOT_KEY_PREFIX}{i}.pem" for i in range(1, root_keys + 1)]
    plan += [key_dir / TARGETS_KEY_FILE, key_dir / ONLINE_KEY_FILE]
    for path in plan:
        if path.exists():
            raise ConfigError(f"key file {path} already exists; refusing to overwrite a signing key")
    for directory in {key_dir, root_key_dir}:
        private_directory(directory)
    for path in plan:
        write_private_key(path, Ed25519PrivateKey.generate())
    for directory in {key_dir, root_key_dir}:
        fsync_directory(directory)
    return plan


def private_directory(directory: Path) -> Path:
    """Creates ``directory`` (and parents) if needed and makes it 0700.

    Each directory it creates is made durable in its parent (fsynced there)
    before this returns; the files later written into it are the caller's to sync.
    """
    created = [d for d in (directory, *directory.parents) if not d.exists()]
    directory.mkdir(parents=True, exist_ok=True, mode=0o700)
    os.chmod(directory, 0o700)
    for new in reversed(created):
        fsync_directory(new.parent)
    return directory


def move_key_file(path: Path, directory: Path) -> Path:
    """Moves a key file into ``directory`` (created 0700), never over another file; returns where it went.

    A name already taken there gets a suffix (``root-2-1.pem``). The caller
    fsyncs both directories once it has moved what it moves.
    """
    private_directory(directory)
    destination = directory / path.name
    n = 0
    while destination.exists():
        n += 1
        destination = directory / f"{path.stem}-{n}{path.suffix}"
    path.rename(destination)
    return destination


def write_private_key(path: Path, key: Ed25519PrivateKey) -> None:
    """Writes a private key as PKCS#8 PEM with mode 0600.

    Raises:
        ConfigError: The file already exists (a signing key is never overwritten).
    """
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    try:
        # O_EXCL: a concurrent generator cannot silently replace a key another one just wrote.
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        raise ConfigError(f"key file {path} already exists; refusing to overwrite a signing key") from None
    with os.fdopen(fd, "wb") as fh:
        fh.write(pem)
        fh.flush()
        os.fsync(fh.fileno())


def next_root_key_files(root_key_dir: Path, count: int) -> list[Path]:
    """The next ``count`` free root key file names of a directory (after the highest number in use)."""
    files = root_key_files(root_key_dir)
    last = int(files[-1].stem[len(ROOT_KEY_PREFIX) :]) if files else 0
    return [root_key_dir / f"{ROOT_KEY_PREFIX}{last + i}.pem" for i in range(1, count + 1)]


def load_signer(path: Path) -> CryptoSigner:
    """Loads one Ed25519 private key file as a TUF signer.

    Raises:
        ConfigError: The file is missing, readable by group or others, or not an
            unencrypted Ed25519 PKCS#8 PEM key.
    """
    try:
        mode = path.stat().st_mode
        pem = path.read_bytes()
    except FileNotFoundError:
        raise ConfigError(f"signing key {path} does not exist") from None
    except OSError as exc:
        raise ConfigError(f"signing key {path} cannot be read: {exc.strerror}") from None
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise ConfigError(f"signing key {path} is accessible by group or others (mode {mode & 0o777:o}); chmod 600 it")
    try:
        key = serialization.load_pem_private_key(pem, password=None)
    except (ValueError, TypeError):
        raise ConfigError(f"signing key {path} is not an unencrypted PEM private key") from None
    if not isinstance(key, Ed25519PrivateKey):
        raise ConfigError(f"signing key {path} is not an Ed25519 key; the registry signs with Ed25519 only")
    return CryptoSigner(key)


def root_key_files(root_key_dir: Path) -> list[Path]:
    """The root key files of a directory, in numeric order."""
    found = [p for p in root_key_dir.glob(f"{ROOT_KEY_PREFIX}*.pem") if p.stem[len(ROOT_KEY_PREFIX) :].isdigit()]
    return sorted(found, key=lambda p: int(p.stem[len(ROOT_KEY_PREFIX) :]))


def load_keys(key_dir: Path, root_key_dir: Path | None = None, *, publisher: bool = True) -> SigningKeys:
    """Loads the keys one process needs.

    Args:
        key_dir: Holds ``online.pem`` (always loaded) and ``targets.pem``.
        root_key_dir: Where root keys are, or None to load none (the serving
            process, and every publish after the repository was created).
        publisher: Whether to load the targets key too.

    Raises:
        ConfigError: A needed key is missing or unusable, or ``root_key_dir``
            holds no root key.
    """
    root: tuple[CryptoSigner, ...] = ()
    if root_key_dir is not None:
        files = root_key_files(root_key_dir)
        if not files:
            raise ConfigError(f"no root keys ({ROOT_KEY_PREFIX}N.pem) in {root_key_dir}")
        root = tuple(load_signer(p) for p in files)
    targets = load_signer(key_dir / TARGETS_KEY_FILE) if publisher else None
    return SigningKeys(root=root, targets=targets, online=load_signer(key_dir / ONLINE_KEY_FILE))
