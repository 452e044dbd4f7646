"""What `qlc` prints into a pipe or a file is never wrapped or cut: a preset's YAML reads back as the
same preset, a log line stays one line, a one-line error stays one line, whatever the width a
terminal would have had (rich wraps at 80 columns when it is not writing to a terminal)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from tests.conftest import QLC, REPO


def _qlc_piped(*args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k not in ("COLUMNS", "LINES")}
    env["NO_COLOR"] = "1"
    return subprocess.run([*QLC, *args], capture_output=True, text=True, env=env, cwd=REPO, timeout=120)


def test_a_preset_written_to_a_file_reads_back_as_the_same_preset(tmp_path: Path) -> None:
    shown = _qlc_piped("presets", "llama-3.1-8b-rtx4090", "--set", "data.source=" + "x" * 120 + ".jsonl")
    assert shown.returncode == 0, shown.stderr
    path = tmp_path / "mine.yaml"
    path.write_text(shown.stdout)
    assert max(len(line) for line in shown.stdout.splitlines()) > 80  # the long value stayed whole
    again = _qlc_piped("presets", str(path), "--json")
    original = _qlc_piped(
        "presets", "llama-3.1-8b-rtx4090", "--set", "data.source=" + "x" * 120 + ".jsonl", "--json"
    )
    assert again.returncode == 0, again.stderr
    assert again.stdout.replace(str(path), "") and again.stdout == original.stdout


def test_an_error_through_a_pipe_is_one_line() -> None:
    long_name = "/nonexistent/" + "a-very-long-folder-name/" * 6 + "preset.yaml"
    result = _qlc_piped("estimate", long_name)
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1 and long_name in result.stderr


def test_a_step_line_through_a_pipe_is_one_line() -> None:
    code = (
        "from engine import protocol\n"
        "from tui.follow import EventPrinter\n"
        "EventPrinter()(protocol.Step(step=12, total_steps=1200, loss=3.25, lr=2e-4, grad_norm=1.5,"
        " tokens_per_s=12345.0, step_seconds=0.25, eta_seconds=4000.0, memory_peak_reserved_gb=21.5))\n"
    )
    env = {k: v for k, v in os.environ.items() if k not in ("COLUMNS", "LINES")}
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=REPO)
    assert result.returncode == 0, result.stderr
    (line,) = result.stdout.splitlines()
    assert line.startswith("step") and "ETA 1:06:40" in line and line.endswith("21.50 GiB peak")
