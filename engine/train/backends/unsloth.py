"""The Unsloth backend: FastLanguageModel's 4-bit load, fused kernels and LoRA, with our trainer.

Imported only in the engine child and only when this backend trains (engine.train.backends.get):
`import unsloth` patches transformers, peft and TRL as it loads, so `prepare()` runs before
anything else imports them. The trainer, callbacks, data and checkpoints are the
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
from engine.models.loading import torch_dtype
from engine.run.distributed import Ranks
from engine.train.backends.base import Backend, lora_settings
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

    kept = checkpointing.layers - checkpointing.checkpointed if checkpointing.partial else 0
    return FastLanguageModel.get_peft_model(
        model,
        **lora_settings(cfg),
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


class UnslothBackend(Backend):
    name = "unsloth"
    KERNELS = "unsloth: fused RMSNorm, RoPE, SwiGLU, LoRA, cross-entropy"

    def prepare(self) -> None:
        preload()

    def load_model(self, cfg: RunConfig, path: str, device: str, plan: CheckpointPlan, ranks: Ranks) -> Any:
        return load_model(cfg, path, plan)

    def apply_kernels(self, model: Any, cfg: RunConfig, device: str) -> list[str]:
        return [self.KERNELS]  # loaded with them: Unsloth patches the model's classes as it loads

    def apply_lora(self, model: Any, cfg: RunConfig, plan: CheckpointPlan, ranks: Ranks) -> Any:
        return apply_lora(model, cfg, plan)

    def padding_free_rows(self, model: Any) -> bool:
        return self.stack.padding_free and allow_padding_free(model)

    def trainer_checkpointing(self, plan: CheckpointPlan) -> bool:
        return False  # set up by Unsloth itself (offloaded), as a bare Unsloth script does


BACKEND = UnslothBackend()
