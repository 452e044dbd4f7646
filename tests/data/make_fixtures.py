"""Writes the data-pipeline test fixtures: one small file per format, a folder, bad-data files,
and four small tokenizers (Llama 3, Gemma 3, ChatML, Mistral), each trained here on these texts
with its family's special tokens and carrying a chat template written like its family's own.

    .venv/bin/python tests/data/make_fixtures.py   # rewrites tests/data/{formats,bad,tokenizers}

Deterministic: the same files on every machine. The tests read the committed output.
"""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

HERE = Path(__file__).resolve().parent
FORMATS = HERE / "formats"
BAD = HERE / "bad"
TOKENIZERS = HERE / "tokenizers"

MULTI_TURN = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "Name a primary colour."},
    {"role": "assistant", "content": "Red."},
    {"role": "user", "content": "And another one?"},
    {"role": "assistant", "content": "Blue, then yellow."},
]
MESSAGES = [
    {"messages": MULTI_TURN},
    {
        "messages": [
            {"role": "user", "content": "What is 3 plus 4?"},
            {"role": "assistant", "content": "3 plus 4 is 7."},
        ]
    },
    {
        "messages": [
            {"role": "user", "content": "Spell cat backwards."},
            {"role": "assistant", "content": "tac"},
            {"role": "user", "content": "And dog?"},
            {"role": "assistant", "content": "god"},
            {"role": "user", "content": "Thanks!"},
            {"role": "assistant", "content": "You are welcome."},
        ]
    },
]
ALPACA = [
    {"instruction": "Give the opposite of hot.", "input": "", "output": "Cold."},
    {"instruction": "Add the numbers.", "input": "2 and 5", "output": "7"},
    {
        "instruction": "Translate to French.",
        "input": "cat",
        "output": "chat",
        "system": "You translate words.",
    },
]
SHAREGPT = [
    {
        "conversations": [
            {"from": "system", "value": "Answer briefly."},
            {"from": "human", "value": "Capital of Peru?"},
            {"from": "gpt", "value": "Lima."},
            {"from": "human", "value": "And of Chile?"},
            {"from": "gpt", "value": "Santiago."},
        ]
    },
    {"conversations": [{"from": "human", "value": "Colour of snow?"}, {"from": "gpt", "value": "White."}]},
]
TEXT = [
    {"text": "The quick brown fox jumps over the lazy dog."},
    {"text": "A second short document about colours: red, blue and yellow."},
    {"text": "Third."},
]
TOKENS = [
    {"input_ids": [1, 20, 21, 22, 23, 2]},
    {"input_ids": [1, 30, 31, 2], "labels": [-100, -100, 31, 2]},
]

