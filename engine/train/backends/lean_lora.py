"""Leaner LoRA projections for Unsloth's fused path: the same arithmetic as its LoRA_MLP and
LoRA_QKV (unsloth/kernels/fast_lora.py, 2026.10.9), with fewer passes over the big activations.

On the seed recipe's 80 GB step (8B, r=32 on all seven projections, 4 x 4,096 tokens, nothing
checkpointed) the rank-32 products take about 158 ms of a 1,121 ms step on an H100, and they are
memory-bound: each reads or writes a (tokens x 4,096) or (tokens x 14,336) activation to move a
(tokens x 32) one. Unsloth's Functions, per layer, read X six times to form X @ A (three in the
backward, to rebuild what the forward had), read the (tokens x 14,336) hidden `h` twice in the
backward, and add each LoRA term into its output with a separate K=32 GEMM that reads and writes
that whole output. Here:

- X @ A of the projections that share an input (gate/up, q/k/v) is one GEMM over a stacked A,
  kept for the backward (tokens x 2r and 3r; 1 MB a projection at 16k tokens), and so is h @ A_down.
- The gate and up products carry their LoRA term inside the base GEMM: X is laid out once as
  [X A_gate | X | X A_up], and each weight as [s B | W] or [W | s B], so the GEMM's K grows by r
  (0.8% more FLOPs) and the K=32 read-modify-write of e and g (940 MB each) goes.
- The backward's DW (tokens x 14,336) likewise: [dY | dY B_down] against [W_down; s A_down].
- The input gradients of q/k/v are one GEMM: [dQ | dK | dV | dQ B_q | dK B_k | dV B_v] against
  the stacked dequantized weights and the scaled A matrices, in place of three base GEMMs and
  three K=r read-modify-writes of dX.
- The A gradients of projections sharing an input are one GEMM over X.

Rounding: the LoRA scale multiplies B (or A) in bf16 before the GEMM instead of scaling in the
GEMM's epilogue, and the base and LoRA terms of e, g, DW and dX are summed in one fp32
accumulator instead of rounding the base product first. Both are bf16-ulp differences; with the
usual power-of-two scale (alpha / r) the first is exact.

Only plain LoRA takes these Functions (one adapter, no dropout, no lora_B bias, no QAT, no DoRA;
Unsloth's own checks, `fast_lora._is_plain_lora`): anything else calls Unsloth's original, which
handles it. `install` swaps them in per layer after Unsloth patched the model, before the first
forward, so Unsloth's per-block compile traces these.
"""

from __future__ import annotations

import functools
import types
from collections.abc import Callable
from typing import Any

import torch

from engine.train.backends.checkpointing import decoder_layers

Dequant = Callable[..., torch.Tensor]
# As Unsloth's Functions: the backward runs under the autocast state the forward saw.
_custom_fwd = torch.amp.custom_fwd(device_type="cuda")
_custom_bwd = torch.amp.custom_bwd(device_type="cuda")


def _write_input(ctx: Any) -> bool:
    """Whether the backward writes dX into X's storage: eager only, as in Unsloth's Functions
    (AOT autograd refuses a backward that mutates a forward input that requires grad)."""
    return ctx.inplace and not torch.compiler.is_compiling()


def _stacked(weights: tuple, states: tuple, below: Any, dequant: Dequant) -> torch.Tensor:
    """The dequantized weights stacked by rows, with `below` (the scaled A matrices) under them,
    each weight dequantized straight into its rows of the stacked buffer. Traced (in a compiled
    block) that goes through `dequant.traced_stack` (an opaque op, `nf4_stack`): Unsloth's own
    dequantize op writing into a view of a larger buffer crashed the compiled block with an
    illegal address (H100, 2026-12-06). A format it does not take is dequantized apart and
    concatenated, a copy."""
    if not torch.compiler.is_compiling() and all(hasattr(Q, "shape") for Q in states):
        return _stack_into(weights, states, [Q.shape[0] for Q in states], below, dequant)
    traced = getattr(dequant, "traced_stack", None)
    stacked = traced(weights, states, below) if traced is not None else None
    if stacked is not None:
        return stacked
    return torch.cat([*(dequant(W, Q) for W, Q in zip(weights, states, strict=True)), *below])


