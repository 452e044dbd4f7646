"""Train on responses only: the unmasked tokens of real multi-turn examples decode to exactly the
assistant texts, each followed by its end-of-turn token, for every template family, whether the
template is the tokenizer's own (no {% generation %} markers) or a built-in one."""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import pytest
from transformers import AutoTokenizer

from engine.config import DataConfig
from engine.data import DataError
from engine.data.check import read_examples
from engine.data.formats import Example
from engine.data.masking import IGNORE, Encoded, encode
from engine.data.templates import END_OF_TURN, resolve_template
from engine.models.tiny import DATASET
from engine.models.tiny_build import ensure_builtin

DATA = Path(__file__).resolve().parent.parent / "data"
FAMILIES = ("llama3", "gemma3", "chatml", "mistral")


def trained_runs(tok, enc: Encoded) -> list[str]:
    """Each maximal run of trained tokens, decoded."""
    pairs = zip(enc.input_ids, enc.labels, strict=True)
    return [
        tok.decode([i for i, _ in group])
        for trained, group in itertools.groupby(pairs, key=lambda p: p[1] != IGNORE)
        if trained
    ]


def expected_runs(example: Example, eot: str) -> list[str]:
    return [m["content"].strip() + eot for m in example.messages or [] if m["role"] == "assistant"]


@pytest.fixture(scope="module")
def tiny_tokenizer():
    return AutoTokenizer.from_pretrained(ensure_builtin("builtin:tiny-llama"))


def test_every_demo_example_trains_on_exactly_its_answers(tiny_tokenizer) -> None:
    examples, _ = read_examples(str(DATASET), DataConfig())
    template = resolve_template(tiny_tokenizer, "auto")
    encoded = encode(tiny_tokenizer, template, examples, responses_only=True)
    assert len(encoded) == len(examples) == 600
    multi_turn = 0
    for example, enc in zip(examples, encoded, strict=True):
        assert trained_runs(tiny_tokenizer, enc) == expected_runs(example, "<|eot_id|>"), example.where
        multi_turn += len(expected_runs(example, "")) > 1
        # masking changes labels only: the ids are the template's own tokenization
        assert (
            enc.input_ids
            == tiny_tokenizer.apply_chat_template(example.messages, tokenize=True, return_dict=True)[
                "input_ids"
            ]
        )
    assert multi_turn > 50


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("choice", ["auto", "builtin"])
@pytest.mark.parametrize("source", ["messages.jsonl", "sharegpt.json", "alpaca.jsonl"])
def test_each_family_trains_on_answers_and_end_of_turn(family: str, choice: str, source: str) -> None:
    tok = AutoTokenizer.from_pretrained(DATA / "tokenizers" / family)
    template = resolve_template(tok, "auto" if choice == "auto" else family)
    examples, _ = read_examples(str(DATA / "formats" / source), DataConfig())
    eot = END_OF_TURN[family]
    for example, enc in zip(examples, encode(tok, template, examples, responses_only=True), strict=True):
        runs = [run.lstrip(" ") for run in trained_runs(tok, enc)]  # Mistral's " answer" keeps its space
        assert runs == expected_runs(example, eot), (family, choice, example.where)


def test_system_and_user_text_is_never_trained(tiny_tokenizer) -> None:
    examples, _ = read_examples(str(DATA / "formats" / "messages.jsonl"), DataConfig())
    template = resolve_template(tiny_tokenizer, "auto")
    enc = encode(tiny_tokenizer, template, examples[:1], responses_only=True)[0]
    masked = tiny_tokenizer.decode(
        [i for i, label in zip(enc.input_ids, enc.labels, strict=True) if label == IGNORE]
    )
    for message in examples[0].messages or []:
        assert (message["content"] in masked) == (message["role"] != "assistant")


def test_responses_only_off_trains_every_token_but_the_first(tiny_tokenizer) -> None:
    examples, _ = read_examples(str(DATA / "formats" / "messages.jsonl"), DataConfig())
    enc = encode(tiny_tokenizer, resolve_template(tiny_tokenizer, "auto"), examples, responses_only=False)[0]
    assert enc.labels[0] == IGNORE and enc.labels[1:] == enc.input_ids[1:]


def test_text_is_framed_by_bos_and_eos_and_trained(tiny_tokenizer) -> None:
    examples, _ = read_examples(str(DATA / "formats" / "text.jsonl"), DataConfig())
    enc = encode(tiny_tokenizer, None, examples, responses_only=True)[0]
    assert (
        enc.input_ids[0] == tiny_tokenizer.bos_token_id and enc.input_ids[-1] == tiny_tokenizer.eos_token_id
    )
    assert (
        tiny_tokenizer.decode(enc.input_ids[1:-1])
        == json.loads((DATA / "formats" / "text.jsonl").read_text().splitlines()[0])["text"]
    )
    assert enc.labels == [IGNORE, *enc.input_ids[1:]]


def test_pretokenized_rows_keep_their_labels_and_are_checked_against_the_vocabulary(tiny_tokenizer) -> None:
    examples, _ = read_examples(str(DATA / "formats" / "tokens.jsonl"), DataConfig())
    first, second = encode(tiny_tokenizer, None, examples, responses_only=True)
    assert first.labels == [IGNORE, 20, 21, 22, 23, 2]
    assert second.labels == [-100, -100, 31, 2]
    too_big = Example("big.jsonl: line 1", input_ids=[1, 99999])
    with pytest.raises(DataError, match=r"big.jsonl: line 1: input_ids holds token id 99999"):
        encode(tiny_tokenizer, None, [too_big], responses_only=True)
