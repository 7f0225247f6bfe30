"""``edgecascade fleet …`` and ``edgecascade deploy``: the region's fleet on the command line.

Commands::

    edgecascade fleet [--json] [--window-s S]   every node: tier, class, budget, installed and desired
                                                versions, update state, last error, last seen, and
                                                its traffic over the window; every version's traffic
    edgecascade fleet token [--ttl-s N]         a one-time enrollment token (shown once; only its hash is kept)
    edgecascade fleet revoke ID                 refuse a node's check-ins; it may enroll again (new keys too)
    edgecascade deploy NAME VERSION [--tier device|edge] [--hardware-class C]
                                                the desired version of a model for the matching nodes

The inventory is ``--fleet PATH``, else ``[fleet] path`` of ``--config``, else
``<state-dir>/region-1/fleet.sqlite`` (``--state-dir`` defaults to the one
``edgecascade up`` uses); ``deploy`` reads the registry at ``--registry``, else
``[registry] path``, else ``<state-dir>/region-1/registry``. Traffic comes from
the region's telemetry store (``[telemetry] path``, else
``<state-dir>/region-1/telemetry.sqlite``), when there is one.
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import asdict, dataclass, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from services.config import load_config
from services.engine.memory import megabytes
from services.errors import InvalidArgumentError, NotFoundError
from tier2_region.config import RegionConfig
from tier2_region.fleet.assignment import VariantOffer
from tier2_region.fleet.catalog import RegistryCatalog
from tier2_region.fleet.domain import TIERS
from tier2_region.fleet.figures import VersionFigures
from tier2_region.fleet.fleet import Fleet, FleetEntry
from tier2_region.fleet.inventory import Inventory
from tier2_region.registry.registry import ModelRegistry
from tier2_region.telemetry.store import NodeSummary, TelemetryStore

DEFAULT_STATE_DIR = Path(".edgecascade")
REGION_DIR = "region-1"
FLEET_FILE = "fleet.sqlite"
TELEMETRY_FILE = "telemetry.sqlite"
DEFAULT_WINDOW_S = 300.0
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
    fleet.add_argument(
        "--window-s",
        type=float,
        default=DEFAULT_WINDOW_S,
        help=f"traffic figures over the last S seconds (default {DEFAULT_WINDOW_S:.0f})",
    )
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


def telemetry_path(args: argparse.Namespace, config: RegionConfig) -> Path:
    """The telemetry store the verb reads traffic from."""
    if args.state_dir is None and args.fleet is None and config.telemetry.path:
        return Path(config.telemetry.path)
    if args.fleet is not None:
        return Path(args.fleet).with_name(TELEMETRY_FILE)
    return (args.state_dir or DEFAULT_STATE_DIR) / REGION_DIR / TELEMETRY_FILE


@dataclass(frozen=True)
class Traffic:
    """What the telemetry store says about the fleet over a window."""

    window_s: float
    nodes: dict[str, NodeSummary]
    versions: list[VersionFigures]


def read_traffic(path: Path, window_s: float, config: RegionConfig) -> Traffic | None:
    """Per-node and per-version traffic since ``window_s`` ago, or None without a telemetry store."""
    if not path.is_file():
        return None
    if not window_s > 0:
        raise InvalidArgumentError(f"--window-s must be a positive number of seconds, got {window_s}")
    store = TelemetryStore(path, replace(config.telemetry, path=str(path)))
    try:
        since = time.time() - window_s
        return Traffic(window_s, {s.node_id: s for s in store.node_summaries(since)}, store.versions(since))
    finally:
        store.close()


def _rate(value: float | None) -> float | None:
    return None if value is None else round(value, 6)


def _traffic_json(summary: NodeSummary | None) -> dict[str, Any] | None:
    if summary is None:
        return None
    anomaly = summary.last_anomaly
    return {
        "requests": summary.requests,
        "error_rate": _rate(summary.error_rate),
        "fallback_rate": _rate(summary.fallback_rate),
        "p50_ms": summary.p50_ms,
        "p99_ms": summary.p99_ms,
        "p999_ms": summary.p999_ms,
        "last_anomaly": None
        if anomaly is None
        else {
            "at": _when(anomaly.received_at),
            "severity": anomaly.severity_text,
            "body": anomaly.body,
            "trace_id": anomaly.trace_id,
        },
    }


def _version_json(v: VersionFigures) -> dict[str, Any]:
    return {
        "name": v.name,
        "version": v.version,
        "nodes": v.nodes,
        "requests": v.requests,
        "error_rate": _rate(v.error_rate),
        "fallback_rate": _rate(v.fallback_rate),
        "p50_ms": v.p50_ms,
        "p99_ms": v.p99_ms,
        "p999_ms": v.p999_ms,
        "mean_confidence": v.mean_confidence,
        "failed_installs": v.failed_installs,
    }


def fleet_json(entries: list[FleetEntry], traffic: Traffic | None = None) -> dict[str, Any]:
    """The fleet as ``fleet --json`` prints it: the nodes, and each version's traffic over the window."""
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
                "traffic": _traffic_json(traffic.nodes.get(node.node_id)) if traffic is not None else None,
            }
        )
    return {
        "window_s": traffic.window_s if traffic is not None else None,
        "nodes": out,
        "versions": [_version_json(v) for v in traffic.versions] if traffic is not None else [],
    }


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}"


