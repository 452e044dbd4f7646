"""The byte counts behind each term, for one resolved training plan. Pure arithmetic.

Each function returns named parts in bytes. What is saved for backward, and in which dtype, was
read from the code the engine runs (docs/memory-model.md walks through it):
- "hf": transformers 5.17 + peft 0.21 + TRL 1.16 SFTTrainer, no prepare_model_for_kbit_training,
  bf16 residual stream, LoRA adapters cast to bf16 by TRL, non-reentrant per-layer checkpointing,
  SDPA, TRL's fused chunked LM-head log-prob loss;
- "hf-upcast": the same plus peft's prepare_model_for_kbit_training (the usual tutorial recipe):
  embeddings, lm_head and norms in fp32, so the residual stream and the MLP run in fp32 under
  bf16 autocast;
- "unsloth": FastLanguageModel with use_gradient_checkpointing="unsloth": layer inputs offloaded
  to CPU, fused RMSNorm / SwiGLU / LoRA kernels, and unsloth_zoo's chunked fused CE loss.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field

from engine.memory import constants as C
from engine.memory import devices
from engine.memory.architectures import Architecture

ATTN_IN = {"q_proj", "k_proj", "v_proj", "qkv_proj"}
MLP_IN = {"gate_proj", "up_proj", "gate_up_proj"}
EMBED, LM_HEAD = "embed_tokens", "lm_head"
PAGED_OPTIMIZERS = {"paged_adamw_8bit", "paged_adamw_32bit"}
BNB_8BIT = {"paged_adamw_8bit", "adamw_8bit"}


@dataclass(frozen=True)
class Plan:
    """Everything the byte counts depend on, resolved from a RunConfig and an Architecture."""

    arch: Architecture
    backend: str  # hf, hf-upcast or unsloth
    micro_batch: int
    seq_len: int
    r: int
    targets: tuple[str, ...]  # the architecture's module names, resolved from lora.target_modules
    modules_to_save: tuple[str, ...]  # embed_tokens and/or lm_head
    dropout: bool
    load_in_4bit: bool
    double_quant: bool
    compute_bytes: int  # 2 for bf16/fp16, 4 for fp32
    optimizer: str
    checkpointed_layers: int  # layers whose activations are recomputed in backward: 0..layers
    attention: str  # sdpa, eager, flash_attention_2
    budget_bytes: float | None = None  # the GPU's budget, for Unsloth's free-memory-sized loss chunks
    liger: bool = False  # hf only: Liger's RMSNorm / SwiGLU / RoPE kernels (engine.train.backends.hf)
    packing: bool = False  # several examples per row: a block-diagonal mask from position_ids
    padded: bool = False  # micro-batches carry padding: an attention mask on every layer
    # The micro-batch sent as one row of micro_batch x seq_len tokens, its examples kept apart by
    # position_ids (the Unsloth backend's padding-free rows): attention sees one long sequence.
    padding_free: bool = False
    # Rows of one length that the Unsloth backend sends as an n x seq_len batch instead of the one
    # row (engine.train.backends.unsloth.even_rows): its kept layers then save one hidden-wide
    # tensor less (UNSLOTH_KEPT_LAYER_HIDDEN_TENSORS was measured on one-row micro-batches).
    even_rows: bool = False
    expandable: bool = False  # the CUDA allocator's expandable segments (engine.allocator)
    # A multimodal checkpoint's vision tower quantized with the rest (the engine's own loads do;
    # a pre-quantized checkpoint whose skip list names it stores it in 16-bit).
    vision_4bit: bool = False
    grad_accum: int = 1  # micro-batches per optimizer step: above 1, gradients outlive the backward
    device: devices.DeviceProfile = devices.UNKNOWN  # the GPU class: context and workspaces

    @property
    def gradient_checkpointing(self) -> bool:
        return self.checkpointed_layers > 0

    @property
    def kept_layers(self) -> int:
        """Layers that keep every activation until backward (not checkpointed)."""
        return self.arch.layers - self.checkpointed_layers

    @property
    def offloads(self) -> bool:
        """Unsloth's offloaded checkpointing moves the checkpointed layers' inputs to the CPU."""
        return self.backend == "unsloth" and self.checkpointed_layers > 0

    @property
    def tokens(self) -> int:
        return self.micro_batch * self.seq_len

    @property
    def rows(self) -> int:
        """The rows attention sees: one for a padding-free micro-batch."""
        return 1 if self.padding_free else self.micro_batch

    @property
    def row_len(self) -> int:
        """The length of each row attention sees: a padding-free row holds the whole micro-batch,
        and its masks are row_len x row_len (the 8 x 2048 rows of a Gemma-3-1B step peaked exactly
        as one row of 16384 tokens, bench/results/memory-calibration-unsloth-gemma-3-1b-h100-2026-12-05b.json)."""
        return self.tokens if self.padding_free else self.seq_len

    @property
    def packed_row(self) -> bool:
        """Several examples share a row (packing, or a padding-free row of several): transformers
        builds a block-diagonal mask from position_ids."""
        return self.packing or (self.padding_free and self.micro_batch > 1)

    @property
    def residual_bytes(self) -> int:
        """The residual stream's dtype: fp32 once prepare_model_for_kbit_training upcast the norms."""
        return 4 if self.backend == "hf-upcast" else self.compute_bytes

    @property
    def unsloth_fast(self) -> bool:
        """Unsloth's own fused kernels (FastLlamaModel and subclasses) rather than FastModel's
        compiled stock layer (constants.UNSLOTH_FAST_FAMILIES)."""
        return self.backend == "unsloth" and self.arch.family in C.UNSLOTH_FAST_FAMILIES

    @property
    def mlp_fused(self) -> bool:
        """Unsloth's fused LoRA MLP: its own kernels, and adapters on gate, up and down
        (unsloth/models/llama.py patch_peft_model patches the MLP only then)."""
        return self.unsloth_fast and {"gate_proj", "up_proj", "down_proj"} <= set(self.targets)

    @property
    def lora_bytes(self) -> int:
        """Bytes per adapter parameter, and per gradient: TRL casts a quantized model's adapters to
        bf16, Unsloth takes that cast out and keeps them fp32 (constants.LORA_PARAM_BYTES), and the
        engine keeps them fp32 when it computes in fp32 (engine.train.backends.trainer)."""
        return 4 if self.compute_bytes == 4 else C.LORA_PARAM_BYTES.get(self.backend, 2)

    @property
    def copy_bytes(self) -> int:
        """Bytes per parameter of a modules_to_save copy (embed_tokens, lm_head), and of its
        gradient: bf16 as TRL casts them on every stack, fp32 when the run computes in fp32."""
        return 4 if self.compute_bytes == 4 else 2

    @property
    def generic_stock_layer(self) -> bool:
        """Unsloth's generic path (FastModel: Gemma 3, Phi-4): transformers' own decoder layer,
        compiled, rather than Unsloth's fused kernels."""
        return self.backend == "unsloth" and not self.unsloth_fast

    @property
    def generic_bare_mlp(self) -> bool:
        """Unsloth's generic path with no adapter in the MLP: its backward builds one MLP-wide
        gradient fewer than with adapters. MEASURED on Gemma-3-1B (bench/results/memory-calibration-
        unsloth-gemma-3-1b-h100-2026-12-05c.json): with the stock layer's inventory (gate and up
        kept, no product without a down_proj adapter) its attention-only records come out +4.9% and
        +6.0%; with the gradient fewer, -0.8% and +0.2%. The fast path's attention-only records
        (Llama-3.2-3B, Qwen2.5-7B) keep every gradient. Chosen on one architecture; Gemma-3-4B holds
        it out when measured (bench/gpu_speed_session.sh generic-attn)."""
        return self.generic_stock_layer and not set(self.targets) & (MLP_IN | {"down_proj"})

    @property
    def modules_key(self) -> str:
        """The key of constants.KERNEL_MODULES_GIB: which kernels the process loads."""
        if self.backend == "unsloth" and not self.unsloth_fast:
            return "unsloth-generic"
        return self.backend

    @property
    def frozen_16bit_bytes(self) -> int:
        """Embeddings, lm_head and norms: the load dtype, or fp32 after the upcast."""
        return 4 if self.backend == "hf-upcast" else self.compute_bytes


