"""A node's update machinery for tests: real registry, real keys, real store, real model cache, real updater.

``publish_real`` publishes a tiny char-LM whose golden vectors are what the
model really answers (``publish_lm``'s hand-made profile has made-up ones),
with the memory profile, hardware classes and onnxruntime minimum a test wants.
"""

from __future__ import annotations

import dataclasses
import hashlib
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import onnxruntime as ort

from services.engine.batcher import BatchingConfig
from services.engine.model_cache import ModelCache
from services.engine.run_pool import RunPool
from services.updates.checkin import InstalledModel, machine_hardware_class
from services.updates.golden_vectors import GoldenVectors
from services.updates.identity import FileKeyProvider, NodeKeys
from services.updates.installed_store import InstalledStore
from services.updates.key_grants import KeyGrant, wrap_key
from services.updates.model_fetcher import ModelFetcher
from services.updates.tuf_client import ArtifactSource
from services.updates.update_journal import Assignment
from services.updates.updater import Backoff, Updater

if TYPE_CHECKING:
    from tests.support.registry import RegistryKit

MB = 1024 * 1024
GOLDEN_INPUT = np.array([[2, 3, 4, 5], [6, 7, 8, 9]], dtype=np.int64)
PROBE = {"input_ids": np.array([[3, 4, 5, 6]], dtype=np.int64)}


def run_model(path: Path, inputs: dict[str, np.ndarray[Any, Any]]) -> np.ndarray[Any, Any]:
    """What the plaintext model answers (``probs``)."""
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return np.asarray(session.run(["probs"], dict(inputs))[0])


def this_hardware_class() -> str:
    """This machine's hardware class, as the registry names it."""
    return machine_hardware_class()


def lm_file(files: Path, seed: int) -> Path:
    """A tiny char-LM (fp32) built for ``seed``."""
    from tests.support.onnx_models import tiny_char_lm
    from tests.support.registry import VOCAB

    return tiny_char_lm(files / f"real-lm-{seed}.onnx", vocab=VOCAB, seed=seed)


@dataclass(frozen=True)
class Published:
    """One published variant with its plaintext file (to compare answers and scan for plaintext)."""

    name: str
    version: str
    variant: str
    target_path: str
    key_id: str
    plaintext: Path


def publish_real(
    kit: RegistryKit,
    name: str = "lm",
    version: str = "1",
    seed: int = 0,
    peak_bytes: int = 12 * MB,
    hardware_classes: tuple[str, ...] = (),
    min_onnxruntime: str = "",
    golden_seed: int | None = None,
    plaintext_seed: int | None = None,
) -> Published:
    """Publishes the fp32 variant of a tiny char-LM with true golden vectors.

    ``golden_seed`` signs the golden vectors of another model; ``plaintext_seed``
    encrypts another model's bytes under the signed digest of this one (a registry that lies).
    """
    # The registry's own modules stay out of the node processes that import this file.
    from tests.support.registry import hand_profile
    from tier2_region.registry.model_inspection import inspect_model
    from tier2_region.registry.pipeline import PipelineOptions, publish_model
    from tier2_region.registry.profiles import BatchProfile
    from tier2_region.registry.registry import VariantSubmission

    path = lm_file(kit.files, seed)
    golden_source = path if golden_seed is None else lm_file(kit.files, golden_seed)
    facts = inspect_model(path)
    if plaintext_seed is not None:
        facts = dataclasses.replace(facts, data=lm_file(kit.files, plaintext_seed).read_bytes())
    inputs = {"input_ids": GOLDEN_INPUT}
    golden = GoldenVectors(inputs, {"probs": run_model(golden_source, inputs)}, atol=1e-5, rtol=1e-4)
    profile = dataclasses.replace(
        hand_profile(facts),
        batches=(BatchProfile(1, peak_bytes, 10.0, 20.0), BatchProfile(8, peak_bytes, 15.0, 30.0)),
        golden=golden,
    )
    options = PipelineOptions(
        hardware_classes=hardware_classes or (this_hardware_class(),), min_onnxruntime_version=min_onnxruntime
    )
    [variant] = publish_model(
        kit.registry, kit.keys, name, version, (VariantSubmission("fp32", facts, profile),), options
    )
    custom = variant.custom
    return Published(name, version, "fp32", variant.target_path, str(custom["encryption"]["key_id"]), path)


