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


# -- Meta's own Llama 3.1 template ---------------------------------------------------------------

META_31_CONVERSATION = (
    "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\n"
    "Cutting Knowledge Date: December 2023\nToday Date: 26 Jul 2024\n\n"
    "You are terse.<|eot_id|>"
    "<|start_header_id|>user<|end_header_id|>\n\nName a primary colour.<|eot_id|>"
    "<|start_header_id|>assistant<|end_header_id|>\n\nRed.<|eot_id|>"
    "<|start_header_id|>user<|end_header_id|>\n\nAnd another one?<|eot_id|>"
    "<|start_header_id|>assistant<|end_header_id|>\n\nBlue, then yellow.<|eot_id|>"
)


@pytest.fixture(scope="module")
def meta31():
    return AutoTokenizer.from_pretrained(DATA / "tokenizers" / "llama31")


def test_the_llama31_fixture_renders_exactly_metas_format(meta31) -> None:
    examples, _ = read_examples(str(DATA / "formats" / "messages.jsonl"), DataConfig())
    assert meta31.apply_chat_template(examples[0].messages, tokenize=False) == META_31_CONVERSATION
    # No system message: the system block (with its dates) is still there, empty.
    text = meta31.apply_chat_template(examples[1].messages, tokenize=False)
    assert text.startswith(
        "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\n"
        "Cutting Knowledge Date: December 2023\nToday Date: 26 Jul 2024\n\n<|eot_id|>"
        "<|start_header_id|>user<|end_header_id|>\n\n"
    )
    template = resolve_template(meta31, "auto")
    assert (template.name, template.family, template.end_of_turn) == ("tokenizer", "llama3", "<|eot_id|>")


@pytest.mark.parametrize("source", ["messages.jsonl", "sharegpt.json", "alpaca.jsonl"])
def test_metas_llama31_template_trains_on_answers_only(meta31, source: str) -> None:
    """The extra headers (system block, knowledge and today dates) are never trained; every
    assistant turn and its <|eot_id|> is."""
    template = resolve_template(meta31, "auto")
    examples, _ = read_examples(str(DATA / "formats" / source), DataConfig())
    for example, enc in zip(examples, encode(meta31, template, examples, responses_only=True), strict=True):
        assert trained_runs(meta31, enc) == expected_runs(example, "<|eot_id|>"), example.where
        masked = meta31.decode(
            [i for i, label in zip(enc.input_ids, enc.labels, strict=True) if label == IGNORE]
        )
        assert "Cutting Knowledge Date: December 2023" in masked and "Today Date: 26 Jul 2024" in masked


def test_metas_llama31_template_on_the_demo_dataset(meta31) -> None:
    examples, _ = read_examples(str(DATASET), DataConfig())
    template = resolve_template(meta31, "auto")
    for example, enc in zip(examples, encode(meta31, template, examples, responses_only=True), strict=True):
        assert trained_runs(meta31, enc) == expected_runs(example, "<|eot_id|>"), example.where


# -- the three ways to the same mask -------------------------------------------------------------


def _tokenizers() -> dict[str, object]:
    names = ("llama3", "llama31", "gemma3", "chatml", "mistral")
    toks = {name: AutoTokenizer.from_pretrained(DATA / "tokenizers" / name) for name in names}
    toks["tiny"] = AutoTokenizer.from_pretrained(ensure_builtin("builtin:tiny-llama"))
    return toks


TOKENIZER_NAMES = ("tiny", "llama3", "llama31", "gemma3", "chatml", "mistral")
SOURCES = [
    str(DATA / "formats" / "messages.jsonl"),
    str(DATA / "formats" / "sharegpt.json"),
    str(DATA / "formats" / "alpaca.jsonl"),
    str(DATASET),
]


@pytest.fixture(scope="module")
def all_tokenizers() -> dict[str, object]:
    return _tokenizers()


def _masks(tok, template, examples, **spec_changes) -> list[tuple[list[int], list[int]]]:
    from dataclasses import replace

    from engine.data.masking import Encoder, EncoderSpec

    spec = replace(EncoderSpec.of(tok, template, True, window=4096), **spec_changes)
    batch = Encoder(spec, tok).encode(examples)
    return [(e.input_ids, e.labels) for e in batch.examples()]


# The templates with {% generation %} markers: every built-in one, and the demo tokenizer's own.
MARKED = [("tiny", "auto"), *((name, "builtin") for name in TOKENIZER_NAMES)]


