"""Deterministic text corpus: docstrings of the Python standard library.

The stdlib sources are parsed with :mod:`ast` instead of being imported, so no
module code runs (``antigravity`` would open a browser, ``this`` prints, GUI
modules need a display) and the result only depends on the stdlib source tree
of the running Python version.

The held-out split is made by module name, so no docstring of a held-out module
is ever seen in training, and it is keyed on a hash of the name so that it is
stable across Python versions: a module stays on the same side of the split even
when other modules are added or removed.
"""

from __future__ import annotations

import ast
import functools
import hashlib
import re
import sys
import sysconfig
from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

PAD_ID = 0
UNK_ID = 1
HELDOUT_PERCENT = 10

# Directory names (at any depth) whose modules are left out: test suites are
# mostly code and fixtures rather than prose, GUI/demo packages are noise, and
# ``encodings`` is machine-generated codec tables with near-identical docstrings.
_SKIP_DIRS = frozenset(
    {
        "__pycache__",
        "site-packages",
        "dist-packages",
        "test",
        "tests",
        "idle_test",
        "idlelib",
        "tkinter",
        "turtledemo",
        "encodings",
        "__phello__",
    }
)
# Top-level module names that are skipped wherever they would appear.
_SKIP_MODULES = frozenset({"antigravity", "this", "__hello__", "turtle"})

_BLANK_LINE = re.compile(r"\n[ \t]*\n")
_WHITESPACE = re.compile(r"\s+")


@dataclass(frozen=True)
class Corpus:
    """Docstrings of the stdlib, split by module.

    Attributes:
        train_docs: Normalised docstrings of the training modules, in module
            order then source order.
        heldout_docs: Normalised docstrings of the held-out modules, with any
            docstring that also occurs in a training module removed.
        train_modules: Names of the training modules that contributed text.
        heldout_modules: Names of the held-out modules that contributed text.
    """

    train_docs: tuple[str, ...]
    heldout_docs: tuple[str, ...]
    train_modules: tuple[str, ...]
    heldout_modules: tuple[str, ...]

    def describe(self) -> str:
        """Return a one-line human readable summary of the corpus sizes."""
        n_train = sum(len(d) for d in self.train_docs)
        n_held = sum(len(d) for d in self.heldout_docs)
        return (
            f"train: {len(self.train_modules)} modules, {len(self.train_docs)} docstrings, "
            f"{n_train} chars; held-out: {len(self.heldout_modules)} modules, "
            f"{len(self.heldout_docs)} docstrings, {n_held} chars"
        )


def corpus_description() -> str:
    """Return the short corpus description stored in the ONNX metadata."""
    major, minor = sys.version_info[:2]
    return f"docstrings of the Python {major}.{minor} standard library"


def stdlib_dir() -> Path:
    """Return the directory holding the pure-Python standard library."""
    return Path(sysconfig.get_paths()["stdlib"])


def _module_name(rel: Path) -> str:
    parts = list(rel.with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def iter_stdlib_modules(root: Path | None = None) -> list[tuple[str, Path]]:
    """List the stdlib modules whose docstrings form the corpus.

    Args:
        root: Stdlib directory; defaults to :func:`stdlib_dir`.

    Returns:
        ``(module name, source path)`` pairs sorted by module name.
    """
    root = stdlib_dir() if root is None else root
    found: list[tuple[str, Path]] = []
    for path in root.rglob("*.py"):
        rel = path.relative_to(root)
        if any(part in _SKIP_DIRS for part in rel.parts[:-1]):
            continue
        # config-3.11-x86_64-linux-gnu and similar build directories.
        if rel.parts[0].startswith("config-"):
            continue
        name = _module_name(rel)
        top = name.split(".")[0]
        if not name or top in _SKIP_MODULES or top.startswith(("_sysconfigdata", "turtle")):
            continue
        found.append((name, path))
    return sorted(found)


def is_heldout(module: str, percent: int = HELDOUT_PERCENT) -> bool:
    """Decide the split of a module from a stable hash of its dotted name.

    ``hash()`` is salted per process, so SHA-256 is used to keep the split
    identical across runs and machines.

    Args:
        module: Dotted module name.
        percent: Share of modules, in percent, that are held out.

    Returns:
        True when the module belongs to the held-out split.
    """
    digest = hashlib.sha256(module.encode("utf-8")).digest()
    return int.from_bytes(digest[:4], "big") % 100 < percent


def normalise(doc: str) -> str:
    """Normalise a cleaned docstring for character modelling.

    Paragraphs (blank-line separated) become single lines joined by ``\\n``;
    inside a paragraph every whitespace run becomes one space, because line
    wrapping and indentation are layout rather than language.

    Args:
        doc: Docstring as returned by :func:`ast.get_docstring` (cleaned).

    Returns:
        The normalised text, possibly empty.
    """
    paragraphs = (_WHITESPACE.sub(" ", p).strip() for p in _BLANK_LINE.split(doc))
    return "\n".join(p for p in paragraphs if p)


def _iter_docstrings(node: ast.AST) -> Iterator[str]:
    # Pre-order walk so docstrings come out in source order.
    if isinstance(node, ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef):
        doc = ast.get_docstring(node, clean=True)
        if doc:
            yield doc
    for child in ast.iter_child_nodes(node):
        yield from _iter_docstrings(child)


def module_docstrings(path: Path) -> list[str]:
    """Extract the normalised module, class and function docstrings of a file.

    Args:
        path: Python source file.

    Returns:
        Non-empty normalised docstrings in source order; empty when the file
        cannot be read or parsed by the running interpreter.
    """
    try:
        tree = ast.parse(path.read_bytes(), filename=str(path))
    except (SyntaxError, ValueError, OSError, UnicodeDecodeError):
        return []
    return [text for text in map(normalise, _iter_docstrings(tree)) if text]


@functools.lru_cache(maxsize=2)
def build_corpus(root: str | None = None) -> Corpus:
    """Build the deterministic train/held-out docstring corpus.

    Exact duplicate docstrings are kept only once, and a held-out docstring
    that also appears in any training module is dropped so that held-out
    accuracy measures generalisation rather than memorisation.

    Args:
        root: Stdlib directory as a string (hashable for the cache); defaults
            to :func:`stdlib_dir`.

    Returns:
        The corpus.
    """
    modules = iter_stdlib_modules(Path(root) if root else None)
    train_docs: list[str] = []
    train_mods: list[str] = []
    held: list[tuple[str, list[str]]] = []
    seen: set[str] = set()
    for name, path in modules:
        docs = module_docstrings(path)
        if is_heldout(name):
            held.append((name, docs))
            continue
        fresh = [d for d in docs if d not in seen]
        seen.update(fresh)
        if fresh:
            train_docs.extend(fresh)
            train_mods.append(name)
    heldout_docs: list[str] = []
    held_mods: list[str] = []
    for name, docs in held:
        fresh = [d for d in docs if d not in seen]
        seen.update(fresh)
        if fresh:
            heldout_docs.extend(fresh)
            held_mods.append(name)
    return Corpus(tuple(train_docs), tuple(heldout_docs), tuple(train_mods), tuple(held_mods))


def build_vocab(docs: Iterable[str], coverage: float = 0.995) -> list[str]:
    """Choose the character vocabulary from training text.

    Args:
        docs: Training documents.
        coverage: Minimum share of training characters the vocabulary must
            cover; the remainder maps to UNK.

    Returns:
        ``["", ""] + chars``: PAD and UNK are empty strings, then the most
        frequent characters (ties broken by code point, for determinism).
    """
    counts: Counter[str] = Counter()
    for doc in docs:
        counts.update(doc)
    total = sum(counts.values())
    ranked = sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))
    chars: list[str] = []
    covered = 0
    for ch, n in ranked:
        if covered >= coverage * total:
            break
        chars.append(ch)
        covered += n
    return ["", "", *chars]


