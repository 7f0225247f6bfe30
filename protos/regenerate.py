"""Regenerates the committed Python code for every ``.proto`` under ``protos/``.

Run from the repository root: ``python -m protos.regenerate``. protoc runs with
the repository root as its only include path, so a file at
``protos/inference/grpc_service.proto`` becomes the module
``protos.inference.grpc_service_pb2`` and generated imports need no rewriting.
The generator is ``grpcio-tools``, pinned exactly in ``pyproject.toml`` so that
the byte-for-byte check in the test suite is meaningful.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
PROTO_ROOT = REPO_ROOT / "protos"


def proto_files() -> list[Path]:
    """Returns every ``.proto`` file under ``protos/``, sorted, relative to the repo root."""
    return sorted(p.relative_to(REPO_ROOT) for p in PROTO_ROOT.rglob("*.proto"))


def generate(out_dir: Path) -> None:
    """Generates ``_pb2.py``, ``_pb2.pyi`` and ``_pb2_grpc.py`` files into ``out_dir``.

    Args:
        out_dir: Directory that receives the generated tree (``out_dir/protos/...``).

    Raises:
        RuntimeError: protoc reported an error.
    """
    from grpc_tools import protoc  # dev-only dependency; imported on use

    out_dir.mkdir(parents=True, exist_ok=True)
    args = [
        "grpc_tools.protoc",
        f"-I{REPO_ROOT}",
        f"--python_out={out_dir}",
        f"--pyi_out={out_dir}",
        f"--grpc_python_out={out_dir}",
        *(str(REPO_ROOT / p) for p in proto_files()),
    ]
    if protoc.main(args) != 0:
        raise RuntimeError("protoc failed; see its messages above")


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point; regenerates into the repository by default."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=REPO_ROOT, help="output root (default: the repository)")
    ns = parser.parse_args(argv)
    generate(ns.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