def _stack_into(weights: Any, states: Any, rows: list[int], below: Any, dequant: Dequant) -> torch.Tensor:
    first = below[0]
    out = torch.empty(
        sum(rows) + sum(b.shape[0] for b in below), first.shape[1], dtype=first.dtype, device=first.device
    )
    at = 0
    for W, Q, n in zip(weights, states, rows, strict=True):
        rows_of = out[at : at + n]
        got = dequant(W, Q, out=rows_of)
        if got.data_ptr() != rows_of.data_ptr():  # a format whose dequantizer ignores out=
            rows_of.copy_(got)
        at += n
    torch.cat(below, out=out[at:])
    return out


# ---- the stacked dequantize as one opaque op, for compiled blocks --------------------------------
# Inductor sees only its output, a fresh tensor: no view of a buffer is mutated in the graph.


@torch.library.custom_op(
    "qlc::nf4_stack",
    mutates_args=(),
    schema="(Tensor[] weights, Tensor[] absmax, Tensor[] absmax2, Tensor[] code, Tensor[] code2, "
    "Tensor[] offset, int[] rows, int blocksize, int blocksize2, Tensor[] below) -> Tensor",
)
def nf4_stack(
    weights: list[torch.Tensor],
    absmax: list[torch.Tensor],
    absmax2: list[torch.Tensor],
    code: list[torch.Tensor],
    code2: list[torch.Tensor],
    offset: list[torch.Tensor],
    rows: list[int],
    blocksize: int,
    blocksize2: int,
    below: list[torch.Tensor],
) -> torch.Tensor:
    """Double-quantized NF4 weights (bitsandbytes' layout, unpacked into tensors: an op takes no
    quant state objects) dequantized into the rows of one buffer, `below` under them."""
    from bitsandbytes.functional import QuantState

    cols, dtype = below[0].shape[1], below[0].dtype
    states = [
        QuantState(
            absmax=a,
            shape=torch.Size((n, cols)),
            code=c,
            blocksize=blocksize,
            quant_type="nf4",
            dtype=dtype,
            offset=o,
            state2=QuantState(absmax=a2, code=c2, blocksize=blocksize2, dtype=torch.float32),
        )
        for a, a2, c, c2, o, n in zip(absmax, absmax2, code, code2, offset, rows, strict=True)
    ]
    return _stack_into(weights, states, rows, below, _nf4_into)


@nf4_stack.register_fake
def _nf4_stack_fake(*args: Any) -> torch.Tensor:
    """The stacked buffer's shape, from `rows` and `below` (nf4_stack's 7th and 10th arguments)."""
    rows, below = args[6], args[9]
    return below[0].new_empty((sum(rows) + sum(b.shape[0] for b in below), below[0].shape[1]))


def _nf4_into(W: torch.Tensor, quant_state: Any, out: torch.Tensor) -> torch.Tensor:
    """Unsloth's NF4 dequantize into `out` on a GPU; bitsandbytes' on the CPU (tests), which has
    no `out=` there."""
    if out.is_cuda:
        return _unsloth_dequant(W, quant_state, out=out)
    from bitsandbytes.functional import dequantize_4bit

    return out.copy_(dequantize_4bit(W, quant_state))


def _nf4_traced_stack(weights: tuple, states: tuple, below: Any) -> torch.Tensor | None:
    """`nf4_stack` on bitsandbytes quant states it takes (double-quantized NF4 of the adapters'
    dtype, one block size), else None."""
    dtype = below[0].dtype
    if not all(
        type(Q).__name__ == "QuantState"
        and getattr(Q, "quant_type", None) == "nf4"
        and Q.state2 is not None
        and Q.dtype == dtype
        and isinstance(Q.offset, torch.Tensor)
        for Q in states
    ):
        return None
    if len({(Q.blocksize, Q.state2.blocksize) for Q in states}) != 1:
        return None
    return torch.ops.qlc.nf4_stack(
        list(weights),
        [Q.absmax for Q in states],
        [Q.state2.absmax for Q in states],
        [Q.code for Q in states],
        [Q.state2.code for Q in states],
        [Q.offset for Q in states],
        [int(Q.shape[0]) for Q in states],
        int(states[0].blocksize),
        int(states[0].state2.blocksize),
        list(below),
    )


# ---- sums of products, accumulated in place, for compiled blocks -------------------------------
# Eagerly `out.addmm_(a, b)` accumulates a product into `out` inside the GEMM (beta = 1). Traced,
# the in-place addmm_ becomes an out-of-place addmm, which Inductor runs as an extern kernel with
# a new output buffer: the whole of `out` is copied into it first. On the 8B's 80 GB step those
# copies were 12.6 ms a step (H100, 2026-12-06, the kernel profile's origins: the q/k/v and down
# projections' LoRA terms in the forward, dX's two accumulations in the MLP's backward). As one
# opaque op the accumulation stays in place.


