"""Fault injection for the reliability tests and `bench/faults.py`, armed only by $QLC_FAULT.

    QLC_FAULT="kill_in_save"              SIGKILL the engine inside its 1st checkpoint save
    QLC_FAULT="kill_in_save=2"            ... inside its 2nd save (counted per engine process)
    QLC_FAULT="disk_full_in_save[=N]"     raise OSError(ENOSPC) inside the Nth save
    QLC_FAULT="oom_at_step=N"             raise torch.OutOfMemoryError in optimizer step N
    QLC_FAULT="nan_at_step=N"             multiply step N's loss by NaN: the NaN gradients reach the
                                          weights, as in a real divergence
    QLC_FAULT="slow_step=0.5"             sleep this many seconds in every optimizer step
    QLC_FAULT="slow_export=30"            sleep this many seconds once an export's temporary folder
                                          exists (an interrupt then has something to clean up)
    QLC_FAULT="gpu_memory_limit_gb=2"     cap the CUDA caching allocator (and empty its cache) at the
                                          first training step, after a resume has loaded its state:
                                          a real CUDA out-of-memory, from the allocator itself
    QLC_FAULT="audit_loads"               log every torch.load to engine.log and refuse any call
                                          that is not weights_only=True
    QLC_FAULT="stall_rank=1@step=3"       rank 1 stops answering at a point of a multi-process run,
                                          until torchrun ends it: @init (before the process group
                                          starts), @sources (rank 0, before it writes sources.json),
                                          @step=N (after optimizer step N, before the command
                                          handoff), @end (before the last barrier). The other
                                          ranks' waits must then end with their one-line timeout.

Several faults are joined with commas: QLC_FAULT="slow_step=0.2,oom_at_step=9".

Inside a save, the faults strike after the adapter's files are written and before the optimizer
state is: a checkpoint folder that is half there, as a real kill or a full disk would leave it.

Unset or empty, nothing here does anything: the trainer asks `FaultInjector.from_env()` once and
every hook returns at its first line. Unknown names or bad values are refused with one line, so a
typo never silently runs an unfaulted trial.
"""

from __future__ import annotations

import errno
import os
import signal
import sys
import time
from dataclasses import dataclass, fields
from typing import Any

from engine.errors import UserError

ENV = "QLC_FAULT"


@dataclass(frozen=True)
class FaultPlan:
    kill_in_save: int | None = None
    disk_full_in_save: int | None = None
    oom_at_step: int | None = None
    nan_at_step: int | None = None
    slow_step: float = 0.0
    slow_export: float = 0.0
    gpu_memory_limit_gb: float | None = None
    audit_loads: bool = False
    stall_rank: str | None = None  # "R@POINT": rank R stalls at POINT (init, sources, step=N, end)

    @property
    def armed(self) -> bool:
        return self != FaultPlan()

    def describe(self) -> str:
        parts = []
        for f in fields(self):
            value = getattr(self, f.name)
            if value in (None, 0.0, False):
                continue
            parts.append(f.name if value is True else f"{f.name}={value}")
        return ",".join(parts)


# Faults that count saves default to the first one when given without a value.
_COUNTS = {"kill_in_save", "disk_full_in_save"}
_INTS = {"oom_at_step", "nan_at_step"}
_FLOATS = {"slow_step", "slow_export", "gpu_memory_limit_gb"}
_FLAGS = {"audit_loads"}
_POINTS = {"init", "sources", "end"}


def parse(text: str) -> FaultPlan:
    """`kill_in_save=2,slow_step=0.1` -> FaultPlan. Raises UserError naming the bad part."""
    values: dict[str, Any] = {}
    for raw in text.split(","):
        part = raw.strip()
        if not part:
            continue
        name, _, value = part.partition("=")
        name, value = name.strip(), value.strip()
        known = _COUNTS | _INTS | _FLOATS | _FLAGS | {"stall_rank"}
        if name not in known:
            raise UserError(f"{ENV}: unknown fault {name!r}", f"known: {', '.join(sorted(known))}")
        try:
            if name == "stall_rank":
                values[name] = _stall_point(value)
            elif name in _FLAGS:
                if value:
                    raise ValueError
                values[name] = True
            elif name in _COUNTS:
                values[name] = int(value) if value else 1
            elif name in _INTS:
                values[name] = int(value)
            else:
                values[name] = float(value)
        except ValueError:
            raise UserError(
                f"{ENV}: {part!r} has a bad value", "see engine/train/faults.py for the forms"
            ) from None
        if name in _COUNTS | _INTS and values[name] < 1:
            raise UserError(f"{ENV}: {part!r} must count from 1")
    return FaultPlan(**values)


def _stall_point(value: str) -> str:
    """'1@step=3' as given, once checked: a rank number, @, and a point."""
    rank, at, point = value.partition("@")
    if not (rank.isdigit() and at):
        raise ValueError
    if point not in _POINTS:
        kind, _, step = point.partition("=")
        if kind != "step" or not step.isdigit() or int(step) < 1:
            raise ValueError
    return f"{int(rank)}@{point}"


