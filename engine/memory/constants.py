"""Every number the memory model uses that is not an architecture or config value, with its source.

Two kinds live here:
- library facts, read from the code of the exact versions the engine runs (bitsandbytes 0.50.2,
  TRL 1.16, peft 0.21, transformers 5.17, unsloth_zoo): they change only when a library does;
- fitted constants, chosen so the model reproduces a measurement. Each names the measurement
  (a row of shared/anchors.md, copied into bench/results/anchors-2026-11-23.json) and is refitted
  when the GPU calibration matrix lands in bench/results/memory-calibration-<date>.json.

Units: bytes, and GiB (2**30 bytes) wherever a name ends in _GIB. The console prints GiB and
calls them GB, as nvidia-smi and GPU vendors do ("24 GB" cards hold 24 GiB).
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

# CUDA context (driver, kernels of torch, bitsandbytes and triton loaded lazily): outside
# PyTorch's allocator, in nvidia-smi. Source: shared/memory-model.md "about 0.3-0.7 GB";
# ASSUMED mid-range until the calibration matrix records device_peak_gib.
CUDA_CONTEXT_GIB = 0.5

# Unsloth's fused CE chunk costs fewer bytes per logit than its planner assumes (16): the
# compiled chunk fuses the fp32 upcast. FITTED to anchors.md row 5 (Unsloth, 8B, 2x4096 tokens:
# 7.74 GiB allocated): with 4 chunks of 2048 x 128256 logits the row needs 8 bytes per logit.
UNSLOTH_CE_BYTES_PER_LOGIT = 8.0

# Activations as computed from the saved-tensor inventory (docs/memory-model.md) are multiplied
# by this factor per backend path; it applies to the per-layer parts (one layer recomputed, or all
# layers without checkpointing, and the backward temporaries), not to the exactly known checkpoints
# and loss buffers. FITTED: hf to anchors.md row 3 (10.19 GiB allocated; the inventory gives
# 10.12 at 1.045). hf-upcast needs none: the inventory gives 15.54 for row 1 (15.46), 10.00 for
# the "RTX 4060" recipe without modules_to_save (9.9) and 16.08 with them (16.0). unsloth's peak
# is its loss chunk (UNSLOTH_CE_BYTES_PER_LOGIT), not a layer.
ACTIVATION_SCALE = {"hf": 1.076, "hf-upcast": 1.0, "unsloth": 1.0}

# Caching-allocator slack: peak reserved minus peak allocated, as a fraction of the activation
# working set at the peak. FITTED so each row's reserved peak comes out right on top of the
# model's allocated peak: hf row 3 (10.78 reserved), hf-upcast row 1 (15.81), unsloth row 5 (7.88).
ALLOCATOR_SLACK_FRACTION = {"hf": 0.133, "hf-upcast": 0.035, "unsloth": 0.033}

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
