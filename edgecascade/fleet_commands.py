"""``edgecascade fleet …`` and ``edgecascade deploy``: the region's fleet on the command line.

Commands::

    edgecascade fleet [--json]                  every node: tier, class, budget, installed and desired
                                                versions, update state, last error, last seen
    edgecascade fleet token [--ttl-s N]         a one-time enrollment token (shown once; only its hash is kept)
    edgecascade fleet revoke ID                 refuse a node's check-ins; it may enroll again (new keys too)
    edgecascade deploy NAME VERSION [--tier device|edge] [--hardware-class C]
                                                the desired version of a model for the matching nodes

The inventory is ``--fleet PATH``, else ``[fleet] path`` of ``--config``, else
``<state-dir>/region-1/fleet.sqlite`` (``--state-dir`` defaults to the one
``edgecascade up`` uses); ``deploy`` reads the registry at ``--registry``, else
``[registry] path``, else ``<state-dir>/region-1/registry``.
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import asdict
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from services.config import load_config
from services.engine.memory import megabytes
from services.errors import NotFoundError
from tier2_region.config import RegionConfig
from tier2_region.fleet.assignment import VariantOffer
from tier2_region.fleet.catalog import RegistryCatalog
from tier2_region.fleet.domain import TIERS
from tier2_region.fleet.fleet import Fleet, FleetEntry
from tier2_region.fleet.inventory import Inventory
from tier2_region.registry.registry import ModelRegistry

DEFAULT_STATE_DIR = Path(".edgecascade")
REGION_DIR = "region-1"
FLEET_FILE = "fleet.sqlite"
REGISTRY_DIR = "registry"


def _location_args(p: argparse.ArgumentParser, registry: bool = False, verb: bool = False) -> None:
    # A verb under `fleet` leaves what `fleet` itself was given alone unless given again (argparse
    # would otherwise overwrite `fleet --state-dir X token` with the verb's own default).
    default = argparse.SUPPRESS if verb else None
    where = p.add_mutually_exclusive_group()
    where.add_argument(
        "--state-dir",
        type=Path,
        default=default,
        help=f"the mesh's state directory: the inventory is <state-dir>/{REGION_DIR}/{FLEET_FILE} "
        f"(default {DEFAULT_STATE_DIR})",
    )
    where.add_argument("--fleet", type=Path, default=default, help="the inventory file itself")
    if registry:
        p.add_argument("--registry", type=Path, help=f"registry directory (default <state-dir>/{REGION_DIR}/registry)")
    p.add_argument(
        "--config",
        type=Path,
        default=default,
        help="the region's TOML file ([fleet] and [registry] paths, token lifetime)",
    )


def add_parsers(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Adds ``fleet`` (and its verbs) and ``deploy`` to the ``edgecascade`` parser."""
    fleet = subparsers.add_parser(
        "fleet",
        help="list the region's enrolled nodes (or: fleet token, fleet revoke ID)",
        description="List every node enrolled with the region: id, tier, hardware class, memory budget, installed "
        "and desired model versions, update state, last error and when it last checked in. `fleet token` makes a "
        "one-time enrollment token; `fleet revoke ID` refuses a node's check-ins until it enrolls again.",
    )
    _location_args(fleet)
    fleet.add_argument("--json", action="store_true", help="print the fleet as JSON")
    fleet.set_defaults(handler=list_fleet)
    verbs = fleet.add_subparsers(dest="fleet_command", required=False)

    token = verbs.add_parser(
        "token",
        help="make a one-time enrollment token",
        description="Make a random enrollment token, print it once and keep only its SHA-256. It enrolls one node "
        "once (devices and edges present it with [updates] enrollment_token) and expires after --ttl-s seconds.",
    )
    token.add_argument("--ttl-s", type=float, help="seconds the token is valid (default [fleet] token_ttl_s: a day)")
    _location_args(token, verb=True)
    token.set_defaults(handler=create_token)

    revoke = verbs.add_parser(
        "revoke",
        help="revoke a node: refuse its check-ins; it may enroll again, with other keys too",
        description="Revoke a node: its check-ins are refused from now on, and its id may enroll again with a new "
        "token (with new keys, e.g. after its keys were lost or exposed).",
    )
    revoke.add_argument("node_id", metavar="ID", help="the node's id")
    _location_args(revoke, verb=True)
    revoke.set_defaults(handler=revoke_node)

    deploy = subparsers.add_parser(
        "deploy",
        help="set the version of a model the matching nodes should run",
        description="Set the desired version of a model for every node of --tier and --hardware-class (default: "
        "all). At their next check-in the nodes get the variant that fits them, with its key. A deploy of the same "
        "model with the same filters replaces the earlier one; where several match a node, the most specific wins. "
        "The registry must hold the version.",
    )
    deploy.add_argument("name", help="model name")
    deploy.add_argument("version", help="model version")
    deploy.add_argument("--tier", choices=TIERS, default="", help="only nodes of this tier (default: any)")
    deploy.add_argument("--hardware-class", default="", help="only nodes of this hardware class (default: any)")
    _location_args(deploy, registry=True)
    deploy.set_defaults(handler=deploy_model)


