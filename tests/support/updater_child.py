"""A node process for the updater's crash tests: ``python -m tests.support.updater_child …``.

``apply``: runs the updater on an assignment and SIGKILLs itself when the journal
reaches ``--kill-at`` (right after that state is durable), or — with
``--kill-at downloading-partial`` — after the first chunk of the model's blob
has been written to staging.

``recover``: starts like a node after a crash — :meth:`Updater.recover` without
resuming — and reports what serves; then resumes the unfinished update and
reports again (JSON to ``--report``).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from services.errors import ArtifactNotFoundError
from services.updates.update_journal import Assignment, UpdateState
from tests.support.updater_node import PROBE, UpdaterNode, build_node, serving_versions

PARTIAL = "downloading-partial"


class Source:
    """The registry's repository directory as an artifact source, in 1000-byte chunks; records blob offsets."""

    def __init__(self, root: Path, kill_after_first_blob_chunk: bool) -> None:
        self.root = root
        self.kill = kill_after_first_blob_chunk
        self.blob_offsets: list[int] = []

    def fetch(self, path: str, offset: int = 0) -> Iterator[bytes]:
        file = self.root / path
        if ".." in path.split("/") or not file.is_file():
            raise ArtifactNotFoundError(f"no artifact at {path}")
        blob = path.startswith("targets/models/") and not path.endswith(".golden.json")
        if blob:
            self.blob_offsets.append(offset)
        data = file.read_bytes()[offset:]
        for start in range(0, len(data), 1000):
            yield data[start : start + 1000]
            if blob and self.kill:
                # The first chunk was handed to the staging file's writer (not necessarily to the OS yet).
                os.kill(os.getpid(), signal.SIGKILL)


def _kill_at(target: str) -> Any:
    def hook(state: UpdateState, assignment: Assignment) -> None:
        if state.value == target:
            os.kill(os.getpid(), signal.SIGKILL)

    return hook


async def _snapshot(node: UpdaterNode) -> dict[str, Any]:
    loaded = serving_versions(node, "lm")
    model = await node.cache.get("lm")
    answer = (await node.cache.run(model, PROBE))["probs"]
    committed = node.store.committed("lm")
    return {
        "loaded": loaded,
        "answered_by": model.version,
        "answer": np.asarray(answer).tolist(),
        "committed": committed.version if committed else "",
        "installed": [[m.version, m.state, m.last_error] for m in node.updater.installed()],
    }


async def run(node: UpdaterNode, assignment: Assignment | None) -> dict[str, Any]:
    """Applies ``assignment`` (expecting to be killed), or recovers and resumes and says what served."""
    try:
        if assignment is not None:
            await node.updater.recover(resume=False)
            await node.updater.apply([assignment])
            return {}
        await node.updater.recover(resume=False)
        recovered = await _snapshot(node)
        await node.updater.resume()
        return {"recovered": recovered, "resumed": await _snapshot(node)}
    finally:
        await node.close()


def main(args: argparse.Namespace) -> int:
    staging = Path(args.state) / "tuf" / "staging"
    partial = sorted(p.stat().st_size for p in staging.glob("*.part")) if staging.is_dir() else []
    source = Source(Path(args.repo), args.kill_at == PARTIAL)
    hook = _kill_at(args.kill_at) if args.kill_at and args.kill_at != PARTIAL else None
    node = build_node(Path(args.state), source, Path(args.root).read_bytes(), on_state=hook)
    if args.command == "apply":
        assignment = Assignment.from_json(json.loads(Path(args.assignment).read_text()))
        asyncio.run(run(node, assignment))
        return 3  # the kill did not happen
    report = asyncio.run(run(node, None))
    report["blob_offsets"] = source.blob_offsets
    report["partial_sizes"] = partial
    Path(args.report).write_text(json.dumps(report))
    return 0


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("command", choices=["apply", "recover"])
    parser.add_argument("--state", required=True)
    parser.add_argument("--repo", required=True)
    parser.add_argument("--root", required=True)
    parser.add_argument("--assignment", default="")
    parser.add_argument("--kill-at", default="")
    parser.add_argument("--report", default="")
    raise SystemExit(main(parser.parse_args()))
