"""Writing files so that a reader (or a crash) never sees half of one.

Every write goes to a temporary file in the destination's own directory (so the
final rename never crosses a file system), is fsynced, renamed over the
destination with :func:`os.replace`, and then the directory itself is fsynced
so that the rename survives a power cut. Before the rename the old content is
intact; after it the new content is complete.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO


def fsync_directory(path: Path) -> None:
    """Flushes a directory's entries (renames, new files) to disk."""
    _fsync(path, os.O_RDONLY | os.O_DIRECTORY)


def fsync_file(path: Path) -> None:
    """Flushes a file written by other means (e.g. a copy) to disk."""
    _fsync(path, os.O_RDONLY)


def _fsync(path: Path, flags: int) -> None:
    fd = os.open(path, flags)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomically(path: Path, data: bytes, mode: int = 0o644) -> None:
    """Replaces ``path`` with ``data`` in one step.

    Args:
        path: The destination; its directory must exist.
        data: The complete new content.
        mode: Permission bits of the new file.

    Raises:
        OSError: The file cannot be written; the old content is untouched.
    """
    with atomic_output(path, mode) as fh:
        fh.write(data)


@contextlib.contextmanager
def atomic_output(path: Path, mode: int = 0o644) -> Iterator[BinaryIO]:
    """Yields a file that replaces ``path`` atomically when the block ends without error.

    On an exception the temporary file is removed and ``path`` is untouched.

    Raises:
        OSError: The file cannot be written.
    """
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(fd, mode)
        with os.fdopen(fd, "wb") as fh:
            yield fh
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    fsync_directory(path.parent)
