"""The checks a run passes before its directory exists, shared by `qlc train` and the console.

A bad model path, unreadable data, or GPUs asked for but absent fail here with one line naming
the field, so that bad input never leaves a run directory behind. Pure Python (no torch): the
model is not loaded and the data not tokenized; the engine child does that seconds later.
"""

from __future__ import annotations

from engine import data
from engine.config import RunConfig
from engine.models import source
from engine.run import distributed


def check(cfg: RunConfig) -> int:
    """Raise UserError (one line) if the run cannot start; returns the processes it takes on this
    host (hardware.gpus resolved)."""
    source.check(cfg)
    data.check_source(cfg)
    return distributed.processes_per_node(cfg)
