"""The work of one training token, in FLOPs: what the dashboard's utilisation divides by.

Counted per token of a micro-batch row (a multiply-add is 2 FLOPs), for QLoRA's step:

- forward: every decoder layer's projections (the 4-bit weights run as 16-bit matmuls), the LoRA
  adapters (A then B), attention's two sequence-wide matmuls (QK^T and AV), and the LM head;
- backward: a frozen projection needs only its input's gradient (one matmul, as in the forward),
  an adapter its input's and its weights' (two), attention about twice its forward (dQ, dK, dV
  and the scores' gradient), the LM head its input's (and its weights' too when trained);
- recompute: each checkpointed layer's forward runs again in the backward.

Attention counts the causal average context (a sliding-window layer's is capped by its window) of a
full row of train.seq_len: packed rows attend within each example, so their attention is smaller
than counted (on the 8B seed recipe attention is about 9% of the total). The vision tower of a
multimodal checkpoint does no work in a text fine-tune. This is the convention of the issue's
"physical limit" (about 3.5e10 FLOPs per token for Llama-3.1-8B at 4096 without recompute).
"""

from __future__ import annotations

from engine.memory.architectures import Architecture


def mean_context(seq_len: int, window: int = 0) -> float:
    """Keys a query attends to, averaged over a causal row: (seq+1)/2, or less under a window."""
    if seq_len <= 0:
        return 0.0
    if not window or window >= seq_len:
        return (seq_len + 1) / 2
    ramp = window * (window + 1) / 2  # the first `window` positions see 1..window keys
    return (ramp + (seq_len - window) * window) / seq_len


def attention_context(arch: Architecture, seq_len: int) -> float:
    """The mean context over the layers: global layers see the causal row, sliding ones a window."""
    if not arch.sliding_window:
        return mean_context(seq_len)
    global_layers = arch.layers // arch.sliding_pattern if arch.sliding_pattern else 0
    sliding = arch.layers - global_layers
    total = global_layers * mean_context(seq_len) + sliding * mean_context(seq_len, arch.sliding_window)
    return total / arch.layers


def attention_flops_per_token(arch: Architecture, seq_len: int) -> float:
    """One layer's attention matmuls (QK^T and AV) in the forward, per token."""
    return 4.0 * arch.q_dim * attention_context(arch, seq_len)


def training_flops_per_token(
    arch: Architecture,
    seq_len: int,
    r: int,
    targets: tuple[str, ...],
    checkpointed_layers: int = 0,
    lm_head_trained: bool = False,
) -> dict[str, float]:
    """FLOPs per trained token by part (forward, backward, recompute), for one optimizer step's
    tokens; their sum is what utilisation divides by."""
    mods = arch.linear_modules()
    base = 2.0 * sum(i * o for i, o in mods.values())  # one layer's projections, forward
    lora = 2.0 * sum(r * (mods[m][0] + mods[m][1]) for m in targets if m in mods)
    attention = attention_flops_per_token(arch, seq_len)
    head = 2.0 * arch.hidden * arch.vocab
    layer_forward = base + lora + attention
    forward = arch.layers * layer_forward + head
    backward = arch.layers * (base + 2 * lora + 2 * attention) + head * (2 if lm_head_trained else 1)
    recompute = checkpointed_layers * layer_forward
    return {"forward": forward, "backward": backward, "recompute": recompute}


def utilisation(
    tokens_per_s: float, flops_per_token: float, peak_tflops: float, gpus: int = 1
) -> float | None:
    """Model FLOPs utilisation: the share of the cards' dense 16-bit tensor peak the run achieves
    (None where the peak or the count is unknown)."""
    if peak_tflops <= 0 or flops_per_token <= 0 or tokens_per_s <= 0:
        return None
    return tokens_per_s * flops_per_token / (peak_tflops * 1e12 * max(1, gpus))
