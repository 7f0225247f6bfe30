"""Validation sets the profiler measures accuracy on.

Three sources, most faithful first:

* a file the user supplies (``.npz`` with one array per model input, each with
  the batch on axis 0, plus an optional ``labels`` array);
* for the character language models of the demo (``edgecascade.vocab`` and
  ``edgecascade.context_length`` in their ONNX metadata): next-character windows
  cut from held-out text, encoded exactly as the models were trained (PAD = 0,
  unknown = 1, each document left-padded by ``context`` PAD ids);
* anything else: seeded random inputs shaped by the signature, with no labels,
  so accuracy is agreement with the fp32 reference's top-1.
"""

from __future__ import annotations

import ast
import hashlib
import json
import sysconfig
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from services.errors import InvalidArgumentError
from services.inference import ModelSignature
from services.tensors import DATATYPES

PAD_ID = 0
UNK_ID = 1
LABELS = "labels"
VOCAB_PROPERTY = "edgecascade.vocab"
CONTEXT_PROPERTY = "edgecascade.context_length"


@dataclass(frozen=True)
class ValidationSet:
    """Inputs (batch on axis 0) and, when known, the correct class of each row.

    Attributes:
        inputs: One array per model input, all with the same number of rows.
        labels: ``int64 [rows]``, or None: the reference variant's top-1 is then the label.
        source: Says where the rows came from (recorded in the signed profile).
        metric: Name of the accuracy measured on it (``next_char_top1``, ``top1``,
            or ``top1_agreement_with_reference`` when there are no labels).
    """

    inputs: dict[str, np.ndarray[Any, Any]]
    labels: np.ndarray[Any, Any] | None
    source: str
    metric: str = "top1"

    @property
    def size(self) -> int:
        """Number of rows."""
        return int(next(iter(self.inputs.values())).shape[0]) if self.inputs else 0

    def save(self, path: Path) -> None:
        """Writes the set as ``.npz`` (no pickled objects)."""
        arrays = dict(self.inputs)
        if self.labels is not None:
            arrays[LABELS] = self.labels
        with path.open("wb") as fh:
            np.savez(fh, allow_pickle=False, **arrays)


def load_validation(path: Path, signature: ModelSignature) -> ValidationSet:
    """Reads a user-supplied ``.npz`` validation set and checks it fits the model.

    Raises:
        InvalidArgumentError: The file cannot be read, lacks an input, has an
            unknown array, or its arrays disagree in rows or datatype.
    """
    try:
        with np.load(path, allow_pickle=False) as npz:
            arrays = {k: npz[k] for k in npz.files}
    except (OSError, ValueError) as exc:
        raise InvalidArgumentError(f"validation set {path} is not a readable .npz file: {exc}") from None
    labels = arrays.pop(LABELS, None)
    source = f"{len(labels) if labels is not None else 'unlabelled'} rows from {path.name}"
    vs = ValidationSet(
        arrays,
        None if labels is None else labels.astype(np.int64).reshape(-1),
        source,
        "top1" if labels is not None else "top1_agreement_with_reference",
    )
    check_fits(vs, signature, str(path))
    return vs


def check_fits(vs: ValidationSet, signature: ModelSignature, where: str) -> None:
    """Refuses a validation set that the model cannot take.

    Raises:
        InvalidArgumentError: An input is missing or extra, rows disagree, or a datatype differs.
    """
    names = {s.name for s in signature.inputs}
    if set(vs.inputs) != names:
        raise InvalidArgumentError(
            f"validation set {where} has arrays {sorted(vs.inputs)}; the model's inputs are {sorted(names)} "
            f"(plus optional '{LABELS}')"
        )
    rows = {a.shape[0] if a.ndim else -1 for a in vs.inputs.values()}
    if len(rows) != 1 or -1 in rows or (vs.labels is not None and vs.labels.shape[0] not in rows):
        raise InvalidArgumentError(f"validation set {where}: every array needs the same number of rows on axis 0")
    for spec in signature.inputs:
        want = DATATYPES[spec.datatype].dtype
        if vs.inputs[spec.name].dtype.kind != want.kind or vs.inputs[spec.name].dtype.itemsize != want.itemsize:
            raise InvalidArgumentError(
                f"validation set {where}: '{spec.name}' is {vs.inputs[spec.name].dtype}, "
                f"the model takes {spec.datatype}"
            )


