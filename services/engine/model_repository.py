"""The model repository on disk.

Layout::

    <repo>/<model>/<version>/model.onnx
    <repo>/<model>/<version>/metadata.json

Versions are positive integers; the newest is the largest. ``metadata.json``
holds what the server needs before loading the file: platform, max batch size,
task (``char-lm`` for the demo generators) and, for generators, the tokenizer.
A version directory appears atomically: it is written under a temporary name,
fsynced and renamed into place, so a reader never sees half a model.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from services.atomic_files import fsync_directory, fsync_file
from services.errors import InvalidArgumentError, ModelNotFoundError, PreconditionError

MODEL_FILE = "model.onnx"
METADATA_FILE = "metadata.json"
PLATFORM = "onnxruntime_onnx"
DEFAULT_MAX_BATCH_SIZE = 64

_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,127}")


def check_model_name(name: str) -> str:
    """Returns ``name`` if it is a safe model name.

    Raises:
        InvalidArgumentError: The name is empty, too long, or could escape the repository.
    """
    if not _NAME.fullmatch(name) or ".." in name:
        raise InvalidArgumentError(
            f"model name {name!r} is not valid: use 1-128 letters, digits, '_', '.' or '-', "
            "starting with a letter or digit"
        )
    return name


def _is_version(text: str) -> bool:
    # ASCII only: str.isdigit() also accepts "¹", which int() refuses.
    return text.isascii() and text.isdigit() and not text.startswith("0")


def check_version(version: str) -> str:
    """Returns ``version`` if it is a positive integer written without leading zeros.

    Raises:
        InvalidArgumentError: It is not.
    """
    if not _is_version(version):
        raise InvalidArgumentError(f"model version {version!r} is not valid: versions are positive integers")
    return version


@dataclass(frozen=True)
class ModelEntry:
    """One model version in the repository."""

    name: str
    version: str
    path: Path
    platform: str = PLATFORM
    max_batch_size: int = DEFAULT_MAX_BATCH_SIZE
    task: str = ""
    properties: dict[str, str] = field(default_factory=dict)

    @property
    def model_file(self) -> Path:
        """The ONNX file of this version."""
        return self.path / MODEL_FILE


class ModelRepository:
    """Reads and writes a model repository directory.

    Args:
        root: The repository directory; created if missing.
    """

    def __init__(self, root: Path) -> None:
        self.root = root
        self.root.mkdir(parents=True, exist_ok=True)

    def entries(self) -> list[ModelEntry]:
        """Returns every model version, sorted by name then version; skips incomplete directories."""
        found: list[ModelEntry] = []
        for model_dir in sorted(p for p in self.root.iterdir() if p.is_dir() and _NAME.fullmatch(p.name)):
            for version_dir in sorted(
                (p for p in model_dir.iterdir() if p.is_dir() and _is_version(p.name)), key=lambda p: int(p.name)
            ):
                entry = self._read(model_dir.name, version_dir)
                if entry is not None:
                    found.append(entry)
        return found

    def names(self) -> list[str]:
        """Returns the names of the models that have at least one complete version."""
        return sorted({e.name for e in self.entries()})

    def versions(self, name: str) -> list[ModelEntry]:
        """Returns the complete versions of one model, oldest first (empty if none)."""
        model_dir = self.root / name
        if not _NAME.fullmatch(name) or not model_dir.is_dir():
            return []
        versions = [self._read(name, p) for p in model_dir.iterdir() if p.is_dir() and _is_version(p.name)]
        return sorted((e for e in versions if e is not None), key=lambda e: int(e.version))

    def resolve(self, name: str, version: str = "") -> ModelEntry:
        """Returns the requested version, or the newest when ``version`` is empty.

        Raises:
            InvalidArgumentError: The name or version is not valid at all.
            ModelNotFoundError: The model or version is not in this repository.
        """
        check_model_name(name)
        if version:
            check_version(version)
        versions = self.versions(name)
        if not versions:
            raise ModelNotFoundError(f"model '{name}' is not in this repository")
        if not version:
            return versions[-1]
        for entry in versions:
            if entry.version == version:
                return entry
        have = ", ".join(e.version for e in versions)
        raise ModelNotFoundError(f"model '{name}' has no version {version!r} here (have: {have})")

    def add(self, name: str, source: Path, version: str = "", properties: dict[str, str] | None = None) -> ModelEntry:
        """Copies an ONNX file into the repository as a new version, atomically.

        The task and tokenizer are taken from the file's ONNX metadata
        (``edgecascade.*`` properties) unless ``properties`` overrides them.

        Args:
            name: Model name.
            source: The ``.onnx`` file to copy.
            version: Version to create; the next free integer when empty.
            properties: Extra string properties stored in ``metadata.json``.

        Returns:
            The new entry.

        Raises:
            InvalidArgumentError: Bad name or version, or the source is not a readable file.
            PreconditionError: That version already exists.
        """
        check_model_name(name)
        existing = self.versions(name)
        if not version:
            version = str(int(existing[-1].version) + 1) if existing else "1"
        check_version(version)
        target = self.root / name / version
        if target.exists():
            raise PreconditionError(f"model '{name}' version {version} already exists in {self.root}")
        if not source.is_file():
            raise InvalidArgumentError(f"{source} is not a file")
        props = read_onnx_properties(source)
        props.update(properties or {})
        metadata = {
            "name": name,
            "version": version,
            "platform": PLATFORM,
            "max_batch_size": DEFAULT_MAX_BATCH_SIZE,
            "task": props.pop("edgecascade.task", ""),
            "sha256": _sha256(source),
            "properties": props,
        }
        (self.root / name).mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{version}.", dir=self.root / name))
        try:
            shutil.copyfile(source, staging / MODEL_FILE)
            (staging / METADATA_FILE).write_text(json.dumps(metadata, indent=2, sort_keys=True) + "\n")
            for path in (staging / MODEL_FILE, staging / METADATA_FILE):
                fsync_file(path)
            os.replace(staging, target)
            fsync_directory(self.root / name)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
        entry = self._read(name, target)
        assert entry is not None  # just written
        return entry

    def _read(self, name: str, version_dir: Path) -> ModelEntry | None:
        meta_path = version_dir / METADATA_FILE
        if not (version_dir / MODEL_FILE).is_file() or not meta_path.is_file():
            return None
        try:
            meta: dict[str, Any] = json.loads(meta_path.read_text())
        except (OSError, ValueError):
            return None
        return ModelEntry(
            name=name,
            version=version_dir.name,
            path=version_dir,
            platform=str(meta.get("platform", PLATFORM)),
            max_batch_size=int(meta.get("max_batch_size", DEFAULT_MAX_BATCH_SIZE)),
            task=str(meta.get("task", "")),
            properties={str(k): str(v) for k, v in dict(meta.get("properties", {})).items()},
        )


def read_onnx_properties(path: Path) -> dict[str, str]:
    """Returns the ``edgecascade.*`` metadata properties stored in an ONNX file.

    Raises:
        InvalidArgumentError: The file is not an ONNX model onnxruntime can read.
    """
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    try:
        session = ort.InferenceSession(str(path), sess_options=options, providers=["CPUExecutionProvider"])
    except Exception as exc:  # onnxruntime raises several unrelated types for a bad file
        raise InvalidArgumentError(f"{path.name} is not an ONNX model onnxruntime can load") from exc
    meta = session.get_modelmeta().custom_metadata_map
    return {k: v for k, v in meta.items() if k.startswith("edgecascade.")}


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()
