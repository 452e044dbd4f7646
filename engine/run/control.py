"""Commands into a running engine: from the launching console's stdin and from the run's control
FIFO (any console, attached later). Both feed one queue that the trainer drains at step boundaries.

End of stdin means the console went away, never "stop": the run goes on.
"""

from __future__ import annotations

import fcntl
import os
import queue
import threading
from collections.abc import Callable
from pathlib import Path

from engine import protocol
from engine.run.events import Emitter


def read_lines(fd: int, on_line: Callable[[bytes], None]) -> None:
    """Call `on_line` for each line read from a raw fd, until EOF. Raw os.read, not a buffered
    file object: a daemon thread blocked inside a buffered reader aborts the interpreter at exit."""
    buffer = b""
    while True:
        try:
            chunk = os.read(fd, 65536)
        except OSError:
            return
        if not chunk:
            return
        buffer += chunk
        *lines, buffer = buffer.split(b"\n")
        for line in lines:
            on_line(line)


def describe(command: protocol.Command) -> str:
    """A command as the log names it: "a stop (save first)", "a sample request"."""
    if isinstance(command, protocol.Stop):
        return "a stop (save first)" if command.save else "a stop (no save)"
    if isinstance(command, protocol.Save):
        return "a save request"
    if isinstance(command, protocol.SampleRequest):
        return "a sample request"
    return f"a {command.__class__.__name__} command"


class CommandQueue:
    def __init__(self, emitter: Emitter) -> None:
        self._queue: queue.Queue[protocol.Command] = queue.Queue()
        self._emitter = emitter

    def put(self, command: protocol.Command) -> None:
        self._queue.put(command)

    def drain(self) -> list[protocol.Command]:
        out = []
        while True:
            try:
                out.append(self._queue.get_nowait())
            except queue.Empty:
                return out

    def _handle_line(self, line: bytes, source: str) -> None:
        if not line.strip():
            return
        try:
            command = protocol.decode_command(line)
        except protocol.ProtocolError as exc:
            self._emitter.log(f"ignored a malformed command from {source}: {exc}", level="warning")
            return
        self._emitter.log(f"received {describe(command)} from {source}", level="debug")
        self.put(command)

    def _read_lines(self, fd: int, source: str) -> None:
        read_lines(fd, lambda line: self._handle_line(line, source))

    def read_stdin(self, fd: int = 0) -> threading.Thread:
        def loop() -> None:
            self._read_lines(fd, "the console that started the run")
            if self._emitter.finished:  # a stopped run's console moving on: nothing goes on
                return
            self._emitter.log(
                "the console that started this run has let go of it (it quit, detached or lost its terminal); training goes on",
                level="debug",
            )

        thread = threading.Thread(target=loop, name="commands-stdin", daemon=True)
        thread.start()
        return thread

    def read_fifo(self, path: Path) -> threading.Thread:
        # Open the read end without blocking, then hold a write end ourselves: with a writer always
        # present, a console closing its end never gives us EOF, and reads simply block for more.
        rfd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
        wfd = os.open(path, os.O_WRONLY)
        flags = fcntl.fcntl(rfd, fcntl.F_GETFL)
        fcntl.fcntl(rfd, fcntl.F_SETFL, flags & ~os.O_NONBLOCK)

        def loop() -> None:
            self._read_lines(rfd, "the control FIFO")

        thread = threading.Thread(target=loop, name="commands-fifo", daemon=True)
        thread.start()
        thread.keepalive_fd = wfd  # type: ignore[attr-defined]
        return thread