@dataclass
class Phase:
    """One moment of a training step whose memory may be the peak."""

    name: str
    activations: dict[str, float] = field(default_factory=dict)
    workspace: dict[str, float] = field(default_factory=dict)  # transient buffers that are not activations
    # Vocabulary-sized one-off buffers (see constants.LARGE_BUFFER_RESERVED_COPIES).
    large_buffers: float = 0.0
    # Bytes allocated and freed over and over at this moment (one layer's tensors, the loss tiles):
    # what the caching allocator's slack grows with (constants.ALLOCATOR_SLACK_FRACTION).
    churn: float = 0.0
    # The share of the trainable parameters' gradients alive at this moment. With one micro-batch
    # per step the gradients are freed after each optimizer step (zero_grad sets them to None) and
    # appear layer by layer in backward; with gradient accumulation they live through the step.
    grads: float = 1.0


# ---------------------------------------------------------------------------------------------
# Parameters
# ---------------------------------------------------------------------------------------------


def lora_tensors(plan: Plan) -> list[tuple[int, int]]:
    """(numel, count) of every LoRA A and B matrix."""
    mods = plan.arch.linear_modules()
    out = []
    for name in plan.targets:
        fan_in, fan_out = mods[name]
        out += [(plan.r * fan_in, plan.arch.layers), (fan_out * plan.r, plan.arch.layers)]
    return out


def trainable_tensors(plan: Plan) -> list[tuple[int, int]]:
    embed = plan.arch.vocab * plan.arch.hidden
    return lora_tensors(plan) + [(embed, 1) for _ in plan.modules_to_save]


def lora_params(plan: Plan) -> int:
    return sum(n * k for n, k in lora_tensors(plan))


