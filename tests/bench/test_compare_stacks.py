"""bench/compare_stacks.py's engine scenarios as a CPU dry run (a shrunk model, no GPU figures):
a scenario's overrides after a colon reach the run, a repeated scenario (#2) is reported apart,
and tokens/s counts the rows of the split the run took."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.conftest import bench

pytestmark = pytest.mark.slow


def test_engine_scenarios_with_overrides_and_repeats(tmp_path: Path) -> None:
    out = tmp_path / "out"
    done = bench(
        "bench/compare_stacks.py", "--dry-run", "--out", str(out), "--work",
         str(tmp_path / "work"), "--seq", "64", "--steps", "3",
         "--scenario", "engine-auto@24GB:train.micro_batch=1,train.grad_accum=4",
         "--scenario", "engine-auto@24GB:train.micro_batch=1,train.grad_accum=4#2",
    )  # fmt: skip
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    scenarios = json.loads((out / "stacks-llama-3.1-8b.json").read_text())["scenarios"]
    assert len(scenarios) == 2
    for result in scenarios.values():
        assert "error" not in result, result
        assert (result["micro_batch"], result["grad_accum"]) == (1, 4)
        assert result["budget"] == "24GB"
        assert result["tokens_per_second"] == pytest.approx(64 * 4 / result["median_step_seconds"])


def test_bare_scenarios_are_refused_in_a_dry_run(tmp_path: Path) -> None:
    done = bench(
        "bench/compare_stacks.py", "--dry-run", "--out", str(tmp_path), "--scenario", "bare-unsloth", timeout=60,
    )  # fmt: skip
    assert done.returncode == 2 and "engine scenarios only" in done.stderr
