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
# Each quantized weight also keeps its own tables (bitsandbytes 0.50.2 shares none between
# weights, measured on the tiny Gemma 3): the 16-entry NF4/FP4 code in fp32, and with double quant
# the 256-entry fp32 code of the nested absmax and its fp32 offset. 1 KB a weight: nothing on an 8B
# (224 weights), 5% of the tiny test models' weights.
BNB_4BIT_TABLE_BYTES = 16 * 4
BNB_4BIT_DQ_TABLE_BYTES = 16 * 4 + 256 * 4 + 4

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
# The engine's lean 8-bit step (engine/train/backends/lean_optimizer.py) updates whole-block
# tensors in slabs of at most this many elements, one kernel call each, gathering a slab's
# gradients and parameters into two transient tensors.
BNB_SLAB_ELEMENTS = 1 << 24

# TRL 1.16 SFTTrainer always patches the model with a fused LM head (trl/trainer/utils.py
# add_fused_lm_head, _CHUNKED_LOGPROB_CHUNK_SIZE) computed by trl/kernels/chunked_logprob.py
# ChunkedLogProbFunction: tiles of TOKEN_CHUNK_SIZE tokens x 32768 vocabulary entries in the
# compute dtype; the backward accumulates grad_hidden (and grad_weight when lm_head trains) in fp32.
TRL_LOGPROB_VOCAB_CHUNK = 32768
TRL_LOGPROB_TOKEN_CHUNK = 4096

# unsloth_zoo 2026.10.9's loss (fused_losses/cross_entropy_loss.py unsloth_fused_ce_loss -> the
# default UNSLOTH_CHUNKED_CE and UNSLOTH_FUSED_LINEAR path, fused_losses/fused_linear.py _ce_impl):
# the gradient is taken in the forward, a chunk of R rows at a time, into one fp32 R x vocab logits
# buffer (_Buffers) reused by every chunk, with grad_hidden (tokens x hidden, the hidden dtype) kept
# for backward. R (fused_linear_rows) = the power of two at or below tokens x hidden / vocab, at least
# the power of two at or below _MIN_LOGITS / vocab (and at least 512), at most _MAX_ROWS, and at most
# the budget (min(_CHUNK_GB, free / 2)) over vocab x 4 bytes. (The older torch.func path with its
# free-memory-sized chunks is no longer the default.)
UNSLOTH_CE_CHUNK_GIB = 2.0  # _CHUNK_GB (UNSLOTH_LOGPROB_CHUNK_GB)
UNSLOTH_CE_MIN_LOGITS = 512 * 151936  # _MIN_LOGITS
UNSLOTH_CE_MIN_ROWS = 512
UNSLOTH_CE_MAX_ROWS = 4096  # _MAX_ROWS
# Its other route, for a frozen LM head over a vocabulary of more than two SPLIT_COLS (_tiled_vocab),
# 16-bit compute and sm 8.0 or newer (_flash_ce_ok, _fp32_out_ok): a tiled ("flash") pass that never
# holds rows x vocab, only an fp32 tile of R rows x a multiple of _SPLIT_COLS columns (R =
# min(_BWD_ROWS, labelled rows, min(_BWD_TILE_BYTES, the loss budget) / (_SPLIT_COLS x 4))) and an
# fp32 R x hidden accumulator (_tiled_layout, _tiled_forward). It runs once the labelled rows of
# a micro-batch reach _flash_min_rows: 4,096 on a card of more than _SMALL_CARD_BYTES (24.5 GiB),
# every micro-batch on a smaller one, whose tile is also capped at 16,384 columns (_FWD_TILE_COLS).
# MEASURED (H100, PyTorch's memory history, bench/results/memory-history-h100-2026-12-06.json): the
# chunked route's 512 x vocab buffer at 1,024 tokens (0.245 GiB Llama, 0.5 GiB Gemma 3), the tiled
# one's counter at 8,192; with the small card's route forced (UNSLOTH_FUSED_LINEAR_FLASH_MIN_ROWS=0)
# the same 1,024-token steps peaked 0.05-0.37 GiB lower.
UNSLOTH_CE_TILE_COLS = 16384  # _SPLIT_COLS
UNSLOTH_CE_TILE_ROWS = 4096  # _BWD_ROWS
UNSLOTH_CE_TILE_BYTES = 256 * 1024**2  # _BWD_TILE_BYTES
UNSLOTH_CE_FLASH_MIN_ROWS = 4096  # _flash_min_rows on a card above UNSLOTH_SMALL_CARD_GIB
UNSLOTH_SMALL_CARD_GIB = 24.5  # _SMALL_CARD_BYTES

