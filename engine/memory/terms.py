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

import math
from dataclasses import dataclass, field

from engine.memory import constants as C
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
    expandable: bool = False  # the CUDA allocator's expandable segments (engine.allocator)
    # A multimodal checkpoint's vision tower quantized with the rest (the engine's own loads do;
    # a pre-quantized checkpoint whose skip list names it stores it in 16-bit).
    vision_4bit: bool = False

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
    def residual_bytes(self) -> int:
        """The residual stream's dtype: fp32 once prepare_model_for_kbit_training upcast the norms."""
        return 4 if self.backend == "hf-upcast" else self.compute_bytes

    @property
    def frozen_16bit_bytes(self) -> int:
        """Embeddings, lm_head and norms: the load dtype, or fp32 after the upcast."""
        return 4 if self.backend == "hf-upcast" else self.compute_bytes

    @property
    def adapter_bytes(self) -> int:
        """LoRA weights as they train: TRL casts a quantized model's adapters to bf16, and the
        engine keeps them fp32 when it computes in fp32 (engine.train.backends.trainer)."""
        return 4 if self.compute_bytes == 4 else 2


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
    # QLoRA, the PEFT adapter weights are converted to bf16"), modules_to_save copies included.
    parts["LoRA adapters"] = lora_params(plan) * plan.adapter_bytes
    if plan.modules_to_save:
        parts[f"{' + '.join(plan.modules_to_save)} trainable copies"] = (
            len(plan.modules_to_save) * counts["embed_tokens"] * plan.adapter_bytes
        )
    return parts


def gradients(plan: Plan) -> dict[str, float]:
    # Gradients take the parameter's dtype (bf16). With gradient accumulation they live across the
    # whole step, so they are counted at the peak (exact from the second micro-batch on).
    parts = {"LoRA adapters": lora_params(plan) * float(plan.adapter_bytes)}
    if plan.modules_to_save:
        embed = plan.arch.vocab * plan.arch.hidden
        parts[" + ".join(plan.modules_to_save)] = (
            len(plan.modules_to_save) * embed * float(plan.adapter_bytes)
        )
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
            add("AdamW states (like the params)", 2.0 * numel * plan.adapter_bytes * count)
        else:  # fp32 states: the 32-bit optimizer, or tensors too small for 8-bit ones
            states = 8.0 * numel * count
            if is_paged and numel >= C.BNB_PAGED_MIN_NUMEL:
                paged += states
            else:
                add("fp32 states", states)
    return torch_parts, paged


def optimizer_step_temporaries(plan: Plan) -> float:
    """torch's foreach AdamW builds sqrt(v) for every parameter at once; bitsandbytes updates in place."""
    if plan.optimizer == "adamw_torch":
        return sum(n * k for n, k in trainable_tensors(plan)) * 2.0
    return 0.0


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
    if plan.backend == "unsloth":
        # Fused RMSNorm keeps its (residual) input; fused QKV and MLP kernels keep the normed X,
        # and the SwiGLU kernel only e = gate and g = up (recomputing the product in backward).
        total += (a.norms_per_layer - 1) * c * h + 2 * c * h
        total += (2 * c * q + 2 * c * kv) if a.qk_norm else 0
        total += c * (q + 2 * kv) + 2 * c * q  # q, k, v after RoPE; SDPA output; o_proj input
        total += 2 * c * ffn
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
        total += (4 * q + 4 * kv) if a.qk_norm else 0
        if a.fused_qkv:  # v is a view of the fused output: its whole storage stays alive
            total += c * (q + 2 * kv) + c * (q + kv)
        else:
            total += c * (q + 2 * kv)
        total += c * q + (c * q if "o_proj" in t else 0)
        # gate, act(gate) and up (Liger's fused SwiGLU keeps only gate and up), and the product
        # the down_proj adapter keeps.
        total += (2 if plan.liger else 3) * c * ffn + (c * ffn if "down_proj" in t else 0)
    total += len(t) * c * r  # each adapter's lora_A output, saved by lora_B
    if plan.dropout:  # nn.Dropout on each adapter's input: its output and a bool mask
        total += sum((c + 1) * mods[m][0] for m in t)
    return total


