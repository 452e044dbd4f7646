"""The device-level constants per GPU class (engine.memory.devices), and the structure issue 15
changed in the model: Unsloth's fp32 adapters and fused or stock MLP, gradients alive with one
micro-batch per step, unsloth_zoo's loss chunk, and the estimate's error band."""

from __future__ import annotations

import dataclasses
import types

import pytest

from engine.config import RunConfig
from engine.memory import constants as C
from engine.memory import devices, estimate, resolve_gpu
from engine.memory.architectures import catalog
from engine.memory.estimate import plan_for
from engine.memory.gpus import Gpu
from engine.memory.terms import layer_saved_per_token, lora_params, unsloth_ce_rows, unsloth_loss_buffers

GIB = 2**30
MIB = 2**20


def cfg_for(arch: str = "llama-3.1-8b", **train: object) -> RunConfig:
    cfg = RunConfig()
    cfg.model.arch = arch
    cfg.data.source = "x"
    cfg.hardware.backend = "hf"
    cfg.lora.target_modules = list(catalog()[arch].linear_modules())
    for key, value in train.items():
        section, _, leaf = key.partition("__")
        setattr(getattr(cfg, section), leaf, value)
    return cfg


# ---------------------------------------------------------------------------------------------
# GPU classes
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("spec", "name", "context", "workspaces"),
    [
        ("h100", "hopper", 0.598, 64 * MIB),  # cuBLAS + cuBLASLt 32 MiB each on sm 9.0
        ("h200", "hopper", 0.598, 64 * MIB),
        # torch's cuBLASLt check is total // GiB >= 24: a 4090's 23.99 GiB keeps 1 MiB, a 3090's 24 GiB 4.
        ("rtx4090", "ada-ampere", 426 / 1024, 2 * 4 * MIB + 8 * 16 * 1024 + 1 * MIB),
        ("rtx3090", "ada-ampere", 426 / 1024, 2 * 4 * MIB + 8 * 16 * 1024 + 4 * MIB),
        ("rtx4060", "ada-ampere", 426 / 1024, 2 * 4 * MIB + 8 * 16 * 1024 + 1 * MIB),  # under 24 GiB
        ("l4", "ada-ampere", 426 / 1024, 2 * 4 * MIB + 8 * 16 * 1024 + 1 * MIB),  # 22.5 GiB usable
        ("a100-80gb", "ampere-datacenter", 0.598, 2 * 4 * MIB + 8 * 16 * 1024 + 4 * MIB),
        ("rtx5090", "blackwell", 0.598, 64 * MIB),
        ("t4", "turing", 426 / 1024, 2 * 4 * MIB + 8 * 16 * 1024 + 1 * MIB),
        ("24GB", "unknown", 0.598, 64 * MIB),  # a plain size: the largest context known
    ],
)
def test_each_card_gets_its_class(spec: str, name: str, context: float, workspaces: int) -> None:
    profile = resolve_gpu(spec).device
    assert (profile.name, profile.workspace_bytes) == (name, workspaces)
    assert profile.context_gib == pytest.approx(context)
    assert profile.source  # every number says where it comes from


def test_every_class_says_whether_it_was_measured_or_sourced() -> None:
    assert devices.HOPPER.source.startswith("measured")
    assert devices.ADA_AMPERE.source.startswith("sourced")
    for p in devices.PROFILES.values():
        assert p.source.startswith(("measured", "sourced", "not measured", "the H200")), p


def test_a_present_gpu_is_classed_by_its_compute_capability(monkeypatch: pytest.MonkeyPatch) -> None:
    import pynvml

    memory = types.SimpleNamespace(total=24564 * MIB, free=20 * GIB, used=0)
    monkeypatch.setattr(pynvml, "nvmlInit", lambda: None)
    monkeypatch.setattr(pynvml, "nvmlShutdown", lambda: None)
    monkeypatch.setattr(pynvml, "nvmlDeviceGetCount", lambda: 1)
    monkeypatch.setattr(pynvml, "nvmlDeviceGetHandleByIndex", lambda i: "h")
    monkeypatch.setattr(pynvml, "nvmlDeviceGetName", lambda h: "Some Future Card")
    monkeypatch.setattr(pynvml, "nvmlDeviceGetMemoryInfo", lambda h: memory)
    monkeypatch.setattr(pynvml, "nvmlDeviceGetCudaComputeCapability", lambda h: (8, 9))
    assert resolve_gpu("auto").device.name == "ada-ampere"
    monkeypatch.setattr(pynvml, "nvmlDeviceGetCudaComputeCapability", lambda h: (9, 0))
    assert resolve_gpu("auto").device.name == "hopper"


