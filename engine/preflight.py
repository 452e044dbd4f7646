"""The checks a run passes before its directory exists, shared by `qlc train` and the console.

A bad model path, unreadable data, or GPUs asked for but absent fail here with one line naming
the field, so that bad input never leaves a run directory behind. Pure Python (no torch): the
model is not loaded and the data not tokenized; the engine child does that seconds later.
"""

from __future__ import annotations

from collections.abc import Callable

from engine import data, stacks
from engine.config import RunConfig
from engine.errors import UserError
from engine.memory import resolve_gpu
from engine.models import source
from engine.run import distributed

Where = Callable[[str], str]  # a key -> where its value came from (engine.config.origin)


def _key(key: str) -> str:
    return key


def check(cfg: RunConfig, where: Where = _key) -> int:
    """Raise UserError (one line) if the run cannot start; returns the processes it takes on this
    host (hardware.gpus resolved). `where` names a value's preset file or --set in the line."""
    check_hardware(cfg, where)
    source.check(cfg)
    data.check_source(cfg)
    return distributed.processes_per_node(cfg)


def check_gpu_name(cfg: RunConfig, where: Where = _key) -> None:
    """hardware.gpu names a card of the catalog, a size, or auto (engine.memory.resolve_gpu)."""
    if str(cfg.hardware.gpu).strip().lower() != "auto":
        try:
            resolve_gpu(str(cfg.hardware.gpu))
        except UserError as exc:
            raise UserError(f"{where('hardware.gpu')}: {exc.message}", exc.hint) from None


def check_hardware(cfg: RunConfig, where: Where = _key) -> None:
    """What the engine would refuse seconds after starting, asked here without torch: a card name
    the catalog does not know, CUDA asked for with no GPU visible, a stack that cannot run here."""
    check_gpu_name(cfg, where)
    hw = cfg.hardware
    wants_cuda = hw.device == "cuda" or (hw.backend != stacks.AUTO and stacks.stack(hw.backend).needs_cuda)
    if not wants_cuda or hw.device == "cpu":  # cpu with a CUDA-only stack: engine.config says so
        return
    seen = distributed.known_gpus()
    if seen is None:  # cannot tell without torch: the engine decides
        return
    cuda = seen > 0
    if hw.device == "cuda" and not cuda:
        raise UserError(
            "hardware.device: cuda was asked for but no CUDA GPU is visible",
            "set hardware.device=auto or cpu",
        )
    stacks.choose(hw.backend, cuda=cuda)