def weights(plan: Plan) -> dict[str, float]:
    a = plan.arch
    counts = a.param_counts()
    parts: dict[str, float] = {}
    if plan.load_in_4bit:
        per = C.BNB_4BIT_DQ_BYTES_PER_PARAM if plan.double_quant else C.BNB_4BIT_BYTES_PER_PARAM
        table = C.BNB_4BIT_DQ_TABLE_BYTES if plan.double_quant else C.BNB_4BIT_TABLE_BYTES
        parts["4-bit linears"] = counts["linear"] * per + a.layers * len(a.linear_modules()) * table
    else:
        parts["16-bit linears"] = counts["linear"] * plan.compute_bytes
    b16 = plan.frozen_16bit_bytes
    if a.tied_embeddings:
        parts["embed_tokens = lm_head (tied)"] = counts["embed_tokens"] * b16
    else:
        parts["embed_tokens"] = counts["embed_tokens"] * b16
        parts["lm_head"] = counts["lm_head"] * b16
    parts["norms" + (" and biases" if counts["bias"] else "")] = (counts["norms"] + counts["bias"]) * b16
    if a.vision is not None:
        v = a.vision.param_counts()
        if plan.vision_4bit:
            per = C.BNB_4BIT_DQ_BYTES_PER_PARAM if plan.double_quant else C.BNB_4BIT_BYTES_PER_PARAM
            table = C.BNB_4BIT_DQ_TABLE_BYTES if plan.double_quant else C.BNB_4BIT_TABLE_BYTES
            tables = a.vision.layers * a.vision.LINEARS_PER_LAYER * table
            parts["vision tower (4-bit linears, frozen)"] = v["linear"] * per + tables + v["other"] * b16
        else:
            parts["vision tower and projector (16-bit, frozen)"] = v["total"] * b16
    # TRL casts every trainable parameter of a quantized model to bf16 (sft_trainer.py, "When using
    # QLoRA, the PEFT adapter weights are converted to bf16"), modules_to_save copies included;
    # Unsloth takes that cast out, and its adapters stay fp32 (constants.LORA_PARAM_BYTES).
    parts["LoRA adapters"] = lora_params(plan) * plan.lora_bytes
    if plan.modules_to_save:
        parts[f"{' + '.join(plan.modules_to_save)} trainable copies"] = (
            len(plan.modules_to_save) * counts["embed_tokens"] * plan.copy_bytes
        )
    return parts


def gradients(plan: Plan) -> dict[str, float]:
    # Gradients take the parameter's dtype. With gradient accumulation they live across the whole
    # step; with one micro-batch per step each phase counts the share alive then (Phase.grads).
    parts = {"LoRA adapters": lora_params(plan) * float(plan.lora_bytes)}
    if plan.modules_to_save:
        embed = plan.arch.vocab * plan.arch.hidden
        parts[" + ".join(plan.modules_to_save)] = len(plan.modules_to_save) * embed * float(plan.copy_bytes)
    return parts


def optimizer_states(plan: Plan) -> tuple[dict[str, float], float]:
    """(parts in PyTorch's allocator, bytes in paged managed memory outside it)."""
    torch_parts: dict[str, float] = {}
    paged = 0.0
    is_paged = plan.optimizer in PAGED_OPTIMIZERS

    def add(name: str, value: float) -> None:
        torch_parts[name] = torch_parts.get(name, 0.0) + value

    for numel, count in trainable_tensors(plan):
        if plan.optimizer in BNB_8BIT and numel >= C.BNB_MIN_8BIT_SIZE:
            states = 2.0 * numel * count  # two uint8 states
            blocks = math.ceil(numel / C.BNB_8BIT_BLOCK)
            add("absmax of 8-bit states", 2.0 * blocks * 4 * count)
            if is_paged and numel >= C.BNB_PAGED_MIN_NUMEL:
                paged += states
            else:
                add("8-bit states", states)
        elif plan.optimizer == "adamw_torch":
            add(
                f"AdamW states ({_dtype(plan.lora_bytes)}, like the params)",
                2.0 * numel * plan.lora_bytes * count,
            )
        else:  # fp32 states: the 32-bit optimizer, or tensors too small for 8-bit ones
            states = 8.0 * numel * count
            if is_paged and numel >= C.BNB_PAGED_MIN_NUMEL:
                paged += states
            else:
                add("fp32 states", states)
    return torch_parts, paged


def optimizer_step_temporaries(plan: Plan) -> float:
    """torch's foreach AdamW builds sqrt(v) for every parameter at once. bitsandbytes updates in
    place, but the engine's lean 8-bit step gathers one slab's gradients and parameters at a time:
    two copies of the largest slab."""
    if plan.optimizer == "adamw_torch":
        return sum(n * k for n, k in trainable_tensors(plan)) * float(plan.lora_bytes)
    if plan.optimizer in BNB_8BIT:
        return 2.0 * largest_slab(plan) * plan.lora_bytes
    return 0.0


def largest_slab(plan: Plan) -> int:
    """Elements in the lean step's largest slab: whole-block 8-bit tensors, paged ones apart from
    the others (bitsandbytes' placement), at most BNB_SLAB_ELEMENTS."""
    paged_optimizer = plan.optimizer in PAGED_OPTIMIZERS
    kinds = {True: 0, False: 0}
    for numel, count in trainable_tensors(plan):
        if numel >= C.BNB_MIN_8BIT_SIZE and numel % C.BNB_8BIT_BLOCK == 0:
            kinds[paged_optimizer and numel >= C.BNB_PAGED_MIN_NUMEL] += numel * count
    return min(C.BNB_SLAB_ELEMENTS, max(kinds.values()))


