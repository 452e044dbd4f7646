"""The prepared-data cache: keyed by what decides the rows, reused across processes, written so that
a crash never leaves an entry a later run trusts, and rebuilt when an entry is damaged."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from transformers import AutoTokenizer

from engine.config import DataConfig, RunConfig, TrainConfig
from engine.data import cache, prepare
from engine.data.report import steps
from engine.models.tiny import DATASET
from engine.models.tiny_build import ensure_builtin

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def tok():
    return AutoTokenizer.from_pretrained(ensure_builtin("builtin:tiny-llama"))


@pytest.fixture
def data_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    folder = tmp_path / "cache"
    monkeypatch.setenv("QLC_DATA_CACHE", str(folder))
    return folder


def cfg(source: Path = DATASET, **data: object) -> RunConfig:
    return RunConfig(
        data=DataConfig(source=str(source), **{"packing": True, **data}),  # type: ignore[arg-type]
        train=TrainConfig(seq_len=128, micro_batch=2, grad_accum=1),
    )


def entries(folder: Path) -> list[Path]:
    return [p for p in folder.iterdir() if p.is_dir() and not p.name.startswith(".") and p.name != "locks"]


def test_the_key_follows_the_data_settings_and_tokenizer_but_not_the_schedule(
    data_cache: Path, tok, tmp_path: Path
) -> None:
    first = prepare(cfg(max_examples=100), tok)
    assert not first.from_cache
    schedule = cfg(max_examples=100)
    schedule.train.micro_batch, schedule.train.grad_accum, schedule.train.epochs = 8, 4, 3
    again = prepare(schedule, tok)
    assert again.from_cache and again.cache_path == first.cache_path
    assert (again.report.micro_batch, again.report.grad_accum) == (8, 4)
    assert (again.report.steps_per_epoch, again.report.total_steps) == steps(first.report.rows, 8, 4, 3, None)
    for changed in (
        cfg(max_examples=101),
        cfg(max_examples=100, responses_only=False),
        cfg(max_examples=100, packing=False),
    ):
        assert not prepare(changed, tok).from_cache
    longer = cfg(max_examples=100)
    longer.train.seq_len = 256
    assert not prepare(longer, tok).from_cache
    # The same bytes elsewhere are other data (the report names the file), an edit is other data.
    copy = tmp_path / "copy.jsonl"
    copy.write_bytes(DATASET.read_bytes())
    assert not prepare(cfg(copy, max_examples=100), tok).from_cache
    assert prepare(cfg(copy, max_examples=100), tok).from_cache
    copy.write_bytes(DATASET.read_bytes().replace(b"plus", b"and", 1))
    assert not prepare(cfg(copy, max_examples=100), tok).from_cache
    other = AutoTokenizer.from_pretrained(REPO / "tests" / "data" / "tokenizers" / "llama3")
    assert not prepare(cfg(max_examples=100), other).from_cache


CRASH = textwrap.dedent(
    """
    import os, sys
    from pathlib import Path
    from transformers import AutoTokenizer
    from engine.config import DataConfig, RunConfig, TrainConfig
    from engine.data import build, cache, prepare
    from engine.models.tiny import DATASET
    from engine.models.tiny_build import ensure_builtin

    where = sys.argv[1]
    if where == "writing_rows":
        real = build.RowWriter.add
        def add(self, *columns):
            real(self, *columns)
            if self.rows == 100:
                os._exit(9)  # the process dies with half the rows written
        build.RowWriter.add = add
    else:
        def publish(folder, key, meta):
            os._exit(9)  # every file written, not yet renamed into place
        cache.publish = publish
    cfg = RunConfig(data=DataConfig(source=str(DATASET), packing=True), train=TrainConfig(seq_len=128))
    prepare(cfg, AutoTokenizer.from_pretrained(ensure_builtin("builtin:tiny-llama")))
    """
)


@pytest.mark.parametrize("where", ["writing_rows", "before_publish"])
def test_a_crash_mid_write_leaves_no_entry_and_the_next_run_rebuilds(
    data_cache: Path, tok, where: str
) -> None:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.run(
        [sys.executable, "-c", CRASH, where], env=env, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 9, proc.stderr
    assert entries(data_cache) == []
    assert [p.name.startswith(".tmp-") for p in data_cache.iterdir() if p.name != "locks"] == [True]
    prepared = prepare(cfg(), tok)
    assert not prepared.from_cache and len(prepared.train) == prepared.report.rows
    # The dead process's leftovers are gone; the new entry is the only thing there.
    assert [p.name for p in data_cache.iterdir() if p.name != "locks"] == [Path(prepared.cache_path).name]


@pytest.mark.parametrize("damage", ["truncate", "no_meta", "foreign_meta"])
def test_a_damaged_entry_is_rebuilt_not_trusted(data_cache: Path, tok, damage: str) -> None:
    first = prepare(cfg(max_examples=200), tok)
    rows = [dict(r) for r in first.train]
    entry = Path(first.cache_path)
    del first
    if damage == "truncate":
        with (entry / cache.TRAIN).open("r+b") as f:
            f.truncate((entry / cache.TRAIN).stat().st_size // 2)
    elif damage == "no_meta":
        (entry / cache.META).unlink()
    else:
        (entry / cache.META).write_text('{"version": 1, "key": "someone else", "files": {}}')
    again = prepare(cfg(max_examples=200), tok)
    assert not again.from_cache
    assert [dict(r) for r in again.train] == rows


def test_the_rows_are_memory_mapped_not_loaded(data_cache: Path, tok) -> None:
    prepared = prepare(cfg(), tok)
    table = prepared.train.data
    assert type(table).__name__ == "MemoryMappedTable"
    assert Path(prepared.cache_path, cache.TRAIN).stat().st_size > 0
