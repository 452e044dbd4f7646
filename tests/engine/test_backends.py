"""Backend choice and the tuned hf path on the tiny model: `auto` falls back with its reason, and
checkpointing only some layers computes exactly what checkpointing all or none computes."""

from __future__ import annotations

import dataclasses
import importlib.util
from typing import Any

import pytest

from engine.config import RunConfig
from engine.errors import UserError
from engine.memory import estimate
from engine.memory.architectures import catalog
from engine.memory.checkpointing import CheckpointPlan, plan_checkpointing
from engine.memory.estimate import choose_checkpointing
from engine.train.backends import choose_backend
from engine.train.backends.checkpointing import checkpointed_now, decoder_layers


def tiny_cfg(**train: Any) -> RunConfig:
    cfg = RunConfig()
    cfg.data.source = "presets/data/tiny-instruct.jsonl"
    cfg.train = dataclasses.replace(cfg.train, **train)
    return cfg


# ---------------------------------------------------------------------------------------------
# Choosing a backend
# ---------------------------------------------------------------------------------------------


def test_auto_falls_back_to_hf_without_a_gpu() -> None:
    backend, reason = choose_backend(tiny_cfg(), "cpu")
    assert backend == "hf" and "no CUDA GPU" in reason


def test_auto_falls_back_to_hf_without_unsloth(monkeypatch: pytest.MonkeyPatch) -> None:
    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "unsloth" else real(name, *a)
    )
    backend, reason = choose_backend(tiny_cfg(), "cuda")
    assert backend == "hf" and "Unsloth is not installed" in reason


def test_asking_for_unsloth_without_a_gpu_is_one_clear_error() -> None:
    cfg = tiny_cfg()
    cfg.hardware.backend = "unsloth"
    with pytest.raises(UserError, match="unsloth needs a CUDA GPU"):
        choose_backend(cfg, "cpu")


def test_unsloth_rows_go_padding_free_only_where_its_attention_reads_their_lengths(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """One padding-free row per micro-batch needs Unsloth's packing support, which marks the model
    to take rows longer than max_seq_length and keeps a row's examples apart by their lengths.
    Without it, the engine pads."""
    import sys
    import types

    from engine.train.backends import unsloth

    monkeypatch.setitem(sys.modules, "unsloth.utils.packing", None)  # an Unsloth without it
    assert unsloth.allow_padding_free(object()) is False

    marked: list[object] = []
    packing = types.ModuleType("unsloth.utils.packing")
    packing.mark_allow_overlength = marked.append  # type: ignore[attr-defined]
    packing.get_packed_info_from_kwargs = lambda kwargs, device: None  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "unsloth.utils.packing", packing)
    model = object()
    assert unsloth.allow_padding_free(model) is True and marked == [model]


# ---------------------------------------------------------------------------------------------
# How many layers to checkpoint
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("setting", "expected"), [(True, 4), (False, 0), (3, 3), (9, 4), ("auto", 4)], ids=str
)
def test_the_plan_follows_the_setting(setting: object, expected: int) -> None:
    plan = plan_checkpointing(tiny_cfg(gradient_checkpointing=setting), "hf", "cpu", 4)
    assert plan.checkpointed == expected and plan.layers == 4
    assert plan.reason  # shown in the run's events


@pytest.mark.parametrize("backend", ["hf", "unsloth"])
def test_auto_checkpoints_the_fewest_layers_that_fit(backend: str) -> None:
    """The estimator's own answer: k layers fit the budget, k - 1 do not; a bigger budget never
    checkpoints more."""
    arch = catalog()["llama-3.1-8b"]
    cfg = RunConfig()
    cfg.data.source = "x"
    cfg.model.arch = arch.name
    cfg.train = dataclasses.replace(cfg.train, seq_len=4096, micro_batch=2, gradient_checkpointing="auto")
    last = arch.layers
    for budget in (16.0, 24.0, 40.0, 80.0):
        k, why = choose_checkpointing(cfg, arch, backend, budget)
        limit = budget * 0.94
        used = estimate(cfg, arch, backend, budget_gb=budget, checkpointed=k).device_total_gb
        assert used <= limit, why
        if k > 0:
            more = estimate(cfg, arch, backend, budget_gb=budget, checkpointed=k - 1).device_total_gb
            assert more > limit
        assert k <= last
        last = k
    assert last == 0  # 80 GB holds the whole 8B step without recomputing anything