class NoVariants:
    """The catalog of the verbs that read no registry."""

    def offers(self, name: str, version: str) -> list[VariantOffer]:
        return []

    def content_key(self, key_id: str) -> bytes:
        raise NotFoundError(f"content key {key_id} is not at hand")


def _config(args: argparse.Namespace) -> RegionConfig:
    return load_config(RegionConfig, getattr(args, "config", None))


def inventory_path(args: argparse.Namespace, config: RegionConfig) -> Path:
    """The inventory file the verb works on."""
    if args.fleet is not None:
        return Path(args.fleet)
    if args.state_dir is None and config.fleet.path:
        return Path(config.fleet.path)
    return (args.state_dir or DEFAULT_STATE_DIR) / REGION_DIR / FLEET_FILE


def _registry_dir(args: argparse.Namespace, config: RegionConfig) -> Path:
    if args.registry is not None:
        return Path(args.registry)
    if args.state_dir is None and config.registry.path:
        return Path(config.registry.path)
    return (args.state_dir or DEFAULT_STATE_DIR) / REGION_DIR / REGISTRY_DIR


def _when(timestamp: float | None) -> str:
    return "" if timestamp is None else datetime.fromtimestamp(timestamp, UTC).isoformat(timespec="seconds")


def _ago(seconds: float) -> str:
    seconds = max(0, int(seconds))
    for unit, size in (("d", 86400), ("h", 3600), ("min", 60)):
        if seconds >= size:
            return f"{seconds // size} {unit} ago"
    return f"{seconds} s ago"


def create_token(args: argparse.Namespace, console: Console) -> int:
    """``fleet token``: prints a new one-time enrollment token."""
    config = _config(args)
    path = inventory_path(args, config)
    inventory = Inventory(path)
    try:
        issued = Fleet(inventory, NoVariants(), config.fleet).create_token(args.ttl_s)
    finally:
        inventory.close()
    console.print(issued.token, markup=False, soft_wrap=True)
    console.print(
        f"one-time enrollment token, valid until {_when(issued.expires_at)}; shown only now ({path} keeps its hash)",
        markup=False,
        soft_wrap=True,
    )
    return 0


def revoke_node(args: argparse.Namespace, console: Console) -> int:
    """``fleet revoke ID``: refuses the node's check-ins from now on."""
    config = _config(args)
    path = inventory_path(args, config)
    if not path.is_file():
        raise NotFoundError(f"no fleet inventory at {path}")
    inventory = Inventory(path)
    try:
        Fleet(inventory, NoVariants(), config.fleet).revoke(args.node_id)
    finally:
        inventory.close()
    console.print(
        f"revoked {args.node_id}: its check-ins are refused; it may enroll again with a new token", markup=False
    )
    return 0