@torch.library.custom_op(
    "qlc::mm_sum", mutates_args=(), schema="(Tensor[] lhs, Tensor[] rhs, float[] alphas) -> Tensor"
)
def mm_sum(lhs: list[torch.Tensor], rhs: list[torch.Tensor], alphas: list[float]) -> torch.Tensor:
    """The sum of alphas[i] * lhs[i] @ rhs[i], as `_sum_of_products` computes it."""
    return _sum_of_products(list(zip(lhs, rhs, alphas, strict=True)))


@mm_sum.register_fake
def _mm_sum_fake(lhs: list[torch.Tensor], rhs: list[torch.Tensor], alphas: list[float]) -> torch.Tensor:
    return lhs[0].new_empty((lhs[0].shape[0], rhs[0].shape[1]))


def _mm_sum(
    products: list[tuple[torch.Tensor, torch.Tensor, float]], out: torch.Tensor | None = None
) -> torch.Tensor:
    """sum(alpha * a @ b for a, b, alpha in products); traced, through `mm_sum`. `out` (eager
    only: a traced backward never writes its input, `_write_input`) takes the sum where the first
    product is unscaled, as every caller's is."""
    if torch.compiler.is_compiling():
        assert out is None, "a traced Function writes no buffer it was given"
        lhs, rhs, alphas = zip(*products, strict=True)
        return torch.ops.qlc.mm_sum(list(lhs), list(rhs), [float(a) for a in alphas])
    return _sum_of_products(products, out)


def _sum_of_products(
    products: list[tuple[torch.Tensor, torch.Tensor, float]], out: torch.Tensor | None = None
) -> torch.Tensor:
    """The first product into a fresh output (or `out`), each other one accumulated into it by its
    GEMM (beta = 1)."""
    (a, b, alpha), *rest = products
    assert out is None or alpha == 1.0, "out= takes an unscaled first product"
    total = torch.matmul(a, b, out=out) if alpha == 1.0 else _mm_scaled(a, b, alpha)
    for a, b, alpha in rest:
        total.addmm_(a, b, alpha=alpha)
    return total


def _mm_scaled(a: torch.Tensor, b: torch.Tensor, s: float) -> torch.Tensor:
    """s * (a @ b), the scale applied in the GEMM's epilogue as Unsloth's `addmm_(beta=0)` does."""
    out = torch.empty((a.shape[0], b.shape[1]), dtype=a.dtype, device=a.device)
    return out.addmm_(a, b, alpha=s, beta=0)


def _a_grads(
    dB: torch.Tensor, X: torch.Tensor, ranks: tuple[int, ...], scales: tuple[float, ...]
) -> list[torch.Tensor]:
    """Each projection's A gradient, s * (dY B)^T X, from one GEMM over the stacked (T x sum(ranks))
    dB of projections that share the input X: one shared scale goes into the GEMM's epilogue,
    as Unsloth scales; different ones scale each projection's rows after it."""
    if len(set(scales)) == 1:
        return list(_mm_scaled(dB.t(), X, scales[0]).split(ranks))
    return [
        part.mul(s) if s != 1 else part for part, s in zip((dB.t() @ X).split(ranks), scales, strict=True)
    ]


