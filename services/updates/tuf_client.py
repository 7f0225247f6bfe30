"""A TUF client of the registry over any artifact source: python-tuf's ngclient does the trusting.

Ports and pieces:

* :class:`ArtifactSource` — the network port: stream a repository file from an
  offset. Production adapters speak the ``edgecascade.v1.ArtifactService``
  (``services.rpc.artifact_client``); tests may read a directory.
* :class:`ArtifactFetcher` — ngclient's ``FetcherInterface`` over a source.
  A missing file becomes ``DownloadHTTPError(404)``, the "does not exist" that
  ends ngclient's root-rotation walk; any other failure a ``DownloadError``
  that keeps the domain error as its cause.
* :class:`TufClient` — refresh (root → timestamp → snapshot → targets, with
  every signature, version, expiry and hash check ngclient makes), look up a
  target's signed info, and download a target resumably into a staging file
  capped at its signed length, verified before it is renamed into place.

Every ngclient error leaves here as a domain error (:func:`domain_error`):
expired metadata → ``MetadataExpiredError``; an older version than already
trusted → ``StaleVersionError``; too few valid signatures →
``MetadataSignatureError``; wrong length or hash → ``DigestMismatchError``.
ngclient is synchronous: call these from a worker thread in async code.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from tuf.api import exceptions as tuf_errors
from tuf.api.metadata import Metadata, Root, TargetFile
from tuf.ngclient import FetcherInterface, Updater, UpdaterConfig

from services.atomic_files import fsync_directory
from services.errors import (
    ArtifactNotFoundError,
    DigestMismatchError,
    EdgecascadeError,
    IntegrityError,
    InvalidArgumentError,
    MetadataExpiredError,
    MetadataSignatureError,
    StaleVersionError,
    UpstreamUnavailableError,
)
from services.updates.variant_facts import VariantFacts, is_sha256

# is_sha256 (the check of a signed digest before it becomes a file name) is shared with the signed variant facts.
__all__ = [
    "ArtifactFetcher",
    "ArtifactSource",
    "Download",
    "ModelTarget",
    "TufClient",
    "check_target_name",
    "domain_error",
    "hashed_target_path",
    "is_sha256",
    "model_target",
    "signed_sha256",
]

log = logging.getLogger("edgecascade.tuf")

# ngclient builds URLs from these bases; the fetcher turns them back into artifact paths.
URL_ROOT = "edgecascade-artifact:///"
METADATA_BASE = URL_ROOT + "metadata/"
TARGETS_PATH = "targets/"
TARGETS_BASE = URL_ROOT + TARGETS_PATH
HASH_ALGORITHM = "sha256"


class ArtifactSource(Protocol):
    """Streams repository files (TUF metadata and target blobs) by path."""

    def fetch(self, path: str, offset: int = 0) -> Iterator[bytes]:
        """Yields the file's bytes from ``offset`` to its end.

        Raises:
            ArtifactNotFoundError: No file exists at the path.
            InvalidArgumentError: The path or offset is not valid.
            IntegrityError: The source refused the file after verifying it.
            UnavailableError: The source cannot be reached.
        """
        ...


def signed_sha256(info: TargetFile) -> str:
    """A target's signed sha256, checked before it is used in a file name or path.

    A signed digest becomes a file name (``<sha256>.part``, ``blobs/<sha256>``):
    nothing but its 64 lowercase hex digits may (:func:`is_sha256`).

    Raises:
        IntegrityError: The signed info has no sha256, or it is not 64 lowercase hex characters.
    """
    digest = info.hashes.get(HASH_ALGORITHM)
    if not digest:
        raise IntegrityError(f"target {info.path} has no {HASH_ALGORITHM} hash in its signed info")
    if not is_sha256(digest):
        raise IntegrityError(
            f"target {info.path} has a signed {HASH_ALGORITHM} {digest[:80]!r} that is not 64 lowercase hex "
            "characters; it is not used as a file name"
        )
    return digest


def hashed_target_path(info: TargetFile) -> str:
    """The file name of a target in a consistent-snapshot repository: ``<dir>/<sha256>.<basename>``.

    Raises:
        IntegrityError: The signed sha256 is missing or malformed (see :func:`signed_sha256`).
    """
    directory, sep, base = info.path.rpartition("/")
    return f"{directory}{sep}{signed_sha256(info)}.{base}"


# ngclient's errors and the domain errors they become, most specific first: the first matching row wins.
_NGCLIENT_ERRORS: tuple[tuple[type[Exception], Callable[[str, Exception], EdgecascadeError]], ...] = (
    (
        tuf_errors.ExpiredMetadataError,
        lambda what, exc: MetadataExpiredError(
            f"{what}: {exc}; nothing new can be installed until the registry re-signs it"
        ),
    ),
    (
        tuf_errors.BadVersionNumberError,
        lambda what, exc: StaleVersionError(
            f"{what}: {exc or 'metadata version is older than the one already trusted'} (rollback refused)"
        ),
    ),
    (
        tuf_errors.UnsignedMetadataError,
        lambda what, exc: MetadataSignatureError(f"{what}: {exc}; the metadata is not signed by the keys root trusts"),
    ),
    (tuf_errors.LengthOrHashMismatchError, lambda what, exc: DigestMismatchError(f"{what}: {exc}")),
    (tuf_errors.DownloadLengthMismatchError, lambda what, exc: DigestMismatchError(f"{what}: {exc}")),
    (tuf_errors.RepositoryError, lambda what, exc: IntegrityError(f"{what}: metadata refused: {exc}")),
    (tuf_errors.DownloadError, lambda what, exc: UpstreamUnavailableError(f"{what}: download failed")),
)


def domain_error(exc: BaseException, what: str) -> EdgecascadeError:
    """The domain error for an ngclient or fetcher failure, by :data:`_NGCLIENT_ERRORS`.

    A domain error raised by our fetcher inside ngclient comes back as itself;
    a 404 (the end of a root-rotation walk) is "not found".

    Args:
        exc: What ngclient (or our fetcher) raised.
        what: Names the operation and source in the message.
    """
    if isinstance(exc, EdgecascadeError):
        return exc
    if isinstance(exc.__cause__, EdgecascadeError) and isinstance(exc, tuf_errors.DownloadError):
        return exc.__cause__
    if isinstance(exc, tuf_errors.DownloadHTTPError) and exc.status_code == 404:
        return ArtifactNotFoundError(f"{what}: not found")
    for kind, error in _NGCLIENT_ERRORS:
        if isinstance(exc, kind):
            return error(what, exc)
    return IntegrityError(f"{what}: {type(exc).__name__}")


class ArtifactFetcher(FetcherInterface):
    """ngclient's fetcher over an :class:`ArtifactSource`.

    Args:
        source: Where repository files come from.
    """

    def __init__(self, source: ArtifactSource) -> None:
        self._source = source

    def _fetch(self, url: str) -> Iterator[bytes]:
        if not url.startswith(URL_ROOT):
            raise tuf_errors.DownloadError(f"{url} is not an artifact URL")
        path = url[len(URL_ROOT) :]
        return self._translated(path)

    def _translated(self, path: str) -> Iterator[bytes]:
        # ngclient only wraps errors raised by _fetch() itself; errors raised while
        # iterating must already be DownloadErrors, and a missing file must be 404.
        try:
            yield from self._source.fetch(path, 0)
        except ArtifactNotFoundError as exc:
            raise tuf_errors.DownloadHTTPError(f"{path}: {exc.message}", 404) from exc
        except EdgecascadeError as exc:
            raise tuf_errors.DownloadError(f"{path}: {exc.message}") from exc


@dataclass(frozen=True)
class Download:
    """A verified target in its staging area."""

    path: Path
    info: TargetFile
    resumed_from: int


class TufClient:
    """One TUF client state (a metadata directory) over one source.

    Args:
        source: Where repository files come from.
        metadata_dir: Where verified metadata is kept between runs (rollback
            protection survives restarts).
        trusted_root: The embedded trusted root metadata (version 1 or later):
            the trust anchor, never downloaded.
        what: Names the source in error messages (``upstream 127.0.0.1:8003``).
        config: ngclient settings (length limits, rotations).

    Raises:
        IntegrityError: ``trusted_root`` is not valid root metadata.
    """

    def __init__(
        self,
        source: ArtifactSource,
        metadata_dir: Path,
        trusted_root: bytes,
        what: str = "artifact source",
        config: UpdaterConfig | None = None,
    ) -> None:
        self._source = source
        self._fetcher = ArtifactFetcher(source)
        self.metadata_dir = metadata_dir
        self._root = trusted_root
        self._what = what
        self._config = config or UpdaterConfig()
        self._updater: Updater | None = None
        metadata_dir.mkdir(parents=True, exist_ok=True)
        try:
            Metadata[Root].from_bytes(trusted_root)
        except Exception as exc:  # the deserializer raises several types for a bad file
            raise IntegrityError("the embedded trusted root is not valid TUF root metadata") from exc

    def refresh(self) -> None:
        """Refreshes all top-level metadata (a new ngclient session each time).

        Raises:
            MetadataExpiredError, StaleVersionError, MetadataSignatureError,
            DigestMismatchError, IntegrityError: The metadata was refused.
            UnavailableError: The source could not be reached.
        """
        updater = Updater(
            str(self.metadata_dir),
            METADATA_BASE,
            target_dir=None,
            target_base_url=TARGETS_BASE,
            fetcher=self._fetcher,
            config=self._config,
            bootstrap=self._root,
        )
        try:
            updater.refresh()
        except (tuf_errors.RepositoryError, tuf_errors.DownloadError) as exc:
            raise domain_error(exc, f"refreshing TUF metadata from {self._what}") from exc
        self._updater = updater

    def target_info(self, target_path: str) -> TargetFile:
        """The signed info of a target from the last refresh (refreshing first if there was none).

        Raises:
            ArtifactNotFoundError: The signed targets do not list it.
            (and what :meth:`refresh` raises)
        """
        if self._updater is None:
            self.refresh()
        assert self._updater is not None
        try:
            info = self._updater.get_targetinfo(target_path)
        except (tuf_errors.RepositoryError, tuf_errors.DownloadError) as exc:
            raise domain_error(exc, f"looking up {target_path} at {self._what}") from exc
        if info is None:
            raise ArtifactNotFoundError(f"{target_path} is not listed in the signed targets of {self._what}")
        return info

    def download(self, info: TargetFile, staging_dir: Path) -> Download:
        """Downloads a target into ``staging_dir``, resumably, and verifies it.

        The bytes go to ``<sha256>.part``; a partial file from an earlier
        attempt is resumed from its length. Receiving more bytes than the
        signed length stops the download at once. Length and hashes are then
        checked against ``info``; only a file that passes is renamed to
        ``<sha256>.blob``. A failed file is deleted, so the next attempt starts
        clean; nothing is written outside ``staging_dir``.

        Returns:
            The verified file.

        Raises:
            DigestMismatchError: Longer than signed, or length or hash differ.
            IntegrityError: The signed sha256 is missing or not 64 lowercase hex
                characters (nothing is written), or the source sent a chunk at
                another offset than the next expected byte.
            ArtifactNotFoundError, UnavailableError: From the source.
        """
        digest = signed_sha256(info)
        staging_dir.mkdir(parents=True, exist_ok=True)
        final = staging_dir / f"{digest}.blob"
        part = staging_dir / f"{digest}.part"
        if final.is_file():
            try:
                with final.open("rb") as fh:
                    info.verify_length_and_hashes(fh)
                return Download(final, info, info.length)
            except tuf_errors.LengthOrHashMismatchError:
                final.unlink()
        offset = part.stat().st_size if part.is_file() else 0
        if offset > info.length:
            part.unlink()
            offset = 0
        try:
            self._stream_capped(info, part, offset)
        except IntegrityError:
            part.unlink(missing_ok=True)
            raise
        except ArtifactNotFoundError:
            with contextlib.suppress(FileNotFoundError):
                if part.stat().st_size == 0:
                    part.unlink()
            raise
        self._verify_or_discard(info, part)
        os.replace(part, final)
        fsync_directory(staging_dir)
        return Download(final, info, offset)

    def _stream_capped(self, info: TargetFile, part: Path, offset: int) -> None:
        """Appends the target's bytes from ``offset`` to ``part``, stopping at once past the signed length.

        Raises:
            DigestMismatchError: The source sent more than the signed length.
            IntegrityError: A chunk arrived at another offset (from the source).
            ArtifactNotFoundError, UnavailableError: From the source (``part`` keeps what arrived, to resume).
        """
        with part.open("ab") as fh:
            for chunk in self._source.fetch(TARGETS_PATH + hashed_target_path(info), offset):
                if offset + len(chunk) > info.length:
                    raise DigestMismatchError(
                        f"{info.path} from {self._what} is longer than its signed length of {info.length} bytes"
                    )
                fh.write(chunk)
                offset += len(chunk)
            fh.flush()
            os.fsync(fh.fileno())

    def _verify_or_discard(self, info: TargetFile, part: Path) -> None:
        """Checks the whole file against the signed length and hashes; a file that fails is deleted.

        Raises:
            DigestMismatchError: The length or a hash differs.
        """
        try:
            with part.open("rb") as fh:
                info.verify_length_and_hashes(fh)
        except tuf_errors.LengthOrHashMismatchError as exc:
            part.unlink(missing_ok=True)
            raise DigestMismatchError(f"{info.path} from {self._what} does not match its signed info: {exc}") from None


def check_target_name(target_path: str) -> str:
    """Refuses a target path that could escape a directory when used as a file name.

    Raises:
        InvalidArgumentError: Absolute, with ``..``/``.``/empty segments, or with
            a backslash or control character (a newline included).
    """
    parts = target_path.split("/")
    if (
        not target_path
        or target_path.startswith("/")
        or any(p in ("", ".", "..") for p in parts)
        or any(c == "\\" or ord(c) < 0x20 or ord(c) == 0x7F for c in target_path)
    ):
        raise InvalidArgumentError(f"target path {target_path!r} is not a plain relative path")
    return target_path


@dataclass(frozen=True)
class ModelTarget:
    """A model variant as the signed targets metadata describes it.

    Attributes:
        target_path: ``models/<name>/<version>/<variant>``.
        length: Signed length of the encrypted blob.
        sha256: Signed digest of the encrypted blob.
        facts: The signed facts (profile, signature, encryption, gate …), checked.
        info: ngclient's target info, for :meth:`TufClient.download`.
    """

    target_path: str
    length: int
    sha256: str
    facts: VariantFacts
    info: TargetFile

    @property
    def custom(self) -> dict[str, Any]:
        """The signed ``custom`` field as JSON (``facts`` as signed, unrecognized fields included)."""
        return self.facts.to_dict()

    @property
    def golden_vectors_path(self) -> str:
        """Target path of the variant's golden vectors."""
        return self.facts.golden_vectors

    def peak_memory_bytes(self, batch_size: int) -> int | None:
        """Signed peak memory at a profiled batch size, or None if that size was not profiled."""
        return self.facts.peak_memory_bytes(batch_size)


def model_target(info: TargetFile) -> ModelTarget:
    """Reads a model variant's signed facts from its target info.

    Raises:
        IntegrityError: The target is not a model variant published by edgecascade
            (its ``custom`` field does not parse as :class:`VariantFacts`; the
            message names the field), or its signed sha256 is missing or not 64
            lowercase hex characters.
    """
    facts = VariantFacts.from_dict(info.custom, info.path)
    return ModelTarget(info.path, info.length, signed_sha256(info), facts, info)
