"""Chat templates (Jinja, as `tokenizer.chat_template` expects) and each family's end-of-turn token.

Training and sampling render conversations through the same template, so a model learns to end
its turn with the token that sampling stops on.
"""

from __future__ import annotations

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

TEMPLATES: dict[str, str] = {"llama3": LLAMA3}

# The token that ends an assistant turn, per template family.
END_OF_TURN: dict[str, str] = {"llama3": "<|eot_id|>"}