def plan_from_env() -> FaultPlan:
    return parse(os.environ.get(ENV, ""))


def export_pause() -> None:
    """The slow_export fault: the export waits here, its temporary folder made."""
    text = os.environ.get(ENV, "")
    if "slow_export" in text:
        seconds = parse(text).slow_export
        _note(f"export pauses {seconds:g} s (slow_export)")
        time.sleep(seconds)


def stall_at(rank: int, point: str) -> None:
    """The stall_rank fault: if it names this rank and point, stop here until torchrun ends the
    process. A stalled rank exits at once on SIGTERM (as a hung process killed by torchrun does),
    not through the engine's stop-and-save."""
    text = os.environ.get(ENV, "")
    if "stall_rank" not in text or parse(text).stall_rank != f"{rank}@{point}":
        return
    _note(f"rank {rank} stalls at {point} (until SIGTERM or SIGKILL)")
    signal.signal(signal.SIGTERM, lambda *_: os._exit(143))
    while True:
        time.sleep(0.5)


def _note(message: str) -> None:
    """To engine.log, so a faulted run says so next to whatever it did."""
    print(f"{ENV}: {message}", file=sys.stderr, flush=True)


class FaultInjector:
    """The hooks the trainer calls. Holds the per-process counters a plan needs."""

    def __init__(self, plan: FaultPlan) -> None:
        self.plan = plan
        self._saves = 0
        self._oom_done = False
        self._nan_done = False
        self._gpu_capped = False

    @classmethod
    def from_env(cls) -> FaultInjector:
        return cls(plan_from_env())

    def at_train_begin(self) -> None:
        if not self.plan.armed:
            return
        _note(f"armed: {self.plan.describe()}")
        if self.plan.audit_loads:
            _audit_torch_load()

    def _cap_gpu(self, limit_gb: float) -> None:
        import torch

        self._gpu_capped = True
        if not torch.cuda.is_available():
            _note("gpu_memory_limit_gb: no CUDA device, nothing capped")
            return
        total = torch.cuda.get_device_properties(0).total_memory
        fraction = min(1.0, limit_gb * 2**30 / total)
        torch.cuda.empty_cache()  # cached blocks would otherwise serve the step under any cap
        torch.cuda.set_per_process_memory_fraction(fraction, 0)
        allocated = torch.cuda.memory_allocated(0) / 2**30
        _note(f"CUDA allocator capped at {limit_gb} GiB ({fraction:.6f}); {allocated:.3f} GiB allocated now")

    def before_step(self, step: int) -> None:
        """Called before each micro-batch of optimizer step `step` (1-based)."""
        plan = self.plan
        if not plan.armed:
            return
        if plan.slow_step:
            time.sleep(plan.slow_step)
        if plan.gpu_memory_limit_gb is not None and not self._gpu_capped:
            self._cap_gpu(plan.gpu_memory_limit_gb)
        if plan.oom_at_step == step and not self._oom_done:
            self._oom_done = True
            import torch

            _note(f"raising OutOfMemoryError in step {step}")
            raise torch.OutOfMemoryError(
                f"CUDA out of memory. Tried to allocate 2.00 GiB (injected by {ENV} at step {step})"
            )

    def poison_loss(self, loss: Any, step: int) -> Any:
        if self.plan.nan_at_step != step or self._nan_done:
            return loss
        self._nan_done = True
        _note(f"multiplying the loss of step {step} by NaN")
        return loss * float("nan")

    def in_save(self, output_dir: str) -> None:
        """Called inside a checkpoint save, between the adapter files and the optimizer state."""
        plan = self.plan
        if plan.kill_in_save is None and plan.disk_full_in_save is None:
            return
        self._saves += 1
        if plan.kill_in_save == self._saves:
            _note(f"SIGKILL inside save {self._saves} ({output_dir})")
            os.kill(os.getpid(), signal.SIGKILL)
            time.sleep(10)  # the signal is delivered before this returns
        if plan.disk_full_in_save == self._saves:
            _note(f"ENOSPC inside save {self._saves} ({output_dir})")
            target = os.path.join(output_dir, "optimizer.pt")
            # Half a file, as a write that ran out of space leaves it.
            with open(target, "wb") as f:
                f.write(b"\0" * 4096)
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), target)


def _audit_torch_load() -> None:
    """Wrap torch.load: note each call's file and weights_only, refuse anything but True."""
    import torch

    original = torch.load

    def audited(f: Any, *args: Any, **kwargs: Any) -> Any:
        weights_only = kwargs.get("weights_only")
        name = os.path.basename(str(f)) if isinstance(f, (str, os.PathLike)) else type(f).__name__
        _note(f"torch.load {name} weights_only={weights_only}")
        if weights_only is not True:
            raise RuntimeError(f"torch.load({name}) without weights_only=True refused by {ENV}=audit_loads")
        return original(f, *args, **kwargs)

    torch.load = audited