def test_the_card_changes_only_what_lies_outside_the_model() -> None:
    """The same run on a 4090 and on an H100: the difference is the context and the workspaces."""
    cfg = cfg_for(train__seq_len=4096, lora__r=32)
    ada, hopper = (estimate(cfg, backend="hf", gpu=resolve_gpu(g)) for g in ("rtx4090", "h100"))
    context = devices.HOPPER.context_gib - devices.ADA_AMPERE.context_gib
    ws = (devices.HOPPER.workspace_bytes - resolve_gpu("rtx4090").device.workspace_bytes) / GIB
    assert hopper.device_total_gb - ada.device_total_gb == pytest.approx(context + ws, rel=1e-6)
    assert hopper.torch_peak_gb - ada.torch_peak_gb == pytest.approx(ws, rel=1e-6)
    assert "Ada" in ada.device_profile and "Hopper" in hopper.device_profile


# ---------------------------------------------------------------------------------------------
# Unsloth's structure
# ---------------------------------------------------------------------------------------------


def test_unsloth_adapters_and_their_gradients_are_fp32() -> None:
    """Unsloth takes TRL's bf16 cast out: 8 bytes per adapter parameter (weight + gradient) where
    the hf backend has 4 (constants.LORA_PARAM_BYTES; the H200 r128/r16 records: 7.8-7.95)."""
    cfg = cfg_for(train__grad_accum=2)
    hf, unsloth = (estimate(cfg, backend=b) for b in ("hf", "unsloth"))
    n = lora_params(plan_for(cfg, catalog()["llama-3.1-8b"], "hf"))
    assert hf.term("weights").parts["LoRA adapters"] == pytest.approx(n * 2 / GIB)
    assert unsloth.term("weights").parts["LoRA adapters"] == pytest.approx(n * 4 / GIB)
    assert unsloth.term("gradients").gb == pytest.approx(n * 4 / GIB)


def test_unsloth_stock_mlp_keeps_one_more_mlp_wide_tensor_and_builds_one_more() -> None:
    """Unsloth fuses the LoRA MLP only when gate, up and down all carry adapters; the stock MLP keeps
    three MLP-wide tensors where LoRA_MLP keeps two, and its backward builds one more."""
    arch = catalog()["llama-3.2-3b"]
    attn = cfg_for("llama-3.2-3b", lora__target_modules=["q_proj", "k_proj", "v_proj", "o_proj"])
    full = cfg_for(
        "llama-3.2-3b",
        lora__target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    )
    p_attn, p_full = (plan_for(c, arch, "unsloth") for c in (attn, full))
    assert p_full.mlp_fused and not p_attn.mlp_fused
    lora = (7 - 4) * 2 * attn.lora.r  # three fewer lora_A outputs in attention-only
    assert layer_saved_per_token(p_attn) - layer_saved_per_token(p_full) == 2 * arch.ffn - lora
    gemma = plan_for(cfg_for("gemma-3-1b"), catalog()["gemma-3-1b"], "unsloth")
    assert not gemma.unsloth_fast and not gemma.mlp_fused and gemma.modules_key == "unsloth-generic"


@pytest.mark.parametrize(("arch", "rows"), [("llama-3.1-8b", 512), ("mistral-7b", 2048), ("gemma-3-1b", 512)])
def test_unsloth_loss_chunk_rows_follow_unsloth_zoo(arch: str, rows: int) -> None:
    """fused_linear_rows at 8192 tokens: tokens x hidden / vocab, within [max(512, 512 x 151936 /
    vocab), 4096] rounded down to a power of two (Mistral's 32k vocabulary: 2048 rows)."""
    cfg = cfg_for(arch, train__seq_len=4096, train__micro_batch=2)
    assert unsloth_ce_rows(plan_for(cfg, catalog()[arch], "unsloth", budget_gb=140.0)) == rows


