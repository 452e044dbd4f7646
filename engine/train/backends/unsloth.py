"""The Unsloth backend: Unsloth's 4-bit load, fused kernels and LoRA, with our trainer.

Imported only in the engine child and only when this backend trains (engine.train.backends.get):
`import unsloth` patches transformers, peft and TRL as it loads, so `prepare()` runs before
anything else imports them. The trainer, callbacks, data and checkpoints are the
same as the hf backend's (TRL's SFTTrainer, which Unsloth patches in place); what differs is the
model: Unsloth's loader, its fused RMSNorm / RoPE / SwiGLU / LoRA kernels, its chunked fused loss,
and its offloaded gradient checkpointing.

The weights asked for, exactly (read from unsloth 2026.10.9, models/loader.py):
- `use_exact_model_name=True`: without it `get_model_name` remaps hub ids to Unsloth's own
  uploads (Meta's Llama 3.1 8B Instruct, Google's Gemma 3 ids, ...) and drops a pinned revision
  when it does (`_revision_for_resolved_repo`). Only that block honours the flag: on a GPU where
  bitsandbytes is unusable Unsloth still loads 16-bit, so that is refused before loading here.
- `quantization_config`: Unsloth otherwise builds its own BitsAndBytesConfig with NF4 and double
  quant hard-coded (models/llama.py); a caller's "stays authoritative". The engine passes the one
  the hf backend builds from `quant.*` (engine.models.quantization), so both train the same weights.
- `attn_implementation` is passed; Unsloth's multimodal loader honours it, its fast Llama-family
  path runs its own attention kernels and drops it (reported in the events).
After loading, the model's config names the repo it came from: anything but the one asked for is
an error, never a silent substitute.

Multimodal checkpoints (Gemma 3 4B/12B/27B) load through `FastModel`, Unsloth's multimodal loader,
as its own Gemma 3 notebooks do (FastLanguageModel hands them to it anyway), whole, the vision tower
quantized like the rest (engine.models.quantization says why) and frozen, the adapters only on the
text decoder (base.lora_targets): the same modules, names and memory as the hf backend.

Checkpointing: Unsloth's own `checkpoint_skip_layers` keeps the activations of as many layers as
the memory budget allows (engine.train.backends.checkpointing decides how many); the checkpointed ones
use Unsloth's offloaded mode, as a bare Unsloth script does.
"""

from __future__ import annotations

import os
from typing import Any

from engine.config import RunConfig
from engine.errors import UserError
from engine.models import quantization
from engine.models.loading import model_config, torch_dtype
from engine.run.distributed import Ranks
from engine.train.backends.base import Backend, has_vision_tower, lora_settings
from engine.train.backends.checkpointing import CheckpointPlan

WHERE = "model.name_or_path"


def preload() -> None:
    """Import unsloth first, as it requires, so its patches reach transformers, peft and TRL."""
    import os

    os.environ.setdefault("UNSLOTH_DISABLE_STATISTICS", "1")  # no network calls from a training box
    import unsloth  # noqa: F401


def gc_mode(plan: CheckpointPlan) -> bool | str:
    return "unsloth" if plan.enabled else False


def check_quantization(cfg: RunConfig, ckpt: quantization.Quantization | None) -> None:
    """Refuse, before loading, what this Unsloth cannot honour."""
    quantization.check_request(cfg, ckpt, "unsloth")
    q = cfg.quant
    if q.storage not in ("auto", "uint8") and ckpt is None:
        raise UserError(
            f"quant.storage: {q.storage} is for FSDP, which the Unsloth backend does not run "
            "(it trains on one GPU, with its 4-bit weights stored as uint8)",
            "set quant.storage=auto, or hardware.backend=hf",
        )
    if q.load_in_4bit or ckpt is not None:
        from unsloth.device_type import ALLOW_BITSANDBYTES

        if not ALLOW_BITSANDBYTES:
            raise UserError(
                "quant.load_in_4bit: Unsloth finds bitsandbytes unusable on this machine and would load "
                "the model in 16-bit instead",
                "set hardware.backend=hf, or quant.load_in_4bit=false to train a 16-bit base",
            )


