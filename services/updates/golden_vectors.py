"""Golden vectors: inputs of a model variant and the exact outputs it gave for them at publish.

The region records them when it profiles a variant and signs them as a target
of their own; a node that installs the variant runs them and compares, within
the signed tolerance, before the variant may serve.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from services.errors import InvalidArgumentError
from services.tensors import DATATYPES, datatype_of


@dataclass(frozen=True)
class GoldenVectors:
    """Inputs and the exact outputs the variant produced for them, with the tolerance a device applies."""

    inputs: dict[str, np.ndarray[Any, Any]]
    outputs: dict[str, np.ndarray[Any, Any]]
    atol: float = 1e-4
    rtol: float = 1e-3

    def to_json(self) -> dict[str, Any]:
        """JSON-ready form (the golden-vectors target's content)."""

        def tensors(arrays: Mapping[str, np.ndarray[Any, Any]]) -> dict[str, Any]:
            return {
                name: {"datatype": datatype_of(a), "shape": list(a.shape), "data": a.reshape(-1).tolist()}
                for name, a in arrays.items()
            }

        return {"inputs": tensors(self.inputs), "outputs": tensors(self.outputs), "atol": self.atol, "rtol": self.rtol}

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> GoldenVectors:
        """Parses :meth:`to_json` output.

        Raises:
            InvalidArgumentError: The data is malformed.
        """

        def tensors(items: Mapping[str, Any]) -> dict[str, np.ndarray[Any, Any]]:
            out = {}
            for name, t in items.items():
                out[name] = np.asarray(t["data"], dtype=DATATYPES[t["datatype"]].dtype).reshape(t["shape"])
            return out

        try:
            return cls(tensors(data["inputs"]), tensors(data["outputs"]), float(data["atol"]), float(data["rtol"]))
        except (KeyError, TypeError, ValueError) as exc:
            raise InvalidArgumentError(f"golden vectors are malformed: {exc}") from None
