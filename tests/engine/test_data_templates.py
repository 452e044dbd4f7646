"""Chat templates: each built-in family renders as the family expects, `auto` picks the right one,
and each family's end-of-turn token is what sampling stops on. Tokenizers are the small ones in
tests/data/tokenizers, trained locally, each carrying a template written like its family's own."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from transformers import AutoTokenizer

from engine.data import DataError
from engine.data.templates import END_OF_TURN, LLAMA3, TEMPLATES, end_of_turn_ids, resolve_template

TOKENIZERS = Path(__file__).resolve().parent.parent / "data" / "tokenizers"
FAMILIES = ("llama3", "gemma3", "chatml", "mistral")
CONVERSATION = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Hi"},
    {"role": "assistant", "content": "Hello."},
    {"role": "user", "content": "Bye"},
    {"role": "assistant", "content": "Goodbye."},
]
EXPECTED = {
    "llama3": (
        "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nBe brief.<|eot_id|>"
        "<|start_header_id|>user<|end_header_id|>\n\nHi<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\nHello.<|eot_id|>"
        "<|start_header_id|>user<|end_header_id|>\n\nBye<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\nGoodbye.<|eot_id|>"
    ),
    # No system role: the system text opens the first user turn; the assistant is "model".
    "gemma3": (
        "<bos><start_of_turn>user\nBe brief.\n\nHi<end_of_turn>\n"
        "<start_of_turn>model\nHello.<end_of_turn>\n"
        "<start_of_turn>user\nBye<end_of_turn>\n"
        "<start_of_turn>model\nGoodbye.<end_of_turn>\n"
    ),
    "chatml": (
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n"
        "<|im_start|>assistant\nHello.<|im_end|>\n<|im_start|>user\nBye<|im_end|>\n"
        "<|im_start|>assistant\nGoodbye.<|im_end|>\n"
    ),
    "mistral": "<s>[INST] Be brief.\n\nHi[/INST] Hello.</s>[INST] Bye[/INST] Goodbye.</s>",
}
GENERATION_PROMPT = {
    "llama3": "<|start_header_id|>assistant<|end_header_id|>\n\n",
    "gemma3": "<start_of_turn>model\n",
    "chatml": "<|im_start|>assistant\n",
    "mistral": "[/INST]",
}


@pytest.fixture(scope="module")
def tokenizers() -> dict:
    return {family: AutoTokenizer.from_pretrained(TOKENIZERS / family) for family in FAMILIES}


@pytest.mark.parametrize("family", FAMILIES)
def test_builtin_template_renders_as_the_family_expects(tokenizers: dict, family: str) -> None:
    tok = tokenizers[family]
    text = tok.apply_chat_template(CONVERSATION, chat_template=TEMPLATES[family], tokenize=False)
    assert text == EXPECTED[family]
    prompt = tok.apply_chat_template(
        CONVERSATION[:2], chat_template=TEMPLATES[family], tokenize=False, add_generation_prompt=True
    )
    assert prompt.endswith(GENERATION_PROMPT[family])


@pytest.mark.parametrize("family", FAMILIES)
def test_builtin_generation_markers_cover_answer_and_end_of_turn(tokenizers: dict, family: str) -> None:
    tok = tokenizers[family]
    out = tok.apply_chat_template(
        CONVERSATION,
        chat_template=TEMPLATES[family],
        tokenize=True,
        return_dict=True,
        return_assistant_tokens_mask=True,
    )
    ids = [i for i, m in zip(out["input_ids"], out["assistant_masks"], strict=True) if m]
    eot = END_OF_TURN[family]
    assert tok.decode(ids).replace(" ", "") == f"Hello.{eot}Goodbye.{eot}".replace(" ", "")


def test_llama3_template_is_unchanged() -> None:
    # The tiny builtin tokenizer bakes this exact text in (its cache fingerprint hashes it).
    import hashlib

    assert hashlib.sha256(LLAMA3.encode()).hexdigest()[:16] == "c8f4e58255910fcb"


@pytest.mark.parametrize("family", FAMILIES)
def test_auto_uses_the_tokenizers_own_template_and_recognises_its_family(
    tokenizers: dict, family: str
) -> None:
    template = resolve_template(tokenizers[family], "auto")
    assert template.name == "tokenizer"
    assert template.family == family
    assert template.source == tokenizers[family].chat_template


@pytest.mark.parametrize("family", ["llama3", "gemma3", "chatml"])
def test_auto_without_a_template_picks_the_family_from_the_vocabulary(tokenizers: dict, family: str) -> None:
    tok = AutoTokenizer.from_pretrained(TOKENIZERS / family)
    tok.chat_template = None
    template = resolve_template(tok, "auto")
    assert (template.name, template.source) == (family, TEMPLATES[family])


def test_auto_without_template_or_known_tokens_asks_for_one(tokenizers: dict) -> None:
    tok = AutoTokenizer.from_pretrained(TOKENIZERS / "mistral")  # [/INST] is a token, so strip both
    tok.chat_template = None
    tok_vocab = tok.get_vocab

    def vocab() -> dict:
        return {k: v for k, v in tok_vocab().items() if k not in ("[INST]", "[/INST]")}

    tok.get_vocab = vocab
    with pytest.raises(DataError, match=re.escape("set data.template")):
        resolve_template(tok, "auto")
    with pytest.raises(DataError, match=re.escape("unknown template 'vicuna'")):
        resolve_template(tok, "vicuna")


@pytest.mark.parametrize(
    ("family", "expected"),
    [
        ("llama3", ["<|eot_id|>"]),
        ("gemma3", ["<end_of_turn>", "<eos>"]),
        ("chatml", ["<|im_end|>"]),
        ("mistral", ["</s>"]),
    ],
)
def test_end_of_turn_ids_per_family(tokenizers: dict, family: str, expected: list[str]) -> None:
    tok = tokenizers[family]
    ids = [tok.convert_tokens_to_ids(t) for t in expected]
    assert end_of_turn_ids(tok, family) == ids
    assert end_of_turn_ids(tok, "auto") == ids