class LeanLoRAMLP(torch.autograd.Function):
    """down(silu(gate(X)) * up(X)) with LoRA on all three: gate = X @ (Wg + s Bg Ag)^T, and so on.
    `fg(e, g) -> h` and `dfg(DW, e, g) -> (h, df, de)` (in place) are the SwiGLU kernels; `dequant`
    turns a weight and its quant state into the (out x in) matrix (into `out=` when given)."""

    @staticmethod
    @_custom_fwd
    def forward(
        ctx: Any,
        X: torch.Tensor,
        gateW: torch.Tensor,
        gateQ: Any,
        gateA: torch.Tensor,
        gateB: torch.Tensor,
        gateS: float,
        upW: torch.Tensor,
        upQ: Any,
        upA: torch.Tensor,
        upB: torch.Tensor,
        upS: float,
        downW: torch.Tensor,
        downQ: Any,
        downA: torch.Tensor,
        downB: torch.Tensor,
        downS: float,
        fg: Callable[..., torch.Tensor],
        dfg: Callable[..., tuple[torch.Tensor, torch.Tensor, torch.Tensor]],
        dequant: Dequant,
        inplace: bool,
    ) -> torch.Tensor:
        dtype = X.dtype
        shape = X.shape
        X2 = X.reshape(-1, shape[-1])
        rg = gateA.shape[0]
        Ag, Bg, Au, Bu = (t.to(dtype) for t in (gateA, gateB, upA, upB))
        XA = X2 @ torch.cat((Ag, Au)).t()  # (T, r_gate + r_up): one read of X for both
        Xc = torch.cat((XA[:, :rg], X2, XA[:, rg:]), dim=1)  # [X Ag | X | X Au]
        e = Xc[:, : rg + shape[-1]] @ torch.cat((Bg * gateS, dequant(gateW, gateQ)), dim=1).t()
        g = Xc[:, rg:] @ torch.cat((dequant(upW, upQ), Bu * upS), dim=1).t()
        del Xc
        h = fg(e.view(*shape[:-1], -1), g.view(*shape[:-1], -1)).view(e.shape)
        hA = h @ downA.to(dtype).t()  # (T, rd), kept: the backward's d_downB needs it
        out = _mm_sum([(h, dequant(downW, downQ).t(), 1.0), (hA, downB.to(dtype).t(), downS)])
        ctx.custom = (gateW, gateQ, gateS, upW, upQ, upS, downW, downQ, downS, dfg, dequant, shape)
        ctx.save_for_backward(X, e, g, XA, hA, gateA, gateB, upA, upB, downA, downB)
        ctx.inplace = inplace
        return out.view(*shape[:-1], -1)

    @staticmethod
    @_custom_bwd
    def backward(ctx: Any, dY: torch.Tensor) -> tuple[Any, ...]:
        gateW, gateQ, gateS, upW, upQ, upS, downW, downQ, downS, dfg, dequant, shape = ctx.custom
        X, e, g, XA, hA, gateA, gateB, upA, upB, downA, downB = ctx.saved_tensors
        dtype = X.dtype
        X2 = X.view(-1, shape[-1])
        dY = dY.reshape(-1, dY.shape[-1])
        Ag, Bg, Au, Bu, Ad, Bd = (t.to(dtype) for t in (gateA, gateB, upA, upB, downA, downB))
        rg = Ag.shape[0]

        # DW = dY @ Wd + s dY Bd @ Ad as one GEMM over [Wd; s Ad] (_stacked says when that is a copy).
        dYB = dY @ Bd  # (T, rd)
        DW = torch.cat((dY, dYB), dim=1) @ _stacked((downW,), (downQ,), (Ad * downS,), dequant)
        h, df, de = dfg(DW, e.view(DW.shape), g.view(DW.shape))

        d_downA = _mm_scaled(dYB.t(), h, downS)  # (rd, I)
        d_downB = _mm_scaled(dY.t(), hA, downS)  # (H, rd)
        del h
        gate_dB = de @ Bg  # (T, rg)
        up_dB = df @ Bu
        d_gateB = _mm_scaled(de.t(), XA[:, :rg], gateS)  # (I, rg)
        d_upB = _mm_scaled(df.t(), XA[:, rg:], upS)
        dB = torch.cat((gate_dB, up_dB), dim=1)  # (T, rg + ru)
        d_gateA, d_upA = _a_grads(dB, X2, (rg, Au.shape[0]), (gateS, upS))

        # dX = df @ Wu + de @ Wg + the LoRA terms of both in one K = rg + ru GEMM. X's storage
        # takes dX where nothing else still reads X (Unsloth's `inplace`), as in its Function.
        dX = _mm_sum(
            [
                (df, dequant(upW, upQ), 1.0),
                (de, dequant(gateW, gateQ), 1.0),
                (dB, torch.cat((Ag * gateS, Au * upS)), 1.0),
            ],
            out=X2 if _write_input(ctx) else None,
        )
        return (
            dX.view(shape),
            *(None, None, d_gateA, d_gateB, None),
            *(None, None, d_upA, d_upB, None),
            *(None, None, d_downA, d_downB, None),
            *(None, None, None, None),
        )


