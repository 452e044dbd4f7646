"""bench/step_tax.py on the CPU, through its GPU path shrunk (--arch --dry-run: a model built in a
child process, rows of random tokens): both variants train on the same model, and every engine
hook it times is one the engine really calls (a renamed hook would otherwise time nothing)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.conftest import bench


@pytest.mark.slow
def test_step_tax_builds_an_architecture_as_on_the_gpu(tmp_path: Path) -> None:
    """The GPU path (--arch: a model built in a child process, rows of random tokens), shrunk."""
    out = tmp_path / "tax.json"
    done = bench(
        "-m", "bench.step_tax", "--arch", "llama-3.2-1b", "--dry-run", "--work",
         str(tmp_path / "work"), "--seq", "64", "--micro-batch", "2", "--grad-accum", "2",
         "--steps", "4", "--rounds", "1", "--kernels", "--out", str(out),
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report["preset"] == "llama-3.1-8b-rtx4090" and report["machine"]["device"] == "cpu"
    assert "train.seq_len=64" in report["overrides"] and "model.arch=llama-3.2-1b" in report["overrides"]
    assert len(report["step_seconds"]["bare"]) == len(report["step_seconds"]["engine"]) == 2
    assert report["bare_median_step_s"] > 0 and report["engine_median_step_s"] > 0
    # The layout the run took (on the CPU: the split as written, and auto's checkpointing there:
    # all 4 of the shrunk model's layers).
    assert report["layout"] == {"micro_batch": 2, "grad_accum": 2, "checkpointed_layers": 4}
    hooks = report["hooks"]
    for name in (
        "trainer._track_nonfinite",
        "trainer._track_num_input_tokens",
        "trainer._fold_tokens",
        "EngineCallback.on_step_end",
        "EngineCallback.on_log",
        "StepClock.on_step_end",
    ):
        assert hooks[name]["calls"] >= 4, (name, hooks)
    assert 0 < report["engine_hooks_share_of_step"] < 0.5
    # --kernels: a profiled round of the engine, steps 3..4, its time by kind (aten ops on the CPU).
    kernels = report["kernels"]
    assert kernels["device"] == "cpu" and kernels["steps"] == 2
    assert 0 < kernels["busy_s_per_step"] <= kernels["wall_s_per_step"]
    assert kernels["categories"]["matmul"]["s_per_step"] > 0
    assert abs(sum(c["share_of_kernels"] for c in kernels["categories"].values()) - 1) < 1e-6


def test_sync_origins_name_the_line_that_synchronised() -> None:
    """On CUDA each sync is a warning (torch.cuda.set_sync_debug_mode): grouped by the line that
    made it, with its source, per step."""
    import warnings
    from collections import Counter

    from bench.step_tax import sync_origin, top_origins

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(3):
            warnings.warn("called a synchronizing CUDA operation", stacklevel=1)
    counts = Counter(sync_origin(w.filename, w.lineno) for w in caught)
    ((where, n),) = counts.items()
    assert n == 3 and where.startswith("tests/bench/test_step_tax.py:")
    assert where.endswith('warnings.warn("called a synchronizing CUDA operation", stacklevel=1)')
    assert top_origins(counts, steps=3) == [{"where": where, "per_step": 1.0}]
