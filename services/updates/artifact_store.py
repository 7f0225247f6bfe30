"""Artifact paths and the region's artifact store: its TUF repository directory, served read-only.

An artifact path is relative to a repository root and names a TUF metadata
file (``metadata/…``) or a target blob (``targets/…``). Anything else is
refused before the file system is touched: absolute paths, ``..`` or ``.`` or
empty segments, backslashes, control characters, other top-level directories.
The resolved file must still lie inside the root (a symlink cannot lead out).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Protocol

from services.errors import ArtifactNotFoundError, InvalidArgumentError

METADATA_PREFIX = "metadata/"
TARGETS_PREFIX = "targets/"
MAX_PATH_CHARS = 1024
# Matched with fullmatch: ``$`` would also accept a trailing newline.
_SAFE = re.compile(r"[A-Za-z0-9._/-]+")


def check_artifact_path(path: str) -> str:
    """Returns ``path`` if it is a safe artifact path.

    Raises:
        InvalidArgumentError: It is empty, too long, absolute, has ``..``/``.``/empty
            segments or unsafe characters, or is not under ``metadata/`` or ``targets/``.
    """
    accepted = "a relative path under metadata/ or targets/ made of letters, digits, '.', '_', '-' and '/'"
    if not path or len(path) > MAX_PATH_CHARS:
        raise InvalidArgumentError(f"artifact path must be 1-{MAX_PATH_CHARS} characters; expected {accepted}")
    if path.startswith("/") or not _SAFE.fullmatch(path):
        raise InvalidArgumentError(f"artifact path {path[:200]!r} is not valid; expected {accepted}")
    parts = path.split("/")
    if any(p in ("", ".", "..") for p in parts):
        raise InvalidArgumentError(f"artifact path {path!r} has an empty, '.' or '..' segment; expected {accepted}")
    if len(parts) < 2 or not path.startswith((METADATA_PREFIX, TARGETS_PREFIX)):
        raise InvalidArgumentError(f"artifact path {path!r} is not under metadata/ or targets/; expected {accepted}")
    return path


class ArtifactProvider(Protocol):
    """Where the artifact service gets a file to stream."""

    async def open(self, path: str) -> Path:
        """Returns a complete local file holding the artifact at ``path``.

        Raises:
            InvalidArgumentError: The path is not a valid artifact path.
            ArtifactNotFoundError: Nothing exists at the path.
            IntegrityError: The artifact failed verification (an edge refuses it).
            UnavailableError: The artifact is not here and the upstream cannot be reached.
        """
        ...


class ArtifactDirectory:
    """The origin: files of a TUF repository directory (the region).

    Args:
        root: The repository directory (``<registry>/repository``).
    """

    def __init__(self, root: Path) -> None:
        self.root = root

    async def open(self, path: str) -> Path:
        """Returns the file at ``path`` under the root.

        Raises:
            InvalidArgumentError: The path is not a valid artifact path.
            ArtifactNotFoundError: No file is there (or it resolves outside the root).
        """
        check_artifact_path(path)
        root = self.root.resolve()
        candidate = (root / path).resolve()
        if not candidate.is_relative_to(root) or not candidate.is_file():
            raise ArtifactNotFoundError(f"no artifact at {path}")
        return candidate
