"""Replay every measured peak in bench/results through the estimator.

Fails when a config that ran is off by more than 5% of its measured peak reserved memory (peak
allocated when only that was measured, or when the process held another model's allocator cache),
when a run's own device figure (NVML per process) is off by more than DEVICE_TOLERANCE, or when a
config that ran out of memory was estimated to fit. bench/results/anchors-2026-11-23.json holds
shared/anchors.md's rows; the GPU matrix (bench/calibrate_memory.py, bench/calibration_matrix.py)
adds bench/results/memory-calibration-*.json files. The error band the estimate carries
(constants.ERROR_BAND) is recomputed here from the leave-one-architecture-out errors.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import pytest

from engine.config import RunConfig
from engine.errors import UserError
from engine.memory import constants as C
from engine.memory import estimate
from engine.memory import fit_constants as fc
from engine.memory.calibration import (
    DEVICE_TOLERANCE,
    TOLERANCE,
    ReplayResult,
    estimate_record,
    load_calibration,
    records_files,
    replay,
)

RESULTS = Path(__file__).resolve().parents[2] / "bench" / "results"
FILES = records_files(RESULTS)

# Files whose measurements carry memory an earlier model left in the same process. Each reads a
# constant above the estimate in every config, whatever the tokens or checkpointing: no term of a
# training step behaves so. Rerun each architecture in a fresh process (or record
# baseline_allocated_gib before loading, which the replay adds), then drop the entry.
CONTAMINATED: dict[str, str] = {}

# Records the model may miss by more than TOLERANCE, each (file, record id) with the bound it is
# held to and why; each one a known gap of the model, named in docs/memory-model.md. Keyed by file:
# the same configuration measured in another file is held to the usual tolerance.
KNOWN_MISSES: dict[tuple[str, str], tuple[float, str]] = {
    (
        "memory-calibration-matrix-h100-2026-12-06-retable1.json",
        "llama-3.2-1b/unsloth/r128-all/s2048x4-half",
    ): (
        0.06,
        "over, +5.3%: the Unsloth backend of that evening keeps less in the layers it does not "
        "recompute than the engine most Unsloth records measured (docs/memory-model.md, Leave one "
        "architecture out)",
    ),
}


def _known(path: Path, rid: str) -> tuple[float, str] | None:
    return KNOWN_MISSES.get((path.name, rid))


def _params() -> list[Any]:
    return [
        pytest.param(p, marks=pytest.mark.xfail(reason=CONTAMINATED[p.name], strict=False))
        if p.name in CONTAMINATED
        else p
        for p in FILES
    ]


def _table(results: list[ReplayResult]) -> str:
    return "\n".join(
        f"  {r.record.describe():70s} {r.compared:9s} measured {r.measured_gib or 0:6.2f} "
        f"estimated {r.estimated_gib or 0:6.2f} ({(r.error or 0):+.1%})"
        for r in results
    )


def test_the_anchors_are_there() -> None:
    assert any(p.name.startswith("anchors-") for p in FILES)


@pytest.mark.parametrize("path", _params(), ids=lambda p: p.name)
def test_replay_within_tolerance(path: Path) -> None:
    calibration = load_calibration(path)
    results = [r for r in replay(calibration) if r.compared in ("reserved", "allocated")]
    known = {r.record.id: r for r in results if _known(path, r.record.id)}
    problems = [p for r in results if r.record.id not in known for p in r.problems]
    header = f"{path.name} ({calibration.gpu}, {calibration.date}):\n"
    assert not problems, header + "\n".join(problems) + "\n" + _table(results)
    for rid, r in known.items():
        bound, why = KNOWN_MISSES[(path.name, rid)]
        assert abs(r.error or 0) <= bound, f"{rid}: {r.error:+.1%} ({why})"


@pytest.mark.parametrize("path", FILES, ids=lambda p: p.name)
def test_device_totals_within_tolerance(path: Path) -> None:
    """The run's own device figure (NVML per process, plus its paged state) against the estimate's
    device total, where the file measured it so."""
    results = [r for r in replay(load_calibration(path)) if r.device_measured_gib is not None]
    known = [r for r in results if _known(path, r.record.id)]
    results = [r for r in results if not _known(path, r.record.id)]
    problems = [p for r in results for p in r.device_problems]
    assert not problems, "\n".join(problems)
    assert all(abs(r.device_error or 0) <= DEVICE_TOLERANCE for r in results)
    for r in known:
        assert abs(r.device_error or 0) <= KNOWN_MISSES[(path.name, r.record.id)][0], (
            f"{r.record.id}: {r.device_error:+.1%}"
        )


def test_no_estimate_says_fits_where_the_run_would_overflow_the_card() -> None:
    """For cards of 8 to 80 GB: a device total the verdict calls "fits" (under the tight line) never
    belongs to a run whose measured device peak is over that card's memory."""
    unsafe = []
    for path in FILES:
        for r in replay(load_calibration(path)):
            if r.device_measured_gib is None or r.device_estimated_gib is None:
                continue
            for budget in (8, 12, 16, 24, 32, 48, 80):
                if (
                    r.device_estimated_gib <= budget * (1 - C.TIGHT_FRACTION)
                    and r.device_measured_gib > budget
                ):
                    unsafe.append(f"{r.record.describe()} on {budget} GB")
    assert not unsafe


