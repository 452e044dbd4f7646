"""bench/attention_saved.py on the CPU, small: the memory model's mask term for packed rows is
exactly what autograd saves (K and V repeated to every query head, and a bf16 bias per layer), and
so it is for a Gemma 3 sliding-window mask, whose single K/V head is repeated as a view (only the
bias costs). The GPU's figures come from the same script on the GPU."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.conftest import bench

pytestmark = pytest.mark.slow


def test_mask_costs_on_the_cpu(tmp_path: Path) -> None:
    out = tmp_path / "saved.json"
    done = bench(
        "-m", "bench.attention_saved", "--small", "--out", str(out),
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    gemma, llama = json.loads(out.read_text())["cases"]
    assert llama["mask_cost_per_token_measured"] == llama["model"]["mask_saved_per_token"]
    assert gemma["mask_cost_per_token_measured"] == gemma["model"]["mask_saved_per_token"]
    assert gemma["model"]["of_which_repeated_kv"] == 0