def encode(text: str, vocab: Sequence[str]) -> np.ndarray:
    """Map characters to ids; characters outside the vocabulary become UNK.

    Args:
        text: Text to encode.
        vocab: Vocabulary as returned by :func:`build_vocab`.

    Returns:
        int64 array of ids, one per character.
    """
    index = {ch: i for i, ch in enumerate(vocab) if ch}
    return np.fromiter((index.get(ch, UNK_ID) for ch in text), dtype=np.int64, count=len(text))


@dataclass(frozen=True)
class TokenStream:
    """Documents encoded into one id stream with PAD separators.

    Each document is preceded by ``context`` PAD ids, so the window that ends
    just before any character never reaches into the previous document and is
    left-padded exactly as the ONNX contract requires at inference time.

    Attributes:
        ids: The id stream (uint8 when the vocabulary allows, to save memory).
        targets: Positions in ``ids`` of every real character (the targets).
        context: Window length the stream was padded for.
    """

    ids: np.ndarray
    targets: np.ndarray
    context: int

    def windows(self, positions: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Return the input windows and next-character targets for positions.

        Args:
            positions: Entries of :attr:`targets` to materialise.

        Returns:
            ``(inputs [n, context] int64, labels [n] int64)``.
        """
        offsets = np.arange(-self.context, 0, dtype=np.int64)
        x = self.ids[positions[:, None] + offsets].astype(np.int64)
        y = self.ids[positions].astype(np.int64)
        return x, y


def make_stream(docs: Sequence[str], vocab: Sequence[str], context: int) -> TokenStream:
    """Encode documents into a :class:`TokenStream`.

    Args:
        docs: Documents to encode.
        vocab: Vocabulary as returned by :func:`build_vocab`.
        context: Window length (the model's context length).

    Returns:
        The padded stream and its target positions.
    """
    dtype = np.uint8 if len(vocab) <= 256 else np.int32
    pieces: list[np.ndarray] = []
    targets: list[np.ndarray] = []
    pos = 0
    for doc in docs:
        ids = encode(doc, vocab)
        pieces.append(np.zeros(context, dtype=dtype))
        pieces.append(ids.astype(dtype))
        targets.append(np.arange(pos + context, pos + context + len(ids), dtype=np.int64))
        pos += context + len(ids)
    stream = np.concatenate(pieces) if pieces else np.zeros(0, dtype=dtype)
    target_pos = np.concatenate(targets) if targets else np.zeros(0, dtype=np.int64)
    return TokenStream(stream, target_pos, context)


def heldout_sample(vocab: Sequence[str], context: int, n: int = 20_000) -> tuple[np.ndarray, np.ndarray]:
    """Deterministic, evenly spaced sample of held-out next-character positions.

    Evenly spaced (rather than the first ``n``) so that every held-out module
    is represented, which keeps the sample's accuracy close to the full
    held-out accuracy.

    Args:
        vocab: Model vocabulary.
        context: Model context length.
        n: Number of positions.

    Returns:
        ``(inputs [n, context] int64, labels [n] int64)``.
    """
    stream = make_stream(build_corpus().heldout_docs, vocab, context)
    total = len(stream.targets)
    pick = np.linspace(0, total - 1, num=min(n, total)).round().astype(np.int64)
    return stream.windows(stream.targets[pick])
