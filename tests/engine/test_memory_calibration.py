"""Replay every measured peak in bench/results through the estimator.

Fails when a config that ran is off by more than 5% of its measured peak reserved memory (peak
allocated when only that was measured), or when a config that ran out of memory was estimated to
fit. bench/results/anchors-2026-11-23.json holds shared/anchors.md's rows; the GPU matrix
(bench/calibrate_memory.py) adds bench/results/memory-calibration-*.json files.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from engine.config import RunConfig
from engine.errors import UserError
from engine.memory import estimate
from engine.memory.calibration import TOLERANCE, load_calibration, records_files, replay

RESULTS = Path(__file__).resolve().parents[2] / "bench" / "results"
FILES = records_files(RESULTS)


def test_the_anchors_are_there() -> None:
    assert any(p.name.startswith("anchors-") for p in FILES)


@pytest.mark.parametrize("path", FILES, ids=lambda p: p.name)
def test_replay_within_tolerance(path: Path) -> None:
    calibration = load_calibration(path)
    results = replay(calibration)
    assert results, f"{path.name}: no records"
    problems = [p for r in results for p in r.problems]
    table = "\n".join(
        f"  {r.record.describe():70s} {r.compared:9s} measured {r.measured_gib or 0:6.2f} "
        f"estimated {r.estimated_gib or 0:6.2f} ({(r.error or 0):+.1%})"
        for r in results
    )
    assert not problems, (
        f"{path.name} ({calibration.gpu}, {calibration.date}):\n" + "\n".join(problems) + "\n" + table
    )
    compared = [r for r in results if r.compared in ("reserved", "allocated")]
    assert all(abs(r.error or 0) <= TOLERANCE for r in compared)


def test_after_load_weights_match_the_anchor() -> None:
    """anchors.md: the 4-bit 8B model holds 5.316 GiB after loading (before LoRA)."""
    data = json.loads((RESULTS / "anchors-2026-11-23.json").read_text())
    cfg = RunConfig()
    cfg.model.arch = "llama-3.1-8b"
    weights = estimate(cfg, backend="hf").term("weights").parts
    base = sum(v for k, v in weights.items() if k != "LoRA adapters")
    assert base == pytest.approx(data["after_load_base_allocated_gib"], rel=0.005)


def test_records_format_errors_are_one_line(tmp_path: Path) -> None:
    bad = tmp_path / "memory-calibration-bad.json"
    bad.write_text(
        json.dumps({"date": "x", "gpu": "h100", "versions": {}, "records": [{"arch": "llama-3.1-8b"}]})
    )
    with pytest.raises(UserError, match="missing backend") as info:
        load_calibration(bad)
    assert "\n" not in str(info.value)


def test_an_oom_estimated_to_fit_is_reported(tmp_path: Path) -> None:
    record = {
        "arch": "llama-3.2-1b",
        "backend": "hf",
        "seq_len": 1024,
        "micro_batch": 1,
        "gradient_checkpointing": True,
        "lora_r": 16,
        "target_modules": ["q_proj", "v_proj"],
        "modules_to_save": [],
        "optimizer": "paged_adamw_8bit",
        "peak_allocated_gib": None,
        "peak_reserved_gib": None,
        "device_peak_gib": None,
        "oom": True,
        "seconds": 1.0,  # harness extras are ignored
    }
    path = tmp_path / "memory-calibration-fake.json"
    path.write_text(
        json.dumps({"date": "d", "gpu": "NVIDIA H100 80GB HBM3", "versions": {}, "records": [record]})
    )
    (result,) = replay(load_calibration(path))
    assert result.compared == "oom" and result.estimated_fits
    assert result.problems and "estimated to fit" in result.problems[0]
