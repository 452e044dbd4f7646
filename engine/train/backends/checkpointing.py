"""Gradient checkpointing on only as many decoder layers as the memory budget needs.

Checkpointing a layer throws away its activations in the forward and recomputes them in the
backward: about a third more work for that layer. `train.gradient_checkpointing: auto` asks the
memory model (engine.memory.choose_checkpointing) for the fewest layers whose estimate still fits
the GPU's budget; true, false or a number fix it. The first k layers are checkpointed and the last
ones keep their activations: backward reaches the kept layers first and frees them before it
recomputes any checkpointed one, so the two never peak together.

transformers' decoder layers (GradientCheckpointingLayer) decide per call from their own
`gradient_checkpointing` flag, and `gradient_checkpointing_enable()` (which the Trainer and Unsloth
call again at train time) sets it on every layer. A forward pre-hook on the layer stack's owner
turns it back off for the kept layers right before each forward, whoever enabled it last.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from engine.config import RunConfig


@dataclass(frozen=True)
class CheckpointPlan:
    layers: int  # decoder layers in the model
    checkpointed: int  # the first `checkpointed` layers recompute their activations
    reason: str

    @property
    def enabled(self) -> bool:
        return self.checkpointed > 0

    @property
    def partial(self) -> bool:
        return 0 < self.checkpointed < self.layers


def plan_checkpointing(cfg: RunConfig, backend: str, device: str, layers: int) -> CheckpointPlan:
    """How many layers to checkpoint for this run, and why (shown in the run's events)."""
    gc = cfg.train.gradient_checkpointing
    if gc is True or gc is False:
        n = layers if gc else 0
        return CheckpointPlan(layers, n, f"train.gradient_checkpointing is {str(gc).lower()}")
    if isinstance(gc, int):
        n = max(0, min(gc, layers))
        return CheckpointPlan(layers, n, f"train.gradient_checkpointing is {gc}")
    if device != "cuda":
        # Host memory is not what the budget models; the safe choice costs only speed on a CPU.
        return CheckpointPlan(layers, layers, "auto on the CPU: every layer (the budget models GPU memory)")
    try:
        from engine import memory

        budget, where = run_budget_gb(cfg.hardware.gpu)
        arch = memory.resolve_architecture(cfg)
        n, why = memory.choose_checkpointing(cfg, arch, backend, budget)
    except Exception as exc:  # no architecture, no NVML: never stop a run over it
        return CheckpointPlan(layers, layers, f"auto: every layer (no memory estimate: {exc})")
    if arch.layers != layers:
        why = f"auto: every layer ({arch.name} has {arch.layers} layers, the model {layers})"
        return CheckpointPlan(layers, layers, why)
    return CheckpointPlan(layers, n, f"{why}; {where}")


def run_budget_gb(spec: str) -> tuple[float, str]:
    """The memory a run may use: the free memory of the GPU in use, capped by hardware.gpu when
    that names a card or a size (a preset for a 24 GB card stays within 24 GB on a bigger one)."""
    from engine import memory

    present = memory.resolve_gpu("auto")
    if str(spec).strip().lower() == "auto":
        return present.budget_gb, f"budget: {present}"
    named = memory.resolve_gpu(spec)
    if named.budget_gb < present.budget_gb:
        return named.budget_gb, f"budget: {named} (hardware.gpu) on {present}"
    return present.budget_gb, f"budget: {present} (less than hardware.gpu {named})"


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
