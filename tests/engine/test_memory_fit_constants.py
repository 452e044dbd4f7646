"""The refit of the memory model's constants (engine/memory/fit_constants.py).

The fit is checked where the answer is known without a GPU: records whose "measurements" are the
model's own estimates under other constants must bring those constants back, and the constants
module must be left as it was. The leave-one-architecture-out run uses the committed H100 records.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from engine.memory import constants as C
from engine.memory import fit_constants as fc
from engine.memory.calibration import estimate_record, load_calibration, records_files

RESULTS = Path(__file__).resolve().parents[2] / "bench" / "results"
HF_FILES = [
    "memory-calibration-llama-3.1-8b-h100-2026-11-23.json",
    "memory-calibration-llama-3.2-1b-h100-2026-11-23.json",
]


def _synthetic(
    tmp_path: Path, params: list[fc.Param], true: list[float], device: bool = False
) -> list[fc.Sample]:
    """The committed hf records, re-measured by the model itself with `true` constants."""
    files = []
    for name in HF_FILES:
        cal = load_calibration(RESULTS / name)
        gpu = cal.resolve_gpu()
        data = json.loads((RESULTS / name).read_text())
        with fc.constants_set(params, true):
            for raw, rec in zip(data["records"], cal.records, strict=True):
                if rec.oom:
                    continue
                est = estimate_record(rec, gpu)
                # Both peaks: the torch stage fits ACTIVATION_SCALE to the allocated one.
                raw["peak_allocated_gib"] = est.torch_allocated_gb
                raw["peak_reserved_gib"] = est.torch_peak_gb
                raw["reserved_clean"] = True
                raw["baseline_allocated_gib"] = 0.0
                if device:
                    raw["device_peak_gib"] = est.device_total_gb
                    raw["device_method"] = "nvml-per-process"
        out = tmp_path / name
        out.write_text(json.dumps(data))
        files.append(load_calibration(out))
    return fc.samples_from(files)


def test_the_fit_brings_back_the_constants_the_records_were_made_with(tmp_path: Path) -> None:
    params = [fc.HF_SCALE, fc.HF_KEPT]
    start = [p.get() for p in params]
    true = [start[0] * 0.92, start[1] * 1.3]
    samples = _synthetic(tmp_path, params, true)
    result = fc.fit(samples, params, "torch")
    assert result.after == pytest.approx(true, rel=2e-3)
    assert result.rms_after < 1e-3 < result.rms_before
    assert [p.get() for p in params] == start  # constants.py untouched


def test_the_device_stage_measures_the_kernel_modules_on_top_of_the_torch_stage(tmp_path: Path) -> None:
    """The device figures were made with other kernel modules outside PyTorch's pool: the device
    stage reads them back from device - reserved - paged - the GPU class's bare context."""
    param = fc.modules_param("hf")
    true = C.KERNEL_MODULES_GIB["hf"] * 0.6
    samples = _synthetic(tmp_path, [param], [true], device=True)
    fitted = fc.fit_backend(samples, "hf")
    assert fitted.device is not None
    assert [p.label for p in fitted.device.params] == ["KERNEL_MODULES_GIB[hf]"]
    assert fitted.device.after == pytest.approx([true], rel=2e-3)
    assert fitted.device.before[0] == C.KERNEL_MODULES_GIB["hf"]
    # What is left is the torch-level fit's own (it converges to 1e-4 of the records).
    assert fitted.device.rms_after < 1e-3 < fitted.device.rms_before


def test_constants_are_restored_when_an_estimate_fails() -> None:
    before = C.ACTIVATION_SCALE
    with pytest.raises(RuntimeError), fc.constants_set([fc.HF_SCALE], [0.5]):
        assert C.ACTIVATION_SCALE["hf"] == 0.5
        assert C.ACTIVATION_SCALE is not before  # a copy: the dict itself is never edited
        raise RuntimeError
    assert C.ACTIVATION_SCALE is before


def test_only_the_constants_the_records_can_tell_apart_are_fitted() -> None:
    samples = fc.samples_from([load_calibration(p) for p in records_files(RESULTS)])
    names = {p.label for p in fc.torch_params(samples, "hf")}
    # The committed hf records used both allocators, with and without Liger under the default one,
    # and Gemma 3 without checkpointing masks its sliding layers: every hf slack constant has
    # records behind it.
    assert names == {
        "ACTIVATION_SCALE[hf]",
        "HF_SLACK_PER_KEPT_INPUT",
        "HF_LIGER_DEFAULT_SLACK_SHARE",
        "HF_EXPANDABLE_SLACK_SHARE",
        "HF_SLACK_PER_MASKED_LAYER_NO_GC",
    }
    llama_only = [s for s in samples if s.backend == "hf" and s.arch.startswith("llama")]
    assert "HF_SLACK_PER_MASKED_LAYER_NO_GC" not in {p.name for p in fc.torch_params(llama_only, "hf")}
    expandable_only = [s for s in samples if s.backend == "hf" and s.record.allocator == "expandable"]
    assert {p.name for p in fc.torch_params(expandable_only, "hf")} & {
        "HF_SLACK_PER_KEPT_INPUT",
        "HF_LIGER_DEFAULT_SLACK_SHARE",
    } == set()


def test_leave_one_architecture_out_predicts_every_record_of_the_held_out_one() -> None:
    samples = fc.samples_from([load_calibration(p) for p in records_files(RESULTS)])
    held = fc.leave_one_architecture_out(samples, "hf")
    hf_archs = {s.arch for s in samples if s.backend == "hf"}
    assert {h.arch for h in held} == hf_archs
    for h in held:
        mine = [s for s in samples if s.backend == "hf" and s.arch == h.arch]
        assert len(h.torch_errors) == len(mine) == h.records
        # What the held-out records are predicted with is the fit on the others, not the
        # constants in constants.py.
        assert h.fitted
