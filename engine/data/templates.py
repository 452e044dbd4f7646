"""Chat templates (Jinja, as `tokenizer.chat_template` expects) and each family's end-of-turn token.

Training and sampling render conversations through the same template, so a model learns to end
its turn with the token that sampling stops on.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

# Llama 3.x: a turn is <|start_header_id|>role<|end_header_id|>\n\ncontent<|eot_id|>.
# The {% generation %} markers let `apply_chat_template(..., return_assistant_tokens_mask=True)`
# report exactly the assistant tokens, end-of-turn included.
LLAMA3 = (
    "{{- bos_token }}"
    "{%- for message in messages %}"
    "{%- if message['role'] == 'assistant' %}"
    "{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}"
    "{% generation %}{{- message['content'] | trim + '<|eot_id|>' }}{% endgeneration %}"
    "{%- else %}"
    "{{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' + message['content'] | trim + '<|eot_id|>' }}"
    "{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{%- endif %}"
)

# Families without a system role fold the system text into the first user turn: this prologue sets
# `first_user_prefix` and the `loop_messages` the turns are rendered from.
_FOLD_SYSTEM = (
    "{%- if messages[0]['role'] == 'system' %}"
    "{%- set first_user_prefix = messages[0]['content'] | trim + '\\n\\n' %}"
    "{%- set loop_messages = messages[1:] %}"
    "{%- else %}"
    "{%- set first_user_prefix = '' %}"
    "{%- set loop_messages = messages %}"
    "{%- endif %}"
)

# Gemma 3: no system role (the system text opens the first user turn), the assistant is "model".
GEMMA3 = (
    "{{- bos_token }}" + _FOLD_SYSTEM + "{%- for message in loop_messages %}"
    "{%- if message['role'] == 'assistant' %}"
    "{{- '<start_of_turn>model\\n' }}"
    "{% generation %}{{- message['content'] | trim + '<end_of_turn>' }}{% endgeneration %}"
    "{{- '\\n' }}"
    "{%- else %}"
    "{{- '<start_of_turn>user\\n' + (first_user_prefix if loop.first else '') + message['content'] | trim + '<end_of_turn>\\n' }}"
    "{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<start_of_turn>model\\n' }}{%- endif %}"
)

# ChatML (Qwen 2.5 / Qwen 3): <|im_start|>role\ncontent<|im_end|>\n, no BOS.
CHATML = (
    "{%- for message in messages %}"
    "{%- if message['role'] == 'assistant' %}"
    "{{- '<|im_start|>assistant\\n' }}"
    "{% generation %}{{- message['content'] | trim + '<|im_end|>' }}{% endgeneration %}"
    "{{- '\\n' }}"
    "{%- else %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] | trim + '<|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)

# Mistral (v0.3 style): <s>[INST] user[/INST] answer</s>; no system role (prepended to the first
# user turn, as for Gemma), and an answer ends with </s>, the model's end of sequence. There is no
# generation prompt beyond [/INST], so the space before an answer is the model's to write: it is
# inside the generation block (a sentencepiece "▁" on its own is a trained token).
MISTRAL = (
    "{{- bos_token }}" + _FOLD_SYSTEM + "{%- for message in loop_messages %}"
    "{%- if message['role'] == 'assistant' %}"
    "{% generation %}{{- ' ' + message['content'] | trim + '</s>' }}{% endgeneration %}"
    "{%- else %}"
    "{{- '[INST] ' + (first_user_prefix if loop.first else '') + message['content'] | trim + '[/INST]' }}"
    "{%- endif %}"
    "{%- endfor %}"
)

TEMPLATES: dict[str, str] = {"llama3": LLAMA3, "gemma3": GEMMA3, "chatml": CHATML, "mistral": MISTRAL}
TEMPLATE_NAMES = ("auto", *TEMPLATES)

# The token that ends an assistant turn, per template family. Sampling stops on it; a model
# trained without it in its labels never learns to stop.
END_OF_TURN: dict[str, str] = {
    "llama3": "<|eot_id|>",
    "gemma3": "<end_of_turn>",
    "chatml": "<|im_end|>",
    "mistral": "</s>",
}

# The families without a system role: their templates fold the system text into the first user turn.
NO_SYSTEM_ROLE = ("gemma3", "mistral")


@dataclass(frozen=True)
class ChatTemplate:
    """The template a run trains (and samples) with."""

    name: str
    """llama3 / gemma3 / chatml / mistral, or "tokenizer" for the model's own template."""
    family: str | None
    """Which END_OF_TURN entry applies; None when the tokenizer's own template is not recognised."""
    source: str
    """The Jinja text, as `tokenizer.chat_template` holds it."""

    @property
    def end_of_turn(self) -> str | None:
        return END_OF_TURN.get(self.family) if self.family else None


def family_of(text: str) -> str | None:
    """Recognise a family from a template's text (or any text that holds its turn markers)."""
    markers = [
        ("llama3", "<|eot_id|>"),
        ("gemma3", "<end_of_turn>"),
        ("chatml", "<|im_end|>"),
        ("mistral", "[/INST]"),
    ]
    return next((family for family, marker in markers if marker in text), None)


def _vocab_family(tokenizer: Any) -> str | None:
    vocab = tokenizer.get_vocab()
    markers = [
        ("llama3", "<|eot_id|>"),
        ("gemma3", "<end_of_turn>"),
        ("chatml", "<|im_end|>"),
        ("mistral", "[/INST]"),
    ]
    return next((family for family, token in markers if token in vocab), None)


def resolve_template(tokenizer: Any, name: str) -> ChatTemplate:
    """`data.template` -> the template to render with.

    "auto" is the tokenizer's own template when it has one, else the built-in template of the family
    whose turn tokens are in its vocabulary.
    """
    from engine.data.errors import DataError

    if name in TEMPLATES:
        return ChatTemplate(name, name, TEMPLATES[name])
    if name != "auto":
        raise DataError(
            f"data.template: unknown template {name!r}", f"use one of {', '.join(TEMPLATE_NAMES)}"
        )
    own = getattr(tokenizer, "chat_template", None)
    if isinstance(own, dict):  # several named templates: "default" is the chat one
        own = own.get("default")
    if isinstance(own, str) and own.strip():
        return ChatTemplate("tokenizer", family_of(own), own)
    family = _vocab_family(tokenizer)
    if family is None:
        raise DataError(
            "data.template: the tokenizer has no chat template and no known turn tokens",
            "set data.template to llama3, gemma3, chatml or mistral",
        )
    return ChatTemplate(family, family, TEMPLATES[family])


def end_of_turn_ids(tokenizer: Any, template_name: str) -> list[int]:
    """Token ids that end an assistant turn, for stopping generation: the family's end-of-turn
    token (when it is one token of this vocabulary) and the tokenizer's own end of sequence.

    `template_name` is a family name, "auto" (resolved against the tokenizer), or "tokenizer".
    """
    family: str | None = template_name if template_name in END_OF_TURN else None
    if family is None and template_name in ("auto", "tokenizer"):
        own = getattr(tokenizer, "chat_template", None)
        family = family_of(own) if isinstance(own, str) else _vocab_family(tokenizer)
    ids: list[int] = []
    if family is not None:
        token_id = tokenizer.convert_tokens_to_ids(END_OF_TURN[family])
        if isinstance(token_id, int) and token_id != getattr(tokenizer, "unk_token_id", None):
            ids.append(token_id)
    eos = getattr(tokenizer, "eos_token_id", None)
    if isinstance(eos, int) and eos not in ids:
        ids.append(eos)
    return ids
