"""``edgecascade``: run the mesh on this machine and talk to it.

Commands::

    edgecascade up [--devices N] [--state-dir DIR]   start region, edge and N devices
    edgecascade status                               what every node reports
    edgecascade generate "prompt" [--cascade confidence|speculative|off] [--threshold T]
                                                     stream text from a device, each token by origin
    edgecascade infer "prompt"                       next-character distribution from a device
    edgecascade repo add --repo DIR --name NAME FILE.onnx
    edgecascade repo demo --role device|edge|region --repo DIR
    edgecascade model init|quantize|profile|publish|list|show   the registry's publish pipeline
    edgecascade model resign-targets|rotate-root                  keep the registry's metadata from expiring
    edgecascade fleet [--json] | fleet token | fleet revoke ID    the region's enrolled nodes
    edgecascade deploy NAME VERSION [--tier T] [--hardware-class C]  what the matching nodes should run
    edgecascade hard-examples export [--format jsonl] [--model M] [--since ISO] [--limit N] [--out FILE]
    edgecascade hard-examples stats [--json]      escalated inputs the region keeps for retraining

Each verb is bound to its handler where it is declared (``set_defaults(handler=…)``);
:func:`main` calls that handler, and a verb declared without one is an error.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from edgecascade import client_commands, fleet_commands, hard_example_commands, model_commands, rollout_commands
from edgecascade.demo_models import DEFAULT_MODELS_DIR, DEVICE_MODEL, place_demo_models
from edgecascade.mesh_launcher import Mesh, run_until_signal
from services import __version__
from services.engine.model_repository import ModelRepository
from services.errors import EdgecascadeError
from services.inference import CASCADE, CASCADE_MODES, THRESHOLD

DEFAULT_STATE_DIR = Path(".edgecascade")

Handler = Callable[[argparse.Namespace, Console], int]


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="edgecascade",
        description="edgecascade: run ML models on fleets of edge devices and keep them running.",
    )
    parser.add_argument("--version", action="version", version=f"edgecascade {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    up = sub.add_parser(
        "up",
        help="start the whole mesh (region, edge, devices) on this machine",
        description=(
            "Start Tier 2 (region), one Tier 1 (edge) and N Tier 0 (device) processes on loopback. "
            "On first start the region's registry is created, the demo models are published into it and "
            "deployed (charlm-device to the devices, charlm-edge to the edge); the edge and the devices "
            "start empty, enroll with one-time tokens the launcher makes and install their models through "
            "their updaters. The endpoints are printed and written to <state-dir>/endpoints.json once every "
            "node reports SERVING and has installed what it was assigned (or 180 s passed). Ctrl-C or "
            "SIGTERM stops every node cleanly. A node that exits is restarted on its port, whatever its exit "
            "code, after 1, 2, 4, 8 and 16 s, and given up on after 5 restarts in 5 minutes, while the "
            "others keep running; <state-dir>/nodes.json records each node's state. Settings in the "
            "environment (EDGECASCADE_<SECTION>__<KEY>, OTEL_*) are passed to every node, except the "
            "per-node ones the launcher sets itself (server host/port/node_id/port_file, repository path, "
            "upstream address, registry, artifacts, fleet and updates paths and tokens), which are ignored "
            "for the nodes. The nodes check in every 2 s unless EDGECASCADE_FLEET__CHECK_INTERVAL_S is set."
        ),
    )
    up.add_argument("--devices", type=int, default=2, help="number of device nodes (default 2)")
    up.add_argument(
        "--state-dir",
        type=Path,
        default=DEFAULT_STATE_DIR,
        help="where configs, models, logs go (default ./.edgecascade)",
    )
    up.add_argument(
        "--models-dir",
        type=Path,
        default=DEFAULT_MODELS_DIR,
        help="where the demo ONNX models are (default: examples/models of this checkout)",
    )
    up.set_defaults(handler=_up)

    for name, helptext in (
        ("generate", "stream generated text from a device (Tier 0) and show which tier served it"),
        ("infer", "ask a device for the next-character distribution after a prompt"),
    ):
        cmd = sub.add_parser(name, help=helptext, description=helptext)
        cmd.add_argument("prompt", help="the text to continue")
        cmd.add_argument("--model", default=DEVICE_MODEL, help=f"model name (default {DEVICE_MODEL})")
        cmd.add_argument("--address", help="host:port to send to (default: the first device in endpoints.json)")
        cmd.add_argument("--state-dir", type=Path, default=DEFAULT_STATE_DIR, help="where endpoints.json is")
        cmd.add_argument("--timeout", type=float, default=30.0, help="deadline in seconds (default 30)")
        if name == "generate":
            cmd.add_argument("--max-tokens", type=int, default=80)
            cmd.add_argument("--temperature", type=float, default=0.7)
            cmd.add_argument("--top-k", type=int, default=0)
            cmd.add_argument("--seed", type=int, help="make the sampling repeatable")
            cmd.add_argument("--stop", help="stop after this string")
            cmd.add_argument(
                "--cascade",
                choices=CASCADE_MODES,
                help="confidence: each token the device is unsure of comes from the edge's model; speculative: the "
                "device drafts, the edge verifies (output follows the edge's model); off: the device alone "
                "(default: the node's [cascade] mode, for a model paired with an upstream model)",
            )
            cmd.add_argument(
                "--threshold",
                type=float,
                help="confidence threshold in [0, 1]: a token the device gave less probability goes to the edge",
            )
            cmd.set_defaults(handler=_generate)
        else:
            cmd.add_argument("--top", type=int, default=5, help="candidates to show (default 5)")
            cmd.set_defaults(handler=_infer)

    status = sub.add_parser(
        "status",
        help="show what every node of the running mesh reports",
        description="Show what every node of the running mesh reports (a node the launcher is restarting or gave "
        "up on shows that state; each node's upstream with the state of its circuit breaker — closed, open or "
        "half-open — how often it opened, its retries and its result-cache hit rate; each device's thermal state "
        '— normal, hot or critical, with the limits in force — its temperature or "no sensor", its power, measured '
        "or estimated, and its inferences per joule), and warn when the region's "
        "registry metadata is close to expiry (root or targets within 30 days, snapshot or timestamp within an "
        "hour: the region re-signs those, so that means its re-signer is not running); exits 1 when a node does "
        "not answer or a role has expired.",
    )
    status.add_argument("--state-dir", type=Path, default=DEFAULT_STATE_DIR)
    status.add_argument("--timeout", type=float, default=5.0)
    status.set_defaults(handler=_status)

    repo = sub.add_parser("repo", help="manage a model repository directory")
    repo_sub = repo.add_subparsers(dest="repo_command", required=True)
    add = repo_sub.add_parser("add", help="copy an ONNX file into a repository as a new model version")
    add.add_argument("file", type=Path, help="the .onnx file")
    add.add_argument("--repo", type=Path, required=True, help="repository directory")
    add.add_argument("--name", required=True, help="model name")
    add.add_argument("--version", default="", help="version (default: next free integer)")
    add.set_defaults(handler=_repo_add)
    demo = repo_sub.add_parser("demo", help="place the demo models meant for one role into a repository")
    demo.add_argument("--role", required=True, choices=["device", "edge", "region"])
    demo.add_argument("--repo", type=Path, required=True, help="repository directory")
    demo.add_argument("--models-dir", type=Path, default=DEFAULT_MODELS_DIR, help="where the demo ONNX models are")
    demo.set_defaults(handler=_repo_demo)
    model_commands.add_parser(sub)
    fleet_commands.add_parsers(sub)
    rollout_commands.add_parsers(sub)
    hard_example_commands.add_parsers(sub)
    return parser


def _up(args: argparse.Namespace, console: Console) -> int:
    mesh = Mesh(args.state_dir, args.devices, args.models_dir, console.print)
    mesh.claim()
    mesh.provision_demo()

    def on_ready(endpoints: dict[str, Any]) -> None:
        table = Table(title="edgecascade mesh is up")
        table.add_column("tier")
        table.add_column("node")
        table.add_column("address")
        table.add_row("tier2 (region)", mesh.region.name, endpoints["region"])
        table.add_row("tier1 (edge)", mesh.edge.name, endpoints["edge"])
        for device in mesh.devices:
            table.add_row("tier0 (device)", device.name, device.address)
        console.print(table)
        console.print(f"endpoints written to {mesh.endpoints_file}")
        console.print('try: [bold]edgecascade generate "The module"[/bold]   ·   Ctrl-C stops the mesh')

    return run_until_signal(mesh, on_ready)


def _status(args: argparse.Namespace, console: Console) -> int:
    return client_commands.status(console, args.state_dir, args.timeout)


def _infer(args: argparse.Namespace, console: Console) -> int:
    address = client_commands.device_address(args.state_dir, args.address)
    return client_commands.infer(console, address, args.model, args.prompt, args.top, args.timeout)


def _generate(args: argparse.Namespace, console: Console) -> int:
    address = client_commands.device_address(args.state_dir, args.address)
    params: dict[str, Any] = {
        "max_tokens": args.max_tokens,
        "temperature": args.temperature,
        "top_k": args.top_k,
    }
    if args.seed is not None:
        params["seed"] = args.seed
    if args.stop:
        params["stop"] = args.stop
    if args.cascade is not None:
        params[CASCADE] = args.cascade
    if args.threshold is not None:
        params[THRESHOLD] = args.threshold
    return client_commands.generate(console, address, args.model, args.prompt, params, args.timeout)


def _repo_add(args: argparse.Namespace, console: Console) -> int:
    entry = ModelRepository(args.repo).add(args.name, args.file, args.version)
    console.print(f"added {entry.name} version {entry.version} at {entry.path}")
    return 0


def _repo_demo(args: argparse.Namespace, console: Console) -> int:
    for placement in place_demo_models(args.repo, args.role, args.models_dir):
        console.print(f"placed {placement.name} ({placement.file}) in {args.repo}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``edgecascade`` console script."""
    parser = _parser()
    args = parser.parse_args(argv)
    handler: Handler | None = getattr(args, "handler", None)
    if not callable(handler):
        # A verb declared without set_defaults(handler=…): a bug, never a fall-through to another verb.
        verb = " ".join(str(v) for k, v in vars(args).items() if k.endswith("command") and v)
        parser.error(f"no handler for {verb!r}; this is a bug in edgecascade")
    console = Console(highlight=False)
    try:
        return handler(args, console)
    except EdgecascadeError as exc:
        console.print(f"[red]error:[/red] {exc.message}")
        return 2


if __name__ == "__main__":
    sys.exit(main())
