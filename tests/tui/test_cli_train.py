"""Bad input to `qlc train`: one line on stderr, exit 2, no traceback, and no run directory."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.conftest import qlc


@pytest.mark.parametrize(
    "args,needle",
    [
        (["train", "no-such-preset"], "unknown preset 'no-such-preset'"),
        (["train", "tiny-demo", "--set", "train.nope=1"], "train.nope: unknown key"),
        (
            ["train", "tiny-demo", "--set", "train.micro_batch=two"],
            "train.micro_batch: expected int, got 'two'",
        ),
        (["train", "tiny-demo", "--set", "train.lr=-1"], "train.lr: must be between 0 and 1"),
        (["train", "tiny-demo", "--set", "data.source=/no/such.jsonl"], "/no/such.jsonl"),
        (["train", "tiny-demo", "--set", "lr"], "expected key=value"),
        (["train"], "the following arguments are required: preset"),
        (["stop", "no-such-run"], "no run 'no-such-run'"),
        (["resume", "no-such-run"], "no run 'no-such-run'"),
        (["sample", "no-such-run", "hi"], "no run 'no-such-run'"),
    ],
)
def test_bad_input_is_one_line_exit_2_and_writes_nothing(
    tmp_path: Path, args: list[str], needle: str
) -> None:
    runs_dir = tmp_path / "runs"
    result = qlc("--runs-dir", str(runs_dir), *args)
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and needle in lines[0], result.stderr
    assert "Traceback" not in result.stderr and not result.stdout.strip()
    assert not runs_dir.exists() or not any(runs_dir.iterdir())


def test_presets_lists_the_recipes() -> None:
    result = qlc("presets", "--json")
    assert result.returncode == 0
    assert "tiny-demo" in result.stdout and "gpus" not in [line.strip() for line in result.stdout.split('"')]
