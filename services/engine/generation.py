"""Token-by-token text generation with character-level language models.

A generator model (task ``char-lm``) takes ``input_ids`` (INT64, ``[batch, C]``,
left-padded with id 0) and returns ``probs`` (FP32, ``[batch, V]``), the
next-character distribution. Its tokenizer travels in the model's metadata:
``edgecascade.vocab`` (a JSON list; id 0 is padding, id 1 stands for unknown
characters) and ``edgecascade.context_length``.

:func:`generate` is an async generator: it yields one token at a time and does
nothing between tokens, so a caller that stops iterating (a cancelled stream)
stops the work at once.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from services.errors import InvalidArgumentError, ModelNotReadyError
from services.inference import ParamValue

CHAR_LM_TASK = "char-lm"
INPUT_IDS = "input_ids"
PROBS = "probs"
TEXT_INPUT = "text_input"
TEXT_OUTPUT = "text_output"
PAD_ID = 0
UNK_ID = 1

MAX_TOKENS_LIMIT = 2048
# Below this, p ** (1 / T) underflows to zero for every token in float64.
MIN_TEMPERATURE = 0.01
MAX_TEMPERATURE = 10.0
MAX_PROMPT_BYTES = 64 * 1024
# Stop strings are matched against the end of the text after every token, on
# the event loop: their number and length are bounded so that check stays cheap.
MAX_STOP_STRINGS = 16
MAX_STOP_CHARS = 64
# The raw parameter: a JSON list of the most and longest strings fits even when
# every character is escaped (json.dumps writes one outside the BMP as 12).
MAX_STOP_PARAMETER_CHARS = MAX_STOP_STRINGS * (MAX_STOP_CHARS * 12 + 4) + 2


class CharTokenizer:
    """Maps text to model input ids and ids back to text.

    Args:
        vocab: The vocabulary; index is the id. Ids 0 and 1 are padding and unknown.
        context_length: The model's fixed context length C.

    Raises:
        ModelNotReadyError: The vocabulary or context length is unusable.
    """

    def __init__(self, vocab: list[str], context_length: int) -> None:
        if len(vocab) < 3 or context_length < 1:
            raise ModelNotReadyError("generator metadata has an empty vocabulary or a context length below 1")
        self.vocab = vocab
        self.context_length = context_length
        self._ids = {ch: i for i, ch in enumerate(vocab) if i > UNK_ID}

    @classmethod
    def from_properties(cls, properties: Mapping[str, str]) -> CharTokenizer:
        """Builds the tokenizer from a model's ``edgecascade.*`` metadata properties.

        Raises:
            ModelNotReadyError: The properties are missing or malformed.
        """
        try:
            vocab = json.loads(properties["edgecascade.vocab"])
            context_length = int(properties["edgecascade.context_length"])
        except (KeyError, ValueError, TypeError) as exc:
            raise ModelNotReadyError(
                "generator model lacks valid edgecascade.vocab / edgecascade.context_length metadata"
            ) from exc
        if not isinstance(vocab, list) or not all(isinstance(v, str) for v in vocab):
            raise ModelNotReadyError("generator metadata edgecascade.vocab is not a list of strings")
        return cls(vocab, context_length)

    def encode(self, text: str) -> list[int]:
        """Returns the ids of ``text`` (unknown characters become id 1)."""
        return [self._ids.get(ch, UNK_ID) for ch in text]

    def window(self, ids: list[int]) -> np.ndarray[Any, np.dtype[np.int64]]:
        """Returns the model input for the last C ids, left-padded, shape ``[1, C]``."""
        tail = ids[-self.context_length :]
        row = [PAD_ID] * (self.context_length - len(tail)) + tail
        return np.asarray([row], dtype=np.int64)

    def decode(self, token_id: int) -> str:
        """Returns the text of one id (empty for padding and unknown)."""
        return self.vocab[token_id] if 0 <= token_id < len(self.vocab) else ""


@dataclass(frozen=True)
class GenerationParams:
    """Sampling settings of one generation request."""

    max_tokens: int = 64
    temperature: float = 0.8
    top_k: int = 0
    seed: int | None = None
    stop: tuple[str, ...] = ()

    @classmethod
    def from_parameters(cls, params: Mapping[str, ParamValue]) -> GenerationParams:
        """Reads ``max_tokens``, ``temperature``, ``top_k``, ``seed`` and ``stop`` request parameters.

        ``stop`` is one stop string, or a JSON list of them.

        Raises:
            InvalidArgumentError: A value has the wrong type or is out of range.
        """
        max_tokens = _int(params, "max_tokens", cls.max_tokens)
        if not 1 <= max_tokens <= MAX_TOKENS_LIMIT:
            raise InvalidArgumentError(
                f"parameter 'max_tokens' must be between 1 and {MAX_TOKENS_LIMIT}, got {max_tokens}"
            )
        temperature = params.get("temperature", cls.temperature)
        if (
            isinstance(temperature, bool)
            or not isinstance(temperature, int | float)
            or not (temperature == 0 or MIN_TEMPERATURE <= temperature <= MAX_TEMPERATURE)
        ):
            raise InvalidArgumentError(
                f"parameter 'temperature' must be 0 (greedy) or between {MIN_TEMPERATURE} and {MAX_TEMPERATURE}, "
                f"got {temperature!r}"
            )
        top_k = _int(params, "top_k", cls.top_k)
        if top_k < 0:
            raise InvalidArgumentError(f"parameter 'top_k' must be 0 (no limit) or positive, got {top_k}")
        seed = _int(params, "seed", -1) if "seed" in params else None
        if seed is not None and seed < 0:
            raise InvalidArgumentError(f"parameter 'seed' must be a non-negative integer, got {seed}")
        stops = _stop_strings(params.get("stop", ""))
        return cls(max_tokens=max_tokens, temperature=float(temperature), top_k=top_k, seed=seed, stop=stops)


def _stop_strings(stop: ParamValue) -> tuple[str, ...]:
    """Reads the ``stop`` parameter: one string, or a JSON list of them, within the documented limits."""
    if not isinstance(stop, str):
        raise InvalidArgumentError("parameter 'stop' must be a string or a JSON list of strings")
    if len(stop) > MAX_STOP_PARAMETER_CHARS:
        raise InvalidArgumentError(
            f"parameter 'stop' is {len(stop)} characters long; the limit is {MAX_STOP_PARAMETER_CHARS} "
            f"(at most {MAX_STOP_STRINGS} stop strings of at most {MAX_STOP_CHARS} characters)"
        )
    stops: tuple[str, ...] = ()
    if stop.startswith("["):
        try:
            parsed = json.loads(stop)
        except ValueError:
            raise InvalidArgumentError("parameter 'stop' starts with '[' but is not a JSON list") from None
        if not isinstance(parsed, list) or not all(isinstance(s, str) and s for s in parsed):
            raise InvalidArgumentError("parameter 'stop' must be a JSON list of non-empty strings")
        stops = tuple(parsed)
    elif stop:
        stops = (stop,)
    if len(stops) > MAX_STOP_STRINGS:
        raise InvalidArgumentError(f"parameter 'stop' holds {len(stops)} strings; the limit is {MAX_STOP_STRINGS}")
    longest = max((len(s) for s in stops), default=0)
    if longest > MAX_STOP_CHARS:
        raise InvalidArgumentError(
            f"parameter 'stop' holds a string of {longest} characters; the limit is {MAX_STOP_CHARS}"
        )
    return stops


GENERATION_PARAMETERS = frozenset({"max_tokens", "temperature", "top_k", "seed", "stop"})


def _int(params: Mapping[str, ParamValue], name: str, default: int) -> int:
    value = params.get(name, default)
    if isinstance(value, bool) or not isinstance(value, int):
        raise InvalidArgumentError(f"parameter '{name}' must be an integer, got {value!r}")
    return value


@dataclass(frozen=True)
class GeneratedToken:
    """One generated token and the model's probability for it."""

    index: int
    text: str
    probability: float


