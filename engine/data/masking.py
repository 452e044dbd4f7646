"""Examples -> token ids and labels: render through the chat template, tokenize, mask.

With responses_only, labels are -100 everywhere except on each assistant turn's content and its
end-of-turn token, on every turn of a multi-turn conversation. The trained character spans are
found by rendering growing prefixes of the conversation: the text a template adds for messages
[:i] with the generation prompt ends exactly where assistant turn i's content begins, and the
text for messages [:i+1] ends with that turn. This works for any template (the tokenizer's own
included) without {% generation %} markers. Tokens are then labelled by their character offsets.

The first token of every example is never a label: nothing before it predicts it, and in a packed
row the token before it belongs to another example.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from engine.data.errors import at
from engine.data.formats import Example
from engine.data.templates import ChatTemplate

IGNORE = -100
Span = tuple[int, int]


@dataclass
class Encoded:
    where: str
    input_ids: list[int]
    labels: list[int]


def render(
    tokenizer: Any, template: ChatTemplate, messages: list[dict[str, str]], generation_prompt: bool = False
) -> str:
    return tokenizer.apply_chat_template(
        messages, chat_template=template.source, tokenize=False, add_generation_prompt=generation_prompt
    )


def assistant_spans(tokenizer: Any, template: ChatTemplate, example: Example) -> tuple[str, list[Span]]:
    """The rendered conversation and the character spans to train on (assistant content + end of turn)."""
    messages = example.messages or []
    full = render(tokenizer, template, messages)
    eot = template.end_of_turn
    spans: list[Span] = []
    cursor = 0
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        before = render(tokenizer, template, messages[:i], generation_prompt=True)
        through = render(tokenizer, template, messages[: i + 1])
        if full.startswith(through) and through.startswith(before) and len(before) >= cursor:
            start, end = len(before), len(through)
        else:
            # Templates that rewrite earlier turns (Qwen 3 drops old reasoning, say) break the
            # prefix property; find the content itself instead.
            content = message["content"].strip()
            start = full.find(content, cursor)
            if start < 0:
                raise at(
                    example.where,
                    f"the {template.name} chat template does not render assistant message {i + 1} verbatim",
                    "choose data.template",
                )
            end = start + len(content)
            if eot and full[end:].lstrip(" \t\n").startswith(eot):
                end = full.index(eot, end) + len(eot)
        turn = full[start:end]
        if eot and eot in turn:  # keep the end-of-turn token, not the newline templates add after it
            end = start + turn.rindex(eot) + len(eot)
        else:
            while end > start and full[end - 1].isspace():
                end -= 1
        spans.append((start, end))
        cursor = end
    return full, spans


def _label_by_offsets(ids: list[int], offsets: list[Span], spans: list[Span]) -> list[int]:
    labels = [IGNORE] * len(ids)
    k = 0
    for j, (a, b) in enumerate(offsets):
        while k < len(spans) and spans[k][1] <= a:
            k += 1
        if k == len(spans):
            break
        s, e = spans[k]
        # Any overlap counts: a token that straddles the start of an answer (" Hello" after
        # "[/INST]") carries answer text and must be learned.
        if (b > s and a < e) or (a == b and s <= a < e):
            labels[j] = ids[j]
    return labels


def _encode_chat_batch(
    tokenizer: Any, template: ChatTemplate, examples: list[Example], responses_only: bool
) -> list[Encoded]:
    rendered = [assistant_spans(tokenizer, template, ex) for ex in examples]
    texts = [text for text, _ in rendered]
    try:
        batch = tokenizer(texts, add_special_tokens=False, return_offsets_mapping=True)
    except NotImplementedError:  # a slow tokenizer has no offsets: tokenize piece by piece
        return [
            _encode_pieces(tokenizer, ex, text, spans, responses_only)
            for ex, (text, spans) in zip(examples, rendered, strict=True)
        ]
    out = []
    for ex, (_, spans), ids, offsets in zip(
        examples, rendered, batch["input_ids"], batch["offset_mapping"], strict=True
    ):
        labels = _label_by_offsets(ids, [tuple(o) for o in offsets], spans) if responses_only else list(ids)
        out.append(_finish(ex.where, list(ids), labels))
    return out


def _encode_pieces(
    tokenizer: Any, ex: Example, text: str, spans: list[Span], responses_only: bool
) -> Encoded:
    ids: list[int] = []
    labels: list[int] = []
    cursor = 0
    for s, e in [*spans, (len(text), len(text))]:
        for piece, trained in ((text[cursor:s], False), (text[s:e], True)):
            if piece:
                piece_ids = tokenizer(piece, add_special_tokens=False)["input_ids"]
                ids += piece_ids
                labels += piece_ids if (trained or not responses_only) else [IGNORE] * len(piece_ids)
        cursor = e
    return _finish(ex.where, ids, labels)


def _encode_text(tokenizer: Any, ex: Example) -> Encoded:
    ids = tokenizer(ex.text, add_special_tokens=False)["input_ids"]
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    ids = ([bos] if bos is not None else []) + list(ids) + ([eos] if eos is not None else [])
    return _finish(ex.where, ids, list(ids))


def _encode_tokens(tokenizer: Any, ex: Example) -> Encoded:
    ids = list(ex.input_ids or [])
    vocab = len(tokenizer)
    if max(ids) >= vocab:
        raise at(
            ex.where,
            f"input_ids holds token id {max(ids)}, beyond this tokenizer's {vocab} tokens",
            "tokenize with the model's tokenizer",
        )
    return _finish(ex.where, ids, list(ex.labels) if ex.labels is not None else list(ids))


def _finish(where: str, ids: list[int], labels: list[int]) -> Encoded:
    if labels:
        labels[0] = IGNORE
    return Encoded(where, ids, labels)


def encode(
    tokenizer: Any,
    template: ChatTemplate | None,
    examples: list[Example],
    responses_only: bool,
    progress: Callable[[int, int], None] | None = None,
    batch_size: int = 512,
) -> list[Encoded]:
    """Every example -> ids and labels, in order. Chats are tokenized in batches (the fast
    tokenizer parallelises a batch in Rust)."""
    out: list[Encoded] = []
    for first in range(0, len(examples), batch_size):
        chunk = examples[first : first + batch_size]
        chats = [ex for ex in chunk if ex.kind == "chat"]
        if chats and template is None:
            raise at(chats[0].where, "a conversation needs a chat template", "set data.template")
        encoded_chats = iter(_encode_chat_batch(tokenizer, template, chats, responses_only) if chats else [])
        for ex in chunk:
            if ex.kind == "chat":
                out.append(next(encoded_chats))
            elif ex.kind == "text":
                out.append(_encode_text(tokenizer, ex))
            else:
                out.append(_encode_tokens(tokenizer, ex))
        if progress:
            progress(len(out), len(examples))
    return out
