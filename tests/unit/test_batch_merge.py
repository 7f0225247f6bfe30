"""Merging a batch's inputs and slicing its outputs back per request."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import pytest

from services.engine.batch_merge import merge_inputs, rows_of, signature_of, split_outputs
from services.errors import InvalidArgumentError


@dataclass
class Part:
    inputs: Mapping[str, np.ndarray[Any, Any]]
    outputs: tuple[str, ...] = ()

    @property
    def rows(self) -> int:
        return rows_of(self.inputs)


def rows(start: int, n: int) -> dict[str, np.ndarray[Any, Any]]:
    return {"x": np.arange(start, start + n, dtype=np.float32).reshape(n, 1), "w": np.zeros((n, 2), np.int64)}


def test_inputs_concatenate_in_batch_order_and_outputs_split_back() -> None:
    batch = [Part(rows(0, 2)), Part(rows(10, 1), ("y",)), Part(rows(20, 3), ("z",))]
    merged = merge_inputs(batch)
    assert merged["x"][:, 0].tolist() == [0, 1, 10, 20, 21, 22] and merged["w"].shape == (6, 2)
    outputs = {"y": merged["x"] * 2, "z": merged["x"] + 1}
    answers = list(split_outputs(outputs, batch))
    assert set(answers[0]) == {"y", "z"} and answers[0]["y"][:, 0].tolist() == [0, 2]
    assert set(answers[1]) == {"y"} and answers[1]["y"][:, 0].tolist() == [20]
    assert set(answers[2]) == {"z"} and answers[2]["z"][:, 0].tolist() == [21, 22, 23]


def test_a_batch_of_one_is_passed_through_without_copies() -> None:
    part = Part(rows(0, 2))
    assert merge_inputs([part]) is part.inputs
    out = np.ones((7, 1))  # whatever the model returns, even another row count
    assert next(split_outputs({"y": out}, [part]))["y"] is out


def test_rows_must_agree_across_inputs() -> None:
    assert rows_of(rows(0, 3)) == 3
    assert rows_of({}) == 1
    with pytest.raises(InvalidArgumentError, match=r"same batch size.*'x': 1, 'w': 2"):
        rows_of({"x": np.ones((1, 2)), "w": np.ones((2, 2))})
    with pytest.raises(InvalidArgumentError, match="'s': scalar"):
        rows_of({"x": np.ones((1, 2)), "s": np.float32(1.0) * np.ones(())})


def test_signatures_ignore_rows_and_input_order_but_not_dtype_or_width() -> None:
    a: dict[str, np.ndarray[Any, Any]] = {"x": np.ones((1, 4), np.float32), "w": np.ones((1, 2), np.int64)}
    b: dict[str, np.ndarray[Any, Any]] = {"w": np.ones((5, 2), np.int64), "x": np.ones((5, 4), np.float32)}
    assert signature_of(a) == signature_of(b)
    assert signature_of(a) != signature_of({**a, "x": np.ones((1, 4), np.float64)})
    assert signature_of(a) != signature_of({**a, "x": np.ones((1, 5), np.float32)})
