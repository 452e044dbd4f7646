"""The Unsloth backend: FastLanguageModel's 4-bit load, fused kernels and LoRA, with our trainer.

Imported only in the engine child and only when this backend trains (engine.train.backends.
choose_backend): `import unsloth` patches transformers, peft and TRL as it loads, so `preload()`
runs before anything else imports them. The trainer, callbacks, data and checkpoints are the
same as the hf backend's (TRL's SFTTrainer, which Unsloth patches in place); what differs is the
model: Unsloth's loader, its fused RMSNorm / RoPE / SwiGLU / LoRA kernels, its chunked fused loss,
and its offloaded gradient checkpointing.

Checkpointing: Unsloth's own `checkpoint_skip_layers` keeps the activations of as many layers as
the memory budget allows (engine.train.backends.checkpointing decides how many); the checkpointed ones
use Unsloth's offloaded mode, as a bare Unsloth script does.
"""

from __future__ import annotations

from typing import Any

from engine.config import RunConfig
from engine.errors import UserError
from engine.train.backends.checkpointing import CheckpointPlan


def preload() -> None:
    """Import unsloth first, as it requires, so its patches reach transformers, peft and TRL."""
    import os

    os.environ.setdefault("UNSLOTH_DISABLE_STATISTICS", "1")  # no network calls from a training box
    import unsloth  # noqa: F401


def gc_mode(plan: CheckpointPlan) -> bool | str:
    return "unsloth" if plan.enabled else False


def load_model(cfg: RunConfig, path: str, checkpointing: CheckpointPlan) -> Any:
    from unsloth import FastLanguageModel

    from engine.train.backends.hf import torch_dtype

    q = cfg.quant
    try:
        model, _tokenizer = FastLanguageModel.from_pretrained(
            model_name=path,
            max_seq_length=cfg.train.seq_len,
            dtype=torch_dtype(q.compute_dtype),
            load_in_4bit=q.load_in_4bit,
            revision=cfg.model.revision,
            trust_remote_code=cfg.model.trust_remote_code,
            use_gradient_checkpointing=gc_mode(checkpointing),
            random_state=cfg.train.seed,
        )
    except OSError as exc:
        raise UserError(
            f"model.name_or_path: cannot load {path!r}: {str(exc).splitlines()[0]}",
            "check the hub id or local path (and your network / HF token for gated models)",
        ) from None
    model.config.use_cache = False
    return model


def apply_lora(model: Any, cfg: RunConfig, checkpointing: CheckpointPlan) -> Any:
    from unsloth import FastLanguageModel

    lo = cfg.lora
    kept = checkpointing.layers - checkpointing.checkpointed if checkpointing.partial else 0
    return FastLanguageModel.get_peft_model(
        model,
        r=lo.r,
        lora_alpha=lo.alpha,
        lora_dropout=lo.dropout,
        target_modules=list(lo.target_modules),
        modules_to_save=list(lo.modules_to_save) or None,
        bias="none",
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
