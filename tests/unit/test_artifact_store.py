"""Artifact paths: only plain relative paths under metadata/ or targets/ reach the file system."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from services.errors import ArtifactNotFoundError, InvalidArgumentError
from services.updates.artifact_store import ArtifactDirectory, check_artifact_path


@pytest.mark.parametrize(
    "path",
    [
        "",
        "../registry.sqlite",
        "metadata/../../keys/online.pem",
        "targets/models/../../../etc/passwd",
        "/etc/passwd",
        "metadata//timestamp.json",
        "metadata/./timestamp.json",
        "metadata\\timestamp.json",
        "registry.sqlite",
        "keys/online.pem",
        "metadata",
        "targets/a b",
        "metadata/timestamp.json\x00",
        "metadata/timestamp.json\n",
        "targets/models/lm/1/ab.int8\n",
        "metadata/timestamp.json\nmetadata",
        "x" * 2000,
    ],
)
def test_unsafe_paths_are_invalid(path: str) -> None:
    with pytest.raises(InvalidArgumentError, match="expected a relative path under metadata/ or targets/"):
        check_artifact_path(path)


@pytest.mark.parametrize("path", ["metadata/timestamp.json", "metadata/3.snapshot.json", "targets/models/lm/1/ab.int8"])
def test_plain_paths_are_accepted(path: str) -> None:
    assert check_artifact_path(path) == path


async def test_the_directory_serves_files_inside_it_only(tmp_path: Path) -> None:
    root = tmp_path / "repository"
    (root / "metadata").mkdir(parents=True)
    (root / "metadata" / "timestamp.json").write_text("{}")
    (tmp_path / "secret.pem").write_text("key")
    os.symlink(tmp_path / "secret.pem", root / "metadata" / "escape.json")
    store = ArtifactDirectory(root)
    assert (await store.open("metadata/timestamp.json")).read_text() == "{}"
    with pytest.raises(ArtifactNotFoundError, match=r"no artifact at metadata/1\.root\.json"):
        await store.open("metadata/1.root.json")
    with pytest.raises(ArtifactNotFoundError):
        await store.open("metadata/escape.json")
    with pytest.raises(InvalidArgumentError):
        await store.open("metadata/../../secret.pem")