def grant(kit: RegistryKit, published: Published, node_id: str, node_public: bytes) -> KeyGrant:
    """The content key of ``published`` wrapped to a node, as the region would grant it."""
    key = kit.registry.database.content_key(published.key_id)
    return wrap_key(key, node_public, node_id, published.target_path, published.key_id)


def assignment(kit: RegistryKit, published: Published, node_id: str, node_public: bytes) -> Assignment:
    """The assignment of ``published`` to a node."""
    return Assignment(
        published.name,
        published.version,
        published.variant,
        published.target_path,
        grant(kit, published, node_id, node_public),
    )


@dataclass
class UpdaterNode:
    """A node's state directory, keys, store, fetcher, cache and updater."""

    node_id: str
    state: Path
    keys: NodeKeys
    store: InstalledStore
    fetcher: ModelFetcher
    cache: ModelCache
    updater: Updater
    pool: RunPool

    async def close(self) -> None:
        """Drains the cache and stops the run pool."""
        await self.cache.close()
        self.pool.close()


def build_node(
    state: Path,
    source: ArtifactSource,
    trusted_root: bytes,
    node_id: str = "device-1",
    budget: int = 1 << 34,
    hardware_class: str = "",
    onnxruntime_version: str = "",
    free_disk: int = 1 << 40,
    on_state: Any = None,
    on_failure: Any = None,
    **cache_options: Any,
) -> UpdaterNode:
    """Builds a node's update machinery over ``state`` (keys are created on first use)."""
    keys = FileKeyProvider(state / "keys").keys()
    store = InstalledStore(state / "installed")
    fetcher = ModelFetcher(source, trusted_root, state / "tuf", "test source")
    pool = RunPool(2)
    cache = ModelCache(
        store.repository(),
        pool,
        BatchingConfig(),
        budget,
        opener=store.opener(node_id, keys.agreement),
        **cache_options,
    )
    updater = Updater(
        node_id,
        keys,
        fetcher,
        store,
        cache,
        budget,
        hardware_class or this_hardware_class(),
        onnxruntime_version or ort.__version__,
        lambda: free_disk,
        backoff=Backoff(initial_s=0.0, max_s=0.0),
        on_state=on_state,
        on_failure=on_failure,
    )
    return UpdaterNode(node_id, state, keys, store, fetcher, cache, updater, pool)


async def apply(node: UpdaterNode, *assignments: Assignment) -> list[InstalledModel]:
    """Applies assignments on a node and returns what it would report at check-in."""
    await node.updater.apply(assignments)
    return node.updater.installed()


def assigned_version(node: UpdaterNode, name: str) -> str:
    """The version of the model's latest journalled assignment."""
    entry = node.updater.journal.read(name)
    return entry.assignment.version if entry else ""


def model_plaintexts(files: Path) -> list[bytes]:
    """Every ONNX file the tests built (the plaintexts that must never be on a node's disk)."""
    return [p.read_bytes() for p in sorted(files.glob("*.onnx"))]


def plaintext_leaks(state: Path, plaintexts: list[bytes]) -> list[str]:
    """Files under ``state`` holding a model plaintext, a large piece of one, or looking like an ONNX model."""
    leaks = []
    digests = {hashlib.sha256(p).hexdigest() for p in plaintexts}
    needles = [p[len(p) // 2 : len(p) // 2 + 64] for p in plaintexts if len(p) > 256]
    for file in sorted(p for p in state.rglob("*") if p.is_file()):
        data = file.read_bytes()
        if (
            hashlib.sha256(data).hexdigest() in digests
            or any(n in data for n in needles)
            or b"edgecascade-tests" in data  # the ONNX producer name of every test model
        ):
            leaks.append(str(file.relative_to(state)))
    return leaks


def copy_state(source: Path, target: Path) -> Path:
    """A copy of a node's state directory (keys keep their modes)."""
    shutil.copytree(source, target, symlinks=True)
    return target


def serving_versions(node: UpdaterNode, name: str) -> list[str]:
    """The versions of ``name`` loaded in the cache."""
    return sorted(m.version for m in node.cache.loaded() if m.name == name)
