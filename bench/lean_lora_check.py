"""The lean LoRA Functions against Unsloth's own on CUDA, at Llama-3.1-8B's shapes, NF4 weights.

    python bench/lean_lora_check.py --out bench/results/lean-lora-<gpu>-<date>.json

For the MLP (4,096 -> 14,336 -> 4,096) and q/k/v (4,096 -> 4,096 / 1,024 / 1,024), r=32, alpha 64,
4 x 4,096 tokens (the seed recipe's 80 GB micro-batch): Unsloth's LoRA_MLP / LoRA_QKV and
engine.train.backends.lean_lora's on the same quantized weights, inputs and output gradients.
Each runs eagerly and under torch.compile (the training step compiles each decoder layer, Unsloth's
per-block compile, and traces the Functions). All are compared with an fp32 autograd reference on
the dequantized weights (relative Frobenius error of the output and of every gradient: the lean
Functions must be no less exact) and timed forward and backward (median of --reps, CUDA events).
The training step itself is measured by bench/step_tax.py.
"""

from __future__ import annotations

import argparse
import functools
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

HIDDEN, INTERMEDIATE, KV = 4096, 14336, 1024


def quantized(out: int, inp: int, gen: Any) -> tuple[Any, Any, Any]:
    """NF4 weight (double-quantized absmax, as the presets load), its quant state, and the
    dequantized fp32 matrix the reference uses."""
    import bitsandbytes.functional as F
    import torch

    w = (torch.randn(out, inp, generator=gen, device="cuda") * 0.02).bfloat16()
    packed, state = F.quantize_4bit(w, blocksize=64, compress_statistics=True, quant_type="nf4")
    return packed, state, F.dequantize_4bit(packed, state).float()


def adapter(out: int, inp: int, rank: int, gen: Any) -> tuple[Any, Any]:
    """fp32 A and B, as Unsloth keeps them; B nonzero, as after some training."""
    import torch

    a = torch.randn(rank, inp, generator=gen, device="cuda") / inp**0.5
    b = torch.randn(out, rank, generator=gen, device="cuda") * 0.01
    return a, b


def lora_ref(X: Any, W: Any, A: Any, B: Any, s: float) -> Any:
    return X @ W.t() + s * (X @ A.t()) @ B.t()


def reference(
    kind: str, projs: list, leaves: tuple[Any, list[Any]], grads_out: list[Any], scale: float
) -> tuple[list, list]:
    """Outputs and gradients in fp32 autograd on the dequantized weights."""
    import torch

    X, ab = leaves
    Xf = X.float()
    As, Bs, Ws = ab[::2], ab[1::2], [p[2] for p in projs]
    if kind == "mlp":
        e = lora_ref(Xf, Ws[0], As[0], Bs[0], scale)
        g = lora_ref(Xf, Ws[1], As[1], Bs[1], scale)
        outs = [lora_ref(torch.nn.functional.silu(e) * g, Ws[2], As[2], Bs[2], scale)]
    else:
        outs = [lora_ref(Xf, W, A, B, scale) for W, A, B in zip(Ws, As, Bs, strict=True)]
    torch.autograd.backward(outs, [d.float() for d in grads_out])
    return [o.detach() for o in outs], [X.grad, *(t.grad for t in ab)]


def rel(a: Any, b: Any) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm())


def timed(fn: Any, reps: int) -> float:
    import torch

    times = []
    for i in range(reps + 2):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        if i >= 2:
            times.append(start.elapsed_time(end))
    return statistics.median(times)


