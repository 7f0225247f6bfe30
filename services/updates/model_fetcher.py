"""The reference consumer of the registry: what a device's updater uses to find and fetch a model.

A python-tuf ngclient session over an artifact source (the artifact service of
an edge or the region, in production), anchored in an embedded trusted root. ``resolve`` refreshes the
metadata and returns a variant's signed facts; ``download`` fetches its
encrypted blob resumably into the staging area, capped at the signed length,
and returns it only once length and hash match. Everything is synchronous
(ngclient is): async code calls it from a worker thread.
"""

from __future__ import annotations

import json
from pathlib import Path

from services.errors import IntegrityError
from services.updates.golden_vectors import GoldenVectors
from services.updates.tuf_client import (
    ArtifactSource,
    Download,
    ModelTarget,
    TufClient,
    check_target_name,
    model_target,
)
from services.updates.variant_facts import target_path


class ModelFetcher:
    """Finds and downloads model variants, verifying everything against signed metadata.

    Args:
        source: Where repository files come from (e.g. ``GrpcArtifactSource`` of an
            edge or the region); the caller owns it and closes it.
        trusted_root: The embedded trusted root metadata.
        state_dir: Holds ``metadata/`` (trusted metadata, kept across runs) and
            ``staging/`` (downloads); nothing is written elsewhere.
        what: Names the source in messages.

    Raises:
        IntegrityError: ``trusted_root`` is not valid root metadata.
    """

    def __init__(self, source: ArtifactSource, trusted_root: bytes, state_dir: Path, what: str) -> None:
        self.staging_dir = state_dir / "staging"
        self._client = TufClient(source, state_dir / "metadata", trusted_root, what)

    def refresh(self) -> None:
        """Refreshes the TUF metadata (see :meth:`TufClient.refresh` for the errors)."""
        self._client.refresh()

    def resolve(self, name: str, version: str, variant: str) -> ModelTarget:
        """Refreshes the metadata and returns a variant's signed facts.

        Raises:
            InvalidArgumentError: The name, version or variant would form an unsafe path.
            ArtifactNotFoundError: The signed targets do not list the variant.
            MetadataExpiredError, StaleVersionError, MetadataSignatureError,
            IntegrityError: The metadata was refused.
            UnavailableError: The artifact service cannot be reached.
        """
        path = check_target_name(target_path(name, version, variant))
        self._client.refresh()
        return model_target(self._client.target_info(path))

    def download(self, target: ModelTarget) -> Download:
        """Downloads and verifies a variant's encrypted blob (resumable; see :meth:`TufClient.download`).

        Raises:
            DigestMismatchError: The bytes are longer than signed or do not hash as signed.
            IntegrityError: The signed sha256 is malformed, or the service sent a
                chunk at another offset than the next expected byte (the partial
                file is deleted).
            ArtifactNotFoundError, UnavailableError: From the artifact service.
        """
        return self._client.download(target.info, self.staging_dir)

    def golden_vectors(self, target: ModelTarget) -> GoldenVectors:
        """Downloads, verifies and parses a variant's golden vectors; nothing of them stays in staging.

        Raises:
            IntegrityError: The file is not valid golden vectors (or fails verification).
        """
        info = self._client.target_info(check_target_name(target.golden_vectors_path))
        download = self._client.download(info, self.staging_dir)
        data = download.path.read_bytes()
        # The caller keeps what it needs of them (the updater, in the installed store); staging holds downloads only.
        download.path.unlink(missing_ok=True)
        try:
            return GoldenVectors.from_json(json.loads(data))
        except ValueError as exc:
            raise IntegrityError(f"golden vectors of {target.target_path} are not valid JSON") from exc
