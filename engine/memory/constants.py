"""Every number the memory model uses that is not an architecture or config value, with its source.

Two kinds live here:
- library facts, read from the code of the exact versions the engine runs (bitsandbytes 0.50.2,
  TRL 1.16, peft 0.21, transformers 5.17, unsloth_zoo): they change only when a library does;
- fitted constants, chosen so the model reproduces a measurement. Each names the measurement
  (a row of shared/anchors.md, copied into bench/results/anchors-2026-11-23.json) and is refitted
  when the GPU calibration matrix lands in bench/results/memory-calibration-<date>.json.

Units: bytes, and GiB (2**30 bytes) wherever a name ends in _GIB. The console and the CLI print
GiB as GiB ("24 GB" cards hold 24 GiB: nvidia-smi's MiB and GPU vendors' GB are binary too).
"""

from __future__ import annotations

GIB = 1024**3
MIB = 1024**2

# ---------------------------------------------------------------------------------------------
# Library facts
# ---------------------------------------------------------------------------------------------

# bitsandbytes NF4/FP4: two 4-bit values per byte, one absmax per block of 64 weights.
# Without double quant the absmax is fp32; with it, uint8 plus one fp32 absmax per 256 absmax
# values (bitsandbytes/functional.py quantize_4bit, nested=True, blocksize 256).
BNB_4BIT_BLOCK = 64
BNB_4BIT_BYTES_PER_PARAM = 0.5 + 4 / BNB_4BIT_BLOCK  # 0.5625
BNB_4BIT_DQ_BYTES_PER_PARAM = 0.5 + 1 / BNB_4BIT_BLOCK + 4 / (BNB_4BIT_BLOCK * 256)  # 0.515869

# bitsandbytes optimizers (bitsandbytes/optim/optimizer.py, 0.50.2):
# - tensors under min_8bit_size keep fp32 states even in an 8-bit optimizer;
BNB_MIN_8BIT_SIZE = 4096
# - paged optimizers put a state in cudaMallocManaged memory only when the tensor has at least
#   1e5 elements (`if not self.is_paged or p.numel() < 1e5`); managed memory is invisible to
#   torch.cuda.max_memory_* and visible to nvidia-smi while resident;
BNB_PAGED_MIN_NUMEL = 100_000
# - 8-bit states are blockwise: one fp32 absmax per 256 values for each of the two states,
#   allocated with torch.zeros on the device (never paged).
BNB_8BIT_BLOCK = 256

# TRL 1.16 SFTTrainer always patches the model with a fused LM head (trl/trainer/utils.py
# add_fused_lm_head, _CHUNKED_LOGPROB_CHUNK_SIZE) computed by trl/kernels/chunked_logprob.py
# ChunkedLogProbFunction: tiles of TOKEN_CHUNK_SIZE tokens x 32768 vocabulary entries in the
# compute dtype; the backward accumulates grad_hidden (and grad_weight when lm_head trains) in fp32.
TRL_LOGPROB_VOCAB_CHUNK = 32768
TRL_LOGPROB_TOKEN_CHUNK = 4096

# unsloth_zoo loss_utils.unsloth_fused_ce_loss: the loss (forward and backward) runs in chunks
# sized so one chunk's transient stays under target = min(free / 2, 4 GiB), counting
# _CE_BYTES_PER_LOGIT = 16 bytes per logit; the chunk count is 1 or a multiple of 4.
UNSLOTH_CE_TARGET_CAP_GIB = 4.0
UNSLOTH_CE_BYTES_PER_LOGIT_PLANNED = 16.0

# cuBLAS workspace, allocated through PyTorch's caching allocator: 32 MiB on Hopper and later,
# 4 MiB + 8 x 16 KiB before (torch/csrc/cuda/CUDABlas workspace size). Take the larger.
CUBLAS_WORKSPACE_BYTES = 32 * MIB

# ---------------------------------------------------------------------------------------------
# Fitted or assumed constants (refit these from bench/results/memory-calibration-*.json)
# ---------------------------------------------------------------------------------------------

# CUDA context and everything else outside PyTorch's allocator that NVML counts (the driver's
# reservation, cuBLAS/triton/bitsandbytes kernels). FITTED: bench/results/memory-calibration-
# llama-3.1-8b-h100-2026-11-23.json, first config of a fresh process: device_peak 7.825 GiB -
# peak_reserved 6.357 - paged optimizer state 0.152 = 1.32 GiB. (shared/memory-model.md guessed
# 0.3-0.7 GB for the context alone.) Later configs of the same process read higher because
# bitsandbytes' page manager never frees an old trainer's paged state.
CUDA_CONTEXT_GIB = 1.3

# Unsloth's fused CE chunk costs fewer bytes per logit than its planner assumes (16): the
# compiled chunk fuses the fp32 upcast. BOUNDED by the engine's padding-free rows on the H100
# (bench/results/memory-calibration-engine-stacks-h100-2026-11-23b.json): Llama-3.2-1B, every
# layer checkpointed, 2 x 4096 tokens in 4 chunks, peaks at 2.075 GiB allocated, and its loss
# cannot exceed that: at most 3.56 bytes. (4.8 was fitted to padded micro-batches, whose loss
# set the peak at 2.38 GiB; the engine no longer builds them for Unsloth.)
UNSLOTH_CE_BYTES_PER_LOGIT = 3.5

