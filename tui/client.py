"""The console's link to one engine process: events in, commands out.

Three ways in, one way out to the UI:
- `pipe`: a run this console launched. The child's stdout is read in a worker thread; it must be
  drained continuously, or a full pipe would stall the engine.
- `tail`: a run started elsewhere (or earlier, by a console that has gone): RUN_DIR/events.jsonl
  is read from byte offset 0 and then followed, polling, until the engine no longer holds the
  run's lock.
- a file of a finished run is `tail` that ends after the first read.

The reader thread never touches widgets. It appends to a locked buffer and posts `EventsArrived`,
which merges with any still-queued `EventsArrived` of the same client (`can_replace`), so a burst
of 20 steps a second costs the UI one wake-up per batch, not one per event. A run's existing
history is folded into a `RunHistory` in the thread too, and handed over whole (`Opened`): opening
a 100,000-step run never blocks the UI.

Commands go down the child's stdin when this console launched it, else through the run's control
FIFO (engine.run.runs.send_command), so any console can stop or sample any live run.
"""

from __future__ import annotations

import contextlib
import os
import select
import subprocess
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Literal

from textual.message import Message

from engine import protocol
from engine.errors import UserError
from engine.run import runs
from tui.history import RunHistory

Launcher = Callable[..., subprocess.Popen[bytes]]
Post = Callable[[Message], object]

FLUSH_SECONDS = 0.1  # the UI hears about new events at most this often (and at least this soon)
TAIL_POLL_SECONDS = 0.25
CHUNK_BYTES = runs.CHUNK_BYTES


def load_history(run_dir: Path) -> tuple[RunHistory, int]:
    """A run's whole history from its events file, and the offset to follow it from."""
    history = RunHistory(run_id=run_dir.name, run_dir=run_dir)
    offset = 0
    while True:
        events, new_offset = runs.read_events(run_dir, offset, CHUNK_BYTES)
        history.apply_all(events)
        if new_offset == offset:
            return history, offset
        offset = new_offset