def test_the_error_band_is_the_held_out_errors_quantile() -> None:
    """constants.ERROR_BAND, which `qlc estimate` prints as "± x GB", is the 90th percentile of the
    leave-one-architecture-out errors of these records (fit_constants.band_for)."""
    samples = fc.samples_from([load_calibration(p) for p in FILES])
    for backend in ("hf", "unsloth"):
        band = fc.band_for(fc.leave_one_architecture_out(samples, backend))
        assert C.ERROR_BAND[backend] == pytest.approx(band, abs=0.0015), backend
    assert C.ERROR_BAND["hf-upcast"] == C.ERROR_BAND["hf"]  # one architecture: nothing held out


def test_the_matrix_baseline_is_not_added() -> None:
    """The calibration matrix's baseline_allocated_gib is what its warm-up left (workspaces, Unsloth's
    global buffers), which the run re-creates: the end-to-end run of the seed recipe peaked at the
    same allocated memory as its in-process twin, which carried a 0.064 GiB "baseline"."""
    records = {r.id: r for p in FILES if "matrix" in p.name for r in load_calibration(p).records}
    e2e, twin = records["e2e-qwen7b-hf-seed"], records["qwen2.5-7b/hf/r16-all/s4096x2"]
    assert twin.baseline_allocated_gib > 0.06 and twin.baseline == 0.0
    assert e2e.peak_allocated_gib == pytest.approx(twin.peak_allocated_gib, abs=0.001)


@pytest.mark.parametrize("path", FILES, ids=lambda p: p.name)
def test_no_measured_oom_is_estimated_to_fit(path: Path) -> None:
    results = replay(load_calibration(path))
    assert results, f"{path.name}: no records"
    wrong = [r.record.describe() for r in results if r.compared == "oom" and r.estimated_fits]
    assert not wrong, f"ran out of memory, estimated to fit: {wrong}"


def test_a_baseline_left_by_an_earlier_model_is_added(tmp_path: Path) -> None:
    """Memory held before the model loaded (an earlier model in the same process) is added to the
    estimate: shift a clean file's measurements by a baseline and the replay must still fit."""
    src = RESULTS / "memory-calibration-llama-3.1-8b-h100-2026-11-23.json"
    if not src.is_file():
        pytest.skip("the 8B calibration file is not there")
    data = json.loads(src.read_text())
    data["baseline_allocated_gib"] = 0.979  # Llama-3.1-8B's embed_tokens, 128256 x 4096 x bf16
    for record in data["records"]:
        record.pop("baseline_allocated_gib", None)
        record["reserved_clean"] = False
        for key in ("peak_allocated_gib", "peak_reserved_gib"):
            if record.get(key) is not None:
                record[key] += 0.979
    path = tmp_path / "memory-calibration-shifted.json"
    path.write_text(json.dumps(data))
    results = replay(load_calibration(path))
    assert all(r.compared == "allocated" for r in results if not r.record.oom)
    assert not [p for r in results for p in r.problems], _table(results)


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


def test_unsloth_loss_route_of_a_small_card() -> None:
    """unsloth_zoo tiles its loss on a card of 24.5 GiB or less: the 1,024-token steps measured with
    that route forced on an H100 (their peak allocated, from the memory history) against the
    estimate for the same card class at 24 GiB, and on the large card's route against 80 GiB."""
    small = json.loads((RESULTS / "memory-history-small-card-route-h100-2026-12-06.json").read_text())
    # The same configurations on the large card's route, measured in the same session's first call.
    twins = load_calibration(RESULTS / "memory-calibration-matrix-h100-2026-12-06e.json")
    records = {r.id: r for r in twins.records}
    gpu = twins.resolve_gpu()
    assert len(small["summaries"]) == 3
    for s in small["summaries"]:
        rec = records[s["id"]]
        at_24 = dataclasses.replace(gpu, total_gb=24.0)  # the H100's class, a card of 24 GiB
        est_small, est_large = estimate_record(rec, at_24), estimate_record(rec, gpu)
        assert est_small.torch_allocated_gb < est_large.torch_allocated_gb
        assert est_small.torch_allocated_gb == pytest.approx(s["peak_allocated_gib"], rel=TOLERANCE), s["id"]
