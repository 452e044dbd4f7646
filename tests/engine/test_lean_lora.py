"""The lean LoRA Functions against plain autograd on the same formula: outputs and every gradient
(X, each A and B), on the CPU, with torch stand-ins for Unsloth's SwiGLU kernels and dequantizer
(bench/lean_lora_check.py compares them with Unsloth's own Functions on NF4 weights on a GPU)."""

from __future__ import annotations

import pytest
import torch

from engine.train.backends import lean_lora
from engine.train.backends.lean_lora import LeanLoRAMLP, LeanLoRAQKV

H, M, R = 16, 40, 4  # hidden, intermediate (MLP), rank


class State:
    """A quant state's one field the stacked backward reads: the weight's (out, in)."""

    def __init__(self, W: torch.Tensor) -> None:
        self.shape = W.shape


def dequant(W: torch.Tensor, quant_state: State | None, out: torch.Tensor | None = None) -> torch.Tensor:
    """Unsloth's fast_dequantize, for a weight kept as it is: the (out x in) matrix, or into `out`
    (the backward's stacked buffers, where the weights come with a state)."""
    assert quant_state is None or quant_state.shape == W.shape
    return W if out is None else out.copy_(W)


def swiglu(e: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.silu(e) * g


def swiglu_backward(DW: torch.Tensor, e: torch.Tensor, g: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """(h, df, de) written over (DW, e, g), as Unsloth's in-place kernel does."""
    se = torch.sigmoid(e)
    f = se * e
    h, df, de = f * g, DW * f, DW * g * se * (1 + e * (1 - se))
    DW.copy_(h), e.copy_(df), g.copy_(de)
    return DW, e, g


def lora(X: torch.Tensor, W: torch.Tensor, A: torch.Tensor, B: torch.Tensor, s: float) -> torch.Tensor:
    return X @ W.t() + s * (X @ A.t()) @ B.t()


def projection(out: int, inp: int, rank: int = R) -> list[torch.Tensor]:
    """Weight, A, B: B nonzero, as after some training, so every LoRA gradient is exercised."""
    return [
        torch.randn(out, inp) / inp**0.5,
        torch.randn(rank, inp) / inp**0.5,
        torch.randn(out, rank) / rank,
    ]


def leaves(*tensors: torch.Tensor) -> list[torch.Tensor]:
    return [t.clone().requires_grad_(t.dim() > 0) for t in tensors]


@pytest.mark.parametrize(
    ("scales", "inplace", "shape", "states"),
    [((2.0, 2.0, 2.0), True, (2, 6), False), ((0.5, 1.5, 3.0), False, (1, 12), True)],
    ids=["shared-scale-inplace", "own-scales-stacked-in-place"],
)
def test_mlp_matches_autograd(
    scales: tuple[float, float, float], inplace: bool, shape: tuple[int, int], states: bool
) -> None:
    """`states`: weights that come with a quant state are dequantized straight into the backward's
    stacked buffer; without one they are concatenated (as in a compiled block)."""
    torch.manual_seed(0)
    x = torch.randn(*shape, H)
    gate, up, down = projection(M, H), projection(M, H), projection(H, M, rank=R + 2)
    weight = torch.randn(*shape, H)

    X, *params = leaves(x, *gate[1:], *up[1:], *down[1:])
    gA, gB, uA, uB, dA, dB = params
    sg, su, sd = scales
    reference = lora(swiglu(lora(X, gate[0], gA, gB, sg), lora(X, up[0], uA, uB, su)), down[0], dA, dB, sd)
    (reference * weight).sum().backward()
    expected = [X.grad, *(p.grad for p in params)]

    X, *params = leaves(x, *gate[1:], *up[1:], *down[1:])
    gA, gB, uA, uB, dA, dB = params
    qs = [State(w[0]) if states else None for w in (gate, up, down)]
    out = LeanLoRAMLP.apply(
        X,
        *(gate[0], qs[0], gA, gB, sg),
        *(up[0], qs[1], uA, uB, su),
        *(down[0], qs[2], dA, dB, sd),
        swiglu,
        swiglu_backward,
        dequant,
        inplace,
    )
    torch.testing.assert_close(out, reference, rtol=1e-5, atol=1e-5)
    (out * weight).sum().backward()
    for got, want in zip([X.grad, *(p.grad for p in params)], expected, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize(
    ("scales", "inplace", "states"), [((2.0, 2.0, 2.0), True, True), ((1.0, 0.25, 2.0), False, False)]
)
def test_qkv_matches_autograd(scales: tuple[float, float, float], inplace: bool, states: bool) -> None:
    torch.manual_seed(1)
    x = torch.randn(2, 5, H)
    q, k, v = projection(H, H), projection(H // 2, H), projection(H // 2, H, rank=R + 1)
    weights = [torch.randn(2, 5, H), torch.randn(2, 5, H // 2), torch.randn(2, 5, H // 2)]

    def loss(outs: tuple[torch.Tensor, ...]) -> torch.Tensor:
        return sum((o * w).sum() for o, w in zip(outs, weights, strict=True))

    X, *params = leaves(x, *q[1:], *k[1:], *v[1:])
    references = [
        lora(X, p[0], a, b, s)
        for p, a, b, s in zip((q, k, v), params[::2], params[1::2], scales, strict=True)
    ]
    loss(references).backward()
    expected = [X.grad, *(p.grad for p in params)]

    X, *params = leaves(x, *q[1:], *k[1:], *v[1:])
    parts = [
        part
        for p, a, b, s in zip((q, k, v), params[::2], params[1::2], scales, strict=True)
        for part in (p[0], State(p[0]) if states else None, a, b, s)
    ]
    outs = LeanLoRAQKV.apply(X, *parts, dequant, inplace)
    for got, want in zip(outs, references, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    loss(outs).backward()
    for got, want in zip([X.grad, *(p.grad for p in params)], expected, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


def test_mlp_in_bf16_stays_within_rounding() -> None:
    """The model's dtype: the LoRA term summed inside the base GEMM (and s folded into B) changes
    rounding only, so bf16 results stay within bf16 error of the fp32 formula."""
    torch.manual_seed(2)
    x = torch.randn(3, 8, H)
    gate, up, down = projection(M, H), projection(M, H), projection(H, M)
    exact = lora(swiglu(lora(x, *gate, 2.0), lora(x, *up, 2.0)), *down, 2.0)
    bf = [t.bfloat16() for t in (*gate, *up, *down)]
    out = LeanLoRAMLP.apply(
        x.bfloat16(),
        *(bf[0], None, bf[1], bf[2], 2.0),
        *(bf[3], None, bf[4], bf[5], 2.0),
        *(bf[6], None, bf[7], bf[8], 2.0),
        swiglu,
        swiglu_backward,
        dequant,
        False,
    )
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), exact, rtol=0.05, atol=0.05)


def test_a_dequantizer_that_ignores_out_still_fills_the_stacked_rows() -> None:
    """Some of Unsloth's formats (fp8, int4) return a fresh tensor whatever `out=` says: the
    backward's stacked buffer must hold the weights all the same."""
    torch.manual_seed(3)
    x = torch.randn(2, 5, H)
    q, k, v = projection(H, H), projection(H // 2, H), projection(H // 2, H)

    def fresh(W: torch.Tensor, quant_state: State | None, out: torch.Tensor | None = None) -> torch.Tensor:
        return W.clone()

    grads = []
    for how in (dequant, fresh):
        X, *params = leaves(x, *q[1:], *k[1:], *v[1:])
        parts = [
            part
            for p, a, b in zip((q, k, v), params[::2], params[1::2], strict=True)
            for part in (p[0], State(p[0]), a, b, 2.0)
        ]
        sum(o.square().sum() for o in LeanLoRAQKV.apply(X, *parts, how, False)).backward()
        grads.append(X.grad)
    torch.testing.assert_close(grads[1], grads[0])


def nf4(out: int, inp: int) -> tuple[torch.Tensor, object, torch.Tensor]:
    """A bf16 weight quantized as the engine loads it (double-quantized NF4, bitsandbytes on the
    CPU): the packed weight, its quant state, and the matrix it dequantizes to."""
    from bitsandbytes.functional import dequantize_4bit, quantize_4bit

    W = (torch.randn(out, inp) / inp**0.5).bfloat16()
    packed, state = quantize_4bit(W, quant_type="nf4", compress_statistics=True)
    return packed, state, dequantize_4bit(packed, state)


def bnb_dequant(W: torch.Tensor, quant_state: object, out: torch.Tensor | None = None) -> torch.Tensor:
    from bitsandbytes.functional import dequantize_4bit

    got = dequantize_4bit(W, quant_state)
    return got if out is None else out.copy_(got)


bnb_dequant.traced_stack = lean_lora._nf4_traced_stack  # as on Unsloth's dequantizer


def test_the_stacked_nf4_op_matches_dequantize_then_concatenate() -> None:
    """`nf4_stack` (the compiled backward's stacked weights) holds each weight's rows as
    bitsandbytes dequantizes them, with the scaled A matrices under them; opcheck runs the op
    through its fake, schema and autograd checks."""
    torch.manual_seed(4)
    weights = [nf4(128, 64), nf4(64, 64), nf4(64, 64)]
    below = [torch.randn(4, 64).bfloat16() for _ in range(3)]
    states = [s for _, s, _ in weights]
    args = (
        [p for p, _, _ in weights],
        [s.absmax for s in states],
        [s.state2.absmax for s in states],
        [s.code for s in states],
        [s.state2.code for s in states],
        [s.offset for s in states],
        [s.shape[0] for s in states],
        64,
        256,
        below,
    )
    stacked = torch.ops.qlc.nf4_stack(*args)
    assert torch.equal(stacked, torch.cat([*(d for _, _, d in weights), *below]))
    torch.library.opcheck(torch.ops.qlc.nf4_stack, args, test_utils=("test_schema", "test_faketensor"))


def _eager_and_traced(
    function: type[torch.autograd.Function], weights: list[tuple], x: torch.Tensor, *tail: object
) -> tuple[list[list[torch.Tensor]], list[str]]:
    """`function` on NF4 `weights` (each with an adapter of rank R, scale 2) run eagerly and traced
    through AOT autograd (the graphs Inductor would get): each run's outputs and gradients, and
    the traced forward's and backward's code."""
    from torch._dynamo.backends.common import aot_autograd

    adapters = [(torch.randn(R, d.shape[1]) / 8, torch.randn(d.shape[0], R) / R) for _, _, d in weights]

    def run(X: torch.Tensor, params: list[torch.Tensor]) -> object:
        parts = [
            part
            for (W, state, _), a, b in zip(weights, params[::2], params[1::2], strict=True)
            for part in (W, state, a, b, 2.0)
        ]
        return function.apply(X, *parts, *tail)

    graphs: list[str] = []

    def keep(gm: torch.fx.GraphModule, _inputs: object) -> torch.fx.GraphModule:
        graphs.append(gm.code)
        return gm

    traced = torch.compile(run, backend=aot_autograd(fw_compiler=keep, bw_compiler=keep), fullgraph=True)
    results = []
    for how in (run, traced):
        X, *params = leaves(x, *(t.bfloat16() for pair in adapters for t in pair))
        got = how(X, params)
        outs = list(got) if isinstance(got, tuple) else [got]
        sum(o.float().square().sum() for o in outs).backward()
        results.append([*outs, X.grad, *(p.grad for p in params)])
    return results, graphs


def _accumulates_out_of_place(graphs: list[str]) -> list[str]:
    """The traced lines that add a product into an existing output out of place: Inductor runs
    such an addmm as a copy of the whole output, then the GEMM (beta = 0 reads no output)."""
    return [line for line in "".join(graphs).splitlines() if "aten.addmm" in line and "beta = 0" not in line]


def test_qkv_traced_with_nf4_weights_matches_eager() -> None:
    """The compiled form's path: traced through AOT autograd, the backward stacks the NF4 weights
    through the opaque op, each projection's LoRA term is accumulated into its output in place
    (mm_sum), and the outputs and gradients are eager's exactly."""
    torch.manual_seed(5)
    x = torch.randn(2, 6, 64).bfloat16()
    results, graphs = _eager_and_traced(
        LeanLoRAQKV, [nf4(64, 64), nf4(32, 64), nf4(32, 64)], x, bnb_dequant, False
    )
    assert sum("qlc.nf4_stack" in code for code in graphs) == 1, graphs  # the backward's, once
    assert graphs[0].count("qlc.mm_sum") == 3, graphs[0]
    assert not _accumulates_out_of_place(graphs)
    for got, want in zip(*results, strict=True):
        torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_mlp_traced_with_nf4_weights_matches_eager() -> None:
    """The MLP Function traced as in a compiled block: the down projection's LoRA term in the
    forward and dX's three products in the backward go through mm_sum, and the output and
    gradients are eager's exactly."""
    torch.manual_seed(6)
    x = torch.randn(2, 6, 64).bfloat16()
    weights = [nf4(96, 64), nf4(96, 64), nf4(64, 96)]
    results, graphs = _eager_and_traced(LeanLoRAMLP, weights, x, swiglu, swiglu_backward, bnb_dequant, False)
    forward, backward = graphs
    assert forward.count("qlc.mm_sum") == 1 and backward.count("qlc.mm_sum") == 1, graphs
    assert not _accumulates_out_of_place(graphs)
    for got, want in zip(*results, strict=True):
        torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_qkv_compiled_with_dynamic_shapes_matches_eager() -> None:
    """As Unsloth compiles its blocks (dynamic=True): two token counts through one graph, mm_sum's
    fake shaped symbolically, eager's outputs and gradients exactly."""
    torch.manual_seed(8)
    q, k, v = nf4(64, 64), nf4(32, 64), nf4(32, 64)
    adapters = [(torch.randn(R, 64) / 8, torch.randn(out, R) / R) for out in (64, 32, 32)]

    def run(X: torch.Tensor, params: list[torch.Tensor]) -> tuple[torch.Tensor, ...]:
        parts = [
            part
            for (W, state, _), a, b in zip((q, k, v), params[::2], params[1::2], strict=True)
            for part in (W, state, a, b, 2.0)
        ]
        return LeanLoRAQKV.apply(X, *parts, bnb_dequant, False)

    compiled = torch.compile(run, backend="aot_eager", dynamic=True, fullgraph=True)
    for tokens in (6, 11):
        x = torch.randn(2, tokens, 64).bfloat16()
        results = []
        for how in (run, compiled):
            X, *params = leaves(x, *(t.bfloat16() for pair in adapters for t in pair))
            outs = how(X, params)
            sum(o.float().square().sum() for o in outs).backward()
            results.append([*outs, X.grad, *(p.grad for p in params)])
        for got, want in zip(*results, strict=True):
            torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_the_sum_of_products_op() -> None:
    """`mm_sum` against the products summed in fp32, and through opcheck's schema and fake checks."""
    torch.manual_seed(7)
    lhs = [torch.randn(8, 16), torch.randn(8, 4), torch.randn(8, 3)]
    rhs = [torch.randn(16, 5), torch.randn(4, 5), torch.randn(3, 5)]
    for alphas in ([1.0, 2.0, 0.5], [0.25, 1.0, 1.0]):
        want = sum(a * (x @ y) for x, y, a in zip(lhs, rhs, alphas, strict=True))
        torch.testing.assert_close(torch.ops.qlc.mm_sum(lhs, rhs, alphas), want)
        torch.library.opcheck(
            torch.ops.qlc.mm_sum, (lhs, rhs, alphas), test_utils=("test_schema", "test_faketensor")
        )


def test_install_gives_every_layer_the_same_objects_so_one_graph_serves_them_all(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Unsloth compiles each decoder layer's forward (one code object for the class). Dynamo
    guards on the identity of what a traced layer calls: with an object of its own in every layer,
    each layer compiled a graph of its own (and past torch's recompile limit, none at all).
    Installed on a stand-in for Unsloth's patched model (its fast_lora module faked: no Unsloth
    on the CPU), 12 layers share the first one's graphs."""
    import sys
    import types

    from torch._dynamo.utils import counters

    def unsloth_mlp(self: torch.nn.Module, X: torch.Tensor, inplace: bool = True) -> torch.Tensor:
        return torch.relu(X @ self.weight.t())

    def unsloth_qkv(self: torch.nn.Module, X: torch.Tensor, inplace: bool = True) -> torch.Tensor:
        return X @ self.weight.t()

    def module(name: str, **attributes: object) -> types.ModuleType:
        made = types.ModuleType(name)  # a module, not a namespace: Dynamo traces imports of one
        made.__dict__.update(attributes)
        monkeypatch.setitem(sys.modules, name, made)
        return made

    fast_lora = module(
        "unsloth.kernels.fast_lora",
        apply_lora_mlp_swiglu=unsloth_mlp,
        apply_lora_qkv=unsloth_qkv,
        TRACE_LORA_FUNCTIONS=True,
        _is_plain_lora=lambda proj: False,  # route to Unsloth's own: the wiring is what is tested
        _has_activation_fake_quantizer=lambda proj: False,
        _autocast_dtype_mismatch=lambda X: False,
        _may_overwrite_input=lambda X: False,
        get_lora_parameters=None,
    )
    glu = module("unsloth.kernels.swiglu", swiglu_fg_kernel=swiglu, swiglu_DWf_DW_dfg_kernel=swiglu_backward)
    module("unsloth", kernels=module("unsloth.kernels", fast_lora=fast_lora, swiglu=glu))

    class Layer(torch.nn.Module):
        gradient_checkpointing = False

        def __init__(self) -> None:
            super().__init__()
            self.self_attn, self.mlp = torch.nn.Linear(H, H), torch.nn.Linear(H, H)
            self.self_attn.gate_proj = self.self_attn.up_proj = self.self_attn.down_proj = self.self_attn
            self.mlp.gate_proj = self.mlp.up_proj = self.mlp.down_proj = self.mlp
            self.self_attn.q_proj = self.self_attn.k_proj = self.self_attn.v_proj = self.self_attn
            self.mlp.forward = types.MethodType(unsloth_mlp, self.mlp)  # as Unsloth patches them
            self.self_attn.apply_qkv = unsloth_qkv

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.mlp(self.self_attn.apply_qkv(self.self_attn, x))

    model = torch.nn.Module()
    model.layers = torch.nn.ModuleList(Layer() for _ in range(12))
    note = lean_lora.install(model)
    assert note is not None and "12 MLP and 12 QKV of 12 layers" in note
    assert len({id(layer.mlp.forward.__func__) for layer in model.layers}) == 1
    assert len({id(layer.self_attn.apply_qkv) for layer in model.layers}) == 1

    torch._dynamo.reset()
    counters.clear()
    compiled = torch.compile(Layer.forward, backend="eager")
    x = torch.randn(2, H)
    graphs = []
    for layer in model.layers:
        torch.testing.assert_close(compiled(layer, x), layer(x))
        graphs.append(counters["stats"]["unique_graphs"])
    assert graphs == graphs[:1] * 12, graphs  # the first layer's graphs serve all twelve
