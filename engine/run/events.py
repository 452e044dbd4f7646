"""Where the engine's events go: the stdout pipe (while a console listens) and the run's
events.jsonl (always). Both get the same bytes; the file is the history any console can replay.
"""

from __future__ import annotations

import contextlib
import os
import sys
import threading
import time
from pathlib import Path
from typing import BinaryIO, Protocol

from engine import protocol


class Sink(Protocol):
    def write(self, line: bytes) -> None: ...
    def close(self) -> None: ...


class PipeSink:
    """The console's pipe. When the console goes away (SSH drop, quit) writes fail with EPIPE:
    from then on the pipe is skipped and the run goes on, reachable through its events file."""

    def __init__(self, stream: BinaryIO) -> None:
        self._stream: BinaryIO | None = stream

    def write(self, line: bytes) -> None:
        if self._stream is None:
            return
        try:
            self._stream.write(line)
            self._stream.flush()
        except (BrokenPipeError, OSError, ValueError):
            self._stream = None

    def close(self) -> None:
        if self._stream is not None:
            with contextlib.suppress(OSError):
                self._stream.close()
            self._stream = None


class FileSink:
    """Appends to RUN_DIR/events.jsonl, a line per write so a follower sees each event at once.

    A full disk must not kill the run or tear the history: what could not be written (a whole line,
    or the rest of a short write) is kept and written first at the next event, once space is back
    (the engine frees a failed checkpoint's space before it reports the failure)."""

    def __init__(self, path: Path) -> None:
        self._fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        self._pending = bytearray()
        self._warned = False

    def write(self, line: bytes) -> None:
        self._pending += line
        self._flush()

    def _flush(self) -> None:
        while self._pending:
            try:
                written = os.write(self._fd, self._pending)
            except OSError as exc:
                if not self._warned:
                    self._warned = True
                    print(
                        f"events.jsonl: {exc.strerror}; keeping events until it can be written",
                        file=sys.stderr,
                    )
                return
            del self._pending[:written]

    def close(self) -> None:
        self._flush()
        os.close(self._fd)


class Emitter:
    """Stamps, encodes once and fans an event out to every sink. Thread-safe: the control
    readers log from their own threads."""

    def __init__(self, sinks: list[Sink]) -> None:
        self._sinks = sinks
        self._lock = threading.Lock()
        self._closed = False
        self.finished = False  # the run's Finished went out: nothing trains any more

    def emit(self, event: protocol.Message) -> None:
        if not event.time:
            import msgspec

            event = msgspec.structs.replace(event, time=time.time())
        line = protocol.encode(event)
        with self._lock:
            if self._closed:  # a reader thread logging after the run ended
                return
            for sink in self._sinks:
                sink.write(line)
            self.finished = self.finished or isinstance(event, protocol.Finished)

    def log(self, message: str, level: str = "info", source: str = "engine") -> None:
        self.emit(protocol.Log(level=level, message=message, source=source))  # type: ignore[arg-type]

    def close(self) -> None:
        with self._lock:
            self._closed = True
            for sink in self._sinks:
                sink.close()