# Unsloth's own fused kernels (FastLlamaModel and its Mistral / Qwen2 / Qwen3 / Gemma / Gemma 2
# subclasses, unsloth/models/loader.py): other model types (Gemma 3, Phi-3/4) load through
# FastModel, the stock transformers layer compiled as one region, with peft's LoRA.
UNSLOTH_FAST_FAMILIES = frozenset({"llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2"})

# LoRA adapters' dtype (bytes per parameter, and the same for their gradients). TRL 1.16's
# SFTTrainer casts the trainable parameters of a quantized model to bf16; Unsloth removes that cast
# from the TRL it patches (unsloth/models/rl.py: `if _is_quantized_model:` -> `if False:`), so its
# adapters stay in peft's fp32. MEASURED: the H200 matrix's r128 and r16 Unsloth records of one
# architecture and token count differ by 7.8-7.95 bytes per extra adapter parameter (fp32 weight
# + fp32 gradient), for Llama-3.2-1B, Llama-3.2-3B and Qwen2.5-7B.
LORA_PARAM_BYTES = {"hf": 2, "hf-upcast": 2, "unsloth": 4}

# ---------------------------------------------------------------------------------------------
# Fitted or assumed constants (refit these from bench/results/memory-calibration-*.json)
# ---------------------------------------------------------------------------------------------

# Kernel modules and other memory outside PyTorch's pool that the backend's process loads on top of
# the bare CUDA context (engine.memory.devices: per GPU class): libtorch's lazily loaded kernels,
# bitsandbytes', Triton's (Liger's, Unsloth's, Inductor's compiled blocks), cuBLAS's handles.
# FITTED to the run's own NVML figure (per process, + its paged state) minus peak reserved minus
# paged state minus the H200's bare context, over bench/results/memory-calibration-matrix-h200-
# 2026-12-04{a,b}.json: hf 0.740-0.744 GiB over its 13 records (5 architectures), Unsloth's own
# kernels (FastLlamaModel) 0.809-0.811 over 16 (5 architectures), Unsloth's FastModel path (Gemma
# 3: unsloth_zoo compiles the modeling file) 1.191 (one record). The H100 figure this replaces
# (CUDA_CONTEXT_GIB 1.3) counted the bench parent's own context. unsloth-generic (Unsloth's generic
# path) is the least-squares value over its device records (2026-12-05, evening): Gemma-3-4B and
# Phi-4 (bench/results/memory-calibration-unsloth-fastmodel-h100-2026-12-05.json) and four new
# Gemma-3-1B records (...-unsloth-gemma-3-1b-h100-2026-12-05.json) measure 0.76-0.85 GiB outside
# peak reserved and paged state, like FastLlamaModel's; the H200 Gemma-3-1B record's 1.19 stood
# alone (superseded since: its process ran without the attention masks the H100 runs hold). The
# 0.42 it replaces had been chosen to hold that one record within 5%. Refitted (2026-12-05, late)
# over the ten Gemma-3-1B records of the day's two H100 calls as well: 0.2335. Refitted 2026-12-06
# over 95 Unsloth device records (the H100 speed tables' 62 records added): 0.203 for
# FastLlamaModel, 0.218 for the generic path (0.199 without the superseded H200 record, at the same
# rms: the larger figure stays, on the side that does not run out of memory).
KERNEL_MODULES_GIB = {"hf": 0.146, "hf-upcast": 0.146, "unsloth": 0.203, "unsloth-generic": 0.218}