@dataclass(frozen=True)
class GenerationSummary:
    """What a finished generation reports on its final response."""

    tokens: int
    finish_reason: str
    mean_probability: float
    min_probability: float


def decode_prompt(raw: bytes) -> str:
    """Decodes a prompt sent as a BYTES element.

    Raises:
        InvalidArgumentError: The bytes are not UTF-8 or the prompt is too long.
    """
    if len(raw) > MAX_PROMPT_BYTES:
        raise InvalidArgumentError(f"input '{TEXT_INPUT}': prompt of {len(raw)} bytes exceeds {MAX_PROMPT_BYTES}")
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise InvalidArgumentError(
            f"input '{TEXT_INPUT}' element 0 is not valid UTF-8 (byte {exc.start}); send text encoded as UTF-8"
        ) from None


def _sampling_weights(probs: np.ndarray[Any, Any], params: GenerationParams) -> np.ndarray[Any, Any] | int:
    """The normalised distribution :func:`choose` samples from, or the id it picks without sampling.

    Temperature scales probabilities as ``(p / max p) ** (1 / T)``, which is
    ``softmax(log p / T)`` without a logarithm and an exponential per token.
    """
    p = np.array(probs, dtype=np.float64)
    p[PAD_ID] = 0.0
    p[UNK_ID] = 0.0
    if params.temperature == 0:
        return int(np.argmax(p))
    np.maximum(p, 0.0, out=p)  # NaN stays NaN (and falls back to greedy below)
    if params.top_k and params.top_k < p.size:
        cutoff = np.partition(p, -params.top_k)[-params.top_k]
        p[p < cutoff] = 0.0
    top = p.max()
    if not top > 0 or not math.isfinite(top):
        return int(np.argmax(p))  # nothing left to sample from: fall back to greedy
    p /= top
    if params.temperature != 1:
        np.power(p, 1.0 / params.temperature, out=p)
    total = p.sum()
    if not math.isfinite(total) or total <= 0:
        return int(np.argmax(p))
    p /= total
    return p


