"""The registry's variants as the assignment rule reads them.

:class:`RegistryCatalog` reads a model version's variants from the registry
database and each variant's facts from its *signed* target (the committed
targets metadata), never from the database's copy. Published variants are
immutable, so what was read of a target path is kept.
"""

from __future__ import annotations

import logging
import threading
from typing import Any, Protocol

from services.errors import IntegrityError, ModelNotFoundError
from services.updates.variant_facts import VariantFacts
from tier2_region.fleet.assignment import VariantOffer, offer_from_facts, unreadable_offer
from tier2_region.registry.registry import ModelRegistry

log = logging.getLogger("edgecascade.fleet")

# Offers kept before the cache starts again (each is a few hundred bytes).
MAX_CACHED_OFFERS = 4096


class VariantCatalog(Protocol):
    """Where the fleet finds a model version's variants and their content keys."""

    def offers(self, name: str, version: str) -> list[VariantOffer]:
        """The published variants of a model version (empty if it has none)."""
        ...

    def content_key(self, key_id: str) -> bytes:
        """The content key with this id.

        Raises:
            NotFoundError: No such key.
        """
        ...


class RegistryCatalog:
    """A :class:`VariantCatalog` over a model registry.

    Args:
        registry: The registry (its database connection is used by one thread at a time, under this catalog's lock).
    """

    def __init__(self, registry: ModelRegistry) -> None:
        self.registry = registry
        self._lock = threading.Lock()
        self._offers: dict[str, VariantOffer] = {}

    def offers(self, name: str, version: str) -> list[VariantOffer]:
        """The published, committed variants of a model version, with their signed facts."""
        with self._lock:
            if not self.registry.exists():
                return []
            found: list[VariantOffer] = []
            for record in self.registry.variants(name, version):
                offer = self._offers.get(record.target_path)
                if offer is None:
                    try:
                        target = self.registry.target(record.name, record.version, record.variant)
                    except ModelNotFoundError:
                        continue  # not committed (a publish in progress): not offered yet
                    offer = _offer(record.variant, record.target_path, target.custom)
                    if len(self._offers) >= MAX_CACHED_OFFERS:
                        self._offers.clear()
                    self._offers[record.target_path] = offer
                found.append(offer)
            return found

    def content_key(self, key_id: str) -> bytes:
        """The content key with this id.

        Raises:
            NotFoundError: No such key.
        """
        with self._lock:
            return self.registry.database.content_key(key_id)


def _offer(variant: str, target_path: str, custom: Any) -> VariantOffer:
    try:
        facts = VariantFacts.from_dict(custom, target_path)
    except IntegrityError as exc:
        log.error("the signed facts of %s cannot be read; it is assigned to no node: %s", target_path, exc.message)
        return unreadable_offer(variant, target_path, "its signed facts cannot be read")
    return offer_from_facts(facts)