# Chat templates as the families' own tokenizers ship them (trimmed of tool calling), so the
# tests exercise `data.template: auto` on real-world shapes, none with {% generation %} markers.
LLAMA31_TEMPLATE = (
    "{{- bos_token }}\n"
    '{%- if not date_string is defined %}{%- set date_string = "26 Jul 2024" %}{%- endif %}\n'
    "{%- if messages[0]['role'] == 'system' %}\n"
    "    {%- set system_message = messages[0]['content']|trim %}\n"
    "    {%- set messages = messages[1:] %}\n"
    '{%- else %}{%- set system_message = "" %}{%- endif %}\n'
    '{{- "<|start_header_id|>system<|end_header_id|>\\n\\n" }}\n'
    '{{- "Cutting Knowledge Date: December 2023\\n" }}\n'
    '{{- "Today Date: " + date_string + "\\n\\n" }}\n'
    "{{- system_message }}\n"
    '{{- "<|eot_id|>" }}\n'
    "{%- for message in messages %}\n"
    "    {{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n'+ message['content'] | trim + '<|eot_id|>' }}\n"
    "{%- endfor %}\n"
    "{%- if add_generation_prompt %}{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{%- endif %}\n"
)
# Meta's own chat template of meta-llama/Llama-3.1-8B-Instruct (tokenizer_config.json; Llama 3.3 ships
# the same text), verbatim: a system block is always emitted, with "Cutting Knowledge Date" and
# "Today Date" lines even when the conversation has no system message. tests/data/tokenizers/llama31
# carries it, so responses-only masking is tested on the exact format `apply_chat_template`, vLLM
# and Ollama send to the base model.
META_LLAMA31_TEMPLATE = r"""{{- bos_token }}
{%- if custom_tools is defined %}
    {%- set tools = custom_tools %}
{%- endif %}
{%- if not tools_in_user_message is defined %}
    {%- set tools_in_user_message = true %}
{%- endif %}
{%- if not date_string is defined %}
    {%- set date_string = "26 Jul 2024" %}
{%- endif %}
{%- if not tools is defined %}
    {%- set tools = none %}
{%- endif %}

{#- This block extracts the system message, so we can slot it into the right place. #}
{%- if messages[0]['role'] == 'system' %}
    {%- set system_message = messages[0]['content']|trim %}
    {%- set messages = messages[1:] %}
{%- else %}
    {%- set system_message = "" %}
{%- endif %}

{#- System message + builtin tools #}
{{- "<|start_header_id|>system<|end_header_id|>\n\n" }}
{%- if builtin_tools is defined or tools is not none %}
    {{- "Environment: ipython\n" }}
{%- endif %}
{%- if builtin_tools is defined %}
    {{- "Tools: " + builtin_tools | reject('equalto', 'code_interpreter') | join(", ") + "\n\n"}}
{%- endif %}
{{- "Cutting Knowledge Date: December 2023\n" }}
{{- "Today Date: " + date_string + "\n\n" }}
{%- if tools is not none and not tools_in_user_message %}
    {{- "You have access to the following functions. To call a function, please respond with JSON for a function call." }}
    {{- 'Respond in the format {"name": function name, "parameters": dictionary of argument name and its value}.' }}
    {{- "Do not use variables.\n\n" }}
    {%- for t in tools %}
        {{- t | tojson(indent=4) }}
        {{- "\n\n" }}
    {%- endfor %}
{%- endif %}
{{- system_message }}
{{- "<|eot_id|>" }}

{#- Custom tools are passed in a user message with some extra guidance #}
{%- if tools_in_user_message and not tools is none %}
    {#- Extract the first user message so we can plug it in here #}
    {%- if messages | length != 0 %}
        {%- set first_user_message = messages[0]['content']|trim %}
        {%- set messages = messages[1:] %}
    {%- else %}
        {{- raise_exception("Cannot put tools in the first user message when there's no first user message!") }}
{%- endif %}
    {{- '<|start_header_id|>user<|end_header_id|>\n\n' -}}
    {{- "Given the following functions, please respond with a JSON for a function call " }}
    {{- "with its proper arguments that best answers the given prompt.\n\n" }}
    {{- 'Respond in the format {"name": function name, "parameters": dictionary of argument name and its value}.' }}
    {{- "Do not use variables.\n\n" }}
    {%- for t in tools %}
        {{- t | tojson(indent=4) }}
        {{- "\n\n" }}
    {%- endfor %}
    {{- first_user_message + "<|eot_id|>"}}
{%- endif %}

{%- for message in messages %}
    {%- if not (message.role == 'ipython' or message.role == 'tool' or 'tool_calls' in message) %}
        {{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'+ message['content'] | trim + '<|eot_id|>' }}
    {%- elif 'tool_calls' in message %}
        {%- if not message.tool_calls|length == 1 %}
            {{- raise_exception("This model only supports single tool-calls at once!") }}
        {%- endif %}
        {%- set tool_call = message.tool_calls[0].function %}
        {%- if builtin_tools is defined and tool_call.name in builtin_tools %}
            {{- '<|start_header_id|>assistant<|end_header_id|>\n\n' -}}
            {{- "<|python_tag|>" + tool_call.name + ".call(" }}
            {%- for arg_name, arg_val in tool_call.arguments | items %}
                {{- arg_name + '="' + arg_val + '"' }}
                {%- if not loop.last %}
                    {{- ", " }}
                {%- endif %}
                {%- endfor %}
            {{- ")" }}
        {%- else  %}
            {{- '<|start_header_id|>assistant<|end_header_id|>\n\n' -}}
            {{- '{"name": "' + tool_call.name + '", ' }}
            {{- '"parameters": ' }}
            {{- tool_call.arguments | tojson }}
            {{- "}" }}
        {%- endif %}
        {%- if builtin_tools is defined %}
            {#- This means we're in ipython mode #}
            {{- "<|eom_id|>" }}
        {%- else %}
            {{- "<|eot_id|>" }}
        {%- endif %}
    {%- elif message.role == "tool" or message.role == "ipython" %}
        {{- "<|start_header_id|>ipython<|end_header_id|>\n\n" }}
        {%- if message.content is mapping or message.content is iterable %}
            {{- message.content | tojson }}
        {%- else %}
            {{- message.content }}
        {%- endif %}
        {{- "<|eot_id|>" }}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|start_header_id|>assistant<|end_header_id|>\n\n' }}
{%- endif %}
"""
GEMMA3_TEMPLATE = (
    "{{ bos_token }}\n"
    "{%- if messages[0]['role'] == 'system' -%}\n"
    "    {%- set first_user_prefix = messages[0]['content'] + '\\n\\n' -%}\n"
    "    {%- set loop_messages = messages[1:] -%}\n"
    "{%- else -%}\n"
    '    {%- set first_user_prefix = "" -%}\n'
    "    {%- set loop_messages = messages -%}\n"
    "{%- endif -%}\n"
    "{%- for message in loop_messages -%}\n"
    "    {%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) -%}\n"
    '        {{ raise_exception("Conversation roles must alternate user/assistant/user/assistant/...") }}\n'
    "    {%- endif -%}\n"
    "    {%- if (message['role'] == 'assistant') -%}{%- set role = \"model\" -%}{%- else -%}{%- set role = message['role'] -%}{%- endif -%}\n"
    "    {{ '<start_of_turn>' + role + '\\n' + (first_user_prefix if loop.first else \"\") }}\n"
    "    {{- message['content'] | trim }}\n"
    "    {{- '<end_of_turn>\\n' }}\n"
    "{%- endfor -%}\n"
    "{%- if add_generation_prompt -%}{{'<start_of_turn>model\\n'}}{%- endif -%}\n"
)
QWEN25_TEMPLATE = (
    "{%- if messages[0]['role'] == 'system' %}\n"
    "    {{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}\n"
    "{%- else %}\n"
    "    {{- '<|im_start|>system\\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\\n' }}\n"
    "{%- endif %}\n"
    "{%- for message in messages %}\n"
    '    {%- if (message.role == "user") or (message.role == "system" and not loop.first) or (message.role == "assistant") %}\n'
    "        {{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>' + '\\n' }}\n"
    "    {%- endif %}\n"
    "{%- endfor %}\n"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}\n"
)
# Mistral v0.3 puts the system prompt in the LAST user turn: rendering a prefix of a conversation
# moves it, so masking must fall back from prefix rendering to finding each answer in the text.
MISTRAL_TEMPLATE = (
    '{%- if messages[0]["role"] == "system" %}\n'
    '    {%- set system_message = messages[0]["content"] %}\n'
    "    {%- set loop_messages = messages[1:] %}\n"
    "{%- else %}{%- set loop_messages = messages %}{%- endif %}\n"
    "{{- bos_token }}\n"
    "{%- for message in loop_messages %}\n"
    '    {%- if message["role"] == "user" %}\n'
    "        {%- if loop.last and system_message is defined %}\n"
    '            {{- "[INST] " + system_message + "\\n\\n" + message["content"] + "[/INST]" }}\n'
    '        {%- else %}{{- "[INST] " + message["content"] + "[/INST]" }}{%- endif %}\n'
    '    {%- elif message["role"] == "assistant" %}\n'
    '        {{- " " + message["content"] + eos_token }}\n'
    "    {%- endif %}\n"
    "{%- endfor %}\n"
)

