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

import re
from pathlib import Path
from typing import Any

from engine import stacks
from engine.config import RunConfig
from engine.errors import UserError
from engine.memory.checkpointing import CheckpointPlan
from engine.run.distributed import Ranks


def lora_settings(cfg: RunConfig, model: Any = None) -> dict[str, Any]:
    """The adapters a run asks for, as keyword arguments both peft.LoraConfig and Unsloth's
    get_peft_model take: the one mapping from `lora.*` to the libraries. With `model`, the
    targets are checked against it and kept to its text decoder (lora_targets)."""
    lo = cfg.lora
    return {
        "r": lo.r,
        "lora_alpha": lo.alpha,
        "lora_dropout": lo.dropout,
        "target_modules": list(lo.target_modules) if model is None else lora_targets(model, cfg),
        "modules_to_save": list(lo.modules_to_save) or None,
        "bias": "none",
    }


def has_vision_tower(model: Any) -> bool:
    config = getattr(model, "config", None)
    return getattr(config, "vision_config", None) is not None


def lora_targets(model: Any, cfg: RunConfig) -> list[str] | str:
    """`lora.target_modules` as peft matches them in `model`: the module names as they are for a
    text model; for a multimodal one (Gemma 3 4B/12B/27B), a pattern that matches them only inside
    the text decoder's layers. A name alone would also put adapters on the SigLIP tower's q/k/v/out
    projections (81 on the 4B): they never train on text, and DDP fails on their unused gradients.
    A name the text decoder lacks is one clear error."""
    from engine.train.backends.checkpointing import base_model, layers_prefix

    wanted = list(cfg.lora.target_modules)
    prefix = layers_prefix(model)
    inside = prefix + "."
    # The prefix is a name in the base model: a model already wrapped by peft (Unsloth's
    # get_peft_model is asked again, to change only the checkpointing) names it further down.
    present = {n.rsplit(".", 1)[-1] for n, _ in base_model(model).named_modules() if n.startswith(inside)}
    missing = [m for m in wanted if m not in present]
    if missing:
        raise UserError(
            f"lora.target_modules: {', '.join(missing)} not found in this model's decoder layers",
            f"its linear layers include {', '.join(sorted(m for m in present if m.endswith('proj'))[:10])}",
        )
    if not has_vision_tower(model):
        return wanted
    names = "|".join(re.escape(m) for m in wanted)
    return rf"{re.escape(prefix)}\.\d+\.(?:.*\.)?(?:{names})"


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

    def fuse_lora(self, model: Any) -> list[str]:
        """After the adapters are in place and before the first forward: swap in faster Functions
        for the LoRA products where the stack has them; returns what was applied (for the events)."""
        return []

    def padding_free_rows(self, model: Any) -> bool:
        """Whether `model` trains on one padding-free row per micro-batch (engine.data.collate):
        where the stack does (engine.stacks) and the installed version can."""
        return False

    def trainer_checkpointing(self, plan: CheckpointPlan) -> bool:
        """Whether the Trainer (re)enables gradient checkpointing at train time."""
        return plan.enabled

    def fit_to_data(self, data: Any, model: Any, plan: CheckpointPlan) -> list[str]:
        """Settings the backend tunes to the prepared data (engine.data.pipeline.PreparedData,
        its collator included), the loaded model and its checkpointing before the trainer is
        built; what it changed, a line each, for the run's log."""
        return []

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
