"""The calibration matrix's driver, as a dry run on the CPU (shrunk models, every path but CUDA):
with --clean-speed, every configuration trains while every other process idles, so that every
record's tokens/s is clean (nothing overlapped its timed steps), and all of them are measured."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.conftest import REPO, bench

pytestmark = pytest.mark.slow


def test_clean_speed_leaves_no_record_overlapped(tmp_path: Path) -> None:
    out = tmp_path / "out"
    done = bench(
        "bench/calibration_matrix.py", "--dry-run", "--out", str(out), "--work",
         str(tmp_path / "work"), "--arch", "llama-3.2-1b", "--no-e2e", "--clean-speed",
         "--deadline-s", "240", "--only", "llama-3.2-1b/hf/r16-all/s4096x2",
         "--only", "llama-3.2-1b/unsloth/r16-all/s4096x2",  # one pair: two worker processes
    )  # fmt: skip
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    (results,) = out.glob("calibration-matrix-dry-run-*.json")
    report = json.loads(results.read_text())
    assert report["clean_speed"] is True
    records = report["records"]
    assert len(records) == report["planned"] and {r["backend"] for r in records} == {"hf", "unsloth"}
    overlapped = {r["id"]: r["speed_overlaps"] for r in records if not r["speed_valid"]}
    assert not overlapped

    # The speed table reads the same records: each configuration paired across the two stacks,
    # held-out predictions, auto's pick. A dry run's figures mean nothing, so it writes no fits.
    table = bench("bench/speed_table.py", str(results), "--out", str(tmp_path / "table.json"), "--write",
                  str(tmp_path / "fits.json"))  # fmt: skip
    assert table.returncode == 0, table.stdout[-2000:] + table.stderr[-2000:]
    written = json.loads((tmp_path / "table.json").read_text())
    by_stack = {
        b: {r["id"].replace(f"/{b}/", "/") for r in records if r["backend"] == b} for b in ("hf", "unsloth")
    }
    assert len(written["paired"]) == len(by_stack["hf"] & by_stack["unsloth"]) > 0
    assert all(set(p["measured_s"]) == {"hf", "unsloth"} for p in written["paired"])
    assert written["target_met"] is False and "no figure here means anything" in table.stdout
    assert not (tmp_path / "fits.json").exists()


def test_the_speed_table_refuses_speeds_measured_beside_other_runs() -> None:
    # The 2026-12-04 matrix ran configurations side by side: its tokens/s carry the others' work.
    old = "bench/results/memory-calibration-matrix-h200-2026-12-04c.json"
    done = bench("bench/speed_table.py", old)
    assert done.returncode == 2 and done.stdout == ""
    assert done.stderr.strip().splitlines() == [
        f"error: {old}: measured without --clean-speed (its speeds overlap other processes' work) "
        "(re-measure with bench/gpu_campaign.sh --clean-speed)"
    ]


def test_the_speed_table_reads_compare_stacks_results_and_fits_one_card_at_a_time(tmp_path: Path) -> None:
    """The committed H100 comparisons (engine scenarios run one at a time): both stacks on the 8B
    and 1B seed recipes pair up; too few configurations for a fit, and nothing is written."""
    files = [
        "bench/results/stacks-llama-3.1-8b-h100-2026-11-23.json",
        "bench/results/stacks-llama-3.1-8b-h100-2026-11-23b.json",
        "bench/results/stacks-llama-3.2-1b-h100-2026-11-23.json",
    ]
    done = bench(
        "bench/speed_table.py", *files, "--out", str(tmp_path / "t.json"), "--write", str(tmp_path / "f.json")
    )
    assert done.returncode == 0, done.stderr
    table = json.loads((tmp_path / "t.json").read_text())
    assert {p["key"] for p in table["paired"]} == {
        "llama-3.1-8b r32-all s4096x2x2 gc32",
        "llama-3.2-1b r32-all s4096x2x2 gc16",
    }
    assert table["errors"]["unsloth"]["configurations"] == 4  # 0, 17 and 32 layers on the 8B, the 1B
    assert not (tmp_path / "f.json").exists() and "no fit written" in done.stdout
    # The same file as measured on an H200: costs differ per card, so the two are not one fit.
    other = json.loads((REPO / files[2]).read_text())
    other["gpu"] = "NVIDIA H200"
    (tmp_path / "h200.json").write_text(json.dumps(other))
    mixed = bench("bench/speed_table.py", files[0], str(tmp_path / "h200.json"))
    assert mixed.returncode == 2
    assert "files from several cards (NVIDIA H100 80GB HBM3, NVIDIA H200)" in mixed.stderr
