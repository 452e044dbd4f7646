"""What a training backend is: the protocol every stack implements, and what they share.

A backend builds the model for one stack (engine.stacks): it loads the base (4-bit), applies its
kernels, wraps the model with LoRA, and builds the trainer. The recipe (engine.train.recipe) calls
these steps in this order and nothing else about the stack: it never branches on a backend's name.
What the memory model and the config need to know about a stack is not here but in
engine.stacks (pure Python); a backend names its entry there (`name`).

Adding a backend is one new file in this folder that defines `BACKEND`, plus its entry in
engine.stacks.STACKS (docs/backends.md).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from engine import stacks
from engine.config import RunConfig
from engine.memory.checkpointing import CheckpointPlan
from engine.run.distributed import Ranks


def lora_settings(cfg: RunConfig) -> dict[str, Any]:
    """The adapters a run asks for, as keyword arguments both peft.LoraConfig and Unsloth's
    get_peft_model take: the one mapping from `lora.*` to the libraries."""
    lo = cfg.lora
    return {
        "r": lo.r,
        "lora_alpha": lo.alpha,
        "lora_dropout": lo.dropout,
        "target_modules": list(lo.target_modules),
        "modules_to_save": list(lo.modules_to_save) or None,
        "bias": "none",
    }


class Backend:
    """One training stack. Subclasses implement `load_model` and `apply_lora`; the rest has
    defaults that fit a stack built on transformers' Trainer."""

    name: str = ""  # its key in engine.stacks.STACKS

    @property
    def stack(self) -> stacks.Stack:
        return stacks.STACKS[self.name]

    def prepare(self) -> None:
        """Runs first, before anything imports transformers, peft or TRL (Unsloth patches them)."""

    def load_model(self, cfg: RunConfig, path: str, device: str, plan: CheckpointPlan, ranks: Ranks) -> Any:
        """The base model, quantized as the config says, on this rank's device."""
        raise NotImplementedError

    def apply_kernels(self, model: Any, cfg: RunConfig, device: str) -> list[str]:
        """Patch the loaded model with faster kernels; returns what was applied (for the events)."""
        return []

    def apply_lora(self, model: Any, cfg: RunConfig, plan: CheckpointPlan, ranks: Ranks) -> Any:
        """The model wrapped with the adapters of `lora_settings(cfg)`, checkpointed as `plan` says."""
        raise NotImplementedError

    def padding_free_rows(self, model: Any) -> bool:
        """Whether `model` trains on one padding-free row per micro-batch (engine.data.collate):
        where the stack does (engine.stacks) and the installed version can."""
        return False

    def trainer_checkpointing(self, plan: CheckpointPlan) -> bool:
        """Whether the Trainer (re)enables gradient checkpointing at train time."""
        return plan.enabled

    def build_trainer(
        self,
        model: Any,
        tokenizer: Any,
        cfg: RunConfig,
        data: Any,
        output_dir: Path,
        device: str,
        callbacks: list[Any],
        plan: CheckpointPlan,
        ranks: Ranks,
    ) -> Any:
        from engine.train.backends.trainer import build_trainer

        return build_trainer(
            model,
            tokenizer,
            cfg,
            data,
            output_dir,
            device,
            callbacks,
            trainer_checkpointing=self.trainer_checkpointing(plan),
            ranks=ranks,
        )
