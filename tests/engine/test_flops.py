"""The FLOPs count behind the dashboard's utilisation, checked against torch's own FlopCounterMode
on a real forward and backward of the tiny Llama with LoRA adapters (CPU, fp32, eager attention
so that attention's matmuls are separable from the projections')."""

from __future__ import annotations

import json

import pytest

from engine.memory.architectures import from_hf_config
from engine.memory.flops import attention_context, mean_context, training_flops_per_token, utilisation

SEQ, BATCH, R = 64, 2, 8


def _measure(checkpointing: bool) -> tuple[dict[str, float], object]:
    torch = pytest.importorskip("torch")
    from peft import LoraConfig, get_peft_model
    from torch.utils.flop_counter import FlopCounterMode
    from transformers import LlamaConfig, LlamaForCausalLM

    from engine.models.tiny_build import ensure_builtin

    config = json.loads((ensure_builtin("builtin:tiny-llama") / "config.json").read_text())
    arch = from_hf_config(config, "tiny-llama")
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**{**config, "dtype": "float32"}, attn_implementation="eager"))
    targets = list(arch.linear_modules())
    model = get_peft_model(model, LoraConfig(r=R, lora_alpha=16, target_modules=targets, lora_dropout=0.0))
    # Every layer's input carries a gradient, as under the engine's checkpointing: the first
    # layer's projections then take their input gradients too (the count's convention).
    model.enable_input_require_grads()
    if checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    ids = torch.randint(0, config["vocab_size"], (BATCH, SEQ))
    counter = FlopCounterMode(display=False)
    with counter:
        model(input_ids=ids, labels=ids).loss.backward()
    counts = counter.get_flop_counts()["Global"]
    by_op = {str(op).split(".")[1]: float(n) for op, n in counts.items()}
    tokens = BATCH * SEQ
    projections = (by_op.get("mm", 0.0) + by_op.get("addmm", 0.0)) / tokens
    attention = by_op.get("bmm", 0.0) / tokens
    return {"projections": projections, "attention": attention}, arch


@pytest.mark.parametrize("checkpointing", [False, True], ids=["kept", "recomputed"])
def test_the_count_matches_torchs_flop_counter(checkpointing: bool) -> None:
    measured, arch = _measure(checkpointing)
    targets = tuple(arch.linear_modules())
    layers = arch.layers if checkpointing else 0
    parts = training_flops_per_token(arch, SEQ, R, targets, checkpointed_layers=layers)
    # The same count with attention taken apart: eager attention multiplies every query by all SEQ
    # keys (the causal mask is applied after), the count by the causal mean context.
    causal = 4.0 * arch.q_dim * attention_context(arch, SEQ)
    attention_calls = arch.layers * 3 + layers  # forward, backward (twice the forward), recompute
    counted_attention = causal * attention_calls
    counted_projections = sum(parts.values()) - counted_attention
    assert measured["projections"] == pytest.approx(counted_projections, rel=0.005)
    assert measured["attention"] == pytest.approx(counted_attention * SEQ / mean_context(SEQ), rel=0.005)


def test_llama_8b_seed_recipe_is_the_issues_figure() -> None:
    """About 3.5e10 FLOPs per token without recompute (the issue's physical limit), and the
    recompute of every layer adds one forward of the decoder (about 1.5e10)."""
    from engine.memory.architectures import catalog

    arch = catalog()["llama-3.1-8b"]
    targets = tuple(arch.linear_modules())
    none = sum(training_flops_per_token(arch, 4096, 32, targets).values())
    every = sum(training_flops_per_token(arch, 4096, 32, targets, checkpointed_layers=32).values())
    assert 3.3e10 < none < 3.5e10
    assert 1.45e10 < every - none < 1.55e10


def test_a_sliding_window_caps_the_context() -> None:
    assert mean_context(4096) == pytest.approx(2048.5)
    assert mean_context(4096, 512) == pytest.approx((512 * 513 / 2 + (4096 - 512) * 512) / 4096)
    assert mean_context(100, 1000) == mean_context(100)


def test_utilisation_needs_a_peak_and_shares_it_across_gpus() -> None:
    assert utilisation(10_000, 3.4e10, 989) == pytest.approx(10_000 * 3.4e10 / 989e12)
    assert utilisation(20_000, 3.4e10, 989, gpus=2) == pytest.approx(utilisation(10_000, 3.4e10, 989))
    assert utilisation(10_000, 3.4e10, 0) is None and utilisation(0, 3.4e10, 989) is None