FAMILIES = {
    "llama3": {
        "special": [
            "<|begin_of_text|>",
            "<|end_of_text|>",
            "<|start_header_id|>",
            "<|end_header_id|>",
            "<|eot_id|>",
            "<|finetune_right_pad_id|>",
        ],
        "tokens": {
            "bos_token": "<|begin_of_text|>",
            "eos_token": "<|eot_id|>",
            "pad_token": "<|finetune_right_pad_id|>",
        },
        "template": LLAMA31_TEMPLATE,
        "metaspace": False,
    },
    "gemma3": {
        "special": ["<pad>", "<eos>", "<bos>", "<unk>", "<start_of_turn>", "<end_of_turn>"],
        "tokens": {"bos_token": "<bos>", "eos_token": "<eos>", "pad_token": "<pad>", "unk_token": "<unk>"},
        "template": GEMMA3_TEMPLATE,
        "metaspace": False,
    },
    "chatml": {
        "special": ["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        "tokens": {"eos_token": "<|im_end|>", "pad_token": "<|endoftext|>"},
        "template": QWEN25_TEMPLATE,
        "metaspace": False,
    },
    "mistral": {
        "special": ["<unk>", "<s>", "</s>", "[INST]", "[/INST]"],
        "tokens": {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"},
        "template": MISTRAL_TEMPLATE,
        "metaspace": True,  # sentencepiece-style "▁word" tokens: a token can straddle a template space
    },
}


def write_jsonl(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")


def write_csv(path: Path, header: list[str], rows: list[list[str]]) -> None:
    with path.open("w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(header)
        writer.writerows(rows)


def formats() -> None:
    shutil.rmtree(FORMATS, ignore_errors=True)
    FORMATS.mkdir()
    write_jsonl(FORMATS / "alpaca.jsonl", ALPACA)
    (FORMATS / "alpaca.json").write_text(json.dumps(ALPACA, indent=2), encoding="utf-8")
    write_jsonl(FORMATS / "messages.jsonl", MESSAGES)
    (FORMATS / "sharegpt.json").write_text(json.dumps(SHAREGPT, indent=2), encoding="utf-8")
    write_jsonl(FORMATS / "text.jsonl", TEXT)
    write_jsonl(FORMATS / "tokens.jsonl", TOKENS)
    write_csv(
        FORMATS / "alpaca.csv",
        ["instruction", "input", "output"],
        [[r["instruction"], r["input"], r["output"]] for r in ALPACA],
    )
    write_csv(
        FORMATS / "qa.csv",
        ["question", "answer"],
        [["Opposite of up?", "Down."], ["Opposite of big?", "Small."]],
    )
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pylist(MESSAGES), FORMATS / "messages.parquet")
    write_jsonl(FORMATS / "folder" / "part-0.jsonl", MESSAGES[:2])
    write_jsonl(FORMATS / "folder" / "nested" / "part-1.jsonl", MESSAGES[2:])
    (FORMATS / "folder" / "README.txt").write_text("not data: ignored\n", encoding="utf-8")
    # One conversation as a whole JSON file: one record, not a {"data": [...]} wrapper.
    (FORMATS / "conversation.json").write_text(json.dumps(MESSAGES[0], indent=2), encoding="utf-8")


def bad() -> None:
    shutil.rmtree(BAD, ignore_errors=True)
    BAD.mkdir()
    ok = json.dumps(MESSAGES[1])
    (BAD / "empty.jsonl").write_bytes(b"")
    (BAD / "blank.jsonl").write_text("\n  \n\n", encoding="utf-8")
    (BAD / "malformed.jsonl").write_text(f'{ok}\n{ok}\n{{"messages": [}}\n', encoding="utf-8")
    (BAD / "malformed.json").write_text('[\n  {"text": "a"},\n  {"text": "b",}\n]\n', encoding="utf-8")
    write_jsonl(BAD / "missing_output.jsonl", [ALPACA[0], {"instruction": "Say hi."}])
    write_csv(
        BAD / "empty_instruction.csv",
        ["instruction", "input", "output"],
        [["Say hi.", "", "Hi."], ["  ", "", "Hello."]],
    )
    write_csv(BAD / "short_row.csv", ["instruction", "input", "output"], [["Say hi.", "", "Hi."]])
    with (BAD / "short_row.csv").open("a", encoding="utf-8") as f:
        f.write("only one field\n")
    user_twice = [
        {"role": "user", "content": "Hi"},
        {"role": "user", "content": "Hello?"},
        {"role": "assistant", "content": "Hey."},
    ]
    write_jsonl(BAD / "not_alternating.jsonl", [MESSAGES[1], {"messages": user_twice}])
    write_jsonl(
        BAD / "starts_with_assistant.jsonl",
        [{"messages": [{"role": "assistant", "content": "Hi"}, {"role": "user", "content": "Hi"}]}],
    )
    write_jsonl(
        BAD / "empty_assistant.jsonl",
        [{"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "  "}]}],
    )
    write_jsonl(
        BAD / "no_assistant.jsonl",
        [{"messages": [{"role": "system", "content": "Be nice."}, {"role": "user", "content": "Hi"}]}],
    )
    write_jsonl(
        BAD / "bad_role.jsonl",
        [{"messages": [{"role": "user", "content": "Hi"}, {"role": "tool", "content": "{}"}]}],
    )
    write_jsonl(
        BAD / "late_system.jsonl",
        [
            {
                "messages": [
                    {"role": "user", "content": "Hi"},
                    {"role": "system", "content": "x"},
                    {"role": "assistant", "content": "Hey"},
                ]
            }
        ],
    )
    write_jsonl(BAD / "unknown_format.jsonl", [{"question": "Hi?", "reply": "Hey."}])
    write_jsonl(
        BAD / "sharegpt_empty_gpt.jsonl",
        [SHAREGPT[1], {"conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": ""}]}],
    )
    write_jsonl(BAD / "tokens_labels_mismatch.jsonl", [{"input_ids": [1, 2, 3], "labels": [1, 2]}])
    # A conversation exploded into one message per line.
    write_jsonl(BAD / "one_message_per_line.jsonl", [MESSAGES[1], *MESSAGES[1]["messages"]])
    # A folder whose files hold different shapes of record.
    write_jsonl(BAD / "mixed" / "a-chat.jsonl", MESSAGES[:2])
    write_jsonl(BAD / "mixed" / "b-alpaca.jsonl", ALPACA[:2])
    (BAD / "non_utf8.jsonl").write_bytes(ok.encode() + b"\n" + b'{"text": "caf\xe9"}\n')
    (BAD / "non_utf8.csv").write_bytes(b"text\nfine\nna\xefve\xff\n")
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(
        pa.Table.from_pylist(
            [{"instruction": "Say hi.", "output": "Hi."}, {"instruction": "Say bye.", "output": ""}]
        ),
        BAD / "empty_output.parquet",
    )


def training_texts() -> list[str]:
    texts = []
    for conversation in MESSAGES:
        texts += [m["content"] for m in conversation["messages"]]
    for row in ALPACA:
        texts += [row["instruction"], row["input"], row["output"], row.get("system", "")]
    for conversation in SHAREGPT:
        texts += [m["value"] for m in conversation["conversations"]]
    texts += [t["text"] for t in TEXT]
    texts += [
        "Cutting Knowledge Date: December 2023",
        "Today Date: 26 Jul 2024",
        "You are Qwen, created by Alibaba Cloud.",
    ]
    return texts


def tokenizers() -> None:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    shutil.rmtree(TOKENIZERS, ignore_errors=True)
    for family, spec in FAMILIES.items():
        tok = Tokenizer(models.BPE(unk_token=spec["tokens"].get("unk_token")))
        if spec["metaspace"]:
            tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
            tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="first")
            alphabet = [chr(c) for c in range(32, 127)] + ["▁", "\n"]
        else:
            tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
            tok.decoder = decoders.ByteLevel()
            alphabet = pre_tokenizers.ByteLevel.alphabet()
        trainer = trainers.BpeTrainer(
            vocab_size=400, special_tokens=spec["special"], initial_alphabet=alphabet, show_progress=False
        )
        tok.train_from_iterator(training_texts(), trainer)
        fast = PreTrainedTokenizerFast(tokenizer_object=tok, model_max_length=4096, **spec["tokens"])
        fast.chat_template = spec["template"]
        fast.save_pretrained(TOKENIZERS / family)


def llama31() -> None:
    """The Llama 3 fixture tokenizer with Meta's 3.1 template (the vocabulary already holds the
    template's "Cutting Knowledge Date" and "Today Date" words)."""
    target = TOKENIZERS / "llama31"
    shutil.rmtree(target, ignore_errors=True)
    target.mkdir(parents=True)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(TOKENIZERS / "llama3" / name, target / name)
    (target / "chat_template.jinja").write_text(META_LLAMA31_TEMPLATE, encoding="utf-8")


if __name__ == "__main__":
    formats()
    bad()
    tokenizers()
    llama31()
