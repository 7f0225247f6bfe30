"""How the requests of one batch become one model run, and its outputs their answers.

Requests share a run only along the leading (batch) axis: every input of a
request has the same first dimension (its rows), and requests are merged only
when their inputs agree in names, dtypes and every dimension after the first
(their :func:`signature_of`). Inputs are concatenated in batch order; each output
is sliced back in the same order, ``rows`` at a time, and filtered to the
outputs the request asked for (all when it named none). A batch of one is
passed through without copying.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from typing import Any, Protocol

import numpy as np

from services.errors import InvalidArgumentError

Arrays = dict[str, np.ndarray[Any, Any]]


class Part(Protocol):
    """What merging and splitting read of one request in a batch."""

    @property
    def inputs(self) -> Mapping[str, np.ndarray[Any, Any]]:
        """Its inputs."""

    @property
    def outputs(self) -> tuple[str, ...]:
        """The outputs it wants (all when empty)."""

    @property
    def rows(self) -> int:
        """Its rows along the batch axis."""


def rows_of(inputs: Mapping[str, np.ndarray[Any, Any]]) -> int:
    """The rows of a request (its first dimension; 1 for a request without inputs).

    Raises:
        InvalidArgumentError: The inputs disagree on the first dimension, or one is a scalar.
    """
    first = next(iter(inputs.values()), None)
    rows = int(first.shape[0]) if first is not None and first.ndim else 1
    if any(v.ndim == 0 or v.shape[0] != rows for v in inputs.values()):
        sizes = ", ".join(f"'{k}': {v.shape[0] if v.ndim else 'scalar'}" for k, v in inputs.items())
        raise InvalidArgumentError(f"every input must have the same batch size (first dimension); got {sizes}")
    return rows


def signature_of(inputs: Mapping[str, np.ndarray[Any, Any]]) -> tuple[Any, ...]:
    """What two requests must share to be merged: names, dtypes and shapes after the batch axis."""
    return tuple(sorted((k, v.dtype.str, v.shape[1:]) for k, v in inputs.items()))


def whole_signature_of(inputs: Mapping[str, np.ndarray[Any, Any]]) -> tuple[Any, ...]:
    """Names, dtypes and whole shapes: what a run of one request that is never merged depends on."""
    return tuple(sorted((k, v.dtype.str, v.shape) for k, v in inputs.items()))


def merge_inputs(batch: Sequence[Part]) -> Mapping[str, np.ndarray[Any, Any]]:
    """The inputs of one run: each input concatenated over ``batch`` in order (a lone request's as they are)."""
    if len(batch) == 1:
        return batch[0].inputs
    return {name: np.concatenate([r.inputs[name] for r in batch]) for name in batch[0].inputs}


def split_outputs(outputs: Mapping[str, np.ndarray[Any, Any]], batch: Sequence[Part]) -> Iterator[Arrays]:
    """Yields each request's answer from the outputs of the run of ``batch``, in batch order."""
    whole = len(batch) == 1
    offset = 0
    for request in batch:
        wanted = request.outputs
        end = offset + request.rows
        yield {
            name: (value if whole else value[offset:end])
            for name, value in outputs.items()
            if not wanted or name in wanted
        }
        offset = end
