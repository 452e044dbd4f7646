"""The merge's memory estimate and where the merge runs: pure arithmetic, no torch."""

from __future__ import annotations

import pytest

from engine.config import load_preset
from engine.memory import estimate_merge, place_merge
from engine.memory.constants import GIB
from engine.memory.merge import HOST_PROCESS_GIB, host_available_gb, outside_torch_gib, parse_size


def test_an_8b_merge_counts_the_16bit_base_and_the_fp32_adapter() -> None:
    est = estimate_merge(load_preset("llama-3.1-8b-rtx4090"), "bf16")
    # Llama 3.1 8B: 8,030,261,248 parameters; r=32 on all seven projections: 83,886,080 LoRA
    # parameters (peft's print_trainable_parameters for this config).
    assert est.term("weights") == pytest.approx(8_030_261_248 * 2 / GIB)
    assert est.term("adapter") == pytest.approx(83_886_080 * 4 / GIB)
    # The largest delta: gate/up/down, 4096 x 14336, in fp32 with its sum.
    assert est.term("merge") == pytest.approx(4096 * 14336 * 8 / GIB)
    assert est.term("process") == HOST_PROCESS_GIB
    model_side = est.term("weights") + est.term("adapter") + est.term("merge")
    assert est.gpu_gb == pytest.approx(model_side + outside_torch_gib(), abs=0.2)
    # On the CPU nothing is copied to be saved; on a GPU one 5 GB shard passes through host memory.
    assert est.term("save") == pytest.approx(5e9 / GIB)
    assert est.cpu_gb == pytest.approx(model_side + HOST_PROCESS_GIB, abs=0.3)
    assert est.gpu_host_gb == pytest.approx(HOST_PROCESS_GIB + 5e9 / GIB, abs=0.2)
    assert "on a GPU" in est.summary() and "weights 14.96" in est.summary()


def test_fused_projections_and_modules_to_save_are_counted_once() -> None:
    cfg = load_preset("llama-3.1-8b-rtx4060")  # r=64 plus full copies of embed_tokens and lm_head
    est = estimate_merge(cfg, "bf16")
    lora = 2 * 83_886_080  # r=64 is twice r=32
    copies = 2 * 128_256 * 4096
    assert est.term("adapter") == pytest.approx((lora * 4 + copies * 2) / GIB)


def test_placement_prefers_a_gpu_with_room_then_the_cpu_then_refuses() -> None:
    est = estimate_merge(load_preset("llama-3.1-8b-rtx4090"), "bf16")
    assert place_merge(est, gpu_free_gb=79.0, host_free_gb=100.0).device == "cuda"
    on_cpu = place_merge(est, gpu_free_gb=7.5, host_free_gb=100.0)
    assert on_cpu.device == "cpu" and "the GPU has 7.50 GiB free" in on_cpu.reason
    assert place_merge(est, gpu_free_gb=79.0, host_free_gb=100.0, want="cpu").device == "cpu"
    # A GPU with room but not the host memory beside it (a 5 GB shard to write) is no good either.
    assert place_merge(est, gpu_free_gb=79.0, host_free_gb=2.0).refused
    refused = place_merge(est, gpu_free_gb=7.5, host_free_gb=12.0)
    assert refused.refused
    assert f"needs {est.cpu_gb:.2f} GiB of RAM (12.00 GiB available)" in refused.reason
    assert f"or {est.gpu_gb:.2f} GiB on the GPU (7.50 GiB free)" in refused.reason
    no_gpu = place_merge(est, gpu_free_gb=None, host_free_gb=100.0, want="cuda")
    assert no_gpu.refused and "no CUDA GPU" in no_gpu.reason
    # Unknown host memory (no /proc/meminfo, no psutil) cannot be checked: it is not a refusal.
    assert place_merge(est, gpu_free_gb=None, host_free_gb=None).device == "cpu"


def test_shard_sizes_read_as_transformers_reads_them() -> None:
    assert parse_size("5GB") == 5 * 10**9
    assert parse_size("2GiB") == 2 * 2**30
    assert parse_size("500MB") == 500 * 10**6
    assert parse_size(" 1.5gb ") == 1_500_000_000
    with pytest.raises(ValueError):
        parse_size("lots")


def test_host_memory_is_read() -> None:
    free = host_available_gb()
    assert free is not None and 0 < free < 100_000
