"""The calibration matrix's driver, as a dry run on the CPU (shrunk models, every path but CUDA):
with --clean-speed, every configuration trains while every other process idles, so that every
record's tokens/s is clean (nothing overlapped its timed steps), and all of them are measured."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.conftest import bench

pytestmark = pytest.mark.slow


def test_clean_speed_leaves_no_record_overlapped(tmp_path: Path) -> None:
    out = tmp_path / "out"
    done = bench(
        "bench/calibration_matrix.py", "--dry-run", "--out", str(out), "--work",
         str(tmp_path / "work"), "--arch", "llama-3.2-1b", "--no-e2e", "--clean-speed",
         "--deadline-s", "240", "--max-configs", "1",
    )  # fmt: skip
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    (results,) = out.glob("calibration-matrix-dry-run-*.json")
    report = json.loads(results.read_text())
    assert report["clean_speed"] is True
    records = report["records"]
    assert len(records) == report["planned"] and {r["backend"] for r in records} == {"hf", "unsloth"}
    overlapped = {r["id"]: r["speed_overlaps"] for r in records if not r["speed_valid"]}
    assert not overlapped