def load_model(cfg: RunConfig, path: str, device: str, checkpointing: CheckpointPlan) -> Any:
    from transformers import BitsAndBytesConfig
    from unsloth import FastLanguageModel, FastModel

    from engine.models.loading import with_compute_dtype

    cfg, _why = with_compute_dtype(cfg, device)
    compute = cfg.quant.compute_dtype
    config = model_config(path, cfg)
    ckpt = quantization.of_config(config)
    check_quantization(cfg, ckpt)
    multimodal = quantization.is_multimodal(config)
    asked = quantization.requested(cfg.quant, compute)
    kwargs: dict[str, Any] = {}
    if asked is not None and ckpt is None:
        kwargs["quantization_config"] = BitsAndBytesConfig(**quantization.bnb_kwargs(asked, torch_dtype))
    loader = FastModel if multimodal else FastLanguageModel
    try:
        model, _tokenizer = loader.from_pretrained(
            model_name=path,
            use_exact_model_name=True,
            revision=cfg.model.revision,
            max_seq_length=cfg.train.seq_len,
            dtype=torch_dtype(compute),
            load_in_4bit=ckpt is not None or asked is not None,
            attn_implementation=cfg.model.attn_implementation,
            trust_remote_code=cfg.model.trust_remote_code,
            use_gradient_checkpointing=gc_mode(checkpointing),
            random_state=cfg.train.seed,
            **kwargs,
        )
    except OSError as exc:
        raise UserError(
            f"{WHERE}: cannot load {path!r}: {str(exc).splitlines()[0]}",
            "check the hub id or local path (and your network / HF token for gated models)",
        ) from None
    loaded = str(getattr(model.config, "_name_or_path", "") or "")
    if loaded and _normal(loaded) != _normal(path):
        raise RuntimeError(f"Unsloth loaded {loaded!r} where {path!r} was asked for")
    model.config.use_cache = False
    return model


def _normal(name: str) -> str:
    import os

    return os.path.normpath(os.path.expanduser(name)) if os.path.isabs(os.path.expanduser(name)) else name


def attention_in_use(model: Any, cfg: RunConfig) -> str:
    """What attention the loaded model runs, for the events."""
    if has_vision_tower(model):
        used = getattr(model.config, "_attn_implementation", None) or cfg.model.attn_implementation
        return f"attention: {used}"
    return (
        "attention: Unsloth's own kernels (its fast path for this family does not take "
        f"model.attn_implementation={cfg.model.attn_implementation})"
    )


def apply_lora(model: Any, cfg: RunConfig, checkpointing: CheckpointPlan) -> Any:
    from unsloth import FastLanguageModel, FastModel

    kept = checkpointing.layers - checkpointing.checkpointed if checkpointing.partial else 0
    loader = FastModel if has_vision_tower(model) else FastLanguageModel
    return loader.get_peft_model(
        model,
        **lora_settings(cfg, model),
        use_gradient_checkpointing=gc_mode(checkpointing),
        random_state=cfg.train.seed,
        max_seq_length=cfg.train.seq_len,
        checkpoint_skip_layers=kept,
    )


def allow_padding_free(model: Any) -> bool:
    """Let `model` take the one-row padding-free micro-batches (engine.data.collate), as Unsloth's
    own trainer does when it enables them: a row of several examples may be longer than
    max_seq_length. False where this Unsloth lacks its packing support (unsloth.utils.packing):
    its attention could not keep the examples of a row apart, so the engine pads instead."""
    try:
        from unsloth.utils.packing import get_packed_info_from_kwargs, mark_allow_overlength
    except ImportError:
        return False
    del get_packed_info_from_kwargs  # only its presence matters: the attention reads the lengths
    mark_allow_overlength(model)
    return True


# Unsloth's cuDNN length padding as it was before a run turned it off (exact_length_attention).
_SHIPPED_BUCKET: int | None = None


def exact_length_attention(length: int | None) -> str | None:
    """Unsloth pads every cuDNN attention call to the next multiple of 128 rows past its length
    (`UNSLOTH_SDPA_CUDNN_BUCKET`): cuDNN builds a plan for each new length (about 170 ms on an
    H100), and padded batches change length every step. It pads a length that is already a
    multiple too, by a whole 128 rows (4,096-token rows attend as 4,224), into padded copies of Q,
    K and V whose gradients are sliced back. Where every sequence of the run (`length`) has one
    length there is one plan either way, and the padding only costs: it is turned off for the run.
    On an H100, the seed recipe's 80 GB step (4 x 1 rows of 4,096, none checkpointed) took 1,177
    ms instead of 1,217 (bench/results/step-kernels-llama-3.1-8b-unsloth-4x1-bucket*.json).
    It stays off for the rest of the run, sampling included: a prompt of a new length then builds
    its own plan (its prefill; decoding runs without cuDNN on these cards). `length` None puts back
    what Unsloth shipped; an explicit `UNSLOTH_SDPA_CUDNN_BUCKET` is left as set. A note for the
    run's log when it changed."""
    global _SHIPPED_BUCKET
    try:
        from unsloth.utils import attention_dispatch as dispatch
    except ImportError:
        return None
    bucket = getattr(dispatch, "_CUDNN_LENGTH_BUCKET", None)
    if not isinstance(bucket, int):
        return None  # an Unsloth without this padding
    if length is None:
        if _SHIPPED_BUCKET is not None:
            dispatch._CUDNN_LENGTH_BUCKET, _SHIPPED_BUCKET = _SHIPPED_BUCKET, None
        return None
    if not bucket or "UNSLOTH_SDPA_CUDNN_BUCKET" in os.environ:
        return None  # off already, or set by the user: theirs to choose
    _SHIPPED_BUCKET, dispatch._CUDNN_LENGTH_BUCKET = bucket, 0
    return (
        f"attention: every sequence is {length} tokens, so cuDNN attention runs at that length "
        f"(Unsloth's padding to a multiple of {bucket} rows is off for this run)"
    )