def _dtype(nbytes: int) -> str:
    return {2: "bf16", 4: "fp32"}.get(nbytes, f"{nbytes} B")


# ---------------------------------------------------------------------------------------------
# Activations
# ---------------------------------------------------------------------------------------------


def layer_saved_per_token(plan: Plan) -> float:
    """Bytes per token that one decoder layer's forward saves for its backward."""
    a, t, r = plan.arch, set(plan.targets), plan.r
    h, q, kv, ffn = a.hidden, a.q_dim, a.kv_dim, a.ffn
    c = plan.compute_bytes
    attn_in, mlp_in = t & ATTN_IN, t & MLP_IN
    mods = a.linear_modules()
    total = 0.0
    if plan.generic_stock_layer:
        # Unsloth's generic path runs transformers' own decoder layer, compiled: what it saves is the
        # stock layer's inventory, with the norms fused as Liger fuses them (the bf16 input and one
        # fp32 rstd a row), at the hf backend's fitted scale.
        stock = dataclasses.replace(plan, backend="hf", liger=True)
        return layer_saved_per_token(stock) * C.ACTIVATION_SCALE["hf"] / layer_scale(plan)
    if plan.backend == "unsloth":
        # The fused RMSNorm keeps its input (the layer's input is counted apart, so one norm less)
        # and the normed X is kept once per group (LoRA_QKV / LoRA_MLP or peft's lora_A save it).
        total += (a.norms_per_layer - 1) * c * h + 2 * c * h
        total += (2 * c * q + 2 * c * kv) if a.qk_norm else 0
        # q, k, v after RoPE; the attention output, which is o_proj's input too (one tensor: the
        # attention returns it contiguous, and LoRA_W saves that same storage).
        total += c * (q + 2 * kv) + c * q
        if plan.mlp_fused:  # LoRA_MLP saves e = X @ gate and g = X @ up, and recomputes the rest
            total += 2 * c * ffn
        else:
            # The stock MLP, compiled with its layer: three MLP-wide tensors (gate, up, and
            # act(gate) or the product a down_proj adapter needs; Inductor recomputes the other).
            # MEASURED: Qwen2.5-7B, attention-only, no checkpointing: 161 KB per layer and token
            # against 159 KB counted so.
            total += 3 * c * ffn
    elif plan.backend == "hf-upcast":
        # RMSNorm saves its fp32 input; the first norm's is the layer input itself (already fp32).
        total += (a.norms_per_layer - 1) * 4 * h
        # peft casts the fp32 normed input to the adapters' bf16 once per adapted module.
        total += c * h * (len(attn_in) + len(mlp_in))
        total += (4 * q + 4 * kv) if a.qk_norm else 0
        # Autocast hands SDPA bf16 copies of q, k, v; its output is bf16, then made contiguous.
        total += c * (2 * q + 2 * kv) + c * q + (c * q if "o_proj" in t else 0)
        # The MLP runs in fp32 (bitsandbytes returns the input's dtype): gate, act(gate), up;
        # the product is saved as the down_proj adapter's bf16 cast.
        total += 3 * 4 * ffn + (c * ffn if "down_proj" in t else 0)
    else:
        # Each RMSNorm saves an fp32 copy of its bf16 input (Liger's keeps the bf16 input and one
        # fp32 rstd per row); the normed bf16 output is saved once per group by the adapters'
        # lora_A (bitsandbytes' MatMul4Bit saves no input).
        total += a.norms_per_layer * ((c * h + 4) if plan.liger else 4 * h)
        total += c * h * (bool(attn_in) + bool(mlp_in))
        if a.qk_norm:
            # Liger patches the q/k norms too (LigerRMSNormForGemma3): the bf16 input and one fp32
            # rstd per head, where the stock norm saves an fp32 copy.
            total += (c * (q + kv) + 4 * (a.heads + a.kv_heads)) if plan.liger else (4 * q + 4 * kv)
        if a.fused_qkv:  # v is a view of the fused output: its whole storage stays alive
            total += c * (q + 2 * kv) + c * (q + kv)
        else:
            total += c * (q + 2 * kv)
        total += c * q + (c * q if "o_proj" in t else 0)
        # gate, act(gate) and up (Liger's fused SwiGLU keeps only gate and up), and the product
        # the down_proj adapter keeps.
        total += (2 if plan.liger else 3) * c * ffn + (c * ffn if "down_proj" in t else 0)
    # Each adapter's lora_A output: saved by peft's lora_B, and on Unsloth's path by the engine's
    # lean LoRA Functions (X @ A of gate/up/down and q/k/v, engine.train.backends.lean_lora; o_proj's
    # is recomputed, a slight over-count there).
    total += len(t) * c * r
    if plan.dropout:  # nn.Dropout on each adapter's input: its output and a bool mask
        total += sum((c + 1) * mods[m][0] for m in t)
    return total


def eager_attention_bytes(plan: Plan) -> tuple[float, float]:
    """(saved, transient) bytes of one layer's attention scores when attention is eager."""
    if plan.attention != "eager":
        return 0.0, 0.0
    scores = plan.rows * plan.arch.heads * plan.row_len**2
    # softmax in fp32 (saved) and its bf16 copy (saved by the matmul with v); scores and mask add.
    return scores * (4 + plan.compute_bytes), scores * 2 * plan.compute_bytes


