"""When the registry's signed metadata expires, and what an operator should do before it does.

``edgecascade status`` reads the four top-level roles from the region's
artifact service (the same files every client fetches) and prints a warning
well before any of them expires (root and targets 30 days ahead, snapshot and
timestamp an hour ahead), and fails once one has expired: an expired role stops
every refresh in the fleet. Root is the newest version of the chain
(``<N>.root.json``, walked up as a client does), not the ``root.json`` copy.
The files are parsed, not verified: this is an operator's reminder, and a
client verifies every byte it acts on.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from datetime import datetime, timedelta
from typing import Any, Protocol

from tuf.api.metadata import Metadata, Root, Snapshot, Targets, Timestamp

from services.errors import ArtifactNotFoundError, IntegrityError

# Warn this long before a role expires. Root and targets are renewed by an
# operator (rotate-root, resign-targets); snapshot and timestamp are re-signed
# by the region hours before expiry, so little time left means its re-signer is not running.
WARN_BEFORE: Mapping[str, timedelta] = {
    Root.type: timedelta(days=30),
    Targets.type: timedelta(days=30),
    Snapshot.type: timedelta(hours=1),
    Timestamp.type: timedelta(hours=1),
}
REMEDY: Mapping[str, str] = {
    Root.type: "rotate root with `edgecascade model rotate-root` (or --keep-keys to renew it)",
    Targets.type: "re-sign it with `edgecascade model resign-targets`, or let the region renew it by itself "
    "([registry] resign_targets = true, which puts the targets key on the region)",
    Snapshot.type: "the region re-signs it: check that it runs with [registry] key_dir set",
    Timestamp.type: "the region re-signs it: check that it runs with [registry] key_dir set",
}
ROLES = (Root.type, Targets.type, Snapshot.type, Timestamp.type)
# How many root versions past the root.json copy are looked for (python-tuf's client allows 256 rotations).
MAX_ROOT_STEPS = 256


class MetadataSource(Protocol):
    """Streams repository files by path (the artifact service's client, or a directory in tests)."""

    def fetch(self, path: str, offset: int = 0) -> Iterator[bytes]:
        """Yields the file's bytes from ``offset``."""
        ...


def read_expiries(source: MetadataSource) -> dict[str, datetime]:
    """Reads when each top-level role expires, following ``timestamp.json`` and the root chain as a client would.

    Raises:
        ArtifactNotFoundError: A file is missing (no registry behind the source).
        IntegrityError: A file is not TUF metadata of the expected role.
        EdgecascadeError: What the source raises (unavailable, …).
    """
    timestamp = _read(source, "metadata/timestamp.json", Timestamp)
    snapshot = _read(source, f"metadata/{timestamp.snapshot_meta.version}.snapshot.json", Snapshot)
    targets = _read(source, f"metadata/{snapshot.meta['targets.json'].version}.targets.json", Targets)
    root = _newest_root(source)
    return {
        Root.type: root.expires,
        Targets.type: targets.expires,
        Snapshot.type: snapshot.expires,
        Timestamp.type: timestamp.expires,
    }


def _newest_root(source: MetadataSource) -> Root:
    """The newest root: from the ``root.json`` copy (or version 1) up the chain of ``<N>.root.json``."""
    try:
        root: Root = _read(source, "metadata/root.json", Root)
    except ArtifactNotFoundError:
        root = _read(source, "metadata/1.root.json", Root)
    for _ in range(MAX_ROOT_STEPS):
        path = f"metadata/{root.version + 1}.root.json"
        try:
            newer: Root = _read(source, path, Root)
        except ArtifactNotFoundError:
            break
        if newer.version != root.version + 1:
            raise IntegrityError(f"{path} holds root version {newer.version}")
        root = newer
    return root


def expired_roles(expiries: Mapping[str, datetime], now: datetime) -> list[str]:
    """The roles whose metadata has expired at ``now``, root first: every client refresh fails on them."""
    return [role for role in ROLES if role in expiries and expiries[role] <= now]


def expiry_warnings(
    expiries: Mapping[str, datetime], now: datetime, warn_before: Mapping[str, timedelta] = WARN_BEFORE
) -> list[str]:
    """One line per role that expires within its warning period (or has expired), root first."""
    warnings = []
    for role in ROLES:
        expires = expiries.get(role)
        if expires is None or expires - now > warn_before[role]:
            continue
        left = expires - now
        when = "EXPIRED" if left <= timedelta(0) else f"expires in {_duration(left)}"
        warnings.append(f"registry {role} metadata {when} ({expires.isoformat()}): {REMEDY[role]}")
    return warnings


def _duration(left: timedelta) -> str:
    if left >= timedelta(days=2):
        return f"{left.days} days"
    hours = left.total_seconds() / 3600
    return f"{hours:.1f} hours" if hours >= 1 else f"{left.total_seconds() / 60:.0f} minutes"


def _read(source: MetadataSource, path: str, kind: type[Any]) -> Any:
    data = b"".join(source.fetch(path))
    try:
        md: Metadata[Any] = Metadata.from_bytes(data)
    except Exception as exc:  # the deserializer raises several types for a bad file
        raise IntegrityError(f"{path} is not TUF metadata") from exc
    if not isinstance(md.signed, kind):
        raise IntegrityError(f"{path} holds {md.signed.type} metadata, not {kind.type}")
    return md.signed
