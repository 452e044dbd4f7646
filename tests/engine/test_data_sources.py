"""Reading and validating data sources: every format, folders, column mapping, and the bad-data
matrix (each problem is one DataError line naming the file, the line or row, and the problem)."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from engine.config import DataConfig, RunConfig
from engine.data import DataError, check_source
from engine.data.check import read_examples
from engine.errors import UserError

DATA = Path(__file__).resolve().parent.parent / "data"
FORMATS = DATA / "formats"
BAD = DATA / "bad"


def cfg_for(source: Path | str, **data: object) -> RunConfig:
    return RunConfig(data=DataConfig(source=str(source), **data))  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("name", "fmt", "examples", "turns"),
    [
        ("alpaca.jsonl", "alpaca", 3, 3),
        ("alpaca.json", "alpaca", 3, 3),
        ("alpaca.csv", "alpaca", 3, 3),
        ("messages.jsonl", "messages", 3, 6),
        ("messages.parquet", "messages", 3, 6),
        ("sharegpt.json", "sharegpt", 2, 3),
        ("text.jsonl", "text", 3, 0),
        ("tokens.jsonl", "tokens", 2, 0),
        ("folder", "messages", 3, 6),
    ],
)
def test_each_format_is_detected_and_counted(name: str, fmt: str, examples: int, turns: int) -> None:
    summary = check_source(cfg_for(FORMATS / name))
    assert (summary.location, summary.format, summary.examples, summary.assistant_turns) == (
        "local",
        fmt,
        examples,
        turns,
    )


def test_folder_reads_nested_files_in_path_order_and_skips_other_files() -> None:
    summary = check_source(cfg_for(FORMATS / "folder"))
    assert [Path(f).relative_to(FORMATS / "folder").as_posix() for f in summary.files] == [
        "nested/part-1.jsonl",
        "part-0.jsonl",
    ]


def test_alpaca_becomes_a_conversation_with_input_and_system() -> None:
    examples, fmt = read_examples(str(FORMATS / "alpaca.jsonl"), DataConfig())
    assert fmt == "alpaca"
    assert examples[0].messages == [
        {"role": "user", "content": "Give the opposite of hot."},
        {"role": "assistant", "content": "Cold."},
    ]
    assert examples[1].messages[0] == {"role": "user", "content": "Add the numbers.\n\n2 and 5"}
    assert examples[2].messages[0] == {"role": "system", "content": "You translate words."}
    assert examples[0].where.endswith("alpaca.jsonl: line 1")


def test_sharegpt_roles_map_to_chat_roles() -> None:
    examples, _ = read_examples(str(FORMATS / "sharegpt.json"), DataConfig())
    assert [m["role"] for m in examples[0].messages or []] == [
        "system",
        "user",
        "assistant",
        "user",
        "assistant",
    ]
    assert examples[0].where.endswith("sharegpt.json: record 1")


def test_columns_map_a_dataset_onto_a_format() -> None:
    d = DataConfig(format="alpaca", columns={"instruction": "question", "output": "answer"})
    examples, _ = read_examples(str(FORMATS / "qa.csv"), d)
    assert examples[1].messages == [
        {"role": "user", "content": "Opposite of big?"},
        {"role": "assistant", "content": "Small."},
    ]


def test_system_prompt_is_added_where_a_conversation_has_none() -> None:
    d = DataConfig(system_prompt="Be kind.")
    examples, _ = read_examples(str(FORMATS / "messages.jsonl"), d)
    assert examples[0].messages[0] == {"role": "system", "content": "You are terse."}
    assert examples[1].messages[0] == {"role": "system", "content": "Be kind."}


def test_tokens_keep_ids_and_labels() -> None:
    examples, _ = read_examples(str(FORMATS / "tokens.jsonl"), DataConfig())
    assert examples[0].input_ids == [1, 20, 21, 22, 23, 2] and examples[0].labels is None
    assert examples[1].labels == [-100, -100, 31, 2]


def test_hub_id_is_left_for_load_time() -> None:
    summary = check_source(cfg_for("tatsu-lab/alpaca"))
    assert summary.location == "hub" and "checked when the run loads" in summary.note


def test_val_source_and_max_examples_are_reported() -> None:
    summary = check_source(
        cfg_for(FORMATS / "messages.jsonl", val_source=str(FORMATS / "alpaca.jsonl"), max_examples=2)
    )
    assert summary.eval_source_examples == 3
    assert "first 2 of 3" in summary.note


# ---------------------------------------------------------------------------------------------
# The bad-data matrix
# ---------------------------------------------------------------------------------------------

BAD_CASES = [
    ("empty.jsonl", {}, "empty.jsonl: the file is empty"),
    ("blank.jsonl", {}, "blank.jsonl: the file holds no records"),
    ("malformed.jsonl", {}, "malformed.jsonl: line 3: malformed JSON"),
    ("malformed.json", {}, "malformed.json: line 3: malformed JSON"),
    ("missing_output.jsonl", {}, "missing_output.jsonl: line 2: missing field 'output'"),
    ("empty_instruction.csv", {}, "empty_instruction.csv: row 2: field 'instruction' is empty"),
    ("short_row.csv", {}, "short_row.csv: row 2: has fewer fields than the header"),
    (
        "not_alternating.jsonl",
        {},
        "not_alternating.jsonl: line 2: message 2 is user after user; roles must alternate",
    ),
    (
        "starts_with_assistant.jsonl",
        {},
        "line 1: message 1 is assistant; a conversation must start with a user message",
    ),
    ("empty_assistant.jsonl", {}, "empty_assistant.jsonl: line 1: message 2 (assistant) is empty"),
    ("no_assistant.jsonl", {}, "no_assistant.jsonl: line 1: the conversation has no assistant message"),
    ("bad_role.jsonl", {}, "bad_role.jsonl: line 1: message 2 has role 'tool'"),
    ("late_system.jsonl", {}, "late_system.jsonl: line 1: message 2 is a system message"),
    (
        "unknown_format.jsonl",
        {},
        "unknown_format.jsonl: line 1: cannot tell the dataset format from its fields (question, reply)",
    ),
    ("sharegpt_empty_gpt.jsonl", {}, "sharegpt_empty_gpt.jsonl: line 2: message 2 (assistant) is empty"),
    ("tokens_labels_mismatch.jsonl", {}, "line 1: labels has 2 entries but input_ids has 3"),
    ("non_utf8.jsonl", {}, "non_utf8.jsonl: line 2: not UTF-8 (byte 0xe9 at column 14)"),
    ("non_utf8.csv", {}, "non_utf8.csv: line 3: not UTF-8 (byte 0xef at column 3)"),
    ("empty_output.parquet", {}, "empty_output.parquet: row 2: field 'output' is empty"),
    (
        "unknown_format.jsonl",
        {"format": "alpaca", "columns": {"instruction": "question"}},
        "line 1: missing field 'output'",
    ),
    (
        "unknown_format.jsonl",
        {"format": "alpaca", "columns": {"instruction": "q", "output": "reply"}},
        "missing field 'q' (data.columns maps it to instruction)",
    ),
]


@pytest.mark.parametrize(
    ("name", "data", "expected"), BAD_CASES, ids=[f"{c[0]}-{i}" for i, c in enumerate(BAD_CASES)]
)
def test_bad_data_is_one_line_naming_file_and_place(name: str, data: dict, expected: str) -> None:
    with pytest.raises(DataError) as info:
        check_source(cfg_for(BAD / name, **data))
    message = str(info.value)
    assert expected in message
    assert "\n" not in message
    assert str(BAD / name) in message
    assert isinstance(info.value, UserError) and info.value.exit_code == 2


def test_a_field_missing_from_one_record_points_at_the_record_not_the_format() -> None:
    # Line 1 has 'output': line 2 lacking it is the row's fault, not a wrong format or column name.
    with pytest.raises(DataError) as later:
        check_source(cfg_for(BAD / "missing_output.jsonl"))
    assert later.value.hint == (
        "fix or remove this record: the records before it have the field; "
        "or set data.bad_records: skip to leave such records out (counted in the data report)"
    )
    # Missing from the very first record: the format or the column names may be what is wrong.
    with pytest.raises(DataError) as first:
        check_source(
            cfg_for(BAD / "unknown_format.jsonl", format="alpaca", columns={"instruction": "question"})
        )
    assert first.value.hint.startswith("alpaca format; ")


def test_missing_path_unsupported_file_and_empty_folder(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=re.escape("nope.jsonl: not found")):
        check_source(cfg_for(tmp_path / "nope.jsonl"))
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(DataError, match=re.escape("unsupported file type '.txt'")):
        check_source(cfg_for(tmp_path / "notes.txt"))
    with pytest.raises(DataError, match=re.escape("holds no .jsonl")):
        check_source(cfg_for(tmp_path))


def test_bad_config_values_are_data_errors() -> None:
    with pytest.raises(DataError, match=re.escape("data.template: unknown template 'llama2'")):
        check_source(cfg_for(FORMATS / "messages.jsonl", template="llama2"))
    with pytest.raises(DataError, match=re.escape("data.columns: 'question'")):
        check_source(cfg_for(FORMATS / "messages.jsonl", columns={"question": "q"}))


def test_check_source_imports_no_heavy_library() -> None:
    code = (
        "import sys; from engine.config import RunConfig, DataConfig; from engine.data import check_source;"
        f"check_source(RunConfig(data=DataConfig(source={str(FORMATS / 'messages.parquet')!r})));"
        f"check_source(RunConfig(data=DataConfig(source={str(FORMATS / 'folder')!r})));"
        "heavy = [m for m in ('torch', 'transformers', 'datasets', 'tokenizers') if m in sys.modules];"
        "assert not heavy, heavy"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=DATA.parent.parent)


# -- data errors that say what is wrong (issue 19) -------------------------------------------------


def test_auto_is_the_default_format_and_the_demo_preset_does_not_pin_one() -> None:
    from engine.config import load_preset

    assert DataConfig().format == "auto"
    demo = load_preset("tiny-demo")
    assert demo.data.format == "auto"
    for name, fmt in (("alpaca.jsonl", "alpaca"), ("sharegpt.json", "sharegpt"), ("text.jsonl", "text")):
        demo.data.source = str(FORMATS / name)
        assert check_source(demo).format == fmt


def test_the_format_hint_lists_auto() -> None:
    with pytest.raises(DataError) as caught:
        check_source(cfg_for(BAD / "unknown_format.jsonl"))
    assert "data.format (auto, alpaca, messages, sharegpt, text, tokens)" in caught.value.hint


@pytest.mark.parametrize("fmt", ["auto", "messages"])
def test_a_line_holding_one_message_is_a_malformed_record_at_its_line(fmt: str) -> None:
    with pytest.raises(DataError) as caught:
        check_source(cfg_for(BAD / "one_message_per_line.jsonl", format=fmt))
    assert caught.value.message == (
        f"{BAD / 'one_message_per_line.jsonl'}: line 2: malformed record: "
        "it holds one message (content, role), not a whole conversation"
    )
    assert '{"messages": [{"role": ..., "content": ...}, ...]}' in caught.value.hint


def test_malformed_json_lines_name_the_line_and_read_plainly(tmp_path: Path) -> None:
    ok = '{"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hey"}]}'
    cut = tmp_path / "cut.jsonl"
    cut.write_text(ok + "\n" + ok[:60])  # the writer died mid-line
    with pytest.raises(DataError) as caught:
        check_source(cfg_for(cut))
    assert (
        caught.value.message == f"{cut}: line 2: malformed JSON (Unterminated string starting at column 59)"
    )
    trailing = tmp_path / "trailing.jsonl"
    trailing.write_text(ok + "\n" + ok[:-1] + ",\n")
    with pytest.raises(DataError) as caught:
        check_source(cfg_for(trailing))
    assert caught.value.message == (
        f"{trailing}: line 2: malformed JSON (Expecting property name enclosed in double quotes at the end of the line)"
    )


def test_one_conversation_as_a_whole_json_file_is_one_record() -> None:
    summary = check_source(cfg_for(FORMATS / "conversation.json"))
    assert (summary.format, summary.examples, summary.assistant_turns) == ("messages", 1, 2)


def test_a_sharegpt_file_under_messages_suggests_sharegpt() -> None:
    with pytest.raises(DataError) as caught:
        check_source(cfg_for(FORMATS / "sharegpt.json", format="messages"))
    assert caught.value.message.endswith(
        "sharegpt.json: record 1: message 1 has no 'role'; the record looks like sharegpt, not messages"
    )
    assert caught.value.hint == "set data.format: sharegpt (or auto)"


@pytest.mark.parametrize(
    ("name", "pinned", "looks"),
    [
        ("alpaca.jsonl", "messages", "alpaca"),
        ("messages.jsonl", "alpaca", "messages"),
        ("text.jsonl", "sharegpt", "text"),
    ],
)
def test_a_file_failing_a_pinned_format_says_which_format_it_looks_like(
    name: str, pinned: str, looks: str
) -> None:
    with pytest.raises(DataError) as caught:
        check_source(cfg_for(FORMATS / name, format=pinned))
    assert caught.value.message.endswith(f"; the record looks like {looks}, not {pinned}")
    assert caught.value.hint == f"set data.format: {looks} (or auto)"


def test_a_folder_of_mixed_formats_is_called_mixed() -> None:
    with pytest.raises(DataError) as caught:
        check_source(cfg_for(BAD / "mixed"))
    chat, alpaca = BAD / "mixed" / "a-chat.jsonl", BAD / "mixed" / "b-alpaca.jsonl"
    assert caught.value.message == (
        f"{alpaca}: line 1: mixed formats: {chat} holds messages records, {alpaca} holds alpaca records"
    )


def test_json_lines_saved_as_json_are_read_line_by_line(tmp_path: Path) -> None:
    """A common mistake, read as meant: records one per line in a .json file."""
    source = tmp_path / "chat.json"
    source.write_text((FORMATS / "messages.jsonl").read_text())
    summary = check_source(cfg_for(source))
    assert (
        summary.format == "messages"
        and summary.examples == check_source(cfg_for(FORMATS / "messages.jsonl")).examples
    )