def masked_layers(plan: Plan) -> int:
    """Layers whose SDPA call gets an explicit mask (transformers drops an all-causal one).

    With a mask, transformers repeats K and V to every query head (sdpa_attention.py
    use_gqa_in_sdpa) and SDPA's memory-efficient kernel keeps the mask as a bf16 bias for backward.
    Packing (a block-diagonal mask from position_ids) and padding put one on every layer; sliding
    window layers (Gemma 3) need one once the sequence reaches the window. Unsloth's own kernels
    (FastLlamaModel) take no mask; its generic path runs transformers' attention, which does: on
    Gemma-3-1B at 16384 tokens the masks and the recomputed layer's bias were the 0.94 GiB the
    estimate missed (bench/results/memory-calibration-unsloth-gemma-3-1b-h100-2026-12-05.json).
    """
    a = plan.arch
    if plan.unsloth_fast or plan.attention != "sdpa":
        return 0
    if plan.packed_row or plan.padded:
        return a.layers
    if a.sliding_window and plan.row_len >= a.sliding_window:
        return a.layers - (a.layers // a.sliding_pattern if a.sliding_pattern else 0)
    return 0


def mask_saved_per_token(plan: Plan) -> float:
    """Extra bytes per token a masked layer saves: K and V repeated to q_dim, and the bf16 bias
    (rows x row_len x row_len x 2 bytes, that is 2 x row_len per token)."""
    return repeated_kv_per_token(plan) + 2 * plan.row_len


def repeated_kv_per_token(plan: Plan) -> float:
    """The K and V copies repeated to every query head that a masked layer saves. With one K/V head
    (Gemma-3-1B) repeat_kv's expand + reshape is a view of K and V themselves: nothing is copied."""
    a = plan.arch
    return 2 * plan.compute_bytes * (a.q_dim - a.kv_dim) if a.kv_heads > 1 else 0


def attention_mask_inputs(plan: Plan) -> float:
    """The bool 4D masks transformers builds once per forward (a causal one and a sliding one)."""
    if not masked_layers(plan):
        return 0.0
    kinds = 2 if plan.arch.sliding_window else 1
    return float(kinds * plan.rows * plan.row_len**2)


def backward_temporaries_per_token(plan: Plan) -> float:
    """Gradients alive at once inside one layer's backward: some MLP-wide (constants.
    BACKWARD_MLP_GRADIENTS, in the MLP's dtype) and some hidden-wide (the residual's dtype): two,
    and Unsloth's UNSLOTH_BACKWARD_HIDDEN_GRADIENTS plus its measured UNSLOTH_TOKEN_BYTES."""
    a = plan.arch
    if plan.backend == "unsloth":
        key = "unsloth" if plan.mlp_fused else "unsloth-unfused"
        n = C.BACKWARD_MLP_GRADIENTS[key] - (1 if plan.generic_bare_mlp else 0)
        mlp = n * plan.compute_bytes * a.ffn
        hidden = C.UNSLOTH_BACKWARD_HIDDEN_GRADIENTS * plan.compute_bytes * a.hidden
        return mlp + hidden + C.UNSLOTH_TOKEN_BYTES
    mlp_bytes = 4 if plan.backend == "hf-upcast" else plan.compute_bytes
    return C.BACKWARD_MLP_GRADIENTS[plan.backend] * mlp_bytes * a.ffn + 2 * plan.residual_bytes * a.hidden


def layer_scale(plan: Plan) -> float:
    return C.ACTIVATION_SCALE[plan.backend]


def dequantized_weight(plan: Plan) -> float:
    """bitsandbytes dequantizes the largest 4-bit weight to the compute dtype for each matmul."""
    if not plan.load_in_4bit:
        return 0.0
    return max(i * o for i, o in plan.arch.linear_modules().values()) * plan.compute_bytes


def _kept_layer_inputs(plan: Plan) -> tuple[str, float]:
    """The checkpointed layers' inputs, kept for the recompute."""
    a, T = plan.arch, plan.tokens
    if plan.offloads:
        # Offloaded to CPU; the GPU holds the layer being recomputed and the next one arriving.
        return "layer inputs on GPU (the rest offloaded to CPU)", 2.0 * T * a.hidden * plan.compute_bytes
    return "checkpoints (each layer's input)", float(
        plan.checkpointed_layers * T * a.hidden * plan.residual_bytes
    )


def _saved_layers(plan: Plan, n: int) -> float:
    """`n` layers that are not checkpointed keep their saved tensors (and input) until backward."""
    a, T = plan.arch, plan.tokens
    saved, _ = eager_attention_bytes(plan)
    per_layer = layer_saved_per_token(plan) * T * layer_scale(plan) + saved
    if plan.backend != "hf" and not plan.generic_stock_layer:
        # hf's first RMSNorm (and the stock layer's on Unsloth's generic path) saves the input itself.
        per_layer += T * a.hidden * plan.residual_bytes
    if plan.backend == "unsloth" and not plan.generic_stock_layer and not plan.even_rows:
        # MEASURED (H200, 2026-12-06, the 8B seed recipe, no layer checkpointed): with even rows
        # the peaks fell by 1.0 GiB at 1 x 4096 tokens a micro-batch (one such tensor a layer, to
        # the MiB) and 2.9 at 4 x 4096; without this tensor the estimates come within 0.6% and
        # 0.8% of both (bench/results/stacks-llama-3.1-8b-even-rows-h200-2026-12-06.json).
        per_layer += C.UNSLOTH_KEPT_LAYER_HIDDEN_TENSORS * T * a.hidden * plan.compute_bytes
    # Unsloth's generic path keeps no bias per layer it does not checkpoint: its Gemma-3-1B records
    # without checkpointing measure under the estimate even without one (+5.5%).
    masked = masked_layers(plan) * n / a.layers if a.layers and plan.backend != "unsloth" else 0.0
    return n * per_layer + masked * mask_saved_per_token(plan) * T


def _resident_activations(plan: Plan) -> dict[str, float]:
    """What the forward leaves on the GPU for backward: checkpoints and/or whole layers' tensors."""
    acts: dict[str, float] = {}
    if plan.checkpointed_layers:
        name, kept = _kept_layer_inputs(plan)
        acts[name] = kept
    if plan.kept_layers:
        label = (
            "saved activations (all layers)"
            if not plan.checkpointed_layers
            else (f"saved activations ({plan.kept_layers} layers not checkpointed)")
        )
        acts[label] = _saved_layers(plan, plan.kept_layers)
    return acts


def _grad_share(plan: Plan, layers_done: float) -> float:
    """The share of the gradients alive once `layers_done` layers' backward has run."""
    if plan.grad_accum > 1 or not plan.arch.layers:
        return 1.0
    return min(1.0, max(layers_done, 0.0) / plan.arch.layers)


def backward_phases(plan: Plan) -> list[Phase]:
    """The backward's candidate peaks. Layers not checkpointed are the last ones (hf; Unsloth
    spreads them evenly): backward starts with all their tensors alive and frees them one layer at
    a time. Checkpointed layers are recomputed one at a time; on the hf path their inputs stay on
    the GPU until then, so the first recompute holds every checkpoint and the last one a single
    input. With one micro-batch per step, gradients appear layer by layer: the start of backward
    holds few, its end all (Phase.grads), so both ends are candidates."""
    a, T = plan.arch, plan.tokens
    L = a.layers
    saved, transient = eager_attention_bytes(plan)
    temps = backward_temporaries_per_token(plan) * T * layer_scale(plan) + transient
    one_layer = layer_saved_per_token(plan) * T * layer_scale(plan) + saved
    if masked_layers(plan):
        one_layer += mask_saved_per_token(plan) * T
    ws = {}
    if plan.load_in_4bit and plan.backend == "unsloth":
        name = f"dequantized weights (Unsloth's LoRA backward, {C.UNSLOTH_DEQUANTIZED_WEIGHTS:.2g} of the largest)"
        ws[name] = C.UNSLOTH_DEQUANTIZED_WEIGHTS * dequantized_weight(plan)
    elif plan.load_in_4bit:
        ws["dequantized weight (one matmul)"] = dequantized_weight(plan)
    # Unsloth's dequantized weights come and go with every layer too.
    deq = sum(ws.values()) if plan.backend == "unsloth" else 0.0
    churn = one_layer + temps + deq
    masks = {"attention masks": attention_mask_inputs(plan)} if masked_layers(plan) else {}
    out = []
    if plan.kept_layers:
        # The top of the backward: every layer that is not checkpointed still holds its tensors.
        acts = {**_resident_activations(plan), "backward temporaries": temps, **masks}
        top = Phase(
            "backward through the last layer", acts, dict(ws), churn=churn, grads=_grad_share(plan, 1)
        )
        out.append(top)
    if plan.checkpointed_layers:
        if plan.backend == "unsloth":
            # Unsloth spreads its kept layers evenly (checkpoint_skip_layers): near the top of the
            # backward a checkpointed layer is recomputed while nearly all of them are alive.
            acts = dict(_resident_activations(plan))
            done = 1.0
        else:
            name, kept = _kept_layer_inputs(plan)
            acts = {name: kept}
            done = plan.kept_layers + 1.0
        acts |= {"one layer recomputed": one_layer, "backward temporaries": temps, **masks}
        label = "backward through the last layer" if not plan.kept_layers else "backward, recomputing a layer"
        out.append(Phase(label, acts, dict(ws), churn=churn, grads=_grad_share(plan, done)))
    if plan.grad_accum == 1 and L > 1:
        # The end of the backward: the first layer, with every layer's gradients.
        if plan.checkpointed_layers:
            if plan.offloads:
                first = {
                    "layer inputs on GPU (Unsloth's staging buffers)": 2.0 * T * a.hidden * plan.compute_bytes
                }
            else:
                first = {"checkpoint (the first layer's input)": float(T * a.hidden * plan.residual_bytes)}
            first["one layer recomputed"] = one_layer
        else:
            first = {"saved activations (the first layer)": _saved_layers(plan, 1)}
        acts = {**first, "backward temporaries": temps, **masks}
        out.append(Phase("backward through the first layer", acts, dict(ws), churn=churn, grads=1.0))
    return out


def _resident_before_loss(plan: Plan) -> dict[str, float]:
    """What the forward leaves for the loss: layers that are not checkpointed hold their tensors;
    hf keeps every checkpoint, Unsloth its two staging buffers (globals, never freed)."""
    return _resident_activations(plan)


def unsloth_kept_buffers(plan: Plan) -> dict[str, float]:
    """Unsloth's fused LoRA kernels dequantize into one global buffer (unsloth/kernels/utils.py
    `_scratch("weight")`), made at the first forward and never freed: alive at the loss and the
    optimizer step too. (The backward phases count it among their dequantized weights.) Its
    generic path has no fused kernels, and a Gemma-3-1B loss peak measures none."""
    if plan.backend != "unsloth" or not plan.unsloth_fast or not plan.load_in_4bit:
        return {}
    return {"Unsloth's dequantization buffer (kept between layers)": dequantized_weight(plan)}


def loss_phase(plan: Plan) -> Phase:
    a, T = plan.arch, plan.tokens
    h, V, c = a.hidden, a.vocab, plan.compute_bytes
    lm_head_trains = LM_HEAD in plan.modules_to_save
    acts = _resident_before_loss(plan)
    if masked_layers(plan):
        acts["attention masks"] = attention_mask_inputs(plan)
    # With one micro-batch per step no gradient exists yet when the loss runs.
    grads = 1.0 if plan.grad_accum > 1 else 0.0
    if plan.backend == "unsloth":
        # unsloth_zoo's fused linear CE (constants.UNSLOTH_CE_*): the final norm's input and output,
        # grad_hidden (taken in the forward, kept for backward), and the route's buffers.
        acts["final hidden states (and normed)"] = 2.0 * T * h * c
        acts["fused CE: grad_hidden"] = float(T * h * c)
        name, chunk = unsloth_loss_buffers(plan)
        acts[name] = chunk
        big = V * h * c if lm_head_trains else 0.0
        if big:
            acts["lm_head gradient"] = big
        churn = chunk + T * h * c
        return Phase("loss (LM head)", acts, unsloth_kept_buffers(plan), big, churn, grads)
    # TRL's ChunkedLogProbFunction (trl/kernels/chunked_logprob.py). N = labelled positions;
    # counted as every token (responses-only masking only lowers it).
    n = T
    lm_in = plan.residual_bytes  # the final norm's output dtype, compacted by hidden[mask]
    head_bytes = 2 if lm_head_trains else plan.frozen_16bit_bytes
    # The final RMSNorm keeps an fp32 copy of the last layer's output; hidden[mask] is a copy too.
    acts["final norm + LM-head input"] = 4.0 * T * h + n * h * lm_in
    tile = min(n, C.TRL_LOGPROB_TOKEN_CHUNK)
    tiles = tile * C.TRL_LOGPROB_VOCAB_CHUNK * c  # mm_buf, in the compute dtype
    tiles += 4.0 * n * h + n * h * lm_in  # grad_hidden accumulated in fp32, returned in the input's dtype
    if lm_in != c:
        tiles += tile * h * c  # hidden_chunk.to(compute_dtype)
    if head_bytes != c:
        tiles += C.TRL_LOGPROB_VOCAB_CHUNK * h * c  # weight[start:end].to(compute_dtype)
    acts["LM-head tiles (chunked log-prob)"] = tiles
    big = 0.0
    if lm_head_trains:
        # grad_weight accumulated in fp32 (V x h x 4) and returned as bf16: both alive at the return.
        big = V * h * (4.0 + 2.0)
        acts["lm_head gradient (fp32 + bf16 copy)"] = big
    churn = acts["final norm + LM-head input"] + tiles
    return Phase("loss (LM head)", acts, {}, big, churn, grads)


def _pow2_at_or_below(x: float) -> int:
    """fused_linear.py's `_pow2` rounded down: the power of two at or below x (0 below 1)."""
    if x < 1:
        return 0
    return 1 << math.floor(math.log2(x))


def unsloth_loss_buffers(plan: Plan) -> tuple[str, float]:
    """The buffers of the route unsloth_zoo's fused loss takes (constants.UNSLOTH_CE_TILE_*).

    Chunked: one fp32 R x vocab logits buffer reused by every chunk, and the chunk's fp32 R x hidden
    gradient. Tiled, for a frozen head over a large vocabulary on sm 8.0 or newer: an fp32 tile of R
    rows x a multiple of 16,384 columns and an fp32 R x hidden accumulator. A card of 24.5 GiB or
    less always tiles; a larger one once a micro-batch's labelled rows (tokens less one per
    sequence) reach 4,096. The estimate counts every token as labelled, and responses-only masking
    labels fewer, so from there a larger card counts the larger of the two routes; a card not named
    counts the larger at every length."""
    a, T = plan.arch, plan.tokens
    h, V = a.hidden, max(a.vocab, 1)
    loss_budget = unsloth_ce_budget(plan)  # both routes size by it: sum the weights once
    rows = unsloth_ce_rows(plan, loss_budget)
    chunked = (f"fused CE: fp32 logits of {rows} rows", rows * (-(-V // 8) * 8) * 4.0 + rows * h * 4.0)
    cols = C.UNSLOTH_CE_TILE_COLS
    # The tiled pass needs fp32 logits from 16-bit inputs, sm 8.0 or newer (_flash_ce_ok, and
    # _fp32_out_ok: a T4 raises), and a frozen head over more than two tiles (_tiled_vocab).
    pre_ampere = plan.device.name == devices.TURING.name
    if LM_HEAD in plan.modules_to_save or -(-V // cols) <= 2 or plan.compute_bytes != 2 or pre_ampere:
        return chunked
    card = plan.device.card_gib
    small = card is not None and card <= C.UNSLOTH_SMALL_CARD_GIB
    labelled = max(T - plan.micro_batch, 1)  # each sequence's last position has no next token
    budget = min(C.UNSLOTH_CE_TILE_BYTES, loss_budget)
    r = max(min(C.UNSLOTH_CE_TILE_ROWS, labelled, int(budget // (cols * 4))), 1)
    width = max(int(budget // (r * 4)), cols)
    if small or card is None:
        width = min(width, cols)  # the small card's 16,384-column cap (largest where none is named)
    width = min(width - width % cols, -(-V // cols) * cols)
    tiled = (f"fused CE: fp32 tile of {r} rows x {width} columns", r * width * 4.0 + r * h * 4.0 + r * 4.0)
    if small:
        return tiled
    if card is not None and labelled < C.UNSLOTH_CE_FLASH_MIN_ROWS:
        return chunked
    return max(chunked, tiled, key=lambda kv: kv[1])


def unsloth_ce_budget(plan: Plan) -> float:
    """unsloth_zoo's loss budget: min(2 GiB, half the free memory), the free memory read once, at the
    first loss. Counting only what is there before any activation errs toward the larger chunk, and
    keeps more tokens from ever estimating a smaller one."""
    budget = C.UNSLOTH_CE_CHUNK_GIB * C.GIB
    if plan.budget_bytes is not None:
        static = sum(weights(plan).values()) + sum(gradients(plan).values())
        free = plan.budget_bytes - static - plan.device.context_gib * C.GIB
        budget = max(min(budget, free / 2), 1.0)
    return budget


def unsloth_ce_rows(plan: Plan, budget: float | None = None) -> int:
    """Rows per chunk of unsloth_zoo's fused linear CE (fused_linear.py fused_linear_rows): about
    tokens x hidden / vocab, within [max(512, _MIN_LOGITS / vocab), 4096], and at most the budget
    min(2 GiB, free / 2) over vocab x 4 bytes (fp32 logits). `budget`: unsloth_ce_budget's, where
    the caller has it."""
    a, T = plan.arch, plan.tokens
    V = max(a.vocab, 1)
    rows = _pow2_at_or_below(T * a.hidden / V)
    floor = min(
        max(_pow2_at_or_below(C.UNSLOTH_CE_MIN_LOGITS / V), C.UNSLOTH_CE_MIN_ROWS), C.UNSLOTH_CE_MAX_ROWS
    )
    rows = min(max(rows, floor), C.UNSLOTH_CE_MAX_ROWS)
    cap = int((unsloth_ce_budget(plan) if budget is None else budget) // (V * 4))
    return max(min(rows, max(cap, 2), T), 1)


def embedding_backward_phase(plan: Plan) -> Phase | None:
    """A trained embed_tokens gets a dense vocab x hidden gradient at the very end of backward."""
    if EMBED not in plan.modules_to_save:
        return None
    a = plan.arch
    dense = float(a.vocab * a.hidden * 2)
    acts = {
        "embed_tokens dense gradient": dense,
        "gradient of the embeddings' output": plan.tokens * a.hidden * plan.residual_bytes,
    }
    kept = unsloth_kept_buffers(plan)
    return Phase("embedding backward", acts, kept, dense, acts["gradient of the embeddings' output"])


def optimizer_phase(plan: Plan) -> Phase | None:
    temps = optimizer_step_temporaries(plan)
    if not temps:
        return None
    return Phase("optimizer step", {}, {**unsloth_kept_buffers(plan), "optimizer step temporaries": temps})


def allocator_slack(plan: Plan, phase: Phase) -> float:
    """Peak reserved minus peak allocated at `phase` (constants.py says how each was fitted)."""
    a = plan.arch
    if plan.backend == "hf":
        slack = C.HF_SLACK_PER_KEPT_INPUT * a.layers * plan.tokens * a.hidden * plan.residual_bytes
        if plan.kept_layers:
            ffn_wide = plan.tokens * a.ffn * plan.compute_bytes
            share = plan.kept_layers / a.layers
            slack += C.HF_SLACK_PER_MASKED_LAYER_NO_GC * masked_layers(plan) * share * ffn_wide
        if plan.expandable:
            slack *= C.HF_EXPANDABLE_SLACK_SHARE
        elif plan.liger:
            slack *= C.HF_LIGER_DEFAULT_SLACK_SHARE
    else:  # Unsloth turns expandable segments on itself: its constants were fitted with them
        slack = C.ALLOCATOR_SLACK_BASE_GIB[plan.backend] * C.GIB
        slack += C.ALLOCATOR_SLACK_FRACTION[plan.backend] * phase.churn
    return slack + C.LARGE_BUFFER_RESERVED_COPIES * phase.large_buffers


def phases(plan: Plan) -> list[Phase]:
    found = [*backward_phases(plan), loss_phase(plan), embedding_backward_phase(plan), optimizer_phase(plan)]
    return [p for p in found if p is not None]