@pytest.mark.parametrize(
    ("arch", "seq", "card", "route", "mib"),
    [
        # A card of 24.5 GiB or less tiles at any length, 16,384 columns at most.
        ("gemma-3-1b", 1024, 24.0, "tile of 1023 rows x 16384 columns", 64 + 4.5),
        ("llama-3.1-8b", 8192, 24.0, "tile of 4096 rows x 16384 columns", 256 + 64),
        # A larger one chunks below 4,096 labelled rows (a 512 x vocab fp32 buffer)...
        ("gemma-3-1b", 1024, 80.0, "logits of 512 rows", 512 + 2.25),
        # ...and at 4,096 and more counts the larger route: labels may be fewer than tokens.
        ("llama-3.1-8b", 8192, 80.0, "tile of 4096 rows x 16384 columns", 256 + 64),
        ("gemma-3-1b", 8192, 80.0, "logits of 512 rows", 512 + 2.25),
        # Mistral's 32,768 entries are two tiles: unsloth_zoo chunks them (_tiled_vocab).
        ("mistral-7b", 1024, 24.0, "logits of 1024 rows", 128 + 16),
    ],
)
def test_unsloth_loss_route_follows_the_card(
    arch: str, seq: int, card: float, route: str, mib: float
) -> None:
    cfg = cfg_for(arch, train__seq_len=seq, train__micro_batch=1)
    device = dataclasses.replace(devices.profile_for_name("NVIDIA H100 80GB HBM3"), card_gib=card)
    name, size = unsloth_loss_buffers(
        plan_for(cfg, catalog()[arch], "unsloth", budget_gb=card, device=device)
    )
    assert route in name
    assert size / C.MIB == pytest.approx(mib, rel=0.01)


@pytest.mark.parametrize(
    ("why", "card", "changes"),
    [
        ("a T4 (sm 7.5) has no fp32 output from 16-bit matmuls", "NVIDIA T4", {}),
        ("fp32 compute", "NVIDIA GeForce RTX 4090", {"quant__compute_dtype": "fp32"}),
        ("a trained lm_head", "NVIDIA GeForce RTX 4090", {"lora__modules_to_save": ["lm_head"]}),
    ],
)
def test_unsloth_loss_chunks_where_unsloth_zoo_cannot_tile(why: str, card: str, changes: dict) -> None:
    cfg = cfg_for("gemma-3-1b", train__seq_len=1024, train__micro_batch=1, **changes)
    device = Gpu(card, card, 16.0, 16.0).device
    name, size = unsloth_loss_buffers(
        plan_for(cfg, catalog()["gemma-3-1b"], "unsloth", budget_gb=16.0, device=device)
    )
    assert "logits of 512 rows" in name, why
    assert size / C.MIB == pytest.approx(512 + 2.25, rel=0.01), why


def test_a_card_not_named_counts_the_larger_loss_route() -> None:
    """No card: the route is unknown at any length, and the estimate takes the larger."""
    for arch, seq, route in (
        ("gemma-3-1b", 1024, "logits of 512 rows"),
        ("llama-3.1-8b", 8192, "tile of 4096"),
    ):
        cfg = cfg_for(arch, train__seq_len=seq, train__micro_batch=1)
        name, _ = unsloth_loss_buffers(plan_for(cfg, catalog()[arch], "unsloth"))
        assert route in name, arch


def test_a_named_card_carries_its_memory() -> None:
    named = Gpu("4090", "NVIDIA GeForce RTX 4090", 24.0, 24.0)
    present = Gpu(
        "auto", "NVIDIA GeForce RTX 4090", 24.0, 20.0, "nvml", devices.profile_for_capability(8, 9, 24.0)
    )
    assert named.device.card_gib == present.device.card_gib == 24.0  # the card's, not what is free
    assert devices.profile_for_name("NVIDIA GeForce RTX 4090").card_gib is None  # a class has no size


# ---------------------------------------------------------------------------------------------
# Gradients with one micro-batch per step
# ---------------------------------------------------------------------------------------------


def test_one_micro_batch_per_step_holds_fewer_gradients_at_the_top_of_backward() -> None:
    """hf keeps every checkpoint on the GPU: at the top of backward they are all there and only the
    last layer's gradients exist; the bottom of backward holds every gradient and one checkpoint.
    With gradient accumulation every gradient is there throughout."""
    one = estimate(cfg_for(train__seq_len=4096, train__micro_batch=2, lora__r=128), backend="hf")
    accumulating = estimate(
        cfg_for(train__seq_len=4096, train__micro_batch=2, lora__r=128, train__grad_accum=4), backend="hf"
    )
    grads = accumulating.term("gradients").gb
    assert one.term("gradients").gb == pytest.approx(grads / 32)  # the last of 32 layers
    assert accumulating.torch_allocated_gb - one.torch_allocated_gb == pytest.approx(grads * 31 / 32)


def test_the_error_band_is_the_backends_held_out_error() -> None:
    for backend in ("hf", "unsloth", "hf-upcast"):
        est = estimate(cfg_for(), backend=backend, gpu=Gpu("24GB", "24 GB GPU", 24.0, 24.0, "size"))
        assert est.error_band_fraction == C.ERROR_BAND[backend]
        assert est.error_band_gb == pytest.approx(est.device_total_gb * C.ERROR_BAND[backend])
        assert est.to_dict()["error_band_gb"] == pytest.approx(est.error_band_gb)
