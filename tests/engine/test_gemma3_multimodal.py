"""Gemma 3's multimodal checkpoints (4B, 12B, 27B) for a text fine-tune: the whole
`Gemma3ForConditionalGeneration` loads, its vision tower frozen and out of LoRA's targets, partial
checkpointing addresses the text decoder's layers, and the memory model counts the vision tower
it loads. On a tiny Gemma3ForConditionalGeneration built here (tests/engine/tiny_gemma3.py); the
two-process DDP run is in test_distributed.py."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import pytest

from engine.config import RunConfig
from engine.memory import estimate, find_architecture
from engine.memory.architectures import catalog, from_hf_config
from engine.memory.checkpointing import CheckpointPlan
from tests.engine import tiny_gemma3


@pytest.fixture(scope="module")
def gemma3(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_gemma3.build(tmp_path_factory.mktemp("models") / "tiny-gemma3")


def gemma3_cfg(path: Path, **quant: Any) -> RunConfig:
    cfg = RunConfig()
    cfg.model.name_or_path = str(path)
    cfg.data.source = "presets/data/tiny-instruct.jsonl"
    cfg.train.seq_len = 128
    cfg.quant.compute_dtype = "bf16"
    for key, value in quant.items():
        setattr(cfg.quant, key, value)
    return cfg


# ---------------------------------------------------------------------------------------------
# The vision tower in the memory model: the published configs, counted as transformers builds them
# ---------------------------------------------------------------------------------------------


def _built_vision_params(config: dict[str, Any]) -> tuple[int, int, int]:
    """(vision tower + projector parameters, of them in the tower's linear layers, text stack
    parameters) of Gemma3ForConditionalGeneration built from `config` on the meta device."""
    import torch
    from transformers import Gemma3Config, Gemma3ForConditionalGeneration

    with torch.device("meta"):
        model = Gemma3ForConditionalGeneration(Gemma3Config(**config))
    tower = model.model.vision_tower
    vision = sum(p.numel() for p in tower.parameters())
    vision += sum(p.numel() for p in model.model.multi_modal_projector.parameters())
    linear = sum(m.weight.numel() for m in tower.modules() if isinstance(m, torch.nn.Linear))
    text = sum(p.numel() for p in model.model.language_model.parameters())
    return vision, linear, text


# google/gemma-3-4b-it's, -12b-it's and -27b-it's config.json publish the same vision_config.
PUBLISHED_VISION = {
    "model_type": "siglip_vision_model",
    "hidden_size": 1152,
    "intermediate_size": 4304,
    "num_hidden_layers": 27,
    "num_attention_heads": 16,
    "image_size": 896,
    "patch_size": 14,
    "vision_use_head": False,
}


def _published(name: str) -> dict[str, Any]:
    """A Gemma 3 config.json with the catalog entry's text stack and the published vision tower."""
    arch = catalog()[name]
    text = {
        "model_type": "gemma3_text",
        "hidden_size": arch.hidden,
        "intermediate_size": arch.ffn,
        "num_hidden_layers": arch.layers,
        "num_attention_heads": arch.heads,
        "num_key_value_heads": arch.kv_heads,
        "head_dim": arch.head_dim,
        "vocab_size": arch.vocab,
    }
    return {"text_config": text, "vision_config": dict(PUBLISHED_VISION), "mm_tokens_per_image": 256}


@pytest.mark.parametrize("name", ["gemma-3-4b", "gemma-3-12b", "gemma-3-27b"])
def test_the_catalog_counts_the_published_vision_tower(name: str) -> None:
    v = catalog()[name].vision
    assert v is not None
    assert (v.hidden, v.ffn, v.layers, v.image_size, v.patch_size) == tuple(
        PUBLISHED_VISION[k]
        for k in ("hidden_size", "intermediate_size", "num_hidden_layers", "image_size", "patch_size")
    )
    config = _published(name)
    assert from_hf_config(config, name).vision == v  # read from a config.json, the same tower
    vision, linear, text = _built_vision_params(config)
    counts = v.param_counts()
    assert (counts["total"], counts["linear"]) == (vision, linear)
    # The Gemma 3 Technical Report's 417M SigLIP encoder (the tower alone, without the projector).
    assert 416_000_000 < counts["total"] - (1152 * catalog()[name].hidden + 1152) < 418_000_000
    # The text stack as the catalog counts it, against the same build.
    assert catalog()[name].param_counts()["total"] == text


def test_a_local_multimodal_config_carries_its_vision_tower(gemma3: Path) -> None:
    arch = find_architecture(str(gemma3))
    config = json.loads((gemma3 / "config.json").read_text())
    vision, linear, text = _built_vision_params(config)
    assert arch.vision is not None and arch.vision.param_counts()["total"] == vision
    assert arch.vision.param_counts()["linear"] == linear and arch.param_counts()["total"] == text
    assert arch.layers == tiny_gemma3.TEXT["num_hidden_layers"]  # the text stack, not the tower's 2
    text_only = from_hf_config(config["text_config"] | {"model_type": "gemma3_text"}, "text")
    assert text_only.vision is None


