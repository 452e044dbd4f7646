"""How a run lays out its step, decided here before the weights load: how many decoder layers it
checkpoints (handed to its backend, engine.train.backends, which applies it to the model) and how
its rows per optimizer step split into micro-batches (handed to the trainer's arguments).

`train.gradient_checkpointing: auto` asks the estimate (choose_checkpointing) for the fewest layers
whose peak still fits the GPU's budget (with several processes, each GPU's share of the peak under
hardware.strategy, as `qlc estimate --gpus N` plans it); true, false or a number fix it.
`train.batch_split: auto` then asks it (choose_split) for the fewest micro-batches that still fit
without checkpointing.
With both auto, plan_layout then takes the split and checkpointing predicted fastest among those
that fit (estimate.fastest_layout): by a speed model for this GPU (engine.memory.speed), or where
there is none, for Unsloth on a 4-bit base, by the measured recompute rule.
Pure Python: the budget is the free memory NVML reports, capped by hardware.gpu.
"""

from __future__ import annotations

from dataclasses import dataclass

from engine.config import RunConfig
from engine.memory.architectures import resolve_architecture
from engine.memory.distributed import gpu_share
from engine.memory.estimate import choose_checkpointing, choose_split, fastest_layout, with_split
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


def plan_checkpointing(
    cfg: RunConfig, backend: str, device: str, layers: int, processes: int = 1
) -> CheckpointPlan:
    """How many layers to checkpoint for this run, and why (shown in the run's events). With
    several processes auto spends each GPU's budget on its share of the step under
    hardware.strategy, as `qlc estimate --gpus N` plans it (engine.memory.distributed)."""
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
        share = gpu_share(cfg.hardware.strategy, processes) if processes > 1 else None
        # The card in use sets the CUDA context and workspaces the budget has to leave room for.
        n, why = choose_checkpointing(
            cfg, arch, backend, budget, device=resolve_gpu("auto").device, share=share
        )
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


@dataclass(frozen=True)
class BatchSplit:
    """The rows of one optimizer step as micro_batch x grad_accum, and why."""

    micro_batch: int
    grad_accum: int
    reason: str  # "" where train.batch_split is fixed

    def changed(self, cfg: RunConfig) -> bool:
        return (self.micro_batch, self.grad_accum) != (cfg.train.micro_batch, cfg.train.grad_accum)

    def apply(self, cfg: RunConfig) -> RunConfig:
        return with_split(cfg, self.micro_batch, self.grad_accum)


def plan_split(
    cfg: RunConfig, backend: str, device: str, checkpointing: CheckpointPlan, processes: int = 1
) -> BatchSplit:
    """The micro-batch split for this run (train.batch_split), given its checkpointing plan."""
    t = cfg.train
    written = BatchSplit(t.micro_batch, t.grad_accum, "")
    if t.batch_split != "auto":
        return written
    if device != "cuda":
        # The budget models GPU memory; on a CPU the split stays as written.
        return BatchSplit(
            t.micro_batch, t.grad_accum, "auto on the CPU: as written (the budget models GPU memory)"
        )
    try:
        budget, _ = run_budget_gb(cfg.hardware.gpu)
        arch = resolve_architecture(cfg)
        mb, ga, why = choose_split(
            cfg,
            arch,
            backend,
            budget,
            checkpointing.checkpointed,
            device=resolve_gpu("auto").device,
            processes=processes,
        )
    except Exception as exc:  # no architecture, no NVML: never stop a run over it
        return BatchSplit(t.micro_batch, t.grad_accum, f"auto: as written (no memory estimate: {exc})")
    return BatchSplit(mb, ga, why)


def plan_layout(
    cfg: RunConfig, backend: str, device: str, layers: int, processes: int = 1
) -> tuple[CheckpointPlan, BatchSplit]:
    """The run's checkpointing and batch split: each by its own rule, then, with both auto and a
    speed model for this GPU (or the recompute rule), the layout predicted fastest where it beats
    theirs."""
    checkpointing = plan_checkpointing(cfg, backend, device, layers, processes)
    split = plan_split(cfg, backend, device, checkpointing, processes)
    if device != "cuda" or processes > 1:
        return checkpointing, split
    try:
        budget, where = run_budget_gb(cfg.hardware.gpu)
        arch = resolve_architecture(cfg)
        chosen = (checkpointing.checkpointed, split.micro_batch, split.grad_accum)
        faster = fastest_layout(cfg, arch, backend, budget, resolve_gpu("auto"), chosen)
    except Exception:  # no architecture, no NVML: the memory rules' layout stands
        return checkpointing, split
    if faster is None or arch.layers != layers:
        return checkpointing, split
    k, mb, ga, why_k, why_split = faster
    return CheckpointPlan(layers, k, f"{why_k}; {where}"), BatchSplit(mb, ga, why_split)