# The MLP projections of Unsloth's fast families: with adapters on none of them it runs them as
# plain 4-bit layers, outside its fused LoRA MLP.
_MLP = frozenset({"gate_proj", "up_proj", "down_proj"})


def _mlp_adapted(model: Any) -> bool:
    """Whether the adapters reach the MLP (peft's target modules)."""
    configs = getattr(model, "peft_config", None) or {}
    targets = getattr(next(iter(configs.values()), None), "target_modules", None)
    return isinstance(targets, (set, list, tuple, frozenset)) and bool(_MLP & set(targets))


def even_rows(collator: Any, model: Any, length: int | None) -> str | None:
    """Where every example of the run has one `length` and the model runs Unsloth's own attention
    (its fast Llama-family path), micro-batches go as rows of that length instead of one
    padding-free row (engine.data.collate.PadCollator.even_rows): no padding either way, and the
    attention makes one batched call. In the one row, Unsloth slices each example out as a view
    (`_sdpa_packed_segments`) and concatenates the outputs; the views' backward copies every Q, K
    and V gradient into a zeroed full-size tensor. On the seed recipe's 80 GB step (H100) those
    copies, fills and the concatenation took 14.5 ms of a 1,177 ms step
    (bench/results/step-kernels-llama-3.1-8b-unsloth-4x1-bucket0-h100-2026-12-06.json).
    The generic path (FastModel: Gemma 3, ...) keeps the row its memory estimate describes, and so
    does a run that checkpoints any layer (the backend's fit_to_data): with every layer
    checkpointed, even rows raised the peak of Llama-3.2-3B and Qwen2.5-7B at 8,192-16,384 tokens a
    micro-batch by 0.2-1.3 GiB (4-15%, bench/results/memory-calibration-matrix-h100-2026-12-06-
    recheck.json; not traced further: in that form Inductor compiles more of each block, 1,730
    Triton kernels a step against 258 on the 8B), where without checkpointing it lowered every
    peak measured. Runs whose adapters leave the MLP alone keep the one row too: there even rows
    lowered Qwen2.5-7B's peak by a quarter (40.4 to 30.4 GiB, r16 on q/k/v/o, 4 x 2048, none
    checkpointed), which the memory model does not explain, so it would estimate 32% over. A
    note for the run's log when it changed."""
    from engine.memory.constants import UNSLOTH_FAST_FAMILIES

    config = getattr(model, "config", None)
    fast = getattr(config, "model_type", None) in UNSLOTH_FAST_FAMILIES and not has_vision_tower(model)
    if length is None or not fast or not collator.padding_free or collator.packed or not _mlp_adapted(model):
        return None
    collator.even_rows = True
    return (
        f"rows: every example is {length} tokens, so a micro-batch goes as rows of {length} "
        "(one batched attention call, not one view per example)"
    )


class UnslothBackend(Backend):
    name = "unsloth"
    KERNELS = "unsloth: fused RMSNorm, RoPE, SwiGLU, LoRA, cross-entropy"

    def prepare(self) -> None:
        preload()

    def load_model(self, cfg: RunConfig, path: str, device: str, plan: CheckpointPlan, ranks: Ranks) -> Any:
        return load_model(cfg, path, device, plan)

    def apply_kernels(self, model: Any, cfg: RunConfig, device: str) -> list[str]:
        # Loaded with them: Unsloth patches the model's classes as it loads.
        return [self.KERNELS, attention_in_use(model, cfg)]

    def apply_lora(self, model: Any, cfg: RunConfig, plan: CheckpointPlan, ranks: Ranks) -> Any:
        return apply_lora(model, cfg, plan)

    def fuse_lora(self, model: Any) -> list[str]:
        # QLC_LEAN_LORA=0 keeps Unsloth's own Functions, =eager runs the lean ones outside the
        # compiled blocks: for side-by-side timings (bench/) and as a way out should a new Unsloth
        # change what lean_lora relies on.
        mode = os.environ.get("QLC_LEAN_LORA", "1")
        if mode == "0":
            return ["kernels: Unsloth's own LoRA products (QLC_LEAN_LORA=0)"]
        from engine.train.backends import lean_lora

        note = lean_lora.install(model, eager=mode == "eager")
        return [note] if note else []

    def padding_free_rows(self, model: Any) -> bool:
        return self.stack.padding_free and allow_padding_free(model)

    def trainer_checkpointing(self, plan: CheckpointPlan) -> bool:
        return False  # set up by Unsloth itself (offloaded), as a bare Unsloth script does

    def fit_to_data(self, data: Any, model: Any, plan: CheckpointPlan) -> list[str]:
        from engine.data.pipeline import one_segment_length

        length = one_segment_length(data.train, data.eval)
        rows = even_rows(data.collator, model, length) if not plan.enabled else None
        notes = [exact_length_attention(length), rows]
        return [note for note in notes if note]


BACKEND = UnslothBackend()