def char_lm_tokenizer(properties: Mapping[str, str]) -> tuple[list[str], int] | None:
    """The vocabulary and context length of a demo char-LM, or None if the model is not one."""
    if VOCAB_PROPERTY not in properties or CONTEXT_PROPERTY not in properties:
        return None
    try:
        vocab = json.loads(properties[VOCAB_PROPERTY])
        context = int(properties[CONTEXT_PROPERTY])
    except ValueError:
        return None
    if not isinstance(vocab, list) or context < 1:
        return None
    return [str(v) for v in vocab], context


def char_lm_validation(
    vocab: Sequence[str], context: int, docs: Iterable[str], size: int, input_name: str, source: str
) -> ValidationSet:
    """Next-character windows from held-out documents, evenly spaced over them.

    Args:
        vocab: The model's vocabulary (index 0 is PAD, 1 is UNK).
        context: The model's context length.
        docs: Held-out documents (never seen in training).
        size: Rows wanted (fewer when the text is shorter).
        input_name: The model's INT64 ``[batch, context]`` input.
        source: Description recorded with the profile.

    Raises:
        InvalidArgumentError: The documents hold no characters.
    """
    index = {ch: i for i, ch in enumerate(vocab) if ch}
    pieces: list[np.ndarray[Any, Any]] = []
    targets: list[np.ndarray[Any, Any]] = []
    position = 0
    for doc in docs:
        ids = np.fromiter((index.get(ch, UNK_ID) for ch in doc), dtype=np.int64, count=len(doc))
        if not len(ids):
            continue
        pieces += [np.full(context, PAD_ID, dtype=np.int64), ids]
        targets.append(np.arange(position + context, position + context + len(ids), dtype=np.int64))
        position += context + len(ids)
    if not targets:
        raise InvalidArgumentError("the held-out text for the validation set is empty")
    stream = np.concatenate(pieces)
    every = np.concatenate(targets)
    pick = every[np.linspace(0, len(every) - 1, num=min(size, len(every))).round().astype(np.int64)]
    windows = stream[pick[:, None] + np.arange(-context, 0, dtype=np.int64)]
    return ValidationSet({input_name: windows}, stream[pick], source, "next_char_top1")


def synthetic_validation(signature: ModelSignature, size: int, seed: int = 0) -> ValidationSet:
    """Seeded random inputs shaped by the signature; unknown non-batch dimensions become 1.

    Raises:
        InvalidArgumentError: An input is BYTES (no meaningful random value exists).
    """
    rng = np.random.default_rng(seed)
    inputs: dict[str, np.ndarray[Any, Any]] = {}
    for spec in signature.inputs:
        shape = (size, *(d if d > 0 else 1 for d in spec.shape[1:]))
        dtype = DATATYPES[spec.datatype].dtype
        if spec.datatype == "BYTES":
            raise InvalidArgumentError(
                f"input '{spec.name}' is BYTES; supply a validation set (--validation FILE.npz) for this model"
            )
        if dtype.kind == "f":
            inputs[spec.name] = rng.standard_normal(shape).astype(dtype)
        elif dtype.kind == "b":
            inputs[spec.name] = rng.integers(0, 2, shape).astype(dtype)
        else:
            # Small non-negative integers stay valid indices for embedding-like inputs.
            inputs[spec.name] = rng.integers(0, 2, shape).astype(dtype)
    return ValidationSet(inputs, None, f"{size} seeded random rows (seed {seed})", "top1_agreement_with_reference")


def stdlib_heldout_docstrings(percent: int = 10, max_chars: int = 400_000) -> list[str]:
    """Docstrings of a stable, hash-chosen share of the standard library's modules.

    The fallback text for char-LM validation when the demo's own corpus module
    is not available. Modules are parsed with :mod:`ast`, never imported.
    """
    root = Path(sysconfig.get_paths()["stdlib"])
    docs: list[str] = []
    total = 0
    for path in sorted(root.glob("*.py")):
        if int(hashlib.sha256(path.stem.encode()).hexdigest(), 16) % 100 >= percent:
            continue
        try:
            tree = ast.parse(path.read_bytes())
        except (SyntaxError, ValueError, OSError):
            continue
        for node in ast.walk(tree):
            if isinstance(node, ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef):
                text = ast.get_docstring(node)
                if text:
                    doc = " ".join(text.split())
                    docs.append(doc)
                    total += len(doc)
        if total >= max_chars:
            break
    return docs
