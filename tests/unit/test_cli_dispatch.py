"""The CLI dispatches by a table: every verb is bound to its handler where it is declared (issue 7 #12)."""

from __future__ import annotations

import argparse
import json
from collections.abc import Iterator
from pathlib import Path

import pytest

from edgecascade import __main__ as cli
from edgecascade import model_commands
from tests.support.registry import new_registry

Leaf = tuple[tuple[str, ...], argparse.ArgumentParser]


def _leaves(parser: argparse.ArgumentParser, path: tuple[str, ...] = ()) -> Iterator[Leaf]:
    subcommands = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    if not subcommands:
        yield path, parser
        return
    for action in subcommands:
        for name, child in action.choices.items():
            yield from _leaves(child, (*path, name))


def test_every_leaf_command_has_a_handler() -> None:
    leaves = dict(_leaves(cli._parser()))
    assert {("up",), ("status",), ("repo", "add"), ("repo", "demo"), ("model", "publish")} <= set(leaves)
    missing = [" ".join(path) for path, parser in leaves.items() if not callable(parser.get_default("handler"))]
    assert missing == []


def test_the_new_model_verbs_are_declared_with_their_handlers() -> None:
    leaves = dict(_leaves(cli._parser()))
    assert leaves[("model", "resign-targets")].get_default("handler").__wrapped__ is model_commands.resign_targets
    assert leaves[("model", "rotate-root")].get_default("handler").__wrapped__ is model_commands.rotate_root


def test_a_verb_declared_without_a_handler_is_an_error_not_repo_add(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    declared = cli._parser

    def with_an_orphan() -> argparse.ArgumentParser:
        parser = declared()
        sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
        sub.add_parser("orphan", help="a verb someone forgot to wire")
        return parser

    monkeypatch.setattr(cli, "_parser", with_an_orphan)
    with pytest.raises(SystemExit) as exited:
        cli.main(["orphan"])
    assert exited.value.code == 2
    assert "no handler for 'orphan'" in capsys.readouterr().err


def test_resign_targets_and_rotate_root_run_from_the_command_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    kit = new_registry(tmp_path)
    registry, keys = str(kit.registry.directory), str(kit.key_dir)
    metadata = kit.registry.repository.metadata_dir
    kit.registry.close()
    assert cli.main(["model", "resign-targets", "--registry", registry, "--keys", keys]) == 0
    assert "re-signed targets: version 2" in capsys.readouterr().out
    timestamp = json.loads((metadata / "timestamp.json").read_bytes())["signed"]
    assert timestamp["version"] == 2
    rotate = ["model", "rotate-root", "--registry", registry, "--keys", keys]
    assert cli.main([*rotate, "--root-key-count", "2", "--root-threshold", "2"]) == 0
    out = capsys.readouterr().out
    assert "root version 2" in out and "threshold 2 of 2" in out
    root = json.loads((metadata / "2.root.json").read_bytes())["signed"]
    assert root["roles"]["root"]["threshold"] == 2 and len(root["roles"]["root"]["keyids"]) == 2
    assert sorted(p.name for p in kit.key_dir.glob("root-*.pem")) == ["root-2.pem", "root-3.pem"]
    # Refused with a message and exit code 2 when the root keys are not there.
    empty = tmp_path / "no-root-keys"
    empty.mkdir()
    assert cli.main([*rotate, "--root-keys-dir", str(empty)]) == 2
    assert "needs 2 of its 2 root keys" in capsys.readouterr().out
    assert not (metadata / "3.root.json").exists()


def test_rotate_root_help_says_what_keys_is_for_there() -> None:
    """rotate-root never loads targets.pem or online.pem: --keys only stands in for --root-keys-dir."""
    leaves = dict(_leaves(cli._parser()))
    keys = next(a for a in leaves[("model", "rotate-root")]._actions if "--keys" in a.option_strings)
    assert keys.help is not None and "root keys" in keys.help and "targets.pem" not in keys.help