def _percent(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.1f} %"


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
    traffic = read_traffic(telemetry_path(args, config), args.window_s, config)
    if args.json:
        text = json.dumps(fleet_json(entries, traffic), indent=2)
        console.print(text, markup=False, highlight=False, soft_wrap=True)
        return 0
    if not entries:
        console.print(f"no node is enrolled ({path}); make a token with `edgecascade fleet token`", markup=False)
        return 0
    table = Table(title="fleet", caption=str(path))
    table.add_column("node", no_wrap=True)
    for column in ("tier", "class", "budget", "installed", "desired", "update", "last error", "requests"):
        table.add_column(column)
    for column in ("errors", "fallbacks", "p99 ms"):
        table.add_column(column, justify="right")
    table.add_column("last seen", no_wrap=True)
    now = time.time()
    for entry in entries:
        node = entry.node
        installed = "\n".join(f"{m.name} {m.version} {m.variant}".strip() for m in node.installed)
        desired = "\n".join(f"{d.name} {d.version}" for d in entry.desired)
        seen = traffic.nodes.get(node.node_id) if traffic is not None else None
        table.add_row(
            node.node_id,
            node.facts.tier,
            node.facts.hardware_class,
            megabytes(node.facts.memory_budget_bytes),
            installed or "-",
            desired or "-",
            "revoked" if node.revoked else (node.update_state or "-"),
            node.last_error,
            str(seen.requests) if seen is not None else "-",
            _percent(seen.error_rate) if seen is not None else "-",
            _percent(seen.fallback_rate) if seen is not None else "-",
            _ms(seen.p99_ms) if seen is not None else "-",
            "never" if node.last_seen is None else _ago(now - node.last_seen),
        )
    console.print(table)
    if traffic is not None and traffic.versions:
        versions = Table(title=f"traffic by version, last {traffic.window_s:.0f} s")
        for column in ("model", "version", "nodes", "requests", "errors", "fallbacks", "p50 ms", "p99 ms", "p99.9 ms"):
            versions.add_column(column, justify="left" if column in ("model", "version") else "right")
        for v in traffic.versions:
            versions.add_row(
                v.name,
                v.version,
                str(v.nodes),
                str(v.requests),
                _percent(v.error_rate),
                _percent(v.fallback_rate),
                _ms(v.p50_ms),
                _ms(v.p99_ms),
                _ms(v.p999_ms),
            )
        console.print(versions)
    return 0