class RunClient:
    """One engine process (a training run or a one-off sample) the console listens to."""

    class EventsArrived(Message):
        """New events are waiting in `client.drain()`. Several queued ones merge into one."""

        def __init__(self, client: RunClient) -> None:
            super().__init__()
            self.client = client

        def can_replace(self, message: Message) -> bool:
            return isinstance(message, RunClient.EventsArrived) and message.client is self.client

    class Opened(Message):
        """The run's history so far, folded off the UI thread; new events follow as EventsArrived."""

        def __init__(self, client: RunClient, history: RunHistory) -> None:
            super().__init__()
            self.client = client
            self.history = history

    class Ended(Message):
        """The engine process exited (or, for a tailed run, no longer holds the run's lock)."""

        def __init__(self, client: RunClient, returncode: int | None) -> None:
            super().__init__()
            self.client = client
            self.returncode = returncode

    def __init__(
        self,
        run_dir: Path,
        *,
        proc: subprocess.Popen[bytes] | None = None,
        mode: Literal["pipe", "tail"] = "tail",
        role: Literal["run", "sample", "export"] = "run",
        follow: bool = True,
    ) -> None:
        self.run_dir = run_dir
        self.proc = proc
        self.mode = mode
        self.role = role
        self.follow = follow
        self._buffer: list[protocol.Event] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self.ended = False
        self.saw_finished = False

    # ---- lifecycle ---------------------------------------------------------------------------

    @classmethod
    def launch(cls, run_dir: Path, launcher: Launcher, *, resume: bool = False) -> RunClient:
        """Start a training (or resumed) engine for `run_dir`.

        A fresh run is read from its pipe. A resumed one appends to a history this console must
        also show, so it is launched without a stdout pipe and read from its events file, whole."""
        if resume:
            proc = launcher(run_dir, resume=True, pipe=False)
            return cls(run_dir, proc=proc, mode="tail")
        return cls(run_dir, proc=launcher(run_dir, resume=False, pipe=True), mode="pipe")

    @property
    def run_id(self) -> str:
        return self.run_dir.name

    def is_alive(self) -> bool:
        if self.ended:
            return False
        if self.proc is not None:
            return self.proc.poll() is None
        return runs.is_running(self.run_dir)

    def detach(self) -> None:
        """Stop listening. The engine keeps running: end of stdin never means stop, and once our end
        of its stdout closes, it writes only to events.jsonl."""
        self._stop.set()
        if self.proc is not None and self.proc.stdin is not None:
            with contextlib.suppress(OSError):
                self.proc.stdin.close()

    def drain(self) -> list[protocol.Event]:
        with self._lock:
            events, self._buffer = self._buffer, []
        return events

    # ---- commands ----------------------------------------------------------------------------

    def send(self, command: protocol.Message) -> None:
        """Raises UserError when no engine is there to hear it."""
        stdin = self.proc.stdin if self.proc is not None else None
        if stdin is not None and not stdin.closed and self.proc is not None and self.proc.poll() is None:
            try:
                stdin.write(protocol.encode(command))
                stdin.flush()
                return
            except (BrokenPipeError, OSError):
                pass  # the engine closed its stdin; its FIFO may still be there
        runs.send_command(self.run_dir, command)

    # ---- the reader thread -------------------------------------------------------------------

    def read_loop(self, post: Post) -> None:
        """Blocking: run it in a thread worker. Posts EventsArrived/Opened/Ended to `post`."""
        try:
            if self.mode == "pipe":
                self._read_pipe(post)
            else:
                self._read_tail(post)
        finally:
            self.ended = True
            code = self.proc.poll() if self.proc is not None else None
            if self.proc is not None and code is None and not self._stop.is_set():
                with contextlib.suppress(subprocess.TimeoutExpired):
                    code = self.proc.wait(timeout=5)
            if (
                not self._stop.is_set()
                and self.role == "run"
                and not self.saw_finished
                and code not in (None, 0)
            ):
                self._push([self._crash_event(code)], post)
            post(self.Ended(self, code))

    def _push(self, events: list[protocol.Event], post: Post) -> None:
        if not events:
            return
        for ev in events:
            if isinstance(ev, protocol.Finished):
                self.saw_finished = True
            elif isinstance(ev, protocol.Hello):
                self.saw_finished = False
                try:
                    protocol.check_hello(ev)
                except protocol.ProtocolError as exc:
                    events = [*events, protocol.ErrorEvent(kind="protocol", message=str(exc))]
        with self._lock:
            self._buffer.extend(events)
        post(self.EventsArrived(self))

    def _read_pipe(self, post: Post) -> None:
        assert self.proc is not None and self.proc.stdout is not None
        fd = self.proc.stdout.fileno()
        partial = b""
        pending: list[protocol.Event] = []
        last_post = 0.0
        try:
            while not self._stop.is_set():
                ready, _, _ = select.select([fd], [], [], FLUSH_SECONDS)
                if ready:
                    chunk = os.read(fd, 1 << 16)
                    if not chunk:
                        break  # EOF: the child exited (or closed its stdout)
                    data = partial + chunk
                    cut = data.rfind(b"\n") + 1
                    partial = data[cut:]
                    pending.extend(protocol.decode_lines(data[:cut], keep_unreadable=True))
                now = time.monotonic()
                if pending and now - last_post >= FLUSH_SECONDS:
                    self._push(pending, post)
                    pending, last_post = [], now
            pending.extend(protocol.decode_lines(partial, keep_unreadable=True))
            self._push(pending, post)
        finally:
            with contextlib.suppress(OSError):
                self.proc.stdout.close()

    def _read_tail(self, post: Post) -> None:
        history, offset = load_history(self.run_dir)
        if history.finished is not None:
            self.saw_finished = True
        post(self.Opened(self, history))
        if not self.follow:
            return
        while not self._stop.wait(TAIL_POLL_SECONDS):
            alive = self.proc.poll() is None if self.proc is not None else runs.is_running(self.run_dir)
            while True:
                events, new_offset = runs.read_events(self.run_dir, offset, CHUNK_BYTES)
                self._push(events, post)
                if new_offset == offset:
                    break
                offset = new_offset
            if not alive:
                return

    def _crash_event(self, code: int) -> protocol.ErrorEvent:
        tail = ""
        with contextlib.suppress(OSError):
            lines = (self.run_dir / runs.ENGINE_LOG).read_text(errors="replace").strip().splitlines()
            tail = lines[-1] if lines else ""
        return protocol.ErrorEvent(
            kind="crashed",
            message=f"the engine exited with code {code} without finishing" + (f": {tail}" if tail else ""),
            hint=f"the full log is in {self.run_dir / runs.ENGINE_LOG}; {how_to_go_on(self.run_dir)}",
        )


def how_to_go_on(run_dir: Path) -> str:
    """After an engine died without finishing: resume from the newest checkpoint, or start again."""
    done = runs.checkpoints(run_dir)
    if done:
        return f"r on Runs (4) resumes it from {done[-1].name}"
    return "it saved no checkpoint: start it again from Presets (1)"


def start_sample(
    run_dir: Path, checkpoint: str | None, request: protocol.SampleRequest, launcher: Launcher
) -> RunClient:
    """A one-off engine that loads base + adapter from a checkpoint and streams one reply."""
    proc = launcher(run_dir, checkpoint, protocol.encode(request).decode().strip())
    return RunClient(run_dir, proc=proc, mode="pipe", role="sample")


def send_to_run(run_dir: Path, command: protocol.Message) -> None:
    """A command to a run this console is not listening to (e.g. from the Runs pane)."""
    try:
        runs.send_command(run_dir, command)
    except OSError as exc:
        raise UserError(f"could not reach run {run_dir.name}: {exc}") from None
