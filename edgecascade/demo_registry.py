"""The region's registry in a dev set-up: keys, an empty TUF repository, and the demo models published into it.

``edgecascade up`` calls :func:`publish_demo_models` before it starts the
nodes. The first start generates the signing keys (``<region>/keys``, mode
0600, never in the repository), creates the registry (``<region>/registry``)
and publishes each demo model's fp32 and int8 variants as version 1 through
the whole pipeline (profile → gate → encrypt → sign). Later starts find them
published and do nothing. A demo model that cannot be published is reported
and skipped: the mesh still starts.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from services.errors import EdgecascadeError
from tier2_region.registry.pipeline import PipelineOptions, ValidationChoice, prepare, publish_model
from tier2_region.registry.profiler import ProfileSettings
from tier2_region.registry.registry import ModelRegistry
from tier2_region.registry.signing_keys import generate_keys, load_keys
from tier2_region.registry.tuf_repository import ExpiryPolicy

DEMO_VERSION = "1"
DEMO_VARIANTS: dict[str, dict[str, str]] = {
    "charlm-device": {"fp32": "charlm-device.onnx", "int8": "charlm-device.int8.onnx"},
    "charlm-edge": {"fp32": "charlm-edge.onnx", "int8": "charlm-edge.int8.onnx"},
}
# Start-up should stay quick: fewer timed runs and validation rows than a release publish.
DEMO_PROFILE = ProfileSettings(batch_sizes=(1, 8, 64), latency_runs=30, latency_budget_s=0.3)
DEMO_ROWS = 2000


def ensure_registry(registry_dir: Path, key_dir: Path, expiry: ExpiryPolicy | None = None) -> bool:
    """Creates dev keys and an empty registry unless they exist.

    Returns:
        Whether anything was created.

    Raises:
        ConfigError: Keys exist but cannot be loaded, or the registry cannot be created.
    """
    registry = ModelRegistry(registry_dir, expiry)
    try:
        if registry.exists():
            return False
        if not (key_dir / "online.pem").exists():
            generate_keys(key_dir)
        registry.create(load_keys(key_dir, key_dir), 1, key_dir, key_dir)
        return True
    finally:
        registry.close()


def publish_demo_models(
    registry_dir: Path,
    key_dir: Path,
    models_dir: Path,
    say: Callable[[str], None],
    heldout: Callable[[Path], tuple[list[str] | None, str]],
) -> list[str]:
    """Publishes the demo models that are not in the registry yet.

    Args:
        registry_dir: The region's registry.
        key_dir: Its signing keys (generated on first use).
        models_dir: Where the demo ONNX files are.
        say: Prints a progress line.
        heldout: Returns held-out text (and its description) for a char-LM file.

    Returns:
        The target paths published now.
    """
    if ensure_registry(registry_dir, key_dir):
        say(f"created the model registry in {registry_dir} (signing keys in {key_dir})")
    registry = ModelRegistry(registry_dir)
    published: list[str] = []
    try:
        keys = load_keys(key_dir)
        for name, variants in DEMO_VARIANTS.items():
            if registry.variants(name):
                continue
            files = {variant: models_dir / file for variant, file in variants.items()}
            missing = [str(p) for p in files.values() if not p.is_file()]
            if missing:
                say(f"[yellow]registry: {name} not published, missing {', '.join(missing)}[/yellow]")
                continue
            docs, source = heldout(files["fp32"])
            options = PipelineOptions(profile=DEMO_PROFILE, validation=ValidationChoice(None, docs, source, DEMO_ROWS))
            try:
                say(f"registry: profiling {name} (fp32, int8) in fresh processes")
                subs = prepare(files, "fp32", options)
                for item in publish_model(registry, keys, name, DEMO_VERSION, subs, options):
                    published.append(item.target_path)
                    say(f"registry: published {item.target_path} (drop {item.facts.accuracy.drop_points:f} pts)")
            except EdgecascadeError as exc:
                say(f"[yellow]registry: {name} not published: {exc.message}[/yellow]")
    finally:
        registry.close()
    return published


def trusted_root(registry_dir: Path) -> bytes:
    """The registry's newest committed root metadata: what edges and devices embed as their trust anchor.

    Raises:
        PreconditionError: The registry has not been created.
    """
    registry = ModelRegistry(registry_dir)
    try:
        return registry.repository.trusted_root()
    finally:
        registry.close()
