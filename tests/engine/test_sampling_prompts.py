"""What a sample's prompt becomes: the chat template's user turn for a run that trained on
conversations, the text as written for one that trained on plain text (its adapter never saw a
chat turn), decided by the format the run recorded."""

from __future__ import annotations

from pathlib import Path

import pytest
from transformers import AutoTokenizer

from engine import protocol
from engine.config import load_preset
from engine.models.tiny_build import ensure_builtin
from engine.run import runs
from engine.train.sample_checkpoint import trained_on_chats
from engine.train.sampling import prompt_ids


@pytest.fixture(scope="module")
def tok():
    return AutoTokenizer.from_pretrained(ensure_builtin("builtin:tiny-llama"))


def test_a_chat_run_gets_the_template_and_a_text_run_the_text(tok) -> None:
    request = protocol.SampleRequest(prompt="Once upon a time")
    turn = [{"role": "user", "content": "Once upon a time"}]
    templated = tok.apply_chat_template(turn, add_generation_prompt=True, tokenize=True, return_dict=True)
    assert prompt_ids(tok, request) == list(templated["input_ids"])
    text = prompt_ids(tok, request, chat=False)
    assert text == tok("Once upon a time")["input_ids"]  # bos and the text, as text rows begin
    assert "user" not in tok.decode(text)


@pytest.mark.parametrize(
    ("recorded", "pinned", "chats"),
    [
        ("text", "auto", False),  # auto detected text: continue the prompt
        ("tokens", "auto", False),
        ("messages", "auto", True),
        ("", "text", False),  # an engine before protocol 1.6: only a pinned format tells
        ("", "auto", True),
        (None, "auto", True),  # no data_ready at all
    ],
)
def test_the_run_records_which_prompts_it_learned(
    tmp_path: Path, recorded: str | None, pinned: str, chats: bool
) -> None:
    run_dir = runs.create_run(tmp_path / "runs", load_preset("tiny-demo", [f"data.format={pinned}"]))
    events = [protocol.Hello(run_id=run_dir.name, mode="train")]
    if recorded is not None:
        events.append(protocol.DataReady(train_examples=10, format=recorded))
    (run_dir / runs.EVENTS).write_bytes(b"".join(protocol.encode(e) for e in events))
    assert trained_on_chats(run_dir, pinned) is chats
