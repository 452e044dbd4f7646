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
    """(backend, reason): engine.stacks' rule on this process's device."""
    return stacks.choose(cfg.hardware.backend, cuda=device == "cuda", processes=processes)
