"""Training backends: each builds the model (4-bit base + LoRA) and the trainer for one stack.

`choose_backend` resolves `hardware.backend` (auto / hf / unsloth) and says why, so the run's
hello event and the dashboard can show which stack trains and the reason.
"""

from __future__ import annotations

from typing import Any

from engine import stacks
from engine.config import RunConfig
from engine.errors import UserError


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


def batches_padding_free(backend: str, model: Any) -> bool:
    """Whether `model` trains on one padding-free row per micro-batch: where the backend does
    (engine.stacks.padding_free) and the installed Unsloth can keep a row's examples apart, which also marks
    the model to take rows longer than max_seq_length (unsloth.allow_padding_free)."""
    if not stacks.padding_free(backend):
        return False
    from engine.train.backends import unsloth

    return unsloth.allow_padding_free(model)


def choose_backend(cfg: RunConfig, device: str, processes: int = 1) -> tuple[str, str]:
    """(backend, reason): engine.stacks' rule on this process's device."""
    return stacks.choose(cfg.hardware.backend, cuda=device == "cuda", processes=processes)
