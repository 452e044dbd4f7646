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

__all__ = [
    "CheckpointPlan",
    "checkpointed_now",
    "count_layers",
    "decoder_layers",
    "keep_last_layers",
    "layers_prefix",
    "text_decoder",
]


def base_model(model: Any) -> Any:
    """The model under peft's wrapper (or `model` itself, not wrapped): where module names are the
    ones peft matches its targets against."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def text_decoder(model: Any) -> Any:
    """The text decoder of `model` (peft-wrapped or not): transformers' get_decoder(), which for a
    multimodal Gemma 3 is its language model, not the SigLIP vision tower beside it (whose encoder
    layers are checkpointable too, and come first in module order)."""
    base = base_model(model)
    get = getattr(base, "get_decoder", None)
    decoder = get() if callable(get) else None
    return decoder if decoder is not None else base


def decoder_layers(model: Any) -> tuple[Any, list[Any]]:
    """(the module that owns the text decoder's layer stack, its layers): the ModuleList of
    checkpointable layers inside the text decoder."""
    owner, _name, layers = _layer_stack(model)
    return owner, layers


def layers_prefix(model: Any) -> str:
    """The qualified name of the text decoder's layer list, as peft names modules under the base
    model (Gemma 3: model.language_model.layers; Llama: model.layers)."""
    return _layer_stack(model)[1]


def _layer_stack(model: Any) -> tuple[Any, str, list[Any]]:
    import torch

    def checkpointable(child: Any) -> bool:
        return (
            isinstance(child, torch.nn.ModuleList)
            and len(child) > 0
            and all(hasattr(layer, "gradient_checkpointing") for layer in child)
        )

    base = base_model(model)
    inside = {id(m) for m in text_decoder(model).modules()}
    # Walk the base model's own names (those peft matches targets against), and take the layer
    # list inside the text decoder; any other checkpointable list in the base model is second
    # choice, for a decoder that get_decoder() returns from outside the base model's tree.
    other: tuple[Any, str, list[Any]] | None = None
    for name, module in base.named_modules():
        for child_name, child in module.named_children():
            if not checkpointable(child):
                continue
            found = (module, f"{name}.{child_name}" if name else child_name, list(child))
            if id(child) in inside:
                return found
            other = other or found
    if other is not None:
        return other
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
