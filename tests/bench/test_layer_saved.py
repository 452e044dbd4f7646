"""bench/layer_saved.py on the CPU: what one Llama decoder layer saves for its backward (NF4 base,
LoRA on every projection, loaded by the engine's own hf backend), against the memory model's
per-layer term as the estimate uses it (scaled by the fitted ACTIVATION_SCALE). A transformers or
peft release that saves more or less per layer shows here first."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from engine.memory import constants as C
from tests.conftest import bench

pytestmark = pytest.mark.slow


def test_a_llama_layer_saves_what_the_model_counts(tmp_path: Path) -> None:
    out = tmp_path / "saved.json"
    done = bench(
        "-m", "bench.layer_saved", "--arch", "llama-3.2-1b", "--out", str(out),
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    (result,) = json.loads(out.read_text())["results"]
    scaled = result["modelled"] * C.ACTIVATION_SCALE["hf"]
    assert abs(scaled / result["measured"] - 1) < 0.03, result
