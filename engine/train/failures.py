"""Failures a run reports as one structured error event, not as a bug with a traceback: a loss that
stopped being finite, a checkpoint that could not be written (a full disk above all).

Each gets one line that says what happened, where, and what is intact, and a hint that says what to
do. `classify` turns an exception that escaped training into such an event, or None for a bug.
"""

from __future__ import annotations

from pathlib import Path

from engine import protocol
from engine.config import RunConfig
from engine.run import checkpoints, runs


class RunFailure(Exception):
    """Ends training with `event` (raised from inside the trainer)."""

    def __init__(self, event: protocol.ErrorEvent) -> None:
        super().__init__(event.message)
        self.event = event


def nonfinite_loss(value: float, step: int, logged_at: int | None = None) -> protocol.ErrorEvent:
    seen = f" (seen when step {logged_at} was logged)" if logged_at not in (None, step) else ""
    return protocol.ErrorEvent(
        kind="nan_loss",
        step=step,
        message=f"the loss became {value} at step {step}{seen}; no checkpoint was saved after it",
        hint="lower train.lr, check the data for broken rows, then resume from the last checkpoint",
    )


def _previous(root: Path) -> str:
    found = checkpoints.complete(root)
    return f"{found[-1].name} is intact" if found else "no earlier checkpoint exists"


def save_failed(
    exc: BaseException, root: Path, step: int, free: int | None, needed: int | None
) -> protocol.ErrorEvent:
    """`free` was measured before the partial checkpoint was removed; `needed` is the size of the
    previous checkpoint, if any (what this one would have taken)."""
    disk_full = checkpoints.is_disk_full(exc) or (
        free is not None and needed is not None and free < max(needed, 1 << 20)
    )
    cause = str(exc).splitlines()[0][:160] if str(exc) else exc.__class__.__name__
    run = root.parent.name
    if disk_full:
        free_text = f", {free / 2**20:.1f} MB free" if free is not None else ""
        return protocol.ErrorEvent(
            kind="disk_full",
            step=step,
            message=f"disk full while saving checkpoint-{step} in {root}{free_text}; {_previous(root)}",
            hint=f"free some space on that disk, then `qlc resume {run}`",
        )
    return protocol.ErrorEvent(
        kind="checkpoint",
        step=step,
        message=f"could not save checkpoint-{step} in {root}: {cause}; {_previous(root)}",
        hint=f"check the disk and {root}, then `qlc resume {run}`",
    )


def out_of_memory(
    exc: BaseException, cfg: RunConfig, step: int | None, backend: str | None = None
) -> protocol.ErrorEvent:
    """The device ran out of memory: the memory calculator's ranked changes come with the error."""
    advice: list[str] = []
    note = ""
    try:
        from engine import memory

        gpu = memory.resolve_gpu(cfg.hardware.gpu)
        advice = [str(a) for a in memory.advise(cfg, gpu, backend=backend)[:5]]
        if not advice:
            # The model said it fits, yet the device ran out: another process holds memory, or the
            # estimate is short. Ask for the changes that take the peak 20% under the estimate.
            est = memory.estimate(cfg, backend=backend)
            smaller = memory.resolve_gpu(f"{est.device_total_gb * 0.8:.3f}GB")
            advice = [str(a) for a in memory.advise(cfg, smaller, backend=backend)[:5]]
            note = (
                f" (estimated {est.device_total_gb:.1f} GiB, which fits {gpu}: "
                "is another process on the GPU?)"
            )
    except Exception:  # advice must never hide the error itself
        pass
    first_line = str(exc).splitlines()[0][:200] if str(exc) else exc.__class__.__name__
    return protocol.ErrorEvent(
        kind="out_of_memory",
        step=step,
        message=f"out of memory: {first_line}{note}",
        hint="start a new run with a lower train.micro_batch or train.seq_len (or gradient checkpointing "
        "on); `qlc resume` retries from the last checkpoint as it is",
        advice=advice,
    )


def classify(exc: BaseException, run_dir: Path, step: int | None) -> protocol.ErrorEvent | None:
    if isinstance(exc, RunFailure):
        return exc.event
    if checkpoints.is_disk_full(exc):
        # Outside a checkpoint save: the final adapter, the events file, the data cache.
        where = getattr(exc, "filename", None) or run_dir
        return protocol.ErrorEvent(
            kind="disk_full",
            step=step,
            message=f"disk full writing {where}; {_previous(run_dir / runs.CHECKPOINTS)}",
            hint=f"free some space on that disk, then `qlc resume {run_dir.name}`",
        )
    return None


def is_oom(exc: BaseException) -> bool:
    name = exc.__class__.__name__
    text = str(exc).lower()
    # "can't allocate memory": torch's CPU allocator, which raises a plain RuntimeError.
    return (
        name == "OutOfMemoryError"
        or isinstance(exc, MemoryError)
        or "out of memory" in text
        or "can't allocate memory" in text
    )
