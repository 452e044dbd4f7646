"""Gradient checkpointing on only as many decoder layers as the memory budget needs.

Checkpointing a layer throws away its activations in the forward and recomputes them in the
backward: about a third more work for that layer. `train.gradient_checkpointing: auto` asks the
memory model for the fewest layers whose estimate still fits the GPU's budget; true, false or a
number fix it. The plan is computed in engine.memory.checkpointing; this module applies it to the
model. The first k layers are checkpointed and the last ones keep their activations: backward reaches the kept layers first and frees them before it
recomputes any checkpointed one, so the two never peak together.

transformers' decoder layers (GradientCheckpointingLayer) decide per call from their own
`gradient_checkpointing` flag, and `gradient_checkpointing_enable()` (which the Trainer and Unsloth
call again at train time) sets it on every layer. A forward pre-hook on the layer stack's owner
turns it back off for the kept layers right before each forward, whoever enabled it last.
"""

from __future__ import annotations

from typing import Any

from engine.memory.checkpointing import CheckpointPlan

__all__ = ["CheckpointPlan", "checkpointed_now", "count_layers", "decoder_layers", "keep_last_layers"]


def decoder_layers(model: Any) -> tuple[Any, list[Any]]:
    """(the module that owns the decoder stack, its layers): the ModuleList of checkpointable layers."""
    import torch

    for module in model.modules():
        for child in module.children():
            if (
                isinstance(child, torch.nn.ModuleList)
                and len(child) > 0
                and all(hasattr(layer, "gradient_checkpointing") for layer in child)
            ):
                return module, list(child)
    raise RuntimeError("no decoder layers with gradient checkpointing support found in this model")


def count_layers(model: Any) -> int:
    return len(decoder_layers(model)[1])


def keep_last_layers(model: Any, plan: CheckpointPlan) -> None:
    """Leave only the first `plan.checkpointed` layers checkpointed, on every forward from now on."""
    if not plan.partial:
        return
    owner, layers = decoder_layers(model)
    kept = layers[plan.checkpointed :]

    def _uncheckpoint(_module: Any, _args: Any) -> None:
        for layer in kept:
            layer.gradient_checkpointing = False

    owner.register_forward_pre_hook(_uncheckpoint)


def checkpointed_now(model: Any) -> int:
    """Layers whose flag is on (for tests: read right after a forward)."""
    return sum(bool(layer.gradient_checkpointing) for layer in decoder_layers(model)[1])