# Unsloth's fused LoRA backward dequantizes the 4-bit weights it multiplies by, and bitsandbytes'
# (the unfused modules') one at a time; unsloth keeps a global dequantization buffer besides.
# FITTED, as a multiple of the largest dequantized weight (the MLP's, ffn x hidden in bf16), with
# UNSLOTH_TOKEN_BYTES, to the 20 Unsloth records' peak allocated memory (fit_constants.py): the
# fully checkpointed peaks extrapolate to 2.2-2.4 of it at zero tokens (Llama-3.2-1B, Qwen2.5-7B
# and -14B, Mistral-7B; 3.2 for Llama-3.2-3B). REFITTED 2026-12-05 with Gemma-3-4B and Phi-4
# (fused qkv and gate_up projections, H100): 1.74 with UNSLOTH_TOKEN_BYTES 10,580 (35 records).
# REFITTED 2026-12-05 (evening) with four Gemma-3-1B records of the generic path, once its attention
# masks were counted (terms.masked_layers): 1.783 with 9,382 (39 records). REFITTED 2026-12-05
# (late) once a padding-free row counted as one sequence of the whole micro-batch (terms.Plan.row_len)
# and the generic path's attention-only layer as measured (terms.Plan.generic_bare_mlp), with ten
# Gemma-3-1B records of the generic path (45 records): 1.793 with 6,490. The 9,382 had been taking
# up the masks of the Gemma-3-1B records the rows left out. REFITTED once more when the generic
# path's layers were counted as the stock layer's inventory (terms.Plan.generic_stock_layer):
# 1.576 with 8,125 (45 records). REFITTED 2026-12-06 with the H100 speed tables' records (ranks
# 8-128, 1,024-16,384 tokens, none, half or all recomputed, one to four micro-batches a step, 99
# records): 1.993 with 7,210. The Llama-3.2-3B at 1,024 tokens had been estimated 6.2% short.
# REFITTED 2026-12-06 (later) once the loss and optimizer phases count the one buffer of these that
# outlives the backward (terms.unsloth_kept_buffers: PyTorch's memory history of that 3B run put its
# peak in the loss, bench/results/memory-history-h100-2026-12-06.json): 1.876 with 7,632. With the
# H200 Gemma-3-1B record superseded (docs/memory-model.md), a refit gives 1.716 with 9,800 at the
# same rms (1.8%) and a worse worst record (4.5% against 4.2%): these stand.
UNSLOTH_DEQUANTIZED_WEIGHTS = 1.876

# Bytes per token at Unsloth's backward peak that no width of the model explains: between 8192 and
# 16384 tokens the fully checkpointed peaks of Llama-3.2-1B, Llama-3.2-3B and Qwen2.5-7B (hidden
# 2048 to 3584, MLP 8192 to 18944) each grow 7.2-7.4 KB per token beyond the layer's tensors.
# FITTED with UNSLOTH_DEQUANTIZED_WEIGHTS. Not derived from Unsloth's code: the measured term.
UNSLOTH_TOKEN_BYTES = 7632.0

# Hidden-wide gradients alive at once in the backward of an Unsloth layer (the output's gradient,
# the residual's, and the recomputed input's). A WHOLE NUMBER chosen from the same three pairs of
# peaks: the slope left after the layer's tensors is 1.95 bytes per unit of hidden width (one
# more bf16 tensor than the two of the hf backend) plus UNSLOTH_TOKEN_BYTES.
UNSLOTH_BACKWARD_HIDDEN_GRADIENTS = 3

# Hidden-wide bf16 tensors a layer Unsloth does not checkpoint keeps beyond the inventory of
# terms.layer_saved_per_token (its blocks are compiled: Inductor's partitioner, not the eager
# code, decides what is saved). FITTED (fit_constants.py) on the H200 records of 2026-12-05b, the
# first Unsloth records without or with partial checkpointing: 5.8-8.2 KB per kept layer and
# token under before it, on Llama-3.2-1B/3B and Qwen2.5-7B (2.1-2.8 x hidden bytes). A WHOLE
# NUMBER: fitted on all 31 Unsloth records it is 0.985, and 0.80-1.10 with any one architecture
# held out; with 1, the 31 records land within 4.0% (rms 1.8%). Not refitted by fit_constants.py (a
# count, like UNSLOTH_BACKWARD_HIDDEN_GRADIENTS): its leave-one-architecture-out table keeps it at 1
# (worst -4.1%); refitted in every fold as well, the worst is -5.1% (Llama-3.2-3B at 0.80).
UNSLOTH_KEPT_LAYER_HIDDEN_TENSORS = 1.0