class LeanLoRAQKV(torch.autograd.Function):
    """Q, K, V = X @ (W + s B A)^T for the three attention inputs."""

    @staticmethod
    @_custom_fwd
    def forward(
        ctx: Any,
        X: torch.Tensor,
        QW: torch.Tensor,
        QQ: Any,
        QA: torch.Tensor,
        QB: torch.Tensor,
        QS: float,
        KW: torch.Tensor,
        KQ: Any,
        KA: torch.Tensor,
        KB: torch.Tensor,
        KS: float,
        VW: torch.Tensor,
        VQ: Any,
        VA: torch.Tensor,
        VB: torch.Tensor,
        VS: float,
        dequant: Dequant,
        inplace: bool,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        dtype = X.dtype
        shape = X.shape
        X2 = X.reshape(-1, shape[-1])
        As = [t.to(dtype) for t in (QA, KA, VA)]
        ranks = tuple(a.shape[0] for a in As)
        XA = X2 @ torch.cat(As).t()  # (T, rq + rk + rv): one read of X for the three
        outs = []
        for W, Q, B, S, XAp in zip(
            (QW, KW, VW), (QQ, KQ, VQ), (QB, KB, VB), (QS, KS, VS), XA.split(ranks, dim=1), strict=True
        ):
            out = _mm_sum([(X2, dequant(W, Q).t(), 1.0), (XAp, B.to(dtype).t(), S)])
            outs.append(out.view(*shape[:-1], -1))
        ctx.custom = (QW, QQ, QS, KW, KQ, KS, VW, VQ, VS, dequant, shape, ranks)
        ctx.save_for_backward(X, XA, QA, QB, KA, KB, VA, VB)
        ctx.inplace = inplace
        return outs[0], outs[1], outs[2]

    @staticmethod
    @_custom_bwd
    def backward(ctx: Any, dQ: torch.Tensor, dK: torch.Tensor, dV: torch.Tensor) -> tuple[Any, ...]:
        QW, QQ, QS, KW, KQ, KS, VW, VQ, VS, dequant, shape, ranks = ctx.custom
        X, XA, QA, QB, KA, KB, VA, VB = ctx.saved_tensors
        dtype = X.dtype
        X2 = X.view(-1, shape[-1])
        grads = [d.reshape(-1, d.shape[-1]) for d in (dQ, dK, dV)]
        As = [t.to(dtype) for t in (QA, KA, VA)]
        Bs = [t.to(dtype) for t in (QB, KB, VB)]
        scales = (QS, KS, VS)

        dBs = [d @ B for d, B in zip(grads, Bs, strict=True)]  # (T, r) each
        d_B = [
            _mm_scaled(d.t(), XAp, s) for d, XAp, s in zip(grads, XA.split(ranks, dim=1), scales, strict=True)
        ]
        dB = torch.cat(dBs, dim=1)
        d_A = _a_grads(dB, X2, ranks, scales)

        # dX in one GEMM: [dQ | dK | dV | dQ Bq | dK Bk | dV Bv] against the three weights
        # stacked and the scaled A matrices below them.
        W = _stacked((QW, KW, VW), (QQ, KQ, VQ), [a * s for a, s in zip(As, scales, strict=True)], dequant)
        dX = torch.matmul(torch.cat((*grads, dB), dim=1), W, out=X2 if _write_input(ctx) else None)
        return (
            dX.view(shape),
            *(None, None, d_A[0], d_B[0], None),
            *(None, None, d_A[1], d_B[1], None),
            *(None, None, d_A[2], d_B[2], None),
            *(None, None),
        )


# ---- installing them in place of Unsloth's ------------------------------------------------------


def _unsloth_dequant(W: torch.Tensor, quant_state: Any, out: torch.Tensor | None = None) -> torch.Tensor:
    from unsloth.kernels.utils import fast_dequantize

    return fast_dequantize(W, quant_state, out=out)


_unsloth_dequant.traced_stack = _nf4_traced_stack  # type: ignore[attr-defined]


def _may_write_input(X: torch.Tensor) -> bool:
    """Unsloth's rule for writing dX into X's storage: not where an RMSNorm kept X (its output)."""
    from unsloth.kernels import fast_lora, rms_layernorm

    return not rms_layernorm._SAVE_OUTPUT or fast_lora._may_overwrite_input(X)


def _plain(projs: tuple[Any, ...], X: torch.Tensor) -> bool:
    from unsloth.kernels import fast_lora

    return not fast_lora._autocast_dtype_mismatch(X) and all(
        fast_lora._is_plain_lora(p) and not fast_lora._has_activation_fake_quantizer(p) for p in projs
    )


def _apply(function: type[torch.autograd.Function], X: torch.Tensor, *args: Any) -> Any:
    """`args` end with `inplace`, which is decided here, where the Function runs: under a trace
    Unsloth's rule answers as for a traced backward (which never writes), eagerly it looks at X."""
    *parts, inplace = args
    return function.apply(X, *parts, inplace and _may_write_input(X))


# QLC_LEAN_LORA=eager: the Functions run outside the compiled block (a graph break on each side),
# eagerly, where the backward dequantizes straight into its stacked buffers.
_apply_eager = torch.compiler.disable(_apply)


def lean_mlp_swiglu(
    original: Callable[..., Any], apply: Callable[..., Any], self: Any, X: torch.Tensor, inplace: bool = True
) -> Any:
    from unsloth.kernels.fast_lora import get_lora_parameters
    from unsloth.kernels.swiglu import swiglu_DWf_DW_dfg_kernel, swiglu_fg_kernel

    projs = (self.gate_proj, self.up_proj, self.down_proj)
    if not _plain(projs, X):
        return original(self, X, inplace)
    parts = [part for proj in projs for part in get_lora_parameters(proj)]
    return apply(
        LeanLoRAMLP, X, *parts, swiglu_fg_kernel, swiglu_DWf_DW_dfg_kernel, _unsloth_dequant, inplace
    )


def lean_qkv(
    original: Callable[..., Any], apply: Callable[..., Any], self: Any, X: torch.Tensor, inplace: bool = True
) -> Any:
    from unsloth.kernels.fast_lora import get_lora_parameters

    projs = (self.q_proj, self.k_proj, self.v_proj)
    if not _plain(projs, X):
        return original(self, X, inplace)
    parts = [part for proj in projs for part in get_lora_parameters(proj)]
    return apply(LeanLoRAQKV, X, *parts, _unsloth_dequant, inplace)


def install(model: Any, eager: bool = False) -> str | None:
    """Put the lean Functions where Unsloth installed its fused SwiGLU MLP and QKV ones, layer by
    layer; `eager` runs them outside the compiled blocks. A note for the run's log, or None where
    Unsloth fused nothing this module replaces (or lacks the helpers it relies on: another Unsloth
    version keeps its own)."""
    try:
        from unsloth.kernels import fast_lora
    except ImportError:
        return None
    needed = (
        "_is_plain_lora",
        "_has_activation_fake_quantizer",
        "_autocast_dtype_mismatch",
        "_may_overwrite_input",
    )
    if not all(hasattr(fast_lora, name) for name in needed):
        return None
    mlp_original, qkv_original = fast_lora.apply_lora_mlp_swiglu, fast_lora.apply_lora_qkv
    # Before torch 2.11 Unsloth keeps its own Functions out of compiled code (Inductor got LoRA
    # gradients wrong: fast_lora.TRACE_LORA_FUNCTIONS); these stay out of it there too.
    apply = _apply_eager if eager or not getattr(fast_lora, "TRACE_LORA_FUNCTIONS", True) else _apply
    try:
        _owner, layers = decoder_layers(model)
    except RuntimeError:  # no layer stack found: nothing of Unsloth's to replace
        return None
    # One object of each for every layer, as Unsloth installs its own: Dynamo guards on the
    # identity of a partial a traced layer calls, so a partial per layer made each layer's block a
    # graph of its own (32 compiled for the 8B, under Unsloth's recompile limit of 256; past
    # torch's default of 8 the rest would run uncompiled), and each call of a layer checked the
    # guards of the layers before it.
    mlp_forward = functools.partial(lean_mlp_swiglu, mlp_original, apply)
    qkv = functools.partial(lean_qkv, qkv_original, apply)
    n_mlp = n_qkv = 0
    for layer in layers:
        mlp = getattr(layer, "mlp", None)
        if getattr(getattr(mlp, "forward", None), "__func__", None) is mlp_original:
            mlp.forward = types.MethodType(mlp_forward, mlp)
            n_mlp += 1
        attn = getattr(layer, "self_attn", None)
        if getattr(attn, "apply_qkv", None) is qkv_original:
            attn.apply_qkv = qkv
            n_qkv += 1
    if not n_mlp and not n_qkv:
        return None
    how = ", run eagerly" if apply is _apply_eager else ""
    return (
        f"kernels: lean LoRA products on {n_mlp} MLP and {n_qkv} QKV of {len(layers)} layers{how} "
        "(engine.train.backends.lean_lora)"
    )
