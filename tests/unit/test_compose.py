"""Static checks for compose.yaml, Dockerfile and .dockerignore.

No Docker engine is needed: compose.yaml is validated against the compose
specification JSON schema vendored inside check-jsonschema (works offline),
and parsed with ruamel.yaml (a check-jsonschema dependency) for structural
assertions about the mesh.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from ruamel.yaml import YAML

ROOT = Path(__file__).resolve().parents[2]
COMPOSE = ROOT / "compose.yaml"
DOCKERFILE = ROOT / "Dockerfile"
DOCKERIGNORE = ROOT / ".dockerignore"

MESH_SERVICES = ("region", "edge", "device-1", "device-2")
DEVICES = ("device-1", "device-2")
TIER_MODULE = {
    "region": "tier2_region",
    "edge": "tier1_edge",
    "device-1": "tier0_device",
    "device-2": "tier0_device",
}
NODE_IDS = {
    "region": "region-1",
    "edge": "edge-1",
    "device-1": "device-1",
    "device-2": "device-2",
}
DEMO_MODELS = (
    "examples/models/charlm-device.int8.onnx",
    "examples/models/charlm-edge.onnx",
)


# --------------------------------------------------------------------------- helpers


def _check_jsonschema_exe() -> str:
    candidate = Path(sys.executable).parent / "check-jsonschema"
    if candidate.is_file():
        return str(candidate)
    found = shutil.which("check-jsonschema")
    if found is None:
        pytest.fail("check-jsonschema executable not found next to sys.executable or on PATH")
    return found


def _validate(path: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [_check_jsonschema_exe(), "--builtin-schema", "vendor.compose-spec", str(path)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def _load_yaml(path: Path) -> Any:
    return YAML(typ="safe", pure=True).load(path.read_text(encoding="utf-8"))


def _dump_yaml(data: Any, path: Path) -> None:
    yaml = YAML(typ="safe", pure=True)
    yaml.default_flow_style = False
    with path.open("w", encoding="utf-8") as fh:
        yaml.dump(data, fh)


def _env(service: dict[str, Any]) -> dict[str, str]:
    env = service.get("environment") or {}
    if isinstance(env, list):  # KEY=VALUE list form
        env = dict(item.split("=", 1) if "=" in item else (item, "") for item in env)
    return {str(k): "" if v is None else str(v) for k, v in env.items()}


def _command(service: dict[str, Any]) -> list[str]:
    cmd = service.get("command")
    if isinstance(cmd, str):
        return cmd.split()
    return [str(part) for part in cmd or []]


def _depends_on(service: dict[str, Any]) -> dict[str, dict[str, Any]]:
    dep = service.get("depends_on") or {}
    if isinstance(dep, list):
        return {name: {} for name in dep}
    return dep


def _published_ports(service: dict[str, Any]) -> list[tuple[str | None, str, str]]:
    """Return (host_ip, published, target) for each published port entry."""
    result: list[tuple[str | None, str, str]] = []
    for entry in service.get("ports") or []:
        if isinstance(entry, dict):
            published = entry.get("published")
            if published is None:
                result.append((entry.get("host_ip"), "", str(entry.get("target"))))
            else:
                result.append((entry.get("host_ip"), str(published), str(entry.get("target"))))
            continue
        spec = str(entry).split("/", 1)[0]
        if spec.startswith("["):  # [ipv6]:host:container
            ip, _, rest = spec[1:].partition("]:")
            host, _, target = rest.partition(":")
            result.append((ip, host, target))
            continue
        parts = spec.split(":")
        if len(parts) == 3:
            result.append((parts[0], parts[1], parts[2]))
        elif len(parts) == 2:
            result.append((None, parts[0], parts[1]))
        else:  # container port only -> random host port on all interfaces
            result.append((None, "", parts[0]))
    return result


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    data = _load_yaml(COMPOSE)
    assert isinstance(data, dict), "compose.yaml must be a mapping"
    return data


@pytest.fixture(scope="module")
def services(compose: dict[str, Any]) -> dict[str, Any]:
    svcs = compose.get("services")
    assert isinstance(svcs, dict), "compose.yaml needs a services mapping"
    return svcs


# ------------------------------------------------------------------ schema validation


def test_compose_validates_against_compose_spec() -> None:
    proc = _validate(COMPOSE)
    assert proc.returncode == 0, (
        f"check-jsonschema rejected compose.yaml (rc={proc.returncode}):\n{proc.stdout}\n{proc.stderr}"
    )


def _break_ports_scalar(data: dict[str, Any]) -> None:
    data["services"]["device-1"]["ports"] = "nope"


def _break_depends_on_type(data: dict[str, Any]) -> None:
    data["services"]["edge"]["depends_on"] = 42


def _break_unknown_key(data: dict[str, Any]) -> None:
    data["services"]["region"]["helthcheck"] = {"test": ["CMD", "true"]}


@pytest.mark.parametrize(
    "breaker",
    [_break_ports_scalar, _break_depends_on_type, _break_unknown_key],
    ids=["ports-scalar", "depends_on-int", "unknown-service-key"],
)
def test_schema_check_rejects_broken_compose(tmp_path: Path, breaker: Any) -> None:
    """The validation above is only meaningful if a broken file really fails."""
    data = _load_yaml(COMPOSE)
    breaker(data)
    broken = tmp_path / "compose.yaml"
    _dump_yaml(data, broken)
    proc = _validate(broken)
    assert proc.returncode != 0, (
        "check-jsonschema accepted a deliberately broken compose file:\n"
        f"{broken.read_text(encoding='utf-8')}\n{proc.stdout}\n{proc.stderr}"
    )


# ---------------------------------------------------------------- structural checks


def test_no_obsolete_version_key(compose: dict[str, Any]) -> None:
    assert "version" not in compose


def test_services_exist(services: dict[str, Any]) -> None:
    for name in (*MESH_SERVICES, "jaeger"):
        assert name in services, f"missing service {name!r}"


def test_single_image_built_once(services: dict[str, Any]) -> None:
    builders = [name for name in MESH_SERVICES if "build" in services[name]]
    assert len(builders) == 1, f"exactly one mesh service should build the image, got {builders}"
    image = services[builders[0]].get("image")
    assert image == "edgecascade:dev"
    for name in MESH_SERVICES:
        assert services[name].get("image") == image, f"{name} must reuse {image}"


def test_commands_run_tier_modules(services: dict[str, Any]) -> None:
    for name, module in TIER_MODULE.items():
        cmd = _command(services[name])
        assert cmd[:3] == ["python", "-m", module], f"{name}: unexpected command {cmd}"


def test_node_ids_and_server_env(services: dict[str, Any]) -> None:
    for name, node_id in NODE_IDS.items():
        env = _env(services[name])
        assert env.get("EDGECASCADE_SERVER__NODE_ID") == node_id, name
        assert env.get("EDGECASCADE_SERVER__HOST") == "0.0.0.0", name
        assert env.get("EDGECASCADE_SERVER__PORT", "").isdigit(), name
        assert env.get("EDGECASCADE_REPOSITORY__PATH", "").startswith("/var/lib/edgecascade/"), name
        assert "OTEL_SERVICE_NAME" not in env, f"{name}: OTEL_SERVICE_NAME is set by the code"


def test_upstream_chain(services: dict[str, Any]) -> None:
    def upstream(name: str) -> str:
        return _env(services[name]).get("EDGECASCADE_UPSTREAM__ADDRESS", "")

    def port(name: str) -> str:
        return _env(services[name])["EDGECASCADE_SERVER__PORT"]

    assert upstream("region") == "", "the region has no upstream"
    assert upstream("edge") == f"region:{port('region')}"
    for device in DEVICES:
        assert upstream(device) == f"edge:{port('edge')}", device


def test_depends_on_follows_chain_with_health(services: dict[str, Any]) -> None:
    expected_parent = {"edge": "region", "device-1": "edge", "device-2": "edge"}
    for name, parent in expected_parent.items():
        deps = _depends_on(services[name])
        assert parent in deps, f"{name} must depend on {parent}"
        assert deps[parent].get("condition") == "service_healthy", f"{name} -> {parent}"


def test_every_tier_has_healthcheck(services: dict[str, Any]) -> None:
    for name in MESH_SERVICES:
        hc = services[name].get("healthcheck")
        assert isinstance(hc, dict) and hc.get("test"), f"{name} lacks a healthcheck"
        test = hc["test"]
        joined = " ".join(test) if isinstance(test, list) else str(test)
        assert "grpc_health" in joined, f"{name}: healthcheck should use grpc.health.v1"
        if isinstance(test, list) and test[0] == "CMD" and test[1:3] == ["python", "-c"]:
            compile(test[3], f"{name}-healthcheck", "exec")  # the one-liner must be valid Python


def test_every_tier_exports_to_jaeger(services: dict[str, Any]) -> None:
    for name in MESH_SERVICES:
        endpoint = _env(services[name]).get("OTEL_EXPORTER_OTLP_ENDPOINT", "")
        assert endpoint == "http://jaeger:4317", f"{name}: OTLP endpoint is {endpoint!r}"
        assert "jaeger" in _depends_on(services[name]), f"{name} should start after jaeger"


def test_jaeger_service(services: dict[str, Any]) -> None:
    jaeger = services["jaeger"]
    image = str(jaeger.get("image", ""))
    assert image.startswith(("jaegertracing/all-in-one:", "jaegertracing/jaeger:")), image
    tag = image.rsplit(":", 1)[1]
    assert tag and tag != "latest", "pin the Jaeger image tag"
    if "all-in-one" in image:
        assert _env(jaeger).get("COLLECTOR_OTLP_ENABLED") == "true"
    targets = {target for _, _, target in _published_ports(jaeger)}
    assert "16686" in targets, "Jaeger UI must be published"
    assert "4317" not in targets, "OTLP gRPC stays internal"


def test_host_ports_bind_loopback_only(services: dict[str, Any]) -> None:
    published: dict[str, list[tuple[str | None, str, str]]] = {}
    for name, service in services.items():
        for host_ip, host_port, target in _published_ports(service):
            assert host_ip == "127.0.0.1", f"{name}: port {host_port}:{target} must bind 127.0.0.1, got {host_ip!r}"
            published.setdefault(name, []).append((host_ip, host_port, target))
    assert ("127.0.0.1", "8001", "8001") in published.get("device-1", [])
    assert ("127.0.0.1", "16686", "16686") in published.get("jaeger", [])
    assert set(published) == {"device-1", "jaeger"}, f"unexpected published services: {published}"


# ------------------------------------------------------------------ Dockerfile checks


def test_dockerfile_basics() -> None:
    text = DOCKERFILE.read_text(encoding="utf-8")
    instructions = [line.strip() for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]
    assert any(line.startswith("FROM python:3.11-slim") for line in instructions)
    assert "pip install --no-cache-dir ." in text
    users = [line.split(None, 1)[1] for line in instructions if line.upper().startswith("USER ")]
    assert users and users[-1] not in ("root", "0", "0:0"), "image must run as a non-root user"
    assert any(line.split()[:2] == ["EXPOSE", "8001"] for line in instructions)
    assert any(line.startswith("CMD") and "tier2_region" in line for line in instructions)


@pytest.mark.parametrize("model", DEMO_MODELS)
def test_dockerfile_places_demo_models(model: str) -> None:
    text = DOCKERFILE.read_text(encoding="utf-8")
    assert model in text, f"Dockerfile does not place {model}"
    assert "edgecascade repo demo" in text


def test_compose_repository_paths_match_dockerfile(services: dict[str, Any]) -> None:
    text = DOCKERFILE.read_text(encoding="utf-8")
    assert "for role in device edge region" in text
    assert '--repo "/var/lib/edgecascade/$role-models"' in text
    for name in MESH_SERVICES:
        role = name.split("-")[0]
        repo = _env(services[name])["EDGECASCADE_REPOSITORY__PATH"]
        assert repo == f"/var/lib/edgecascade/{role}-models", f"{name}: {repo} is not populated in the Dockerfile"


def test_dockerignore_excludes_local_state() -> None:
    patterns = {
        line.strip()
        for line in DOCKERIGNORE.read_text(encoding="utf-8").splitlines()
        if line.strip() and not line.startswith("#")
    }
    for required in (
        ".git",
        ".venv*",
        ".edgecascade",
        "**/__pycache__",
        ".pytest_cache",
        ".mypy_cache",
        ".ruff_cache",
    ):
        assert required in patterns, f".dockerignore should exclude {required}"
    assert not any(p.startswith("examples") for p in patterns), "demo models must stay in the context"
