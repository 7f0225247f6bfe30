"""Where the demo models live and which tier gets which.

The demo models are built by ``python -m examples.charlm.train`` and committed
under ``examples/models``; nothing is trained or downloaded at run time.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from services.engine.model_repository import ModelRepository
from services.errors import ConfigError

DEFAULT_MODELS_DIR = Path(__file__).resolve().parents[1] / "examples" / "models"

DEVICE_MODEL = "charlm-device"
EDGE_MODEL = "charlm-edge"


@dataclass(frozen=True)
class Placement:
    """One model file placed into one role's repository under a model name."""

    role: str
    name: str
    file: str


PLACEMENTS = (
    Placement("device", DEVICE_MODEL, "charlm-device.int8.onnx"),
    Placement("edge", EDGE_MODEL, "charlm-edge.onnx"),
    Placement("region", DEVICE_MODEL, "charlm-device.onnx"),
    Placement("region", EDGE_MODEL, "charlm-edge.onnx"),
)


def demo_file(models_dir: Path, placement: Placement) -> Path:
    """Returns the file of a placement.

    Raises:
        ConfigError: The file is not there (e.g. edgecascade was installed without its examples).
    """
    path = models_dir / placement.file
    if not path.is_file():
        raise ConfigError(
            f"demo model {path} not found; run from a checkout of edgecascade or pass --models-dir "
            "(rebuild with: python -m examples.charlm.train --size all --out examples/models)"
        )
    return path


def place_demo_models(repository: Path, role: str, models_dir: Path = DEFAULT_MODELS_DIR) -> list[Placement]:
    """Adds the demo models meant for ``role`` to a repository, unless already there.

    Returns:
        The placements made (empty when everything was already placed).

    Raises:
        ConfigError: Unknown role or a missing demo model file.
    """
    roles = {p.role for p in PLACEMENTS}
    if role not in roles:
        raise ConfigError(f"unknown role {role!r}; expected one of {', '.join(sorted(roles))}")
    repo = ModelRepository(repository)
    placed = []
    for placement in PLACEMENTS:
        if placement.role == role and not repo.versions(placement.name):
            repo.add(placement.name, demo_file(models_dir, placement))
            placed.append(placement)
    return placed