def check(kind: str, rank: int, scale: float, tokens: tuple[int, int], reps: int) -> dict[str, Any]:
    import torch
    from unsloth.kernels import fast_lora
    from unsloth.kernels.swiglu import swiglu_DWf_DW_dfg_kernel, swiglu_fg_kernel

    from engine.train.backends import lean_lora

    gen = torch.Generator(device="cuda").manual_seed(0)
    if kind == "mlp":
        shapes = ((INTERMEDIATE, HIDDEN), (INTERMEDIATE, HIDDEN), (HIDDEN, INTERMEDIATE))
    else:
        shapes = ((HIDDEN, HIDDEN), (KV, HIDDEN), (KV, HIDDEN))
    projs = [(*quantized(o, i, gen), *adapter(o, i, rank, gen)) for o, i in shapes]
    x = torch.randn(*tokens, HIDDEN, generator=gen, device="cuda").bfloat16()
    out_dims = (HIDDEN,) if kind == "mlp" else tuple(o for o, _ in shapes)
    grads_out = [torch.randn(*tokens, d, generator=gen, device="cuda").bfloat16() for d in out_dims]

    def leaves() -> tuple[Any, list[Any]]:
        X = x.clone().requires_grad_()
        ab = [t.clone().requires_grad_() for p in projs for t in p[3:]]
        return X, ab

    def apply(impl: str, X: Any, *ab: Any) -> tuple[Any, ...]:
        parts = [
            part
            for p, (a, b) in zip(projs, zip(ab[::2], ab[1::2], strict=True), strict=True)
            for part in (p[0], p[1], a, b, scale)
        ]
        if kind == "mlp":
            if impl == "unsloth":
                return (
                    fast_lora.LoRA_MLP.apply(X, *parts, swiglu_fg_kernel, swiglu_DWf_DW_dfg_kernel, False),
                )
            return (
                lean_lora.LeanLoRAMLP.apply(
                    X, *parts, swiglu_fg_kernel, swiglu_DWf_DW_dfg_kernel, lean_lora._unsloth_dequant, False
                ),
            )
        if impl == "unsloth":
            return fast_lora.LoRA_QKV.apply(X, *parts, False)
        return lean_lora.LeanLoRAQKV.apply(X, *parts, lean_lora._unsloth_dequant, False)

    # Each decoder layer trains compiled (Unsloth's per-block compile), which traces the Functions.
    compiled = {
        impl: torch.compile(functools.partial(apply, impl), dynamic=True) for impl in ("unsloth", "lean")
    }

    def run(impl: str) -> tuple[list[Any], Any]:
        X, ab = leaves()
        base, _, how = impl.partition("-")
        outs = (compiled[base] if how == "compiled" else functools.partial(apply, base))(X, *ab)
        torch.autograd.backward(outs, grads_out)
        return [o.detach() for o in outs], [X.grad, *(t.grad for t in ab)]

    ref_outs, ref_grads = reference(kind, projs, leaves(), grads_out, scale)
    names = [
        "X",
        *(
            f"{p}{m}"
            for p in (("gate", "up", "down") if kind == "mlp" else ("q", "k", "v"))
            for m in ("A", "B")
        ),
    ]

    row: dict[str, Any] = {"kind": kind, "rank": rank, "scale": scale, "tokens": list(tokens)}
    impls = ("unsloth", "lean", "unsloth-compiled", "lean-compiled")
    for impl in impls:
        outs, grads = run(impl)
        row[impl] = {
            "rel_error_vs_fp32": {
                "out": max(rel(o, r) for o, r in zip(outs, ref_outs, strict=True)),
                **{n: rel(gr, r) for n, gr, r in zip(names, grads, ref_grads, strict=True)},
            },
        }
        del outs, grads
    del ref_outs, ref_grads
    torch.cuda.empty_cache()
    for impl in impls:
        row[impl]["fwd_bwd_ms"] = timed(lambda impl=impl: run(impl), reps)
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        run(impl)
        row[impl]["peak_above_inputs_mib"] = (torch.cuda.max_memory_allocated() - base) / 2**20
    errors = {impl: row[impl]["rel_error_vs_fp32"] for impl in impls}
    worst = max(
        errors[f"lean{how}"][k] / max(errors[f"unsloth{how}"][k], 1e-12)
        for how in ("", "-compiled")
        for k in errors["lean"]
    )
    row["lean_error_over_unsloth_worst"] = worst
    print(
        f"{kind} forward+backward: "
        + ", ".join(f"{impl} {row[impl]['fwd_bwd_ms']:.2f} ms" for impl in impls)
        + f"; worst error ratio lean/unsloth {worst:.2f}; errors lean-compiled "
        + ", ".join(f"{k} {v:.1e}" for k, v in errors["lean-compiled"].items())
    )
    return row


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--rank", type=int, default=32)
    ap.add_argument("--alpha", type=float, default=64)
    ap.add_argument("--rows", type=int, default=4)
    ap.add_argument("--seq", type=int, default=4096)
    ap.add_argument("--reps", type=int, default=10)
    args = ap.parse_args()

    import torch
    import unsloth  # noqa: F401 - first, as it requires

    from bench.gpu_common import versions

    report: dict[str, Any] = {
        "date": time.strftime("%Y-%m-%d"),
        "bench": "bench/lean_lora_check.py",
        "command": " ".join(sys.argv),
        "gpu": torch.cuda.get_device_name(),
        "versions": versions(),
        "checks": [
            check(kind, args.rank, args.alpha / args.rank, (args.rows, args.seq), args.reps)
            for kind in ("mlp", "qkv")
        ],
    }
    # Rounding may differ, but the lean Functions must be no less exact than Unsloth's (25% slack).
    failed = [c["kind"] for c in report["checks"] if c["lean_error_over_unsloth_worst"] > 1.25]
    report["failed"] = failed
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"-> {args.out}" + (f"; less exact than Unsloth's: {failed}" if failed else ""))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
