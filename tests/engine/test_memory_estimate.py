"""The estimate: each term against a hand computation, monotonicity, GPUs, the verdict, no torch."""

from __future__ import annotations

import math
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from engine.config import RunConfig
from engine.errors import UserError
from engine.memory import constants as C
from engine.memory import devices, estimate, resolve_gpu
from engine.memory.architectures import catalog
from engine.memory.estimate import DOES_NOT_FIT, FITS, TIGHT
from engine.memory.gpus import Gpu
from engine.protocol import EstimateEvent, decode_event, encode

REPO = Path(__file__).resolve().parents[2]
GIB = 2**30


def cfg_for(arch: str = "llama-3.1-8b", **train: object) -> RunConfig:
    cfg = RunConfig()
    cfg.model.arch = arch
    cfg.data.source = "x"
    cfg.hardware.backend = "hf"
    for key, value in train.items():
        section, _, leaf = key.partition("__")
        setattr(getattr(cfg, section), leaf, value)
    return cfg


def test_engine_memory_imports_neither_torch_nor_transformers() -> None:
    code = (
        "import sys, engine.memory, engine.memory.calibration\n"
        "from engine.config import RunConfig\n"
        "c = RunConfig(); c.model.arch = 'llama-3.1-8b'; c.data.source = 'x'\n"
        "engine.memory.estimate(c, backend='hf')\n"
        "bad = [m for m in ('torch', 'transformers', 'peft', 'trl', 'bitsandbytes', 'rich', 'textual')"
        " if m in sys.modules]\n"
        "assert not bad, bad\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=REPO)


# ---------------------------------------------------------------------------------------------
# Each term by hand: Llama-3.1-8B, hf backend, seq 2048, micro-batch 1, grad-accum 2, r 16 on all
# seven projections, paged_adamw_8bit, gradient checkpointing on.
# ---------------------------------------------------------------------------------------------


def test_each_term_against_a_hand_computation() -> None:
    # The engine's allocator; gradient accumulation keeps every gradient alive through the step.
    est = estimate(cfg_for(train__grad_accum=2), backend="hf", expandable=True)
    parts = {t.name: t.parts for t in est.terms}

    # Weights. 6,979,321,856 linear params in NF4 with double quant: 0.5 B + a uint8 absmax per
    # 64 + an fp32 absmax per 256 x 64, and each of the 224 weights' own tables (16 + 256 fp32
    # code entries and an fp32 offset); embed_tokens and lm_head 128256 x 4096 in bf16; 65 norms.
    w = parts["weights"]
    packed = 6_979_321_856 * (0.5 + 1 / 64 + 4 / (64 * 256))
    assert w["4-bit linears"] == pytest.approx((packed + 224 * (16 * 4 + 256 * 4 + 4)) / GIB)
    assert w["embed_tokens"] == w["lm_head"] == pytest.approx(128256 * 4096 * 2 / GIB)
    assert w["norms"] == pytest.approx((32 * 2 + 1) * 4096 * 2 / GIB)
    # LoRA: r x (in + out) per module; per layer q 8192 + k 5120 + v 5120 + o 8192 + gate 18432
    # + up 18432 + down 18432 = 81,920 x r, over 32 layers, in bf16 (TRL's cast).
    lora = 81_920 * 16 * 32
    assert lora == 41_943_040
    assert w["LoRA adapters"] == pytest.approx(lora * 2 / GIB)
    assert parts["gradients"] == pytest.approx({"LoRA adapters": lora * 2 / GIB})

    # Optimizer (8-bit, paged). Per layer, A = r x in and B = out x r:
    #   65,536 elements: A of q, k, v, o, gate, up and B of q, o, down -> 8-bit on the device
    #   16,384 elements: B of k, v                                     -> 8-bit on the device
    #   229,376 elements (>= 1e5): A of down, B of gate, up            -> paged (managed memory)
    on_device = 9 * 65_536 + 2 * 16_384
    paged = 3 * 229_376
    assert on_device + paged == 81_920 * 16
    # absmax: two fp32 per 256 elements of each tensor.
    absmax = 2 * 4 * (9 * 256 + 2 * 64 + 3 * 896)
    o = parts["optimizer"]
    assert o["8-bit states"] == pytest.approx(2 * on_device * 32 / GIB)
    assert o["paged states (managed memory, outside torch)"] == pytest.approx(2 * paged * 32 / GIB)
    assert o["absmax of 8-bit states"] == pytest.approx(absmax * 32 / GIB)

    # Activations at the peak: the backward through the last layer. T = 2048 tokens.
    T, h, q, kv, ffn = 2048, 4096, 4096, 1024, 14336
    assert est.peak_phase == "backward through the last layer"
    a = parts["activations"]
    assert a["checkpoints (each layer's input)"] == pytest.approx(32 * T * h * 2 / GIB)
    # One layer recomputed, bytes per token: two RMSNorms' fp32 input copies (2 x 4h); the two
    # normed bf16 outputs the adapters keep (2 x 2h); q, k, v after RoPE (2q + 2kv + 2kv); the SDPA
    # output and its contiguous copy for o_proj (2 x 2q); gate, act(gate), up and their product
    # (4 x 2 ffn); seven lora_A outputs (7 x 2r).
    per_token = 2 * 4 * h + 2 * 2 * h + (2 * q + 4 * kv) + 2 * 2 * q + 4 * 2 * ffn + 7 * 2 * 16
    assert per_token == 192_736
    scale = C.ACTIVATION_SCALE["hf"]  # fitted to the calibration matrix
    assert a["one layer recomputed"] == pytest.approx(per_token * T * scale / GIB)
    # Backward temporaries: one MLP-wide and two hidden-wide bf16 gradients (the hf fit).
    assert C.BACKWARD_MLP_GRADIENTS["hf"] == 1
    temps = (1 * 2 * ffn + 2 * 2 * h) * T
    assert a["backward temporaries"] == pytest.approx(temps * scale / GIB)

    # Workspace: the CUDA context and kernel modules (no GPU named: the largest context known, the
    # H200's), cuBLAS and cuBLASLt workspaces (32 MiB each on Hopper), the largest dequantized
    # weight (down_proj in bf16), and the allocator's slack: a share of the kept layer inputs
    # (32 x T x h in bf16), of which expandable segments leave a share.
    ws = parts["workspace"]
    slack = C.HF_SLACK_PER_KEPT_INPUT * 32 * T * h * 2 * C.HF_EXPANDABLE_SLACK_SHARE
    outside = devices.UNKNOWN.context_gib + C.KERNEL_MODULES_GIB["hf"]
    assert (
        ws["CUDA context (outside torch)"]
        == pytest.approx(devices.HOPPER.context_gib)
        == pytest.approx(0.598)
    )
    assert ws["kernel modules (outside torch)"] == pytest.approx(C.KERNEL_MODULES_GIB["hf"])
    assert ws["cuBLAS + cuBLASLt workspaces"] == pytest.approx(64 * 2**20 / GIB)
    assert ws["dequantized weight (one matmul)"] == pytest.approx(ffn * h * 2 / GIB)
    assert ws["allocator slack (reserved - allocated)"] == pytest.approx(slack / GIB)

    # The totals: terms add up to the device total; torch sees neither context nor paged state.
    assert sum(t.gb for t in est.terms) == pytest.approx(est.device_total_gb)
    paged_gb = o["paged states (managed memory, outside torch)"]
    assert est.torch_peak_gb == pytest.approx(est.device_total_gb - outside - paged_gb)
    assert est.outside_torch_gb == pytest.approx(outside)
    assert est.torch_allocated_gb == pytest.approx(
        est.torch_peak_gb - ws["allocator slack (reserved - allocated)"]
    )


def test_the_default_allocator_only_adds_slack() -> None:
    expandable = estimate(cfg_for(), backend="hf", expandable=True)
    default = estimate(cfg_for(), backend="hf", expandable=False)
    slack = "allocator slack (reserved - allocated)"
    assert default.torch_allocated_gb == pytest.approx(expandable.torch_allocated_gb)
    assert default.term("workspace").parts[slack] == pytest.approx(
        expandable.term("workspace").parts[slack] / C.HF_EXPANDABLE_SLACK_SHARE
    )
    assert any("expandable segments" in n for n in default.notes)
    assert not any("expandable segments" in n for n in expandable.notes)


def test_the_allocator_follows_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """The estimate uses the allocator an engine started from this environment would use."""
    monkeypatch.setenv("PYTORCH_ALLOC_CONF", "max_split_size_mb:512")
    assert estimate(cfg_for(), backend="hf").torch_peak_gb == pytest.approx(
        estimate(cfg_for(), backend="hf", expandable=False).torch_peak_gb
    )
    monkeypatch.setenv("PYTORCH_ALLOC_CONF", "expandable_segments:True")
    assert estimate(cfg_for(), backend="hf").torch_peak_gb == pytest.approx(
        estimate(cfg_for(), backend="hf", expandable=True).torch_peak_gb
    )


def test_unsloth_rows_are_padding_free() -> None:
    """The Unsloth backend sends a micro-batch as one padding-free row: no attention mask, so the
    same estimate as rows that need no padding; hf pads rows of a micro-batch to the longest."""
    cfg = cfg_for(train__micro_batch=4)
    assert not any("padded" in n for n in estimate(cfg, backend="unsloth").notes)
    assert estimate(cfg, backend="unsloth").torch_peak_gb == pytest.approx(
        estimate(cfg, backend="unsloth", padded=False).torch_peak_gb
    )
    assert any("padded" in n for n in estimate(cfg, backend="hf").notes)


def test_even_rows_keep_one_hidden_tensor_less_in_each_kept_layer() -> None:
    """Rows of one length sent as n x seq_len (the Unsloth backend's even rows): each layer kept
    for backward saves one bf16 hidden-wide tensor less than in the one padding-free row
    (measured on the 8B seed recipe, terms._saved_layers); checkpointed layers keep nothing
    either way, and the hf backend never builds the one row."""
    cfg = cfg_for(train__micro_batch=2, train__seq_len=4096, train__gradient_checkpointing=False)
    arch = catalog()["llama-3.1-8b"]
    one, even = (estimate(cfg, backend="unsloth", checkpointed=0, even_rows=e) for e in (False, True))
    tensor = arch.layers * 2 * 4096 * arch.hidden * 2 / C.GIB  # every layer, 8192 tokens, bf16
    assert one.torch_peak_gb - even.torch_peak_gb == pytest.approx(tensor, rel=1e-3)
    every = [estimate(cfg, backend="unsloth", checkpointed=arch.layers, even_rows=e) for e in (False, True)]
    assert every[0].torch_peak_gb == pytest.approx(every[1].torch_peak_gb)
    assert estimate(cfg, backend="hf", checkpointed=0, even_rows=True).torch_peak_gb == pytest.approx(
        estimate(cfg, backend="hf", checkpointed=0).torch_peak_gb
    )


def test_a_padding_free_row_is_one_sequence_of_the_whole_micro_batch() -> None:
    """Unsloth's generic path (Gemma 3) runs transformers' attention on the padding-free row: its
    masks are as wide as the whole micro-batch, so 8 x 2048 tokens cost what one row of 16384 does
    (measured: 3.80 GiB allocated at both, bench/results/memory-calibration-unsloth-gemma-3-1b-h100-
    2026-12-05b.json), and several examples in the row mask every layer, not only the sliding ones."""
    from engine.memory.estimate import plan_for
    from engine.memory.terms import attention_mask_inputs, masked_layers

    arch = catalog()["gemma-3-1b"]
    wide = cfg_for("gemma-3-1b", train__seq_len=2048, train__micro_batch=8)
    long = cfg_for("gemma-3-1b", train__seq_len=16384, train__micro_batch=1)
    a, b = estimate(wide, backend="unsloth"), estimate(long, backend="unsloth")
    assert a.torch_allocated_gb == pytest.approx(b.torch_allocated_gb, rel=0.01)
    plan = plan_for(wide, arch, "unsloth")
    assert (plan.rows, plan.row_len) == (1, 16384)
    assert masked_layers(plan) == arch.layers
    assert attention_mask_inputs(plan) == 2 * 16384**2
    single = plan_for(long, arch, "unsloth")
    assert masked_layers(single) == arch.layers - arch.layers // arch.sliding_pattern
    # hf pads the same micro-batch into 8 rows of 2048: eight small masks.
    hf = plan_for(wide, arch, "hf")
    assert (hf.rows, hf.row_len) == (8, 2048)
    assert attention_mask_inputs(hf) == 2 * 8 * 2048**2


def test_trl_loss_never_builds_full_logits() -> None:
    """TRL 1.16's chunked LM head: the loss phase holds a 4096 x 32768 tile, not T x V fp32 logits."""
    est = estimate(cfg_for(train__seq_len=16384), backend="hf")
    full_logits_gib = 16384 * 128256 * 4 / GIB
    assert est.device_total_gb < full_logits_gib + 10  # 7.8 GiB of logits would dominate otherwise
    from engine.memory.estimate import plan_for
    from engine.memory.terms import loss_phase

    plan = plan_for(cfg_for(train__seq_len=16384), catalog()["llama-3.1-8b"], "hf")
    tiles = loss_phase(plan).activations["LM-head tiles (chunked log-prob)"]
    T, h = 16384, 4096
    assert tiles == 4096 * 32768 * 2 + 4 * T * h + 2 * T * h


def test_backends_order_as_measured() -> None:
    """anchors.md: the usual recipe > the engine's hf > unsloth, on the same recipe."""
    cfg = cfg_for(train__seq_len=4096, train__micro_batch=2, lora__r=32)
    peaks = {b: estimate(cfg, backend=b).torch_peak_gb for b in ("hf-upcast", "hf", "unsloth")}
    assert peaks["hf-upcast"] > peaks["hf"] > peaks["unsloth"]


def test_auto_backend_is_hf_without_unsloth_and_the_caller_wins() -> None:
    cfg = cfg_for()
    cfg.hardware.backend = "auto"
    assert estimate(cfg).backend == "hf"
    assert estimate(cfg, backend="unsloth").backend == "unsloth"
    assert estimate(cfg, backend="usual").backend == "hf-upcast"


def test_bad_configs_are_user_errors() -> None:
    with pytest.raises(UserError, match=r"above llama-3\.1-8b's maximum of 131072"):
        estimate(cfg_for(train__seq_len=200_000))
    with pytest.raises(UserError, match="qkv_proj"):
        estimate(cfg_for("phi-4"))  # q_proj... do not exist in Phi-4's fused layout
    with pytest.raises(UserError, match="modules_to_save"):
        estimate(cfg_for(lora__modules_to_save=["norm"]))
    with pytest.raises(UserError, match="backend"):
        estimate(cfg_for(), backend="vllm")


# ---------------------------------------------------------------------------------------------
# Monotonicity: more tokens, a bigger batch or a higher rank never lowers the estimate.
# Ranks start at 8: below that bitsandbytes keeps fp32 states for tensors under 4096 elements,
# which really is a few KB more than 8-bit states for a slightly bigger tensor.
# ---------------------------------------------------------------------------------------------

configs = st.fixed_dictionaries(
    {
        "arch": st.sampled_from(sorted(catalog())),
        "backend": st.sampled_from(["hf", "hf-upcast", "unsloth"]),
        "seq": st.integers(64, 16384),
        "mb": st.integers(1, 8),
        "r": st.integers(8, 256),
        "gc": st.booleans(),
        "mts": st.sampled_from([[], ["lm_head"], ["embed_tokens", "lm_head"]]),
        "optimizer": st.sampled_from(["paged_adamw_8bit", "adamw_8bit", "paged_adamw_32bit", "adamw_torch"]),
        "attention": st.sampled_from(["sdpa", "eager"]),
        "budget": st.sampled_from([None, 8.0, 24.0, 80.0]),
    }
)


def _total(c: dict, **change: int) -> float:
    c = {**c, **change}
    arch = catalog()[c["arch"]]
    cfg = cfg_for(
        c["arch"],
        train__seq_len=min(c["seq"], arch.max_positions),
        train__micro_batch=c["mb"],
        train__gradient_checkpointing=c["gc"],
        train__optimizer=c["optimizer"],
        lora__r=c["r"],
        lora__modules_to_save=c["mts"],
        lora__target_modules=list(arch.linear_modules()),
        model__attn_implementation=c["attention"],
    )
    return estimate(cfg, arch, c["backend"], budget_gb=c["budget"]).device_total_gb


@settings(max_examples=60, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])
@given(c=configs, more=st.integers(1, 4096))
def test_longer_sequences_never_estimate_less(c: dict, more: int) -> None:
    assert _total(c, seq=c["seq"] + more) >= _total(c) - 1e-9


