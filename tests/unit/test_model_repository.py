"""The on-disk model repository."""

from __future__ import annotations

from pathlib import Path

import pytest

from services.engine.model_repository import METADATA_FILE, MODEL_FILE, ModelRepository
from services.errors import InvalidArgumentError, ModelNotFoundError, PreconditionError
from tests.support.onnx_models import linear_model, tiny_char_lm


def test_add_creates_versions_and_reads_task_from_onnx_metadata(tmp_path: Path) -> None:
    repo = ModelRepository(tmp_path / "repo")
    first = repo.add("lm", tiny_char_lm(tmp_path / "lm.onnx"))
    second = repo.add("lm", tiny_char_lm(tmp_path / "lm2.onnx", seed=1))
    assert (first.version, second.version) == ("1", "2")
    assert first.task == "char-lm"
    assert "edgecascade.vocab" in first.properties
    assert (first.path / MODEL_FILE).is_file() and (first.path / METADATA_FILE).is_file()
    assert repo.resolve("lm").version == "2"
    assert repo.resolve("lm", "1").version == "1"
    assert repo.names() == ["lm"]


def test_resolve_errors(tmp_path: Path) -> None:
    repo = ModelRepository(tmp_path)
    repo.add("m", linear_model(tmp_path / "m.onnx"))
    with pytest.raises(ModelNotFoundError, match="not in this repository"):
        repo.resolve("other")
    with pytest.raises(ModelNotFoundError, match="no version '7'"):
        repo.resolve("m", "7")


@pytest.mark.parametrize("name", ["", "../escape", "a/b", ".hidden", "x" * 200, "trailing\n", "m\n"])
def test_unsafe_names_are_refused(tmp_path: Path, name: str) -> None:
    with pytest.raises(InvalidArgumentError):
        ModelRepository(tmp_path).add(name, linear_model(tmp_path / "m.onnx"))


def test_duplicate_version_and_bad_files_leave_nothing_behind(tmp_path: Path) -> None:
    repo = ModelRepository(tmp_path / "repo")
    model = linear_model(tmp_path / "m.onnx")
    repo.add("m", model, version="3")
    with pytest.raises(PreconditionError, match="already exists"):
        repo.add("m", model, version="3")
    junk = tmp_path / "junk.onnx"
    junk.write_bytes(b"not a model")
    with pytest.raises(InvalidArgumentError, match="not an ONNX model"):
        repo.add("m", junk)
    with pytest.raises(InvalidArgumentError, match="positive integers"):
        repo.add("m", model, version="01")
    for bad in ("¹", "٣", "3\n"):
        with pytest.raises(InvalidArgumentError, match="versions are positive integers"):
            repo.add("m", model, version=bad)
    assert [e.version for e in repo.versions("m")] == ["3"]
    assert sorted(p.name for p in (tmp_path / "repo" / "m").iterdir()) == ["3"]
    (tmp_path / "repo" / "m" / "¹").mkdir()  # made by hand: listing skips it instead of failing on int()
    assert [e.version for e in repo.versions("m")] == ["3"]
    assert [e.version for e in repo.entries()] == ["3"]


def test_incomplete_version_directories_are_invisible(tmp_path: Path) -> None:
    repo = ModelRepository(tmp_path)
    repo.add("m", linear_model(tmp_path / "m.onnx"))
    (tmp_path / "m" / "2").mkdir()
    (tmp_path / "m" / "2" / MODEL_FILE).write_bytes(b"half")
    assert [e.version for e in repo.versions("m")] == ["1"]