def choose(probs: np.ndarray[Any, Any], params: GenerationParams, rng: np.random.Generator) -> int:
    """Picks the next id from a next-character distribution.

    Padding and unknown ids are never chosen; temperature 0 means greedy.
    """
    weights = _sampling_weights(probs, params)
    if isinstance(weights, int):
        return weights
    # What Generator.choice(size, p=weights) does, without re-validating p each token: one uniform
    # draw looked up in the cumulative distribution (the same draws for the same seed).
    cumulative = np.cumsum(weights)
    cumulative /= cumulative[-1]
    return min(int(cumulative.searchsorted(rng.random(), side="right")), weights.size - 1)


def sampling_distribution(probs: np.ndarray[Any, Any], params: GenerationParams) -> np.ndarray[Any, Any]:
    """Returns the distribution :func:`choose` draws from (one-hot when it picks without drawing), ``[V]``.

    Speculative decoding verifies drafts against these: the emitted tokens then
    follow the target model's distribution *as sampled* (temperature, top-k).
    """
    weights = _sampling_weights(probs, params)
    if isinstance(weights, int):
        one_hot = np.zeros(np.asarray(probs).shape[-1], dtype=np.float64)
        one_hot[weights] = 1.0
        return one_hot
    return weights


async def generate(
    tokenizer: CharTokenizer,
    step: Callable[[np.ndarray[Any, Any]], Awaitable[np.ndarray[Any, Any]]],
    prompt: str,
    params: GenerationParams,
    summary: list[GenerationSummary] | None = None,
) -> AsyncIterator[GeneratedToken]:
    """Yields generated tokens one by one.

    Args:
        tokenizer: The model's tokenizer.
        step: Runs the model on ``[1, C]`` ids and returns the ``[1, V]`` probabilities.
        prompt: The text to continue.
        params: Sampling settings.
        summary: If given, receives one :class:`GenerationSummary` when the generation ends normally.
    """
    seed = params.seed if params.seed is not None else int.from_bytes(os.urandom(4), "little")
    rng = np.random.default_rng(seed)
    ids = tokenizer.encode(prompt)
    # Only the last characters can end with a stop string: keep just those.
    keep = max((len(s) for s in params.stop), default=0)
    tail = ""
    probabilities: list[float] = []
    finish = "length"
    for index in range(params.max_tokens):
        probs = (await step(tokenizer.window(ids)))[0]
        token_id = choose(probs, params, rng)
        probability = float(probs[token_id])
        ids.append(token_id)
        piece = tokenizer.decode(token_id)
        tail = (tail + piece)[-keep:] if keep else ""
        probabilities.append(probability)
        yield GeneratedToken(index=index, text=piece, probability=probability)
        if keep and any(tail.endswith(s) for s in params.stop):
            finish = "stop"
            break
    if summary is not None:
        summary.append(
            GenerationSummary(
                tokens=len(probabilities),
                finish_reason=finish,
                mean_probability=float(np.mean(probabilities)) if probabilities else 0.0,
                min_probability=float(np.min(probabilities)) if probabilities else 0.0,
            )
        )
