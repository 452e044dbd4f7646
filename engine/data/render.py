"""A conversation -> the text its chat template renders, and the character spans to train on.

Two ways to find the spans, for one result: each assistant turn's content and its end-of-turn token.

- `{% generation %}` markers (the built-in templates have them; some models' own do): one render
  reports where each generation block starts and ends, as `apply_chat_template(...,
  return_assistant_tokens_mask=True)` does.
- Any other template (Meta's Llama 3.1 template with its system block and dates, Gemma's, Qwen's):
  render growing prefixes. The text for messages[:i] with the generation prompt ends where
  assistant turn i's content begins; the text for messages[:i+1] ends with that turn. Templates
  that rewrite earlier turns (Qwen 3 drops old reasoning; Mistral v0.3 moves the system prompt
  into the last user turn) break that prefix property; there each answer is found in the text.

Rendering goes through transformers' own Jinja renderer (`render_jinja_template`, the function
`apply_chat_template` calls, with the tokenizer's special tokens as its variables), which is
importable without torch: the tokenizing worker processes use it too.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

from engine.data.errors import at
from engine.data.formats import Example
from engine.data.templates import ChatTemplate

Span = tuple[int, int]
RenderFn = Callable[[list[dict[str, str]], bool, bool], tuple[str, list[Span]]]

_GENERATION = re.compile(r"\{%-?\s*generation\s*-?%\}")


def has_generation_markers(source: str) -> bool:
    return bool(_GENERATION.search(source))


def jinja_renderer(template: ChatTemplate, variables: dict[str, Any]) -> RenderFn | None:
    """transformers' renderer for `template`, or None when this transformers has no such function."""
    try:
        from transformers.utils.chat_template_utils import render_jinja_template
    except ImportError:  # pragma: no cover - moved in some future transformers
        return None

    def render(
        messages: list[dict[str, str]], generation_prompt: bool, track: bool
    ) -> tuple[str, list[Span]]:
        texts, indices = render_jinja_template(
            conversations=[messages],
            chat_template=template.source,
            add_generation_prompt=generation_prompt,
            return_assistant_tokens_mask=track,
            **variables,
        )
        return texts[0], [tuple(span) for span in indices[0]] if track else []

    return render


def tokenizer_renderer(tokenizer: Any, template: ChatTemplate) -> RenderFn:
    """The same through `tokenizer.apply_chat_template` (no generation spans)."""

    def render(
        messages: list[dict[str, str]], generation_prompt: bool, track: bool
    ) -> tuple[str, list[Span]]:
        text = tokenizer.apply_chat_template(
            messages, chat_template=template.source, tokenize=False, add_generation_prompt=generation_prompt
        )
        return text, []

    return render


class Renderer:
    """Renders conversations through one template and finds the spans to train on."""

    def __init__(self, template: ChatTemplate, render: RenderFn, markers: bool | None = None) -> None:
        self.template = template
        self._render = render
        self.markers = has_generation_markers(template.source) if markers is None else markers

    def render(self, messages: list[dict[str, str]], generation_prompt: bool = False) -> str:
        return self._render(messages, generation_prompt, False)[0]

    def spans(self, example: Example) -> tuple[str, list[Span]]:
        """The rendered conversation and the character spans to train on."""
        from jinja2 import TemplateError

        try:
            found = self._marker_spans(example) if self.markers else None
            full, spans = found if found is not None else self._prefix_spans(example)
            # One span per assistant message, in order: leave out the ones marked weight 0.
            return full, [s for i, s in enumerate(spans) if i not in example.untrained]
        except TemplateError as exc:  # the template's own raise_exception (roles must alternate, ...)
            raise at(
                example.where,
                f"the {self.template.name} chat template refused this conversation: {exc}",
                "fix the conversation or choose data.template",
            ) from None

    def _end_turn(self, full: str, start: int, end: int) -> int:
        """Where a trained span ends: just after the end-of-turn token (not the newline some
        templates add after it), else at the turn's last non-space character."""
        eot = self.template.end_of_turn
        turn = full[start:end]
        if eot and eot in turn:
            return start + turn.rindex(eot) + len(eot)
        if eot and full[end:].lstrip(" \t\n").startswith(eot):
            return full.index(eot, end) + len(eot)
        while end > start and full[end - 1].isspace():
            end -= 1
        return end

    def _marker_spans(self, example: Example) -> tuple[str, list[Span]] | None:
        messages = example.messages or []
        full, blocks = self._render(messages, False, True)
        if len(blocks) != sum(m["role"] == "assistant" for m in messages):
            return None  # a template that marks only some turns: find them by prefixes instead
        spans: list[Span] = []
        cursor = 0
        for start, end in blocks:
            if start < cursor:
                return None
            end = self._end_turn(full, start, end)
            spans.append((start, end))
            cursor = end
        return full, spans

    def _prefix_spans(self, example: Example) -> tuple[str, list[Span]]:
        messages = example.messages or []
        full = self.render(messages)
        eot = self.template.end_of_turn
        spans: list[Span] = []
        cursor = 0
        for i, message in enumerate(messages):
            if message["role"] != "assistant":
                continue
            before = self.render(messages[:i], generation_prompt=True)
            through = self.render(messages[: i + 1])
            if full.startswith(through) and through.startswith(before) and len(before) >= cursor:
                start, end = len(before), len(through)
            else:
                # The template rewrites earlier turns: find the content itself instead.
                content = message["content"].strip()
                start = full.find(content, cursor)
                if start < 0:
                    raise at(
                        example.where,
                        f"the {self.template.name} chat template does not render assistant message {i + 1} verbatim",
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
