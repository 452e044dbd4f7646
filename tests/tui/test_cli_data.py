"""`qlc data PRESET`: the pre-flight report end to end, and bad data as one line with exit 2."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from engine.data.report import DataReport, HistogramBin
from tui.commands import data as data_command

REPO = Path(__file__).resolve().parent.parent.parent
BAD = REPO / "tests" / "data" / "bad"


def qlc(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "NO_COLOR": "1", "COLUMNS": "200", **(env or {})}
    return subprocess.run(
        [sys.executable, "-m", "tui.cli", *args],
        capture_output=True,
        text=True,
        env=env,
        cwd=REPO,
        timeout=300,
    )


def test_tiny_demo_report() -> None:
    proc = qlc("data", "tiny-demo")
    assert proc.returncode == 0, proc.stderr
    text = proc.stdout
    assert "tiny-demo  presets/data/tiny-instruct.jsonl  (messages, 600 examples)" in text
    assert "tokenizer's own (llama3) · turns end with <|eot_id|> · responses only" in text
    assert "examples   570 train · 30 eval" in text
    assert "p50 32 · p95 72 · max 84 tokens (seq_len 128)" in text
    assert "█" in text
    assert "0 truncated · 0 dropped" in text
    assert "72 per epoch at batch 8 (8 × 1) · 120 total (train.max_steps)" in text
    # Without colour, trained text is bracketed: the answer and its end-of-turn token, nothing else.
    assert "<|end_header_id|>\n\n[[2 plus 18 is 20.<|eot_id|>]]" in text
    assert text.count("[[") == 1 + text.count("(trained in [[ ]])")
    assert "Traceback" not in proc.stderr


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("empty.jsonl", "empty.jsonl: the file is empty"),
        ("malformed.jsonl", "malformed.jsonl: line 3: malformed JSON"),
        ("non_utf8.jsonl", "non_utf8.jsonl: line 2: not UTF-8"),
        ("not_alternating.jsonl", "not_alternating.jsonl: line 2: message 2 is user after user"),
        ("empty_assistant.jsonl", "empty_assistant.jsonl: line 1: message 2 (assistant) is empty"),
        ("empty_instruction.csv", "empty_instruction.csv: row 2: field 'instruction' is empty"),
    ],
)
def test_bad_data_is_one_line_and_exit_2(name: str, expected: str) -> None:
    proc = qlc("data", "tiny-demo", "--set", f"data.source={BAD / name}", "--set", "data.format=auto")
    assert proc.returncode == 2
    assert proc.stdout == ""
    assert proc.stderr.startswith("qlc: error: ") and proc.stderr.count("\n") == 1
    assert expected in proc.stderr and str(BAD / name) in proc.stderr


def test_an_engine_side_data_error_is_one_line(monkeypatch: pytest.MonkeyPatch) -> None:
    script = "import sys; print('loading', file=sys.stderr); print('error: x.jsonl: line 4: too big', file=sys.stderr); sys.exit(2)"
    monkeypatch.setattr(data_command, "engine_command", lambda *args: [sys.executable, "-c", script])
    from engine.config import load_preset
    from engine.errors import UserError

    with pytest.raises(UserError, match=r"^x\.jsonl: line 4: too big$"):
        data_command.engine_report(load_preset("tiny-demo"))


def test_json_output(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    report = DataReport(examples=3, histogram=[HistogramBin(1, 2, 3)], example=[("hi", False), ("yo", True)])
    monkeypatch.setattr(data_command, "engine_report", lambda cfg: report)
    from tui.cli import main

    assert main(["data", "tiny-demo", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["source"]["examples"] == 600 and out["source"]["format"] == "messages"
    assert DataReport.from_dict(out["report"]) == report


def test_example_highlighting_plain_and_coloured() -> None:
    spans = [("<user>hi</user>", False), ("hello<eot>", True)]
    assert data_command.example_text(spans, plain=True).plain == "<user>hi</user>[[hello<eot>]]"
    coloured = data_command.example_text(spans, plain=False)
    assert coloured.plain == "<user>hi</user>hello<eot>"
    assert any("reverse" in str(span.style) for span in coloured.spans)


def test_the_data_command_imports_no_heavy_library() -> None:
    code = (
        "import sys, tui.cli, tui.commands.data;"
        "heavy = [m for m in ('torch', 'transformers', 'datasets', 'tokenizers') if m in sys.modules];"
        "assert not heavy, heavy"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=REPO)


def test_progress_goes_to_stderr_and_a_second_report_reuses_the_prepared_rows(tmp_path: Path) -> None:
    env = {"QLC_DATA_CACHE": str(tmp_path / "data-cache")}
    first = qlc("data", "tiny-demo", env=env)
    assert first.returncode == 0, first.stderr
    progress = [line for line in first.stderr.splitlines() if line.startswith("preparing data")]
    assert any("600 of 600 examples (100%)" in line and "examples/s" in line for line in progress), progress
    assert "preparing data" not in first.stdout
    second = qlc("data", "tiny-demo", env=env)
    assert second.returncode == 0, second.stderr
    assert second.stdout == first.stdout
    assert any("reusing the data prepared before" in line for line in second.stderr.splitlines())
    assert not any("examples/s" in line for line in second.stderr.splitlines())


def test_bad_records_skipped_are_counted_and_named(tmp_path: Path) -> None:
    """`qlc data` with data.bad_records: skip: the good records' report, the count on the source
    line and a warning naming the first; without it, the first bad record is the error and its
    hint says how to skip."""
    source = tmp_path / "scraped.jsonl"
    good = (REPO / "presets" / "data" / "tiny-instruct.jsonl").read_text().splitlines()
    source.write_text("\n".join([*good[:5], "{oops", *good[5:], '["not", "a record"]']) + "\n")
    sets = ("--set", f"data.source={source}", "--set", "data.val_fraction=0")
    stopped = qlc("data", "tiny-demo", *sets)
    assert stopped.returncode == 2 and stopped.stdout == ""
    assert f"{source}: line 6: malformed JSON" in stopped.stderr
    assert "or set data.bad_records: skip to leave such records out" in stopped.stderr
    proc = qlc("data", "tiny-demo", *sets, "--set", "data.bad_records=skip")
    assert proc.returncode == 0, proc.stderr
    text = " ".join(proc.stdout.split())
    assert "(messages, 600 examples, 2 bad records skipped)" in text
    assert "examples 600 train" in text
    assert (
        f"warning: 2 bad records were skipped (data.bad_records: skip): {source}: line 6: malformed JSON"
        in text
    )
