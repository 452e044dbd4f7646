"""The dataset fingerprint a run records at its start and checks before a resume (the engine-level
refusal, on a real run, is in test_faults)."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from engine.config import load_preset
from engine.errors import UserError
from engine.run import fingerprint
from tests.conftest import REPO

DATA = REPO / "presets" / "data" / "tiny-instruct.jsonl"


@pytest.fixture
def run(tmp_path: Path):
    data = tmp_path / "data" / "train.jsonl"
    data.parent.mkdir()
    shutil.copy(DATA, data)
    cfg = load_preset("tiny-demo", [f"data.source={data.parent}"])  # a folder source
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    fingerprint.record(run_dir, cfg)
    return run_dir, cfg, data


def _refusal(run_dir: Path, cfg, full: bool = False) -> str:
    with pytest.raises(fingerprint.DataChanged) as info:
        fingerprint.check(run_dir, cfg, full=full)
    assert info.value.kind == "data_changed" and "start a new run" in info.value.hint
    return info.value.message


def test_unchanged_data_resumes(run) -> None:
    run_dir, cfg, _ = run
    fingerprint.check(run_dir, cfg)
    fingerprint.check(run_dir, cfg, full=True)
    assert oct((run_dir / fingerprint.RECORD).stat().st_mode & 0o777) == "0o600"


def test_an_edited_file_is_named(run) -> None:
    run_dir, cfg, data = run
    data.write_bytes(data.read_bytes() + b'{"messages": []}\n')
    assert f"data.source {data} changed since the run started (110621 bytes then" in _refusal(run_dir, cfg)


def test_same_size_other_content_is_caught_by_its_hash(run) -> None:
    run_dir, cfg, data = run
    lines = data.read_bytes().splitlines(keepends=True)
    data.write_bytes(b"".join(lines[1:] + lines[:1]))  # same rows in another order
    assert "(same size, different content)" in _refusal(run_dir, cfg)


def test_a_forged_modification_time_is_seen_by_the_engines_full_check(run) -> None:
    run_dir, cfg, data = run
    st = data.stat()
    lines = data.read_bytes().splitlines(keepends=True)
    data.write_bytes(b"".join(lines[1:] + lines[:1]))
    os.utime(data, ns=(st.st_atime_ns, st.st_mtime_ns))
    fingerprint.check(run_dir, cfg)  # the consoles' quick check trusts size and time
    assert "different content" in _refusal(run_dir, cfg, full=True)


def test_a_deleted_file_and_an_added_file(run) -> None:
    run_dir, cfg, data = run
    extra = data.parent / "more.jsonl"
    shutil.copy(DATA, extra)
    assert f"has new files since the run started ({extra}" in _refusal(run_dir, cfg)
    extra.unlink()
    data.unlink()
    assert f"data.source {data} is gone since the run started" in _refusal(run_dir, cfg)


def test_runs_without_a_record_and_hub_datasets_are_not_checked(tmp_path: Path) -> None:
    cfg = load_preset("tiny-demo", ["data.source=someone/some-dataset"])
    fingerprint.record(tmp_path, cfg)
    fingerprint.check(tmp_path, cfg, full=True)
    (tmp_path / fingerprint.RECORD).unlink()
    fingerprint.check(tmp_path, load_preset("tiny-demo"))
    (tmp_path / fingerprint.RECORD).write_text("{broken")
    with pytest.raises(UserError, match=r"dataset\.json: unreadable"):
        fingerprint.check(tmp_path, cfg)
