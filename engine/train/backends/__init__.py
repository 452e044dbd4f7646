"""Training backends: one file per stack of engine.stacks, each defining `BACKEND` (base.Backend).

`get(name)` imports a stack's file only when that stack trains: importing Unsloth patches
transformers, peft and TRL, so no other run may import it. `choose_backend` resolves
`hardware.backend` (auto / a stack) by engine.stacks' rule and says why, for the hello event.

    base.py           the Backend protocol, and the LoRA settings every stack shares
    hf.py             transformers + peft + TRL + bitsandbytes, tuned
    unsloth.py        Unsloth's loader, kernels and offloaded checkpointing
    trainer.py        the trainer every backend trains with (TRL's SFTTrainer + safe_trainer)
    safe_trainer.py   atomic checkpoints, the non-finite loss guard, fault hooks, token counts
    checkpointing.py  applies the memory model's checkpointing plan to a model's layers
    parallel.py       DDP and FSDP: where each rank loads, what the trainer is told
"""

from __future__ import annotations

import importlib

from engine import stacks
from engine.config import RunConfig
from engine.errors import UserError
from engine.train.backends.base import Backend

__all__ = ["Backend", "choose_backend", "choose_device", "get"]


def get(name: str) -> Backend:
    """The backend that implements stack `name`: engine/train/backends/<name>.py's BACKEND."""
    stacks.stack(name)  # an unknown name is one clear error
    return importlib.import_module(f"{__name__}.{name}").BACKEND


def cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


def choose_device(cfg: RunConfig) -> str:
    want = cfg.hardware.device
    if want == "cpu":
        return "cpu"
    if cuda_available():
        return "cuda"
    if want == "cuda":
        raise UserError(
            "hardware.device: cuda was asked for but no CUDA GPU is visible",
            "set hardware.device=auto or cpu",
        )
    return "cpu"


def choose_backend(cfg: RunConfig, device: str, processes: int = 1) -> tuple[str, str]:
    """(backend, reason): engine.stacks' rule on this process's device, by predicted speed where
    a speed model covers every stack that can run on this GPU."""
    speed = _speed(cfg) if device == "cuda" and cfg.hardware.backend == stacks.AUTO else None
    return stacks.choose(cfg.hardware.backend, cuda=device == "cuda", processes=processes, speed=speed)


def _speed(cfg: RunConfig) -> stacks.SpeedOf | None:
    """The memory model's speed predictor at this run's budget; never stops a run: a stack it
    cannot predict falls back to engine.stacks' order."""
    from engine.memory import speed
    from engine.memory.architectures import resolve_architecture
    from engine.memory.checkpointing import run_budget_gb
    from engine.memory.estimate import speed_predictor
    from engine.memory.gpus import resolve_gpu

    if not speed.fits():  # nothing measured: no architecture to resolve (a hub request, maybe)
        return None
    try:
        gpu = resolve_gpu("auto")
        if not any(speed.fit_for(name, gpu.label) for name in stacks.NAMES):
            return None
        budget, _ = run_budget_gb(cfg.hardware.gpu)
        predict = speed_predictor(cfg, resolve_architecture(cfg), gpu, budget)
    except Exception:
        return None

    def guarded(name: str) -> stacks.Predicted | None:
        try:
            return predict(name)
        except Exception:
            return None

    return guarded