# ---------------------------------------------------------------------------------------------
# The tuned path computes what the plain one does
# ---------------------------------------------------------------------------------------------


def _gradients(checkpointed: int) -> tuple[float, dict[str, Any], int]:
    """One forward and backward of the tiny NF4 model with LoRA; returns the loss, the LoRA
    gradients, and how many layers really ran through the checkpoint function."""
    import torch
    from transformers import set_seed

    from engine.train.backends import hf

    cfg = tiny_cfg(gradient_checkpointing=checkpointed)
    model = hf.load_model(cfg, "cpu")
    set_seed(0)
    plan = CheckpointPlan(4, checkpointed, "test")
    model = hf.apply_lora(model, cfg, plan)
    calls = []
    if plan.enabled:
        # The Trainer enables checkpointing again at train time (every layer): the hook must win.
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        for i, layer in enumerate(decoder_layers(model)[1]):
            inner = layer._gradient_checkpointing_func

            def counted(*args: Any, _i: int = i, _f: Any = inner, **kw: Any) -> Any:
                calls.append(_i)
                return _f(*args, **kw)

            layer._gradient_checkpointing_func = counted
    model.train()
    ids = torch.randint(0, 1000, (2, 48), generator=torch.Generator().manual_seed(1))
    out = model(input_ids=ids, labels=ids)
    out.loss.backward()
    grads = {n: p.grad.detach().float().clone() for n, p in model.named_parameters() if p.requires_grad}
    if plan.enabled:
        assert checkpointed_now(model) == checkpointed
    return float(out.loss), grads, len(set(calls))


@pytest.mark.slow
def test_partial_checkpointing_gives_the_same_loss_and_gradients() -> None:
    loss_all, grads_all, ran_all = _gradients(4)
    loss_some, grads_some, ran_some = _gradients(2)
    loss_none, grads_none, ran_none = _gradients(0)
    assert (ran_all, ran_some, ran_none) == (4, 2, 0)
    assert loss_all == loss_some == loss_none
    for name, g in grads_all.items():
        assert torch_equal(g, grads_some[name]) and torch_equal(g, grads_none[name]), name


def torch_equal(a: Any, b: Any) -> bool:
    import torch

    return bool(torch.allclose(a, b, rtol=0, atol=1e-6))


def test_liger_is_used_only_on_a_gpu() -> None:
    from engine.train.backends import hf

    assert hf.apply_kernels(object(), tiny_cfg(), "cpu") == []


def test_lora_targets_are_found_on_a_model_that_already_has_adapters() -> None:
    """Unsloth's get_peft_model is asked again on the wrapped model to change only the
    checkpointing (bench/calibrate_memory.py does, per configuration): the targets must be found
    under the base model's names there too, not only on the bare model."""
    from engine.train.backends import hf
    from engine.train.backends.base import lora_targets
    from engine.train.backends.checkpointing import layers_prefix

    cfg = tiny_cfg()
    model = hf.load_model(cfg, "cpu")
    wanted = list(cfg.lora.target_modules)
    assert lora_targets(model, cfg) == wanted
    wrapped = hf.apply_lora(model, cfg, CheckpointPlan(4, 0, "test"))
    assert layers_prefix(wrapped) == layers_prefix(model) == "model.layers"
    assert lora_targets(wrapped, cfg) == wanted
    odd = dataclasses.replace(cfg, lora=dataclasses.replace(cfg.lora, target_modules=("q_proj", "qkv_proj")))
    with pytest.raises(UserError, match=r"qkv_proj not found .*its linear layers include .*q_proj"):
        lora_targets(wrapped, odd)
