"""What a run learns while it trains, read back by the recipe when training ends. Kept apart from
engine.train.callback, which imports transformers: the recipe module must load before a backend's
`prepare` (Unsloth patches transformers as it is imported)."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from engine import protocol


@dataclass
class RunState:
    """What the callback learns during training, read back by the recipe when training ends."""

    stop_requested: bool = False
    failure: protocol.ErrorEvent | None = None
    last_loss: float | None = None
    last_checkpoint: str | None = None
    total_steps: int = 0
    first_step: int = 0
    started: float = field(default_factory=time.time)


class EvalInterrupted(Exception):
    """A stop arrived during an evaluation: the trainer's evaluate gives up on it (no eval loss
    for this round) and training stops as after a step (engine.train.callback)."""
