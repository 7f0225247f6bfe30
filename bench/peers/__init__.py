"""The bench's peers: other Open Inference Protocol servers serving the same ONNX file with onnxruntime.

Each peer runs in a virtualenv of its own (``make bench-peers`` creates them
from ``bench/peers/requirements-*.txt``) through a small launcher here:
``kserve_server`` (KServe), ``mlserver_server`` (Seldon MLServer) and
``pytriton_server`` (NVIDIA PyTriton). ``check`` asks a running server for
onnxruntime's numbers through the load generator's client.

This module is what ``bench/run.py`` needs to plan and rank them: the
configurations, the selection from ``--peers``, and the "Tier 0 ÷ best peer"
arithmetic. Standard library only: every virtualenv imports it.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

IN_FLIGHT = (1, 16, 64)


@dataclass(frozen=True)
class PeerConfig:
    """One way of running one peer: its launcher module, virtualenv and options."""

    label: str  # the table's row name, e.g. "mlserver batching on"
    family: str  # what --peers names: kserve, mlserver, pytriton
    module: str  # python -m this, inside the venv
    args: tuple[str, ...] = ()

    @property
    def key(self) -> str:
        """The label as a results key: ``mlserver_batching_on``."""
        return self.label.replace(" ", "_").replace(",", "")

    def venv(self, root: Path) -> Path:
        """The virtualenv this peer runs in."""
        return root / f".venv-{self.family}"


PEERS: tuple[PeerConfig, ...] = (
    PeerConfig("kserve", "kserve", "bench.peers.kserve_server"),
    PeerConfig("mlserver batching off", "mlserver", "bench.peers.mlserver_server", ("--max-batch-size", "0")),
    PeerConfig(
        "mlserver batching on",
        "mlserver",
        "bench.peers.mlserver_server",
        ("--max-batch-size", "64", "--max-batch-time", "0.001"),
    ),
    PeerConfig("pytriton 1 instance", "pytriton", "bench.peers.pytriton_server", ("--instances", "1")),
    PeerConfig("pytriton 2 instances", "pytriton", "bench.peers.pytriton_server", ("--instances", "2")),
)
FAMILIES = tuple(dict.fromkeys(p.family for p in PEERS))
# What each peer's virtualenv reports as installed, for the record.
DISTRIBUTIONS: dict[str, tuple[str, ...]] = {
    "kserve": ("kserve", "onnxruntime", "numpy", "grpcio", "protobuf"),
    "mlserver": ("mlserver", "uvloop", "onnxruntime", "numpy", "grpcio", "protobuf"),
    "pytriton": ("nvidia-pytriton", "tritonclient", "onnxruntime", "numpy", "grpcio"),
}


def select(spec: str, peers: Sequence[PeerConfig] = PEERS) -> list[PeerConfig]:
    """The configurations ``--peers`` names: ``none``, ``all`` or a comma list of families (``kserve,pytriton``)."""
    spec = spec.strip().lower()
    if spec in {"", "none"}:
        return []
    if spec == "all":
        return list(peers)
    wanted = {part.strip() for part in spec.split(",") if part.strip()}
    known = {p.family for p in peers}
    unknown = wanted - known
    if unknown:
        raise ValueError(f"unknown peer(s) {sorted(unknown)}: choose from {sorted(known)}, 'all' or 'none'")
    return [p for p in peers if p.family in wanted]


def missing_venv(config: PeerConfig, root: Path) -> str | None:
    """Why this peer cannot run here (its virtualenv is not installed), or ``None`` if it can."""
    venv = config.venv(root)
    if not (venv / ".installed").is_file() or not (venv / "bin" / "python").is_file():
        return f"{venv.name} is not installed (make bench-peers; it needs PyPI)"
    return None


def valid(run: Mapping[str, Any] | None) -> bool:
    """A load run that counts: it answered, and every answer in its window was an answer, not an error."""
    if not run:
        return False
    return int(run.get("requests", 0)) > 0 and int(run.get("errors", 0)) == 0 and run.get("p99_ms") is not None


def ranked(peers: Mapping[str, Mapping[str, Any]], clients: int) -> dict[str, Mapping[str, Any]]:
    """The load runs at ``clients`` in flight of the peers that may be ranked.

    ``peers`` maps a configuration's key to its results: ``{"checked": {"ok": bool, ...},
    "closed_<clients>": <load report>}``. A peer whose answers were not onnxruntime's
    numbers, or whose run at that load had errors, is left out.
    """
    runs: dict[str, Mapping[str, Any]] = {}
    for key, result in peers.items():
        run = result.get(f"closed_{clients}")
        if run is not None and result.get("checked", {}).get("ok") and valid(run):
            runs[key] = run
    return runs


def best(
    runs: Mapping[str, Mapping[str, Any] | None], lowest_p99: bool = False
) -> tuple[str, Mapping[str, Any]] | None:
    """The run with the most requests/s (or the lowest p99) among the valid ones, with its key."""
    usable = [(key, run) for key, run in runs.items() if run is not None and valid(run)]
    if not usable:
        return None
    if lowest_p99:
        return min(usable, key=lambda item: float(item[1]["p99_ms"]))
    return max(usable, key=lambda item: float(item[1]["throughput"]))


def ratio(ours: float | None, theirs: float | None) -> float | None:
    """``ours ÷ theirs``, or ``None`` when either is missing or the divisor is zero."""
    if ours is None or theirs is None or theirs == 0:
        return None
    return ours / theirs
