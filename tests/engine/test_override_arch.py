"""A preset's model.arch describes the preset's own model: `--set model.name_or_path` to another
model brings that model's architecture into the memory budget, unless model.arch is set too."""

from __future__ import annotations

from engine import memory
from engine.config import draft_preset, load_preset


def test_another_model_brings_its_own_architecture() -> None:
    other = ["model.name_or_path=meta-llama/Llama-3.2-3B-Instruct"]
    assert memory.resolve_architecture(load_preset("llama-3.1-8b-rtx4090", other)).name == "llama-3.2-3b"
    pinned = [*other, "model.arch=llama-3.1-8b"]  # said outright: kept
    assert memory.resolve_architecture(load_preset("llama-3.1-8b-rtx4090", pinned)).name == "llama-3.1-8b"
    # The preset alone keeps its own.
    assert load_preset("llama-3.1-8b-rtx4090").model.arch == "llama-3.1-8b"


def test_the_console_draft_agrees() -> None:
    draft = draft_preset("llama-3.1-8b-rtx4090", ["model.name_or_path=meta-llama/Llama-3.2-3B-Instruct"])
    assert draft.config is not None and not draft.config.model.arch