# Unsloth's fused LoRA MLP backward dequantizes the 4-bit weights it multiplies by (gate, up and
# down, and the recompute's own) and holds several at once, where bitsandbytes' matmul holds one.
# FITTED, as a whole number of the largest dequantized weight (the MLP's, ffn x hidden in bf16),
# to the same file's padding-free peaks, both set by the backward of a recomputed layer: Llama-3.1-8B
# 7.738 GiB allocated (estimate 7.741) and Llama-3.2-1B 2.075 (estimate 2.079), with the layer's
# saved-tensor inventory unscaled. (The earlier fit scaled the inventory by 1.5 from the 8B alone,
# and overestimated the 1B by 14%.)
UNSLOTH_DEQUANTIZED_WEIGHTS = 5

# The per-layer parts of the activations (one layer's saved tensors, every layer's without
# checkpointing, and the backward temporaries) are the saved-tensor inventory of terms.py times
# this factor. FITTED: hf to the 8 Llama-3.1-8B configs of the calibration matrix: without
# checkpointing the peak grows 5.73 MiB per token against the inventory's 5.89 (0.97);
# hf-upcast needs none (anchors.md row 1: 15.54 estimated vs 15.46 allocated; the "RTX 4060"
# rows 16.08 vs 16.0 and 10.00 vs 9.9); unsloth none (see UNSLOTH_DEQUANTIZED_WEIGHTS).
ACTIVATION_SCALE = {"hf": 0.97, "hf-upcast": 1.0, "unsloth": 1.0}

# MLP-wide gradients alive at once in one layer's backward (besides two hidden-wide ones).
# FITTED: hf 1, the checkpointed Llama-3.1-8B configs of the matrix (peak grows 0.477 MiB per token:
# checkpoints 0.25 + one layer 0.18 + temporaries 0.043); hf-upcast 3, anchors.md row 1 (a bare
# script, fp32 MLP); unsloth 2 (its fused SwiGLU backward writes into e and g in place).
BACKWARD_MLP_GRADIENTS = {"hf": 1, "hf-upcast": 3, "unsloth": 2}

# Caching-allocator slack (peak reserved - peak allocated).
# hf: the tensors a step keeps (each layer's input, and with no checkpointing everything a layer
# saves) are carved out of blocks that held the previous layer's temporaries, so the split
# remainders pile up with the number of kept layer inputs. Slack = a share of L x T x h x bytes,
# plus, without checkpointing, a share of one FFN-wide tensor per layer that builds an attention
# mask (the mask's transients are sized unlike anything else in the layer). FITTED by least
# squares on the 23 hf configs that ran in bench/results/memory-calibration-{llama-3.2-1b,
# llama-3.1-8b,gemma-3-12b}-h100-2026-11-23.json (relative residuals weighted): the totals land
# within 3.1% (worst: Gemma-3-12B seq 4096 mb 1 gc). The earlier "fraction of one layer's churn"
# fit only the 8B and over-estimated the 1B by 8-13%.
HF_SLACK_PER_KEPT_INPUT = 0.5
HF_SLACK_PER_MASKED_LAYER_NO_GC = 0.68
# With expandable segments (the engine's default, engine/allocator.py) the allocator grows one
# mapping instead of splitting cached blocks, and the slack above shrinks to this share of itself.
# FITTED: bench/results/memory-calibration-engine-stacks-h100-2026-11-23b.json, Llama-3.1-8B hf
# with Liger, seq 4096 mb 2, every layer checkpointed: 0.174 GiB reserved - allocated for the
# engine and 0.161 for the bare TRL script, against 1.0 GiB from the default-allocator model
# (0.86 measured without expandable segments). One config: the least certain hf constant.
HF_EXPANDABLE_SLACK_SHARE = 0.17
# hf-upcast and unsloth = base + fraction x the bytes churned at the peak (one layer's saved
# tensors, temporaries and dequantized weights, or the loss tiles). FITTED: hf-upcast to
# anchors.md row 1 (15.81 reserved), one row; unsloth (which runs with expandable segments) to
# the padding-free peaks of memory-calibration-engine-stacks-h100-2026-11-23b.json: 0.141 GiB
# slack on the 8B (0.117 estimated) and 0.044 on the 1B (0.056).
ALLOCATOR_SLACK_BASE_GIB = {"hf-upcast": 0.0, "unsloth": 0.0}
ALLOCATOR_SLACK_FRACTION = {"hf-upcast": 0.07, "unsloth": 0.06}

# Vocabulary-sized gradient buffers (the fp32 grad of a trained lm_head and its bf16 copy, built
# once per micro-step) do not fit in the split blocks the allocator has cached by then, so reserved
# memory holds them a second time. Source: anchors.md "RTX 4060" row, modules_to_save
# [embed_tokens, lm_head]: 16.0 GiB allocated, 19.2 reserved; 3.2 GiB ~ 2.94 GiB of such buffers.
LARGE_BUFFER_RESERVED_COPIES = 1.0

# ---------------------------------------------------------------------------------------------
# Verdict
# ---------------------------------------------------------------------------------------------

# "tight" when the headroom is under this share of the GPU's memory. The model aims at 5% of the
# measured peak (the replay test's bound); 6% of the budget covers that error plus a desktop
# session's few hundred MB on a consumer card.
TIGHT_FRACTION = 0.06