def deploy_model(args: argparse.Namespace, console: Console) -> int:
    """``deploy NAME VERSION``: the desired version of a model for the matching nodes."""
    config = _config(args)
    registry_dir = _registry_dir(args, config)
    if not registry_dir.is_dir():
        raise NotFoundError(f"no registry in {registry_dir}; give --registry or --state-dir")
    registry = ModelRegistry(registry_dir)
    inventory = Inventory(inventory_path(args, config))
    try:
        fleet = Fleet(inventory, RegistryCatalog(registry), config.fleet)
        replaced = fleet.deploy(args.name, args.version, args.tier, args.hardware_class)
        matching = [
            e for e in fleet.listing() if any((d.name, d.version) == (args.name, args.version) for d in e.desired)
        ]
    finally:
        inventory.close()
        registry.close()
    scope = " ".join(filter(None, [args.tier and f"{args.tier}s", args.hardware_class and f"of {args.hardware_class}"]))
    note = f" (was version {replaced.version})" if replaced is not None else ""
    console.print(
        f"deployed {args.name} version {args.version} to {scope or 'every node'}{note}; "
        f"{len(matching)} enrolled node(s) get it at their next check-in",
        markup=False,
    )
    return 0


def fleet_json(entries: list[FleetEntry]) -> list[dict[str, Any]]:
    """The fleet as ``fleet --json`` prints it."""
    out = []
    for entry in entries:
        node = entry.node
        out.append(
            {
                "node_id": node.node_id,
                "tier": node.facts.tier,
                "hardware_class": node.facts.hardware_class,
                "memory_budget_bytes": node.facts.memory_budget_bytes,
                "onnxruntime_version": node.facts.onnxruntime_version,
                "free_disk_bytes": node.facts.free_disk_bytes,
                "enrolled_at": _when(node.enrolled_at),
                "revoked": node.revoked,
                "last_seen": _when(node.last_seen) or None,
                "installed": [asdict(m) for m in node.installed],
                "desired": [{"name": d.name, "version": d.version} for d in entry.desired],
                "update_state": node.update_state,
                "last_error": node.last_error,
            }
        )
    return out


def list_fleet(args: argparse.Namespace, console: Console) -> int:
    """``fleet``: every enrolled node (a table, or JSON with ``--json``)."""
    config = _config(args)
    path = inventory_path(args, config)
    entries: list[FleetEntry] = []
    if path.is_file():
        inventory = Inventory(path)
        try:
            entries = Fleet(inventory, NoVariants(), config.fleet).listing()
        finally:
            inventory.close()
    if args.json:
        console.print(json.dumps(fleet_json(entries), indent=2), markup=False, highlight=False, soft_wrap=True)
        return 0
    if not entries:
        console.print(f"no node is enrolled ({path}); make a token with `edgecascade fleet token`", markup=False)
        return 0
    table = Table(title="fleet", caption=str(path))
    table.add_column("node", no_wrap=True)
    for column in ("tier", "class", "budget", "installed", "desired", "update", "last error"):
        table.add_column(column)
    table.add_column("last seen", no_wrap=True)
    now = time.time()
    for entry in entries:
        node = entry.node
        installed = "\n".join(f"{m.name} {m.version} {m.variant}".strip() for m in node.installed)
        desired = "\n".join(f"{d.name} {d.version}" for d in entry.desired)
        table.add_row(
            node.node_id,
            node.facts.tier,
            node.facts.hardware_class,
            megabytes(node.facts.memory_budget_bytes),
            installed or "-",
            desired or "-",
            "revoked" if node.revoked else (node.update_state or "-"),
            node.last_error,
            "never" if node.last_seen is None else _ago(now - node.last_seen),
        )
    console.print(table)
    return 0
