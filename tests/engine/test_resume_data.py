"""A run resumed by a later version prepares its data with that version's rules: what it ran with is
kept where a new key's default would change it, and what still differs is said."""

from __future__ import annotations

from pathlib import Path

import yaml

from engine import protocol
from engine.config import load_preset, load_resolved
from engine.run import runs
from engine.train.recipe import data_changed


def test_a_run_written_before_val_max_examples_keeps_every_validation_example(tmp_path: Path) -> None:
    run_dir = runs.create_run(tmp_path / "runs", load_preset("tiny-demo"))
    saved = yaml.safe_load((run_dir / runs.CONFIG).read_text())
    assert saved["data"]["val_max_examples"] == 1000  # a new run writes the default it runs with
    del saved["data"]["val_max_examples"]  # as a run of 2026-12-04 wrote it
    (run_dir / runs.CONFIG).write_text(yaml.safe_dump(saved))
    assert load_resolved(run_dir / runs.CONFIG).data.val_max_examples is None


def test_a_resume_says_when_its_data_prepares_differently(tmp_path: Path) -> None:
    run_dir = runs.create_run(tmp_path / "runs", load_preset("tiny-demo"))
    first = protocol.DataReady(
        train_examples=47500, eval_examples=2500, train_tokens=9_000_000, trained_tokens=3_000_000
    )
    (run_dir / runs.EVENTS).write_bytes(
        protocol.encode(protocol.Hello(run_id=run_dir.name)) + protocol.encode(first)
    )
    assert data_changed(run_dir, first) == ""
    now = protocol.DataReady(
        train_examples=49000, eval_examples=1000, train_tokens=9_300_000, trained_tokens=3_100_000
    )
    assert data_changed(run_dir, now) == (
        "the data prepares differently than when the run started: train examples 47,500 -> 49,000, "
        "eval examples 2,500 -> 1,000, train tokens 9,000,000 -> 9,300,000, trained tokens 3,000,000 -> 3,100,000"
    )
