"""Training backends: each builds the model (4-bit base + LoRA) and the trainer for one stack.

`choose_backend` resolves `hardware.backend` (auto / hf / unsloth) and says why, so the run's
hello event and the dashboard can show which stack trains and the reason.
"""

from __future__ import annotations

import importlib.util
from typing import Any

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


def padding_free(backend: str) -> bool:
    """Whether micro-batches go to the model as one padding-free row (engine.data.collate).

    Unsloth: yes, as a bare Unsloth script does on a Hopper GPU (its auto choice keeps padding-free
    wherever it has not measured padded batches to be faster), and its attention keeps the
    examples apart by the lengths the row carries. hf: no; SDPA would need a block-diagonal mask.
    What the memory estimate assumes; a run decides with `batches_padding_free`.
    """
    return backend == "unsloth"


def batches_padding_free(backend: str, model: Any) -> bool:
    """Whether `model` trains on one padding-free row per micro-batch: where the backend does
    (padding_free) and the installed Unsloth can keep a row's examples apart, which also marks
    the model to take rows longer than max_seq_length (unsloth.allow_padding_free)."""
    if not padding_free(backend):
        return False
    from engine.train.backends import unsloth

    return unsloth.allow_padding_free(model)


def choose_backend(cfg: RunConfig, device: str, processes: int = 1) -> tuple[str, str]:
    """(backend, reason)."""
    want = cfg.hardware.backend
    if want == "auto" and processes > 1:
        return "hf", "auto: Unsloth trains on one GPU"
    have_unsloth = importlib.util.find_spec("unsloth") is not None
    have_backend = importlib.util.find_spec("engine.train.backends.unsloth") is not None
    if want == "hf":
        return "hf", "requested in the preset"
    if want == "unsloth":
        if device != "cuda":
            raise UserError("hardware.backend: unsloth needs a CUDA GPU", "set hardware.backend=hf or auto")
        if not have_unsloth:
            raise UserError(
                "hardware.backend: unsloth is not installed",
                "pip install 'qlora-console[unsloth]', or set hardware.backend=hf",
            )
        if not have_backend:
            raise UserError(
                "hardware.backend: this version has no unsloth backend yet", "set hardware.backend=hf"
            )
        return "unsloth", "requested in the preset"
    if device != "cuda":
        return "hf", "auto: no CUDA GPU, and Unsloth needs one"
    if not have_unsloth:
        return "hf", "auto: Unsloth is not installed"
    if not have_backend:
        return "hf", "auto: this version has no unsloth backend yet"
    return "unsloth", "auto: Unsloth is installed and a CUDA GPU is present"