@pytest.mark.parametrize(("name", "choice"), MARKED)
def test_generation_markers_and_prefix_rendering_give_the_same_masks(
    all_tokenizers, name: str, choice: str
) -> None:
    """Where the template has {% generation %} markers (the built-in ones, the demo tokenizer's
    own), the marked spans give exactly the masks that rendering growing prefixes gives, and
    exactly what apply_chat_template(return_assistant_tokens_mask=True) marks (the first token,
    never a target, aside)."""
    from engine.data.render import has_generation_markers

    tok = all_tokenizers[name]
    family = resolve_template(tok, "auto").family
    template = resolve_template(tok, "auto" if choice == "auto" else family)
    assert has_generation_markers(template.source)
    for source in SOURCES:
        examples, _ = read_examples(source, DataConfig())
        examples = examples[:150]
        marked = _masks(tok, template, examples, markers=True)
        assert marked == _masks(tok, template, examples, markers=False), (name, source)
        for example, (ids, labels) in zip(examples, marked, strict=True):
            out = tok.apply_chat_template(
                example.messages,
                chat_template=template.source,
                tokenize=True,
                return_dict=True,
                return_assistant_tokens_mask=True,
            )
            assert out["input_ids"] == ids
            expected = [label != IGNORE for label in labels]
            assert [bool(m) for m in out["assistant_masks"]][1:] == expected[1:], example.where


@pytest.mark.parametrize("name", TOKENIZER_NAMES)
def test_offsets_from_token_ids_give_the_tokenizers_own_masks(all_tokenizers, name: str) -> None:
    """A byte-level BPE's token offsets follow from its ids (the faster path); the masks are the
    same as from the offsets the tokenizer reports, on ASCII and on multi-byte text."""
    tok = all_tokenizers[name]
    template = resolve_template(tok, "auto")
    examples = []
    for source in SOURCES:
        examples += read_examples(source, DataConfig())[0][:100]
    examples.append(
        Example(
            "unicode",
            messages=[
                {"role": "user", "content": "Café ☕ — naïve 😀? 日本語で"},
                {"role": "assistant", "content": "Oui: crème brûlée 🍮 · ok  \t spaced"},
                {"role": "user", "content": "Ünïcödé again\n\nand newlines"},
                {"role": "assistant", "content": "😀😀 fin."},
            ],
        )
    )
    assert _masks(tok, template, examples) == _masks(tok, template, examples, offsets_from_ids=False)


@pytest.mark.parametrize("markers", [True, False])
def test_weight_0_leaves_an_answer_out_and_a_last_user_turn_is_dropped(
    tiny_tokenizer, tmp_path: Path, markers: bool
) -> None:
    """OpenAI's fine-tuning format: an assistant message with "weight": 0 is context, not a target.
    A conversation that ends on a user turn loses that turn (nothing answers it)."""
    from engine.data.render import Renderer, tokenizer_renderer

    path = tmp_path / "weights.jsonl"
    rows = [
        {"messages": [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "First question?"},
            {"role": "assistant", "content": "A bad first answer.", "weight": 0},
            {"role": "user", "content": "Second question?"},
            {"role": "assistant", "content": "A good second answer.", "weight": 1},
            {"role": "user", "content": "A question nobody answered?"},
        ]},
    ]  # fmt: skip
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    (example,), _ = read_examples(str(path), DataConfig())
    assert example.untrained == (0,)
    assert [m["role"] for m in example.messages or []] == ["system", "user", "assistant", "user", "assistant"]
    template = resolve_template(tiny_tokenizer, "auto")
    enc = encode(tiny_tokenizer, template, [example], responses_only=True)[0]
    assert trained_runs(tiny_tokenizer, enc) == ["A good second answer.<|eot_id|>"]
    assert "A bad first answer." in tiny_tokenizer.decode(enc.input_ids)  # still there, as context
    # The same spans whether the template's {% generation %} markers or growing prefixes find them.
    renderer = Renderer(template, tokenizer_renderer(tiny_tokenizer, template), markers=markers)
    full, spans = renderer.spans(example)
    assert [full[a:b] for a, b in spans] == ["A good second answer.<|eot_id|>"]


@pytest.mark.parametrize(
    ("turns", "error"),
    [
        ([{"role": "user", "content": "Q", "weight": 0}, {"role": "assistant", "content": "A"}],
         "message 1 (user) has weight 0: only assistant messages take one, 0 or 1"),
        ([{"role": "user", "content": "Q"}, {"role": "assistant", "content": "A", "weight": 0.5}],
         "message 2 (assistant) has weight 0.5: only assistant messages take one, 0 or 1"),
        ([{"role": "user", "content": "Q"}, {"role": "assistant", "content": "A", "weight": 0}],
         "every assistant message has weight 0: nothing to train on"),
    ],
)  # fmt: skip
def test_a_bad_weight_is_one_line(tmp_path: Path, turns: list[dict], error: str) -> None:
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps({"messages": turns}) + "\n")
    with pytest.raises(DataError) as e:
        read_examples(str(path), DataConfig())
    assert e.value.message == f"{path}: line 1: {error}"
