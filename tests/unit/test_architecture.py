"""Enforces the layering of docs/architecture.md by walking every first-party import.

* ``edgecascade`` (the operator's CLI) → ``tierN_*`` → ``services`` → ``protos``;
  tiers never import each other, ``services`` and ``protos`` never import a tier,
  and nothing imports the CLI.
* Domain cores — modules directly in ``services/``, in ``services/engine/`` and
  ``services/updates/``, and tier modules other than ``app.py``, ``__main__.py``,
  servicers and ``*_service.py`` components — import neither ``grpc``,
  ``protos``, ``opentelemetry``, ``tenacity`` nor ``services.rpc``.
* Nothing is built at import time: no module-level ``asyncio.run`` or server.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
TIERS = ("tier0_device", "tier1_edge", "tier2_region")
CLI = "edgecascade"
TRANSPORT_ONLY = (
    "grpc",
    "grpc_health",
    "grpc_reflection",
    "grpc_status",
    "google",
    "protos",
    "opentelemetry",
    "tenacity",
)
ADAPTER_FILES = {"app.py", "__main__.py"}
CORE_SUBPACKAGES = {"engine", "updates"}


def _modules(package: str) -> list[Path]:
    return sorted(p for p in (ROOT / package).rglob("*.py") if not p.name.endswith(("_pb2.py", "_pb2_grpc.py")))


def _imports(path: Path) -> set[str]:
    """Every module a file imports: ``from a import b`` counts as ``a`` and ``a.b``; relative imports are resolved."""
    tree = ast.parse(path.read_text(), filename=str(path))
    package = path.relative_to(ROOT).with_suffix("").parts[:-1]
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = package[: len(package) - node.level + 1] if node.level else ()
            module = ".".join((*base, *([node.module] if node.module else [])))
            if module:
                found.add(module)
                found.update(f"{module}.{alias.name}" for alias in node.names)
    return found


def _top(name: str) -> str:
    return name.split(".", maxsplit=1)[0]


def _is_core(path: Path) -> bool:
    rel = path.relative_to(ROOT)
    if rel.parts[0] == "services":
        # Directly in services/ or in a core subpackage (engine/, updates/), not rpc/.
        return len(rel.parts) == 2 or rel.parts[1] in CORE_SUBPACKAGES
    if rel.parts[0] in TIERS:
        return path.name not in ADAPTER_FILES and "servicer" not in path.name and not path.name.endswith("_service.py")
    return False


ALL = [p for pkg in ("services", "protos", *TIERS, CLI) for p in _modules(pkg)]


def test_the_walk_sees_every_layer() -> None:
    packages = {p.relative_to(ROOT).parts[0] for p in ALL}
    assert packages == {"services", "protos", *TIERS, CLI}
    assert any(_is_core(p) for p in ALL)


@pytest.mark.parametrize("path", ALL, ids=lambda p: str(p.relative_to(ROOT)))
def test_layering(path: Path) -> None:
    rel = path.relative_to(ROOT)
    package = rel.parts[0]
    names = _imports(path)
    tops = {_top(n) for n in names}
    if package != CLI:
        assert CLI not in tops, f"{rel} imports the CLI; nothing may (it sits above the tiers)"
    if package in TIERS:
        others = tops & (set(TIERS) - {package})
        assert not others, f"{rel} imports another tier: {others}; tiers talk over gRPC"
    elif package != CLI:
        assert not tops & set(TIERS), f"{rel} imports a tier; {package} must not depend on tiers"
    if package == "protos":
        assert not tops & {"services"}, f"{rel}: contracts must not import services"
    if _is_core(path):
        bad = tops & set(TRANSPORT_ONLY) | {n for n in names if n == "services.rpc" or n.startswith("services.rpc.")}
        assert not bad, f"{rel} is a domain core but imports {bad}; move transport code to services/rpc"


@pytest.mark.parametrize("path", ALL, ids=lambda p: str(p.relative_to(ROOT)))
def test_nothing_runs_at_import_time(path: Path) -> None:
    tree = ast.parse(path.read_text())
    for node in tree.body:
        if isinstance(node, ast.Expr) and isinstance(node.value, ast.Call):
            func = ast.unparse(node.value.func)
            assert func in {"sys.exit"} or func.endswith("__doc__"), f"{path.name} calls {func} at import time"
        if isinstance(node, ast.Assign) and isinstance(node.value, ast.Call):
            func = ast.unparse(node.value.func)
            assert not func.startswith(("asyncio.", "aio.server", "grpc.aio.server")), (
                f"{path.name} builds {func} at import"
            )


def test_the_core_rule_can_fail(tmp_path: Path) -> None:
    bad = ROOT / "services" / "dataplane.py"
    assert _is_core(bad)
    assert _is_core(ROOT / "services" / "engine" / "batcher.py")
    assert _is_core(ROOT / "tier2_region" / "registry" / "registry.py")
    assert _is_core(ROOT / "tier1_edge" / "artifact_cache.py")
    assert not _is_core(ROOT / "services" / "rpc" / "artifact_servicer.py")
    assert not _is_core(ROOT / "tier1_edge" / "cache_service.py")
    assert "grpc" not in {_top(n) for n in _imports(bad)}
    probe = ROOT / "services" / "engine" / "_probe_for_the_test.py"
    probe.write_text(
        "import grpc\nfrom protos.inference import grpc_service_pb2\nfrom services import rpc\n"
        "from ..rpc import node\nfrom google.protobuf import message\n"
    )
    try:
        found = _imports(probe)
    finally:
        probe.unlink()
    assert {_top(n) for n in found} & set(TRANSPORT_ONLY) == {"grpc", "protos", "google"}
    assert {"services.rpc", "services.rpc.node"} <= found  # `from services import rpc` and the relative import


def test_each_room_holds_what_its_tier_runs() -> None:
    # The registry is the region's, the artifact cache the edge's; the CLI is a package of its own.
    assert (ROOT / "tier2_region" / "registry" / "registry.py").is_file()
    assert (ROOT / "tier1_edge" / "artifact_cache.py").is_file()
    assert (ROOT / "edgecascade" / "__main__.py").is_file()
    for gone in ("registry", "cli"):
        assert not (ROOT / "services" / gone).exists(), f"services/{gone} belongs elsewhere"
