"""Registries the tests build: keys in a temp dir, tiny models, profiles made by hand (no subprocess).

``DirectorySource`` is the network edge for tests that need no sockets: it
streams files of a repository directory the way the artifact service does,
and counts what it was asked for.
"""

from __future__ import annotations

import sqlite3
import threading
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path

import numpy as np

from services.errors import ArtifactNotFoundError, UpstreamUnavailableError
from services.updates.golden_vectors import GoldenVectors
from tests.support.onnx_models import tiny_char_lm
from tier2_region.registry.model_inspection import ModelFacts, inspect_model
from tier2_region.registry.pipeline import PipelineOptions, publish_model
from tier2_region.registry.profiles import BatchProfile, VariantProfile
from tier2_region.registry.quantization import quantize
from tier2_region.registry.registry import ModelRegistry, PublishedVariant, VariantSubmission
from tier2_region.registry.signing_keys import SigningKeys, generate_keys, load_keys
from tier2_region.registry.tuf_repository import ExpiryPolicy

VOCAB = ["", "", *"abcdefghijklmnopqrstuvwxyz .,"]


@dataclass
class FakeClock:
    """A UTC clock the test moves by hand."""

    now: datetime = field(default_factory=lambda: datetime(2030, 1, 1, tzinfo=UTC))

    def __call__(self) -> datetime:
        return self.now

    def advance(self, delta: timedelta) -> None:
        self.now += delta


@dataclass
class RegistryKit:
    """A registry with its keys."""

    registry: ModelRegistry
    keys: SigningKeys
    key_dir: Path
    files: Path


def new_registry(tmp: Path, clock: FakeClock | None = None, expiry: ExpiryPolicy | None = None) -> RegistryKit:
    """Generates dev keys and creates an empty registry under ``tmp``."""
    key_dir = tmp / "keys"
    generate_keys(key_dir)
    registry = ModelRegistry(tmp / "registry", expiry, clock or (lambda: datetime.now(UTC)))
    registry.create(load_keys(key_dir, key_dir), 1, key_dir, key_dir)
    return RegistryKit(registry, load_keys(key_dir), key_dir, tmp / "files")


def hand_profile(facts: ModelFacts, accuracy: float = 0.5, reference: float = 0.5) -> VariantProfile:
    """A profile with plausible numbers, made without measuring (unit tests of the registry itself)."""
    golden_in = {facts.signature.inputs[0].name: np.zeros((1, 4), dtype=np.int64)}
    golden_out = {facts.signature.outputs[0].name: np.full((1, len(VOCAB)), 1 / len(VOCAB), dtype=np.float32)}
    return VariantProfile(
        file_sha256=facts.sha256,
        file_bytes=facts.size,
        signature=facts.signature,
        opset=facts.opset,
        load_time_ms=3.0,
        batches=(BatchProfile(1, 10_000_000, 10.0, 20.0), BatchProfile(8, 12_000_000, 15.0, 30.0)),
        metric="next_char_top1",
        accuracy=accuracy,
        reference_accuracy=reference,
        agreement=0.99,
        validation_size=100,
        validation_source="hand-made",
        confidence_threshold=0.25,
        target_accuracy=0.8,
        onnxruntime_version="1.32.0",
        machine="linux-x86_64",
        intra_op_threads=1,
        golden=GoldenVectors(golden_in, golden_out),
    )


def lm_variants(files: Path, seed: int = 0) -> dict[str, Path]:
    """An fp32 tiny char-LM and its int8 variant."""
    fp32 = tiny_char_lm(files / f"lm-{seed}.onnx", vocab=VOCAB, seed=seed)
    return {"fp32": fp32, "int8": quantize(fp32, files / f"lm-{seed}.int8.onnx")}


def submissions(files: dict[str, Path], int8_accuracy: float = 0.5) -> tuple[VariantSubmission, ...]:
    """Submissions with hand-made profiles (fp32 reference at 50 %)."""
    out = []
    for variant, path in files.items():
        facts = inspect_model(path)
        accuracy = 0.5 if variant == "fp32" else int8_accuracy
        out.append(VariantSubmission(variant, facts, hand_profile(facts, accuracy, 0.5)))
    return tuple(out)


def publish_lm(kit: RegistryKit, name: str = "lm", version: str = "1", seed: int = 0) -> list[PublishedVariant]:
    """Publishes fp32 and int8 of a tiny char-LM with hand-made profiles."""
    return publish_model(
        kit.registry, kit.keys, name, version, submissions(lm_variants(kit.files, seed)), PipelineOptions()
    )


def tree(root: Path) -> dict[str, bytes]:
    """Every file under ``root`` with its content, and the registry database's rows (to show nothing changed).

    SQLite's own files are compared by content dump, not by bytes: its
    write-ahead log and shared-memory index change on every transaction.
    """
    files = {
        str(p.relative_to(root)): p.read_bytes()
        for p in sorted(root.rglob("*"))
        if p.is_file() and not p.name.startswith("registry.sqlite")
    }
    database = root / "registry.sqlite"
    if database.is_file():
        with sqlite3.connect(database) as db:
            files["registry.sqlite (dump)"] = "\n".join(db.iterdump()).encode()
    return files


class DirectorySource:
    """An artifact source over a repository directory, as the artifact service would serve it.

    Args:
        root: The repository directory.
    """

    def __init__(self, root: Path) -> None:
        self.root = root
        self.requests: Counter[str] = Counter()
        self.down = False
        self._lock = threading.Lock()

    def fetch(self, path: str, offset: int = 0) -> Iterator[bytes]:
        with self._lock:
            self.requests[path] += 1
        if self.down:
            raise UpstreamUnavailableError("upstream test-source is unavailable")
        file = self.root / path
        if ".." in path.split("/") or not file.is_file():
            raise ArtifactNotFoundError(f"no artifact at {path}")
        data = file.read_bytes()[offset:]
        for start in range(0, len(data), 1000):
            yield data[start : start + 1000]
