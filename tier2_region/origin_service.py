"""The region's artifact origin: its registry's TUF repository over the artifact service, kept fresh.

Serves the repository directory of ``[registry] path`` and, with ``[registry]
key_dir``, re-signs what is close to expiry (snapshot and timestamp; targets too
with ``resign_targets``) every ``resign_check_s`` through a
:class:`~services.ticker.Ticker`. Without ``[registry] path`` it serves nothing.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from pathlib import Path

from services.errors import EdgecascadeError
from services.rpc.artifact_servicer import ArtifactServicer, artifact_bindings
from services.rpc.components import NodeContext
from services.rpc.server import ServiceBinding
from services.ticker import Ticker
from services.updates.artifact_store import ArtifactDirectory
from tier2_region.config import RegionConfig
from tier2_region.registry.registry import ModelRegistry
from tier2_region.registry.signing_keys import load_keys

log = logging.getLogger("edgecascade.artifacts")

# How long stop() waits for a re-signing round that is already writing.
STOP_WAIT_S = 30.0


class ArtifactOrigin:
    """The registry as the region serves and maintains it.

    Args:
        context: The node's context; its configuration is a :class:`RegionConfig`.

    Raises:
        ConfigError: A key cannot be read.
    """

    def __init__(self, context: NodeContext) -> None:
        config = context.config
        assert isinstance(config, RegionConfig), "the artifact origin runs on the region"
        settings = config.registry
        self.registry: ModelRegistry | None = None
        self._servicer: ArtifactServicer | None = None
        self._resigner: Ticker | None = None
        self._resigning: asyncio.Future[list[str]] | None = None
        if not settings.path:
            return
        self.registry = ModelRegistry(Path(settings.path), settings.expiry)
        self._servicer = ArtifactServicer(ArtifactDirectory(self.registry.repository_dir), settings.chunk_bytes)
        if settings.key_dir:
            # By default the serving process holds the online key only; root and targets keys stay
            # out of its reach. With resign_targets the operator trades that for targets that
            # renew themselves (else `edgecascade model resign-targets` renews them).
            keys = load_keys(Path(settings.key_dir), publisher=settings.resign_targets)
            registry = self.registry

            async def resign() -> None:
                if not registry.exists():
                    return
                # The thread is not cancellable: stop() waits for it before it closes the registry.
                self._resigning = asyncio.ensure_future(asyncio.to_thread(registry.refresh_online, keys))
                try:
                    roles = await asyncio.shield(self._resigning)
                except EdgecascadeError as exc:
                    log.error("re-signing the registry's online metadata failed: %s", exc.message)
                    return
                if roles:
                    log.info("re-signed %s before expiry", " and ".join(roles))

            # Any other failure (a full disk's OSError too) costs one round: the ticker logs it and goes on.
            self._resigner = Ticker("registry re-signer", settings.resign_check_s, resign)

    @property
    def bindings(self) -> Sequence[ServiceBinding]:
        """The artifact service, when a registry is configured."""
        return artifact_bindings(self._servicer)

    async def start(self) -> None:
        """Starts re-signing; warns when nothing will re-sign or nothing is published yet."""
        if self.registry is None:
            return
        if not self.registry.exists():
            log.warning(
                "no TUF repository in %s yet; every artifact is NOT_FOUND until one is created",
                self.registry.directory,
            )
        if self._resigner is None:
            log.warning("[registry] key_dir is empty: snapshot and timestamp will not be re-signed before they expire")
            return
        self._resigner.start()

    async def stop(self) -> None:
        """Stops re-signing and closes the repository's files."""
        if self._resigner is not None:
            await self._resigner.stop()
        if self._resigning is not None:
            # A re-signing round already in its thread finishes (it is one atomic commit) before the files close.
            await asyncio.wait({self._resigning}, timeout=STOP_WAIT_S)
            if self._resigning.done() and not self._resigning.cancelled():
                self._resigning.exception()  # retrieved: its failure was logged by the round
        if self._servicer is not None:
            self._servicer.close()
        if self.registry is not None:
            self.registry.close()