@settings(max_examples=60, deadline=None, database=None)
@given(c=configs, more=st.integers(1, 8))
def test_bigger_micro_batches_never_estimate_less(c: dict, more: int) -> None:
    assert _total(c, mb=c["mb"] + more) >= _total(c) - 1e-9


@settings(max_examples=60, deadline=None, database=None)
@given(c=configs, more=st.integers(1, 32))
def test_higher_ranks_never_estimate_less(c: dict, more: int) -> None:
    """Over ranks that are multiples of 8, where every adapter tensor is whole 256-value blocks
    (the catalog's widths are multiples of 32), so the lean 8-bit step's slabs take them all."""
    r = 8 * max(1, c["r"] // 8)
    assert _total(c, r=r + 8 * more) >= _total(c, r=r) - 1e-9


def test_a_rank_whose_adapters_are_not_whole_blocks_can_estimate_less() -> None:
    """The lean 8-bit step gathers only whole-block tensors into its slabs (two transient copies of
    the largest); at r=9 Gemma-3-1B's adapters (9 x 1152 values) are not, and go through
    bitsandbytes' own per-tensor update, which needs no gather. Found by the property test above
    when it drew odd ranks."""
    c = {"arch": "gemma-3-1b", "backend": "unsloth", "seq": 64, "mb": 1, "gc": True, "mts": []}
    c |= {"optimizer": "paged_adamw_8bit", "attention": "sdpa", "budget": None}
    assert _total(c, r=9) < _total(c, r=8) < _total(c, r=16)


# ---------------------------------------------------------------------------------------------
# GPUs and the verdict
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("spec", ["rtx4090", "RTX 4090", "4090", "NVIDIA GeForce RTX 4090", "rtx-4090"])
def test_catalog_gpu_spellings(spec: str) -> None:
    gpu = resolve_gpu(spec)
    assert gpu.name == "rtx4090"
    assert gpu.total_gb == pytest.approx(24564 / 1024)  # 23.99 GiB, as nvidia-smi reports


@pytest.mark.parametrize(("spec", "gib"), [("24GB", 24), ("24", 24), ("80GiB", 80), ("12288MiB", 12)])
def test_plain_sizes_are_gib(spec: str, gib: float) -> None:
    gpu = resolve_gpu(spec)
    assert gpu.source == "size" and gpu.budget_gb == gib


def test_required_cards_are_in_the_catalog() -> None:
    for spec, gib in [
        ("rtx3060", 12),
        ("rtx4060", 8),
        ("rtx4070", 12),
        ("rtx4080", 16),
        ("rtx3090", 24),
        ("rtx5090", 32),
        ("a10", 22.5),
        ("l4", 22.5),
        ("a100-40gb", 40),
        ("a100-80gb", 80),
        ("h100", 79.6),
        ("h200", 140),
    ]:
        assert resolve_gpu(spec).total_gb == pytest.approx(gib, rel=0.01), spec


def test_unknown_gpu_and_absent_gpu_are_user_errors(monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(UserError, match="unknown GPU 'rtx9999'"):
        resolve_gpu("rtx9999")
    import pynvml

    def no_driver() -> None:
        raise pynvml.NVMLError(pynvml.NVML_ERROR_LIBRARY_NOT_FOUND)

    monkeypatch.setattr(pynvml, "nvmlInit", no_driver)
    with pytest.raises(UserError, match="pass --gpu"):
        resolve_gpu("auto")


def test_auto_reads_free_memory_through_nvml(monkeypatch: pytest.MonkeyPatch) -> None:
    import types

    import pynvml

    memory = types.SimpleNamespace(total=24564 * 2**20, free=20 * GIB, used=0)
    monkeypatch.setattr(pynvml, "nvmlInit", lambda: None)
    monkeypatch.setattr(pynvml, "nvmlShutdown", lambda: None)
    monkeypatch.setattr(pynvml, "nvmlDeviceGetCount", lambda: 1)
    monkeypatch.setattr(pynvml, "nvmlDeviceGetHandleByIndex", lambda i: "h")
    monkeypatch.setattr(pynvml, "nvmlDeviceGetName", lambda h: "NVIDIA GeForce RTX 4090")
    monkeypatch.setattr(pynvml, "nvmlDeviceGetMemoryInfo", lambda h: memory)
    gpu = resolve_gpu("auto")
    assert gpu.budget_gb == pytest.approx(20) and gpu.total_gb == pytest.approx(23.988, abs=1e-3)


def test_verdict_thresholds() -> None:
    est = estimate(cfg_for())
    used = est.device_total_gb
    roomy = Gpu("x", "x", used * 2, used * 2, "size")
    assert est.verdict(roomy).status == FITS
    tight_budget = used / (1 - C.TIGHT_FRACTION / 2)  # headroom is 3% of the budget: under 6%
    assert est.verdict(Gpu("x", "x", tight_budget, tight_budget, "size")).status == TIGHT
    small = Gpu("x", "x", used - 0.01, used - 0.01, "size")
    v = est.verdict(small)
    assert v.status == DOES_NOT_FIT and v.headroom_gb == pytest.approx(-0.01)
    assert v.basis == est.verdict_basis == "device_total"


def test_to_event_round_trips_through_the_protocol() -> None:
    est = estimate(cfg_for())
    event = est.to_event(resolve_gpu("rtx4090"))
    assert isinstance(event, EstimateEvent)
    assert [t.name for t in event.terms] == ["weights", "gradients", "optimizer", "activations", "workspace"]
    assert event.verdict == FITS and event.budget_gb == pytest.approx(23.988, abs=1e-3)
    assert decode_event(encode(event)) == event
    assert est.to_event(None).verdict == "" and est.to_event(None).budget_gb is None
    assert math.isclose(sum(t.gb for t in event.terms), event.device_total_gb, abs_tol=1e-3)


def test_gemma_tied_embeddings_are_one_matrix() -> None:
    est = estimate(cfg_for("gemma-3-1b"))
    w = est.term("weights").parts
    assert "lm_head" not in w
    assert w["embed_tokens = lm_head (tied)"] == pytest.approx(262144 * 1152 * 2 / GIB)
