"""The region's fleet in a dev set-up: tokens for the nodes ``edgecascade up`` starts, and the demo deployments.

The launcher works on the region's inventory file directly, the way
``edgecascade fleet token`` and ``edgecascade deploy`` do (SQLite in WAL mode, so
the region process may have it open at the same time).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from edgecascade.demo_models import DEVICE_MODEL, EDGE_MODEL
from edgecascade.demo_registry import DEMO_VERSION
from edgecascade.fleet_commands import NoVariants
from services.errors import EdgecascadeError, NotFoundError
from tier2_region.config import FleetSection
from tier2_region.fleet.catalog import RegistryCatalog
from tier2_region.fleet.fleet import Fleet
from tier2_region.fleet.inventory import Inventory
from tier2_region.registry.registry import ModelRegistry

# Which demo model each tier is deployed (the region keeps its own copies as the last fallback).
DEMO_DEPLOYMENTS = ((DEVICE_MODEL, "device"), (EDGE_MODEL, "edge"))


def issue_token(fleet_path: Path, ttl_s: float, revoke: str | None = None) -> tuple[str, bool]:
    """A new one-time enrollment token, valid for ``ttl_s`` seconds.

    Args:
        fleet_path: The region's inventory.
        ttl_s: Lifetime of the token.
        revoke: A node id to revoke first (a node that lost its keys enrolls again with new ones).

    Returns:
        The token, and whether ``revoke`` was enrolled and is revoked now.
    """
    inventory = Inventory(fleet_path)
    try:
        fleet = Fleet(inventory, NoVariants(), FleetSection(path=str(fleet_path)))
        revoked = False
        if revoke is not None:
            try:
                fleet.revoke(revoke)
                revoked = True
            except NotFoundError:
                pass
        return fleet.create_token(ttl_s).token, revoked
    finally:
        inventory.close()


def deploy_demo_models(fleet_path: Path, registry_dir: Path, say: Callable[[str], None]) -> list[str]:
    """Deploys each demo model to its tier unless the fleet has a deployment of it already (an operator's wins).

    A demo model the registry does not hold (its publish failed) is reported and skipped.

    Returns:
        The names deployed now.
    """
    registry = ModelRegistry(registry_dir)
    inventory = Inventory(fleet_path)
    deployed: list[str] = []
    try:
        fleet = Fleet(inventory, RegistryCatalog(registry), FleetSection(path=str(fleet_path)))
        existing = {d.name for d in inventory.deployments()}
        for name, tier in DEMO_DEPLOYMENTS:
            if name in existing:
                continue
            try:
                fleet.deploy(name, DEMO_VERSION, tier)
            except EdgecascadeError as exc:
                say(f"[yellow]fleet: {name} not deployed: {exc.message}[/yellow]")
                continue
            deployed.append(name)
            say(f"fleet: deployed {name} version {DEMO_VERSION} to every {tier}")
    finally:
        inventory.close()
        registry.close()
    return deployed
