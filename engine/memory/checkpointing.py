"""How many decoder layers a run checkpoints: the plan the engine computes here, before the
weights load, and hands to its backend (engine.train.backends), which applies it to the model.

`train.gradient_checkpointing: auto` asks the estimate (choose_checkpointing) for the fewest layers
whose peak still fits the GPU's budget; true, false or a number fix it. Pure Python: the budget is
the free memory NVML reports, capped by hardware.gpu.
"""

from __future__ import annotations

from dataclasses import dataclass

from engine.config import RunConfig
from engine.memory.architectures import resolve_architecture
from engine.memory.estimate import choose_checkpointing
from engine.memory.gpus import resolve_gpu


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
        budget, where = run_budget_gb(cfg.hardware.gpu)
        arch = resolve_architecture(cfg)
        # The card in use sets the CUDA context and workspaces the budget has to leave room for.
        n, why = choose_checkpointing(cfg, arch, backend, budget, device=resolve_gpu("auto").device)
    except Exception as exc:  # no architecture, no NVML: never stop a run over it
        return CheckpointPlan(layers, layers, f"auto: every layer (no memory estimate: {exc})")
    if arch.layers != layers:
        why = f"auto: every layer ({arch.name} has {arch.layers} layers, the model {layers})"
        return CheckpointPlan(layers, layers, why)
    return CheckpointPlan(layers, n, f"{why}; {where}")


def run_budget_gb(spec: str) -> tuple[float, str]:
    """The memory a run may use: the free memory of the GPU in use, capped by hardware.gpu when
    that names a card or a size (a preset for a 24 GB card stays within 24 GB on a bigger one)."""
    present = resolve_gpu("auto")
    if str(spec).strip().lower() == "auto":
        return present.budget_gb, f"budget: {present}"
    named = resolve_gpu(spec)
    if named.budget_gb < present.budget_gb:
        return named.budget_gb, f"budget: {named} (hardware.gpu) on {present}"
    return present.budget_gb, f"budget: {present} (less than hardware.gpu {named})"
