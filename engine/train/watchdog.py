"""Where an engine process hangs, written into the run's logs, and a limit on the waits that have
none of their own. One per engine process (every rank of a multi-process run), installed first.

- SIGUSR1 makes the process write every thread's stack to RUN_DIR/stacks-rank<R>.log. Python's
  faulthandler does it in C, so it works while the interpreter is blocked inside NCCL, CUDA or a
  lock. `qlc stop` sends it to a run that does not stop in time, bench/multi_gpu.py to a run before
  it gives it up (engine.run.distributed.dump_stacks). A fatal signal (a segfault, NCCL's abort)
  writes the same stacks there.
- No optimizer step for QLC_STALL_DUMP_S seconds (the start included): the same dump, again every
  period, and a warning saying so.
- `waiting(what, seconds, hint)` guards a call that cannot time out by itself (NCCL's start, the
  process group's end). Past its limit the process dumps its stacks, reports one line (an
  ErrorEvent on rank 0, a line in its log on the others), and exits: torchrun then ends the other
  ranks, instead of the run hanging. If even Python cannot run by then (a C call holding the
  interpreter), faulthandler's own timer dumps and exits GRACE_S later.

Standard library only: nothing here may itself hang on torch.
"""

from __future__ import annotations

import contextlib
import faulthandler
import os
import signal
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from engine import protocol
from engine.run.distributed import stack_file

GRACE_S = 30.0  # faulthandler's exit backstop, after a wait's limit, when Python could not act
POLL_S = 0.5
EXIT_CODE = 1

Emit = Callable[[protocol.Message], None]


@dataclass(frozen=True)
class _Wait:
    what: str
    seconds: float
    hint: str
    deadline: float