# The per-layer parts of the activations (one layer's saved tensors, every layer's without
# checkpointing, and the backward temporaries) are the saved-tensor inventory of terms.py times
# this factor. FITTED: hf to the calibration matrix (fit_constants.py); hf-upcast needs none
# (anchors.md row 1: 15.54 estimated vs 15.46 allocated; the "RTX 4060" rows 16.08 vs 16.0 and
# 10.00 vs 9.9); unsloth none: its inventory (terms.py) is counted from its kernels and the
# H200 records' slopes, not scaled.
ACTIVATION_SCALE = {"hf": 0.958, "hf-upcast": 1.0, "unsloth": 1.0}

# MLP-wide gradients alive at once in one layer's backward (besides the hidden-wide ones).
# hf 1: the checkpointed Llama-3.1-8B configs of the H100 matrix (peak grows 0.477 MiB per token:
# checkpoints 0.25 + one layer 0.18 + temporaries 0.043); hf-upcast 3, anchors.md row 1 (a bare
# script, fp32 MLP). Unsloth: its fused LoRA MLP (unsloth/kernels/fast_lora.py LoRA_MLP, used when
# gate, up and down all carry adapters) computes DW = dY @ down^T and writes h, df, de over DW, e
# and g (swiglu_DWf_DW_dfg_kernel; Inductor reuses the buffers when the block is compiled): one
# more MLP-wide tensor besides e and g. The stock MLP (attention-only targets, or FastModel) keeps
# gate, act(gate) and up and builds the product's gradient and two more: 2. MEASURED: attention-only
# records peak 4.2-4.6 bytes per token per MLP unit above all-linear ones (Llama-3.2-3B, Qwen2.5-7B).
BACKWARD_MLP_GRADIENTS = {"hf": 1, "hf-upcast": 3, "unsloth": 1, "unsloth-unfused": 2}

# Caching-allocator slack (peak reserved - peak allocated).
# hf: the tensors a step keeps (each layer's input, and with no checkpointing everything a layer
# saves) are carved out of blocks that held the previous layer's temporaries, so the split
# remainders pile up with the number of kept layer inputs. Slack = a share of L x T x h x bytes,
# plus, without checkpointing, a share of one FFN-wide tensor per layer that builds an attention
# mask (the mask's transients are sized unlike anything else in the layer). FITTED (fit_constants.py,
# against peak reserved once ACTIVATION_SCALE is fitted against peak allocated) on the 89 hf records
# of bench/results: the H100 matrix of 2026-11-23 (Llama-3.2-1B, Llama-3.1-8B, Gemma-3-12B, default
# allocator) and the H200 matrices of 2026-12-04 and 2026-12-05 (nine architectures, expandable
# segments). Refitted 2026-12-05 once terms.py counted Liger's q/k norms (bf16 input, not fp32) and
# no copy for K/V repeated from one head, and again with HF_LIGER_DEFAULT_SLACK_SHARE and the 14
# H100 records with Liger and the default allocator (103 hf records): worst -4.6% in the fit,
# 4.8% held out by architecture (Gemma-3-12B; 5.6% and 9.1% before).
HF_SLACK_PER_KEPT_INPUT = 0.63
HF_SLACK_PER_MASKED_LAYER_NO_GC = 0.64
# With expandable segments (the engine's default, engine/allocator.py) the allocator grows one
# mapping instead of splitting cached blocks, and the slack above shrinks to this share of itself.
# FITTED with the above: the 13 H200 records and the two Llama-3.1-8B engine-stacks records of the
# H100 (0.174 and 0.161 GiB reserved - allocated, against 0.86 without expandable segments).
HF_EXPANDABLE_SLACK_SHARE = 0.19
# With Liger's kernels and the default allocator (a user's PYTORCH_ALLOC_CONF wins over the
# engine's expandable segments; WSL has none) the slack is this share of the Liger-less one: the
# fused norms and SwiGLU leave fewer odd-sized temporaries to split blocks around. MEASURED on
# Gemma-3-1B and -4B (H100, 2026-12-05: 0.07-0.43 GiB reserved - allocated, where the share of 1
# predicted up to 2.1) and FITTED with the above: 0.42.
HF_LIGER_DEFAULT_SLACK_SHARE = 0.42
# hf-upcast and unsloth = base + fraction x the bytes churned at the peak (one layer's saved
# tensors, temporaries and dequantized weights, or the loss tiles). FITTED: hf-upcast to
# anchors.md row 1 (15.81 reserved), one row; unsloth (which runs with expandable segments) to its
# 20 padding-free records (H100 and H200) against peak reserved, once UNSLOTH_DEQUANTIZED_WEIGHTS
# and UNSLOTH_TOKEN_BYTES are fitted against peak allocated: 0.04-0.34 GiB measured. Unsloth
# refitted 2026-12-05 on 35 records (with Gemma-3-4B and Phi-4), then on 39 (four Gemma-3-1B),
# then on 45 (ten Gemma-3-1B, padding-free rows as one sequence, the generic path's stock layer),
# then on 99 (2026-12-06, the H100 speed tables), and once more when the loss and optimizer phases
# counted Unsloth's global dequantization buffer (terms.unsloth_kept_buffers).
ALLOCATOR_SLACK_BASE_GIB = {"hf-upcast": 0.0, "unsloth": 0.0781}
ALLOCATOR_SLACK_FRACTION = {"hf-upcast": 0.07, "unsloth": 0.0446}