def eager_attention_bytes(plan: Plan) -> tuple[float, float]:
    """(saved, transient) bytes of one layer's attention scores when attention is eager."""
    if plan.attention != "eager":
        return 0.0, 0.0
    scores = plan.micro_batch * plan.arch.heads * plan.seq_len**2
    # softmax in fp32 (saved) and its bf16 copy (saved by the matmul with v); scores and mask add.
    return scores * (4 + plan.compute_bytes), scores * 2 * plan.compute_bytes


def masked_layers(plan: Plan) -> int:
    """Layers whose SDPA call gets an explicit mask (transformers drops an all-causal one).

    With a mask, transformers repeats K and V to every query head (sdpa_attention.py
    use_gqa_in_sdpa) and SDPA's memory-efficient kernel keeps the mask as a bf16 bias for backward.
    Packing (a block-diagonal mask from position_ids) and padding put one on every layer; sliding
    window layers (Gemma 3) need one once the sequence reaches the window.
    """
    a = plan.arch
    if plan.backend == "unsloth" or plan.attention != "sdpa":
        return 0
    if plan.packing or plan.padded:
        return a.layers
    if a.sliding_window and plan.seq_len >= a.sliding_window:
        return a.layers - (a.layers // a.sliding_pattern if a.sliding_pattern else 0)
    return 0


def mask_saved_per_token(plan: Plan) -> float:
    """Extra bytes per token a masked layer saves: K and V repeated to q_dim, and the bf16 bias
    (micro_batch x seq x seq x 2 bytes, that is 2 x seq per token)."""
    a = plan.arch
    return 2 * plan.compute_bytes * (a.q_dim - a.kv_dim) + 2 * plan.seq_len


def attention_mask_inputs(plan: Plan) -> float:
    """The bool 4D masks transformers builds once per forward (a causal one and a sliding one)."""
    if not masked_layers(plan):
        return 0.0
    kinds = 2 if plan.arch.sliding_window else 1
    return float(kinds * plan.micro_batch * plan.seq_len**2)


def backward_temporaries_per_token(plan: Plan) -> float:
    """Gradients alive at once inside one layer's backward: some MLP-wide (constants.
    BACKWARD_MLP_GRADIENTS, in the MLP's dtype) and two hidden-wide (the residual's dtype)."""
    a = plan.arch
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
    if plan.backend != "hf":  # hf's first RMSNorm already saves its own fp32 copy of the input
        per_layer += T * a.hidden * plan.residual_bytes
    masked = masked_layers(plan) * n / a.layers if a.layers else 0.0
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


def backward_phases(plan: Plan) -> list[Phase]:
    """The backward's candidate peaks. Layers not checkpointed are the last ones: backward starts
    with all their tensors alive, and frees them one layer at a time before it reaches the first
    checkpointed layer, whose recompute is the other candidate."""
    T = plan.tokens
    saved, transient = eager_attention_bytes(plan)
    temps = backward_temporaries_per_token(plan) * T * layer_scale(plan) + transient
    one_layer = layer_saved_per_token(plan) * T * layer_scale(plan) + saved
    if masked_layers(plan):
        one_layer += mask_saved_per_token(plan) * T
    ws = {}
    if plan.load_in_4bit and plan.backend == "unsloth":
        name = f"dequantized weights (Unsloth's fused LoRA backward, {C.UNSLOTH_DEQUANTIZED_WEIGHTS})"
        ws[name] = C.UNSLOTH_DEQUANTIZED_WEIGHTS * dequantized_weight(plan)
    elif plan.load_in_4bit:
        ws["dequantized weight (one matmul)"] = dequantized_weight(plan)
    # Unsloth's dequantized weights come and go with every layer too.
    deq = sum(ws.values()) if plan.backend == "unsloth" else 0.0
    masks = {"attention masks": attention_mask_inputs(plan)} if masked_layers(plan) else {}
    out = []
    # Either way the allocator churns through one layer's tensors at a time.
    if plan.kept_layers:
        acts = {**_resident_activations(plan), "backward temporaries": temps, **masks}
        out.append(Phase("backward through the last layer", acts, dict(ws), churn=one_layer + temps + deq))
    if plan.checkpointed_layers:
        if plan.backend == "unsloth":
            # Unsloth spreads its kept layers evenly (checkpoint_skip_layers): some are still
            # alive when a checkpointed layer is recomputed. Count them all.
            acts = dict(_resident_activations(plan))
        else:
            name, kept = _kept_layer_inputs(plan)
            acts = {name: kept}
        acts |= {"one layer recomputed": one_layer, "backward temporaries": temps, **masks}
        label = "backward through the last layer" if not plan.kept_layers else "backward, recomputing a layer"
        out.append(Phase(label, acts, dict(ws), churn=one_layer + temps + deq))
    return out


def _resident_before_loss(plan: Plan) -> dict[str, float]:
    acts = _resident_activations(plan)
    if plan.offloads:
        # The checkpointed layers' inputs are on the CPU by the time the loss runs; layers that
        # are not checkpointed still hold their tensors.
        acts = {k: v for k, v in acts.items() if not k.startswith("layer inputs on GPU")}
    return acts


def loss_phase(plan: Plan) -> Phase:
    a, T = plan.arch, plan.tokens
    h, V, c = a.hidden, a.vocab, plan.compute_bytes
    lm_head_trains = LM_HEAD in plan.modules_to_save
    acts = _resident_before_loss(plan)
    if masked_layers(plan):
        acts["attention masks"] = attention_mask_inputs(plan)
    if plan.backend == "unsloth":
        acts["final hidden states (and normed)"] = 2.0 * T * h * c
        grad_inputs = T * h * c
        fixed = grad_inputs + (2 * V * h * c if lm_head_trains else 0)
        acts["fused CE loss: grad_inputs + one chunk"] = grad_inputs + unsloth_loss_chunk(plan, fixed)
        churn = acts["final hidden states (and normed)"] + acts["fused CE loss: grad_inputs + one chunk"]
        big = V * h * c if lm_head_trains else 0.0
        if big:
            acts["lm_head gradient"] = big
        return Phase("loss (LM head)", acts, {}, big, churn)
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
    return Phase("loss (LM head)", acts, {}, big, churn)


def unsloth_loss_chunk(plan: Plan, fixed: float) -> float:
    """One chunk of unsloth_zoo's fused CE, whose planner sizes chunks against min(free / 2, 4 GiB).

    Its chunk count is 1 or a multiple of 4, so the real chunk shrinks when a few more tokens tip
    it into more chunks. This returns the planner's ceiling instead (the whole loss when it fits
    in one chunk, else the target): never below the real chunk, and more tokens never estimate
    less. At anchors.md row 5 (4 chunks, 99% of the target) the two differ by 0.6%.
    """
    a, T = plan.arch, plan.tokens
    target = C.UNSLOTH_CE_TARGET_CAP_GIB * C.GIB
    if plan.budget_bytes is not None:
        static = sum(weights(plan).values()) + sum(gradients(plan).values())
        context = C.CUDA_CONTEXT_GIB * C.GIB
        free = plan.budget_bytes - static - context - 3.0 * T * a.hidden * plan.compute_bytes
        target = max(min(target, free / 2), 0.0)
    if 0 < fixed < target:
        target -= fixed
    whole = T * a.vocab * C.UNSLOTH_CE_BYTES_PER_LOGIT_PLANNED
    # The planner counts 16 bytes per logit; a chunk really holds UNSLOTH_CE_BYTES_PER_LOGIT.
    return min(whole, target) * C.UNSLOTH_CE_BYTES_PER_LOGIT / C.UNSLOTH_CE_BYTES_PER_LOGIT_PLANNED


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
    return Phase("embedding backward", acts, {}, dense, acts["gradient of the embeddings' output"])


def optimizer_phase(plan: Plan) -> Phase | None:
    temps = optimizer_step_temporaries(plan)
    if not temps:
        return None
    return Phase("optimizer step", {}, {"optimizer step temporaries": temps})


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
    else:  # Unsloth turns expandable segments on itself: its constants were fitted with them
        slack = C.ALLOCATOR_SLACK_BASE_GIB[plan.backend] * C.GIB
        slack += C.ALLOCATOR_SLACK_FRACTION[plan.backend] * phase.churn
    return slack + C.LARGE_BUFFER_RESERVED_COPIES * phase.large_buffers


def phases(plan: Plan) -> list[Phase]:
    found = [*backward_phases(plan), loss_phase(plan), embedding_backward_phase(plan), optimizer_phase(plan)]
    return [p for p in found if p is not None]
