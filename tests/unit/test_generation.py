"""Tokenizer, sampling parameters and the token loop of char-LM generation."""

from __future__ import annotations

import json
from typing import Any

import numpy as np
import pytest

from services.engine.generation import (
    MAX_STOP_CHARS,
    MAX_STOP_PARAMETER_CHARS,
    MAX_STOP_STRINGS,
    CharTokenizer,
    GenerationParams,
    GenerationSummary,
    choose,
    decode_prompt,
    generate,
)
from services.errors import InvalidArgumentError, ModelNotReadyError

VOCAB = ["", "", "a", "b", "c"]


def test_tokenizer_left_pads_and_maps_unknown_to_one() -> None:
    tok = CharTokenizer(VOCAB, context_length=4)
    assert tok.encode("abz") == [2, 3, 1]
    assert tok.window([2, 3]).tolist() == [[0, 0, 2, 3]]
    assert tok.window([2, 3, 4, 2, 3]).tolist() == [[3, 4, 2, 3]]
    assert tok.decode(4) == "c"


def test_tokenizer_from_properties_rejects_garbage() -> None:
    tok = CharTokenizer.from_properties({"edgecascade.vocab": json.dumps(VOCAB), "edgecascade.context_length": "3"})
    assert tok.context_length == 3
    with pytest.raises(ModelNotReadyError):
        CharTokenizer.from_properties({"edgecascade.vocab": "not json"})


@pytest.mark.parametrize(
    ("params", "message"),
    [
        ({"max_tokens": 0}, "max_tokens"),
        ({"max_tokens": "5"}, "max_tokens"),
        ({"temperature": -1.0}, "temperature"),
        ({"temperature": 1e-310}, "temperature"),
        ({"top_k": -2}, "top_k"),
        ({"seed": -1}, "seed"),
        ({"stop": "[1, 2]"}, "stop"),
    ],
)
def test_bad_sampling_parameters(params: dict[str, Any], message: str) -> None:
    with pytest.raises(InvalidArgumentError, match=message):
        GenerationParams.from_parameters(params)


def test_stop_accepts_a_json_list() -> None:
    assert GenerationParams.from_parameters({"stop": '["\\n", "."]'}).stop == ("\n", ".")


@pytest.mark.parametrize(
    ("stop", "message"),
    [
        (json.dumps(["x"] * (MAX_STOP_STRINGS + 1)), f"holds {MAX_STOP_STRINGS + 1} strings; the limit is"),
        ("y" * (MAX_STOP_CHARS + 1), f"string of {MAX_STOP_CHARS + 1} characters"),
        (json.dumps(["z" * (MAX_STOP_CHARS + 1)]), f"string of {MAX_STOP_CHARS + 1} characters"),
        # The 6 MB list that stalled a node's event loop is refused before it is parsed.
        (json.dumps(["ab"] * 1_000_000), f"the limit is {MAX_STOP_PARAMETER_CHARS}"),
    ],
)
def test_stop_strings_are_bounded(stop: str, message: str) -> None:
    with pytest.raises(InvalidArgumentError, match=message):
        GenerationParams.from_parameters({"stop": stop})


def test_stop_at_the_limits_is_accepted() -> None:
    stops = [chr(ord("a") + i) * MAX_STOP_CHARS for i in range(MAX_STOP_STRINGS)]
    assert GenerationParams.from_parameters({"stop": json.dumps(stops)}).stop == tuple(stops)
    # json.dumps escapes each character outside the BMP as 12: the documented limits still fit.
    emoji = ["\U0001f600" * MAX_STOP_CHARS] * MAX_STOP_STRINGS
    assert GenerationParams.from_parameters({"stop": json.dumps(emoji)}).stop == tuple(emoji)


async def test_a_stop_string_spanning_many_tokens_still_stops() -> None:
    tok = CharTokenizer(VOCAB, context_length=2)
    cycle = iter([4, 2, 3] * 20)  # "cab" repeated

    async def step(ids: np.ndarray[Any, Any]) -> np.ndarray[Any, Any]:
        probs = np.zeros((1, len(VOCAB)))
        probs[0, next(cycle)] = 1.0
        return probs

    summary: list[GenerationSummary] = []
    params = GenerationParams(max_tokens=40, temperature=0, stop=("zz", "bcabca"))
    text = "".join([t.text async for t in generate(tok, step, "", params, summary)])
    assert text == "cabcabca"
    assert summary[0].finish_reason == "stop"


def test_choose_never_picks_padding_and_greedy_is_argmax() -> None:
    probs = np.array([0.9, 0.05, 0.01, 0.03, 0.01])
    rng = np.random.default_rng(0)
    assert choose(probs, GenerationParams(temperature=0), rng) == 3
    picks = {choose(probs, GenerationParams(temperature=1.0, top_k=2), rng) for _ in range(50)}
    assert picks <= {2, 3, 4} and 3 in picks
    assert {choose(probs, GenerationParams(temperature=1.0, top_k=1), rng) for _ in range(20)} == {3}


def test_decode_prompt_rejects_non_utf8() -> None:
    with pytest.raises(InvalidArgumentError, match="not valid UTF-8"):
        decode_prompt(b"\xff\xfe")


async def test_generate_streams_tokens_stops_and_summarises() -> None:
    tok = CharTokenizer(VOCAB, context_length=2)
    seen: list[list[int]] = []

    async def step(ids: np.ndarray[Any, Any]) -> np.ndarray[Any, Any]:
        seen.append(ids[0].tolist())
        return np.array([[0.0, 0.0, 0.1, 0.2, 0.7]]) if len(seen) < 3 else np.array([[0.0, 0.0, 0.8, 0.1, 0.1]])

    summary: list[GenerationSummary] = []
    params = GenerationParams(max_tokens=10, temperature=0, stop=("ca",))
    tokens = [t async for t in generate(tok, step, "ab", params, summary)]
    assert "".join(t.text for t in tokens) == "cca"
    assert [round(t.probability, 2) for t in tokens] == [0.7, 0.7, 0.8]
    assert seen[0] == [2, 3] and seen[1] == [3, 4]
    assert len(summary) == 1
    assert (summary[0].tokens, summary[0].finish_reason) == (3, "stop")
    assert summary[0].mean_probability == pytest.approx(0.7333, abs=1e-3)
    assert summary[0].min_probability == pytest.approx(0.7)


async def test_generate_is_repeatable_with_a_seed() -> None:
    tok = CharTokenizer(VOCAB, context_length=2)

    async def step(ids: np.ndarray[Any, Any]) -> np.ndarray[Any, Any]:
        return np.array([[0.0, 0.0, 0.3, 0.3, 0.4]])

    params = GenerationParams(max_tokens=20, temperature=1.0, seed=7)
    first = [t.text async for t in generate(tok, step, "", params)]
    second = [t.text async for t in generate(tok, step, "", params)]
    assert first == second and len(first) == 20