def test_the_estimate_counts_the_vision_tower_it_loads() -> None:
    cfg = RunConfig()
    cfg.model.name_or_path = "google/gemma-3-4b-it"
    cfg.data.source = "x"
    cfg.train.seq_len = 1024
    with_tower = estimate(cfg, backend="hf", checkpointed=34)
    arch = catalog()["gemma-3-4b"]
    without = estimate(cfg, dataclasses.replace(arch, vision=None), backend="hf", checkpointed=34)
    extra = with_tower.term("weights").gb - without.term("weights").gb
    counts = arch.vision.param_counts()
    # 4-bit linears (NF4 + double quant) and 16-bit convolution, positions, norms, biases, projector.
    expected = counts["linear"] * 0.515869 + counts["other"] * 2
    assert abs(extra * 2**30 - expected) / expected < 0.01


# ---------------------------------------------------------------------------------------------
# The engine's hf path on the tiny model
# ---------------------------------------------------------------------------------------------


def _loaded(gemma3: Path, checkpointed: int) -> Any:
    from engine.train.backends import hf

    cfg = gemma3_cfg(gemma3)
    model = hf.load_model(cfg, "cpu", str(gemma3))
    assert type(model).__name__ == "Gemma3ForConditionalGeneration"  # loaded whole
    return hf.apply_lora(model, cfg, CheckpointPlan(4, checkpointed, "test")), cfg


@pytest.mark.slow
def test_lora_adapts_the_language_model_only_and_the_vision_tower_is_frozen(gemma3: Path) -> None:
    model, _cfg = _loaded(gemma3, 4)
    adapted = [n for n, _ in model.named_modules() if n.endswith(".lora_A")]
    assert len(adapted) == 4 * 7  # every target of every text layer
    assert all(".language_model.layers." in n for n in adapted), adapted
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n and ".language_model." in n for n in trainable)
    tower = model.get_base_model().model.vision_tower
    assert not any(p.requires_grad for p in tower.parameters())
    # Quantized like the text stack (engine.models.quantization says why).
    import torch

    assert {type(m).__name__ for m in tower.modules() if isinstance(m, torch.nn.Linear)} == {"Linear4bit"}


@pytest.mark.slow
@pytest.mark.parametrize("k", [1, 3])
def test_checkpointing_k_layers_recomputes_k_text_layers(gemma3: Path, k: int) -> None:
    """Count the forward calls: a checkpointed layer runs its forward twice (forward, then the
    recompute in backward), a kept one once; the vision tower's layers never run."""
    import torch

    from engine.train.backends.checkpointing import checkpointed_now, decoder_layers

    model, _cfg = _loaded(gemma3, k)
    model.gradient_checkpointing_enable(
        gradient_checkpointing_kwargs={"use_reentrant": False}
    )  # as the Trainer does
    text_layers = decoder_layers(model)[1]
    vision_layers = list(model.get_base_model().model.vision_tower.encoder.layers)
    assert text_layers[0] is model.get_base_model().model.language_model.layers[0]
    calls: dict[int, int] = {}
    for i, layer in enumerate(text_layers + vision_layers):
        layer.register_forward_pre_hook(lambda _m, _a, _i=i: calls.__setitem__(_i, calls.get(_i, 0) + 1))
    model.train()
    ids = torch.randint(6, 390, (2, 40), generator=torch.Generator().manual_seed(1))
    model(input_ids=ids, labels=ids).loss.backward()
    assert checkpointed_now(model) == k
    assert [calls.get(i, 0) for i in range(4)] == [2] * k + [1] * (4 - k)
    assert all(calls.get(4 + i, 0) == 0 for i in range(len(vision_layers)))


@pytest.mark.slow
def test_the_weights_term_matches_the_loaded_model(gemma3: Path) -> None:
    """The estimate's weights against the bytes the loaded model holds (every tensor once: packed
    4-bit weights and their quantization state, 16-bit tensors, LoRA as TRL trains it in bf16)."""
    import torch

    model, cfg = _loaded(gemma3, 4)
    for p in model.parameters():
        if p.requires_grad:  # TRL casts a quantized model's adapters to bf16 (sft_trainer.py)
            p.data = p.data.to(torch.bfloat16)
    seen: set[tuple[int, int]] = set()

    def nbytes(t: Any) -> int:
        if not torch.is_tensor(t):
            return 0
        key = (t.untyped_storage().data_ptr(), t.untyped_storage().nbytes())
        if key in seen:
            return 0
        seen.add(key)
        return t.untyped_storage().nbytes()

    held = 0
    for p in model.parameters():
        held += nbytes(p.data)
        qs = getattr(p, "quant_state", None)
        if qs is not None:
            held += sum(nbytes(t) for t in (qs.absmax, qs.code, qs.offset))
            if qs.state2 is not None:
                held += nbytes(qs.state2.absmax) + nbytes(qs.state2.code)
    weights = estimate(cfg, backend="hf").term("weights")
    assert any(name.startswith("vision tower") for name in weights.parts)
    assert abs(weights.gb * 2**30 / held - 1) < 0.02, (weights.gb * 2**30, held)
