"""bench/kernel_profile.py's accounting: kernel names from CUDA traces (H100, torch 2.11, Unsloth
and bitsandbytes) land in the category their work belongs to, and the device's busy time counts
overlapping kernels once."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from bench.kernel_profile import category, device_kernels, summarise, union_us


@pytest.mark.parametrize(
    ("name", "want"),
    [
        ("sm90_xmma_gemm_bf16bf16_bf16f32_f32_tn_n_tilesize128x256x64_warpgroupsize2x1x1", "matmul"),
        ("nvjet_tst_256x128_64x4_1x2_h_bz_coopB_NNT", "matmul"),
        ("void pytorch_flash::flash_fwd_kernel<Flash_fwd_kernel_traits<128, 128, 64>>", "attention"),
        ("cudnn_generated_fort_native_sdpa_sm90_flash_fprop_wgmma_f16_knob_3", "attention"),
        ("void kDequantizeBlockwise<__nv_bfloat16, 512, 64, 8, 2>(float*, unsigned char*)", "dequantize"),
        ("_nf4_dequant_kernel", "dequantize"),
        ("void kOptimizer32bit2State<float, 0>(float*)", "optimizer"),
        ("_cross_entropy_forward", "cross-entropy"),
        ("triton_poi_fused_add_mul_0", "fused (Triton)"),
        ("_rms_layernorm_forward", "fused (Triton)"),
        ("_DWf_DW_dfg_kernel", "fused (Triton)"),
        ("ncclDevKernel_AllReduce_Sum_bf16_RING_LL", "communication"),
        ("Memcpy DtoH (Device -> Pinned)", "copy"),
        (
            "void at::native::vectorized_elementwise_kernel<4, at::native::FillFunctor<float>>",
            "elementwise (aten)",
        ),
        ("aten::addmm", "matmul"),
        ("aten::add_", "elementwise (aten)"),
        ("some_custom_kernel", "other"),
    ],
)
def test_category(name: str, want: str) -> None:
    assert category(name) == want


def test_union_counts_overlap_once() -> None:
    assert union_us([(0, 10), (5, 15), (20, 25), (21, 22)]) == 20


def test_summary_per_step() -> None:
    kernels = [
        ("gemm_a", 0, 600, 1),
        ("flash_fwd", 600, 800, 1),
        ("gemm_a", 1000, 1600, 1),
        ("Memcpy", 1500, 1700, 1),
    ]
    r = summarise(kernels, steps=2, wall_s=0.002)
    assert r["busy_s_per_step"] == pytest.approx(0.00075)  # 1,500 us busy over 2 steps
    assert r["idle_share"] == pytest.approx(0.25)
    assert r["categories"]["matmul"]["s_per_step"] == pytest.approx(0.0006)
    assert r["categories"]["matmul"]["kernels_per_step"] == 1
    assert r["top"][0] == {"name": "gemm_a", "category": "matmul", "ms_per_step": 0.6, "calls_per_step": 1.0}
    # the one gap inside the window: 200 us between flash_fwd's end and the second gemm_a
    assert r["idle_gaps"] == [{"between": "flash_fwd -> gemm_a", "ms_per_step": 0.1, "gaps_per_step": 0.5}]


def test_device_kernels_leave_the_codes_own_ranges_out() -> None:
    """On the device's timeline torch also shows the ranges the code names, over the kernels they
    launched (Optimizer.step#AdamW.step): not kernels. Events on the host are not kernels either."""

    def event(name: str, device: str, a: float, b: float, annotation: bool = False) -> SimpleNamespace:
        span = SimpleNamespace(start=a, end=b)
        return SimpleNamespace(name=name, device_type=device, time_range=span, is_user_annotation=annotation)

    events = [
        event("Optimizer.step#AdamW.step", "cuda", 0, 420, annotation=True),
        event("kOptimizer8bit2StateBlockwise", "cuda", 10, 20),
        event("aten::mm", "cpu", 0, 50),
        SimpleNamespace(name="gemm", device_type="cuda", time_range=SimpleNamespace(start=30, end=80)),
    ]
    assert device_kernels(events, "cuda") == [
        ("kOptimizer8bit2StateBlockwise", 10.0, 20.0, 1),
        ("gemm", 30.0, 80.0, 1),
    ]


def test_origins_name_the_op_chain_shapes_and_caller() -> None:
    """Each traced kernel is filed under the op that launched it, that op's callers, its input
    shapes and the first frame outside torch; other categories are left out."""
    from types import SimpleNamespace as NS

    from bench.kernel_profile import origins

    step = NS(name="autograd::engine::evaluate_function: SliceBackward0", cpu_parent=None, kernels=[])
    slice_bwd = NS(name="aten::slice_backward", cpu_parent=step, kernels=[])
    copy = NS(
        name="aten::copy_",
        cpu_parent=slice_bwd,
        input_shapes=[[4, 32, 4096, 128], [4, 32, 4096, 128], []],
        stack=["torch/autograd/graph.py(1): f", "/tmp/site2/unsloth/utils/attention_dispatch.py(990): split"],
        kernels=[NS(name="void at::native::elementwise_kernel<direct_copy_kernel>", duration=200.0)] * 2,
    )
    mm = NS(
        name="aten::mm",
        cpu_parent=None,
        input_shapes=[],
        stack=[],
        kernels=[NS(name="nvjet_gemm", duration=50.0)],
    )
    attn = NS(name="aten::sdpa", cpu_parent=None, kernels=[NS(name="cudnn_generated_flash", duration=500.0)])
    out = origins([step, slice_bwd, copy, mm, attn], steps=2)
    assert set(out) == {"copy", "matmul"}
    (row,) = out["copy"]
    assert row["ms_per_step"] == 0.2 and row["calls_per_step"] == 1.0
    assert (
        row["ops"]
        == "aten::copy_ < aten::slice_backward < autograd::engine::evaluate_function: SliceBackward0"
    )
    assert row["shapes"].startswith("[[4, 32, 4096, 128]")
    assert row["caller"] == "unsloth/utils/attention_dispatch.py(990): split"
    assert out["matmul"][0]["ms_per_step"] == 0.025