class Watchdog:
    def __init__(self, run_dir: Path, rank: int, emit: Emit, stall_s: float) -> None:
        self.path = stack_file(run_dir, rank)
        self.rank = rank
        self.stall_s = stall_s
        self._emit = emit
        self._file: IO[str] | None = None
        self._wait: _Wait | None = None
        self._step: int | None = None
        self._progress = time.monotonic()  # the last completed step, or the start
        self._stall_warned = self._progress
        self._lock = threading.Lock()

    def start(self) -> None:
        self._file = open(self.path, "a", buffering=1, encoding="utf-8")  # noqa: SIM115 - held until exit
        with contextlib.suppress(OSError):
            os.chmod(self.path, 0o600)  # stacks quote paths and values
        self._header(f"pid {os.getpid()}: SIGUSR1 writes every thread's stack here")
        faulthandler.enable(file=self._file, all_threads=True)
        faulthandler.register(signal.SIGUSR1, file=self._file, all_threads=True, chain=False)
        self._arm()
        threading.Thread(target=self._monitor, name="qlc-watchdog", daemon=True).start()

    def on_terminate(self) -> None:
        """Also dump the stacks on SIGTERM, then run the handler already installed (the engine's
        stop): when torchrun ends a rank because another failed, the file says where it was."""
        if self._file is not None:
            faulthandler.register(signal.SIGTERM, file=self._file, all_threads=True, chain=True)

    # ---- what the engine tells it -----------------------------------------------------------

    def step_done(self, step: int) -> None:
        with self._lock:
            self._step = step
            self._progress = self._stall_warned = time.monotonic()
            if self._wait is None:
                self._arm()

    @contextlib.contextmanager
    def waiting(self, what: str, seconds: float, hint: str) -> Iterator[None]:
        with self._lock:
            self._wait = _Wait(what, seconds, hint, time.monotonic() + seconds)
            self._arm()
        try:
            yield
        finally:
            with self._lock:
                self._wait = None
                self._progress = self._stall_warned = time.monotonic()  # a wait that ended is progress
                self._arm()

    def exiting(self, seconds: float) -> None:
        """The process is ending: if it has not within `seconds` (a library's exit hook waiting on
        a dead peer), dump its stacks and exit."""
        with self._lock:
            self.stall_s = 0.0
            self._wait = None
        if self._file is not None:
            self._header(f"exiting: stacks follow if the process has not ended within {seconds:.0f} s")
            faulthandler.dump_traceback_later(seconds, exit=True, file=self._file)

    # ---- inside ------------------------------------------------------------------------------

    def _header(self, text: str) -> None:
        if self._file is not None:
            with contextlib.suppress(OSError, ValueError):
                self._file.write(f"# {time.strftime('%Y-%m-%d %H:%M:%S')} rank {self.rank}: {text}\n")
                self._file.flush()

    def _arm(self) -> None:
        """faulthandler's single timer, in C: a wait's exit backstop, else the stall dump."""
        if self._file is None:
            return
        if self._wait is not None:
            left = max(self._wait.deadline - time.monotonic(), 0.0)
            faulthandler.dump_traceback_later(left + GRACE_S, exit=True, file=self._file)
        elif self.stall_s > 0:
            faulthandler.dump_traceback_later(self.stall_s, repeat=True, file=self._file)
        else:
            faulthandler.cancel_dump_traceback_later()

    def _monitor(self) -> None:
        while True:
            time.sleep(POLL_S)
            now = time.monotonic()
            with self._lock:
                wait, step, stall_s = self._wait, self._step, self.stall_s
                stalled = stall_s > 0 and wait is None and now - self._stall_warned >= stall_s
                idle = now - self._progress
                if stalled:
                    self._stall_warned = now
            if wait is not None and now >= wait.deadline:
                self._expire(wait, step)
            elif stalled:
                since = f"step {step}" if step is not None else "the start"
                self._emit(
                    protocol.Log(
                        level="warning",
                        message=f"rank {self.rank}: no optimizer step for {idle:.0f} s (since {since}); "
                        f"every thread's stack is in {self.path} (QLC_STALL_DUMP_S sets the period)",
                    )
                )

    def _expire(self, wait: _Wait, step: int | None) -> None:
        self._header(f"timeout: {wait.what} did not finish within {wait.seconds:.0f} s")
        if self._file is not None:
            with contextlib.suppress(OSError, ValueError):
                faulthandler.dump_traceback(file=self._file, all_threads=True)
        with contextlib.suppress(Exception):
            self._emit(
                protocol.ErrorEvent(
                    kind="timeout",
                    message=f"rank {self.rank}: {wait.what} did not finish within {wait.seconds:.0f} s",
                    hint=f"{wait.hint}; every thread's stack: {self.path}",
                    step=step,
                )
            )
            self._emit(protocol.Finished(status="failed", step=step or 0))
        os._exit(EXIT_CODE)


_current: Watchdog | None = None


def install(run_dir: Path, rank: int, emit: Emit, stall_s: float) -> Watchdog:
    global _current
    _current = Watchdog(run_dir, rank, emit, stall_s)
    _current.start()
    return _current


def step_done(step: int) -> None:
    if _current is not None:
        _current.step_done(step)


@contextlib.contextmanager
def waiting(what: str, seconds: float, hint: str) -> Iterator[None]:
    """Guard a call that has no timeout of its own (see the module doc); a no-op without a
    watchdog (a test calling the recipe directly)."""
    if _current is None:
        yield
        return
    with _current.waiting(what, seconds, hint):
        yield


def exiting(seconds: float) -> None:
    if _current is not None:
        _current.exiting(seconds)


def step_clock(commands: Any) -> Any:
    """A trainer callback that tells the watchdog and the shared commands (collectives) which
    optimizer step just ended. Listed before the engine's own callback, which reads the step."""
    from transformers import TrainerCallback

    class StepClock(TrainerCallback):  # type: ignore[misc]
        def on_train_begin(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
            commands.step = state.global_step
            step_done(state.global_step)

        def on_step_end(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
            commands.step = state.global_step
            step_done(state.global_step)

    return StepClock()