# Vocabulary-sized gradient buffers (the fp32 grad of a trained lm_head and its bf16 copy, built
# once per micro-step) do not fit in the split blocks the allocator has cached by then, so reserved
# memory holds them a second time. Source: anchors.md "RTX 4060" row, modules_to_save
# [embed_tokens, lm_head]: 16.0 GiB allocated, 19.2 reserved; 3.2 GiB ~ 2.94 GiB of such buffers.
LARGE_BUFFER_RESERVED_COPIES = 1.0

# ---------------------------------------------------------------------------------------------
# Speed of a layout, where no speed model covers the card (estimate.RecomputeRule)
# ---------------------------------------------------------------------------------------------

# Each figure below is a step time divided by bare Unsloth's in the same call (speeds compare within
# a call: the same 1 x 4 layout ran 1.417 s in one and 1.302 s in another), Llama-3.1-8B seed
# recipe, Unsloth, rows of 4096 tokens, H100, 2026-12-05.
#
# A checkpointed layer runs its forward a second time in the backward: the step's cost grows by
# this share for every layer recomputed, linearly. MEASURED (bench/results/split-llama-3.1-8b-
# h100-2026-12-05.json): 2 x 2 with 17 of 32 layers checkpointed 0.873 of bare, with none 0.717
# (17 layers: +21.7%, 0.41 for the whole model); bare Unsloth itself, every layer checkpointed
# (its own offloaded checkpointing, as the engine's Unsloth backend runs it), is +39.4% on none.
RECOMPUTE_SHARE = 0.39

# A step's cost by tokens per micro-batch (micro_batch x seq_len), relative to passes of 16384 or
# more: each pass dequantizes every 4-bit weight and launches every kernel whatever its size, and
# short passes keep the matmuls' tiles less busy. MEASURED, no layer recomputed, the same 4 rows
# a step: 4 x 1 0.703 of bare and 2 x 2 0.717 (split file above): 1.021; 1 x 4 0.825 and 0.764 in
# two calls (bench/results/stacks-llama-3.1-8b-24gb-1x4-h100-2026-12-05.json, split-24gb-llama-
# 3.1-8b-h100-2026-12-05.json): 1.17 and 1.09, 1.13 their mean. Between the points the cost is
# read on a log scale; passes under 4096 tokens are not measured, so the rule does not take them.
PASS_COST = {4096: 1.13, 8192: 1.021, 16384: 1.0}

# ---------------------------------------------------------------------------------------------
# Verdict
# ---------------------------------------------------------------------------------------------

# "tight" when the headroom is under this share of the GPU's memory. The model aims at 5% of the
# measured peak (the replay test's bound); 6% of the budget covers that error plus a desktop
# session's few hundred MB on a consumer card.
TIGHT_FRACTION = 0.06

# The expected relative error of an estimate's device total, per backend: the 90th percentile of
# |leave-one-architecture-out error| over the measured records (fit_constants.error_band, printed
# by bench/memory_table.py; tests/engine/test_memory_calibration.py recomputes it). `qlc estimate`
# shows it next to the verdict ("22.3 GB ± 0.5"). hf-upcast has no held-out measurement (one
# architecture): it takes hf's band.
ERROR_BAND = {"hf": 0.030, "hf-upcast": 0.030, "unsloth": 0.039}
